"""`raytrain-ssl shards`: turn a non-curated image collection into Parquet shards (see `schema.py`).

The job, in four steps:
1. list the source on the driver (`sources.list_source`: names, sizes and byte ranges only);
2. assign each image its split (training or held-out) and its label, and put each split in a fixed
   pseudo-random order (by a hash of the id), so that a shard read front to back already mixes
   classes and sources: a streaming reader needs only a small shuffle buffer;
3. a Ray Data `map_batches` reads, validates and normalises the images in parallel tasks: a bad file
   becomes a row with a reason, never an exception;
4. the driver takes the results in that order (held-out split first), drops exact duplicates (the
   first in that order is kept, so the result is deterministic and training never holds a copy of a
   held-out image), writes shards of about `shard_size_mb` each and
   finally the manifest. Only encoded bytes reach the driver; the decoding work is spread over the
   cluster.

Bytes are kept as they are unless they must change: formats other than JPEG/PNG/WebP, modes other
than RGB/L (CMYK, palette, alpha, 16-bit, ...), and images above `image_size` are re-encoded to RGB, or
to L for greyscale sources (JPEG quality 95 when the source was a JPEG, lossless PNG otherwise). idx
records become greyscale PNGs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from raytrain_ssl.data.decode import DEFAULT_MAX_PIXELS, BadImageError, open_image, to_rgb
from raytrain_ssl.data.schema import MANIFEST_NAME, SHARD_SCHEMA
from raytrain_ssl.data.sources import Listing, Reader, SourceError, class_folder, list_source, open_uri

log = logging.getLogger(__name__)

HELDOUT_DIR = "heldout"  # OUT_DIR/heldout/: shards + manifest of the held-out split
SCRATCH_DIR = "_scratch"  # OUT_DIR/_scratch/: decompressed archives while the job runs
KEEP_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP"})
KEEP_MODES = frozenset({"RGB", "L"})
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
ITEMS_PER_TASK = 4000
BYTES_PER_TASK = 32 * 1024 * 1024
ROW_GROUP_BYTES = 8 * 1024 * 1024  # a reader that splits by row group gets parallelism from one shard

_RESULT_SCHEMA = pa.schema(
    [
        *SHARD_SCHEMA,
        pa.field("heldout", pa.bool_()),
        pa.field("reencoded", pa.bool_()),
        pa.field("reason", pa.string()),
    ]
)


class IngestError(Exception):
    """A setting or output directory that stops the job before it starts; the message is one line."""


@dataclass(frozen=True)
class IngestOptions:
    labels_from_folders: bool = False
    subdir: str | None = None  # only images under this folder of SRC; classes are its sub-folders
    holdout_folder: str | None = None  # images under this folder of SRC form the held-out split
    holdout_ids: frozenset[str] = frozenset()  # ids that form the held-out split
    shard_size_mb: float = 256.0
    image_size: int | None = None  # cap on the longer side; None keeps every size
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_size: int = 8  # images whose shorter side is below this are rejected
    num_tasks: int | None = None  # concurrent Ray Data tasks; None lets Ray Data decide
    overwrite: bool = False

    def __post_init__(self):
        rules = [
            ("shard_size_mb", self.shard_size_mb > 0, "> 0"),
            ("min_size", self.min_size >= 1, ">= 1"),
            (
                "image_size",
                self.image_size is None or self.image_size >= self.min_size,
                f">= min_size ({self.min_size})",
            ),
            ("max_pixels", self.max_pixels > 0, "> 0"),
            ("num_tasks", self.num_tasks is None or self.num_tasks >= 1, ">= 1"),
        ]
        for key, ok, allowed in rules:
            if not ok:
                raise IngestError(f"{key} must be {allowed}, got {getattr(self, key)}")


@dataclass
class SplitReport:
    """What one split's manifest says."""

    classes: list[str]
    class_counts: Counter = field(default_factory=Counter)
    num_unlabeled: int = 0
    num_reencoded: int = 0
    rejected: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(s["rows"] for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)


@dataclass
class IngestSummary:
    out_dir: str
    images: int
    rejected: int
    duplicates: int
    total_bytes: int
    seconds: float

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        return (
            f"wrote {self.images:,} images ({self.total_bytes / 1e6:,.1f} MB) to {self.out_dir}; "
            f"rejected {self.rejected:,}, duplicates {self.duplicates:,}; "
            f"{self.seconds:.1f} s, {rate:,.0f} images/s"
        )


def write_shards(src: str, out_dir: str, options: IngestOptions = IngestOptions()) -> IngestSummary:
    """Run the whole job; uses the Ray the caller started, else starts one with `ray.init()`."""
    start = time.perf_counter()
    src_fs, src_path = open_uri(src)
    if src_fs.get_file_info(src_path).type == pafs.FileType.NotFound:
        raise SourceError(f"SRC not found: {src}")
    out_fs, out_path = open_uri(out_dir)
    _prepare_out_dir(out_fs, out_path, options.overwrite)
    scratch = posixpath.join(out_dir.rstrip("/"), SCRATCH_DIR)
    try:
        listing = list_source(src, scratch)
        entries, classes, heldout_missing = _plan(listing, options)
        log.info("%s: %d images listed (%s), %d files ignored", src, len(entries), listing.kind, len(listing.ignored))
        reports = {False: SplitReport(classes), True: SplitReport(classes)}
        reports[False].rejected.extend(listing.rejected)
        shard_bytes = int(options.shard_size_mb * 1024 * 1024)
        writers = {
            False: _ShardWriter(out_fs, out_path, shard_bytes, reports[False].shards),
            True: _ShardWriter(out_fs, posixpath.join(out_path, HELDOUT_DIR), shard_bytes, reports[True].shards),
        }
        if entries:
            _collect(_process_in_ray(entries, src, scratch, options), writers, reports)
        for writer in writers.values():
            writer.close()
        # The main manifest goes last: its presence marks a finished job.
        common = {"source": src, "source_kind": listing.kind, "options": _options_json(options)}
        heldout = bool(options.holdout_folder or options.holdout_ids)
        if heldout:
            extra = {"split": "heldout", "holdout_ids_not_found": heldout_missing}
            _write_manifest(out_fs, posixpath.join(out_path, HELDOUT_DIR), reports[True], {**common, **extra})
        ignored = {"count": len(listing.ignored), "examples": listing.ignored[:20]}
        extra = {"split": "train", "heldout_dir": HELDOUT_DIR if heldout else None, "ignored_files": ignored}
        _write_manifest(out_fs, out_path, reports[False], {**common, **extra})
    finally:
        scratch_dir = posixpath.join(out_path, SCRATCH_DIR)
        if out_fs.get_file_info(scratch_dir).type != pafs.FileType.NotFound:
            out_fs.delete_dir(scratch_dir)
    both = reports.values()
    return IngestSummary(
        out_dir,
        sum(r.num_images for r in both),
        sum(len(r.rejected) for r in both),
        sum(len(r.duplicates) for r in both),
        sum(r.total_bytes for r in both),
        time.perf_counter() - start,
    )


def _process_in_ray(entries: list[dict], src: str, scratch: str, options: IngestOptions):
    """The Ray Data part: result batches (see `_RESULT_SCHEMA`), in the order of `entries`."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()  # a local Ray, or the cluster named by RAY_ADDRESS
    ds = ray.data.from_items(entries, override_num_blocks=_num_blocks(entries))
    ds = ds.map_batches(
        _process_batch,
        batch_size=None,  # one task per block of entries
        batch_format="pyarrow",
        fn_kwargs={"reader": Reader(src, scratch), "options": options},
        compute=ray.data.TaskPoolStrategy(size=options.num_tasks),
    )
    ds.context.execution_options.preserve_order = True  # the dedup keeps the first in this order
    return ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _num_blocks(entries: list[dict]) -> int:
    """Tasks big enough that Ray's per-task cost (tens of ms) stays small, yet enough to use every CPU."""
    import ray

    total = sum(e["size"] for e in entries)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = max(math.ceil(len(entries) / ITEMS_PER_TASK), math.ceil(total / BYTES_PER_TASK), 2 * cpus)
    return min(blocks, len(entries))


def _prepare_out_dir(fs: pafs.FileSystem, path: str, overwrite: bool) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise IngestError(f"OUT_DIR is a file: {path}")
    if info.type == pafs.FileType.Directory:
        ours = [
            i
            for i in fs.get_file_info(pafs.FileSelector(path))
            if i.base_name in (MANIFEST_NAME, HELDOUT_DIR, SCRATCH_DIR) or i.base_name.endswith(".parquet")
        ]
        if ours and not overwrite:
            raise IngestError(f"OUT_DIR already holds shards: {path} (pass --overwrite to replace them)")
        for i in ours:
            fs.delete_dir(i.path) if i.type == pafs.FileType.Directory else fs.delete_file(i.path)
    fs.create_dir(path, recursive=True)


def _under(key: str, folder: str | None) -> bool:
    return folder is not None and key.startswith(folder.strip("/") + "/")


def _plan(listing: Listing, options: IngestOptions) -> tuple[list[dict], list[str], list[str]]:
    """Entries in processing order (held-out first, each split shuffled by id) with split and label.

    Returns (entries, classes, held-out ids that were not found). Labels index the sorted class names;
    idx labels are kept as they are, with classes "0".."max".
    """
    held, train = [], []
    for entry in listing.entries:
        key = entry["key"]
        if _under(key, options.holdout_folder):
            root, heldout = options.holdout_folder.strip("/"), True
        elif options.subdir and not _under(key, options.subdir):
            continue
        else:
            root, heldout = (options.subdir or "").strip("/"), entry["id"] in options.holdout_ids
        name = class_folder(key, root) if options.labels_from_folders else None
        (held if heldout else train).append({**entry, "heldout": heldout, "class_name": name})
    entries = sorted(held, key=_order_key) + sorted(train, key=_order_key)
    if listing.kind == "idx":
        top = max((e["idx_label"] for e in entries if e["idx_label"] is not None), default=-1)
        classes = [str(i) for i in range(top + 1)]
        labels = [e["idx_label"] for e in entries]
    else:
        classes = sorted({e["class_name"] for e in entries if e["class_name"] is not None})
        index = {name: i for i, name in enumerate(classes)}
        labels = [index.get(e["class_name"]) for e in entries]
    for entry, label in zip(entries, labels):
        del entry["class_name"]
        entry["label"] = label
    found = {e["id"] for e in held}
    missing = sorted(options.holdout_ids - found)
    if missing:
        log.warning("%d held-out ids are not in the source, e.g. %s", len(missing), missing[0])
    return entries, classes, missing


def _order_key(entry: dict) -> bytes:
    """A pseudo-random but fixed place for each id; adding files does not move the others."""
    return hashlib.blake2b(entry["id"].encode(), digest_size=8).digest()


# ---------------------------------------------------------------------------------- in Ray Data tasks


def _process_batch(batch: pa.Table, reader: Reader, options: IngestOptions) -> pa.Table:
    entries = batch.to_pylist()
    columns: dict[str, list] = {name: [] for name in _RESULT_SCHEMA.names}
    for entry, data in zip(entries, reader.read(entries)):
        reason = None
        try:
            image, digest, width, height, reencoded = normalise(entry, data, options)
        except BadImageError as exc:
            reason = str(exc)
        except Exception as exc:  # a bug or an exotic failure must still not stop the job
            reason = f"unexpected error ({type(exc).__name__}: {exc})"
        if reason is not None:
            image, digest, width, height, reencoded = b"", "", 0, 0, False
        row = (entry["id"], image, entry["label"], digest, width, height, entry["heldout"], reencoded, reason)
        for name, value in zip(_RESULT_SCHEMA.names, row, strict=True):
            columns[name].append(value)
    return pa.table(columns, schema=_RESULT_SCHEMA)


def normalise(entry: dict, data: bytes | Exception, options: IngestOptions) -> tuple[bytes, str, int, int, bool]:
    """(image bytes, sha256 of the source bytes, width, height, re-encoded?) or `BadImageError`."""
    if isinstance(data, EOFError):
        raise BadImageError(f"truncated ({data})")
    if isinstance(data, Exception):
        raise BadImageError(f"unreadable ({type(data).__name__}: {data})")
    digest = hashlib.sha256(data).hexdigest()
    if entry["rows"] is not None:  # an idx record: raw 8-bit greyscale pixels
        img = Image.frombytes("L", (entry["cols"], entry["rows"]), data)
        img.format, img.info["source_size"] = "idx", img.size
    else:
        img = open_image(data, options.max_pixels, draft_size=options.image_size)
    width, height = img.info["source_size"]
    if min(width, height) < options.min_size:
        raise BadImageError(f"too small ({width}x{height}, shorter side below {options.min_size} px)")
    resize = options.image_size is not None and max(width, height) > options.image_size
    if not resize and img.format in KEEP_FORMATS and img.mode in KEEP_MODES:
        return data, digest, width, height, False
    out = to_rgb(img)
    if img.mode in _GREY_MODES:  # stays one channel: a third of the bytes, and decode_rgb expands it
        out = out.convert("L")
    if resize:
        out.thumbnail((options.image_size, options.image_size), Image.Resampling.LANCZOS)
    fmt = "JPEG" if img.format in ("JPEG", "MPO") else "PNG"
    return _encode(out, fmt), digest, out.width, out.height, True


def _encode(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


# ------------------------------------------------------------------------------------- on the driver


def _collect(batches, writers: dict, reports: dict) -> None:
    """Dedup by hash in processing order, count, log each bad file, hand the rest to the writers."""
    seen: dict[str, str] = {}
    for batch in batches:
        meta = batch.select(["id", "hash", "label", "heldout", "reencoded", "reason"]).to_pylist()
        keep = []
        for i, row in enumerate(meta):
            report = reports[row["heldout"]]
            if row["reason"] is not None:
                log.warning("skipped %s: %s", row["id"], row["reason"])
                report.rejected.append({"path": row["id"], "reason": row["reason"]})
            elif row["hash"] in seen:
                report.duplicates.append({"path": row["id"], "duplicate_of": seen[row["hash"]]})
            else:
                seen[row["hash"]] = row["id"]
                keep.append(i)
                if row["label"] is None:
                    report.num_unlabeled += 1
                else:
                    report.class_counts[report.classes[row["label"]]] += 1
                report.num_reencoded += row["reencoded"]
        kept = batch.take(pa.array(keep, pa.int64()))  # typed: an empty list would infer type null
        for flag, writer in writers.items():
            part = kept.filter(pc.equal(kept["heldout"], flag)) if kept.num_rows else kept
            writer.write(part.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))


class _ShardWriter:
    """Writes rows in order into `shard-NNNNN.parquet` files of about `shard_bytes` image bytes each."""

    def __init__(self, fs: pafs.FileSystem, directory: str, shard_bytes: int, shards: list[dict]):
        self.fs, self.directory, self.shard_bytes = fs, directory, max(1, shard_bytes)
        self.shards = shards  # filled with {"file", "rows", "bytes"}
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_bytes += pc.sum(pc.binary_length(table["image"])).as_py()
        while self.pending_bytes >= self.shard_bytes:
            table = pa.concat_tables(self.pending)
            sizes = np.cumsum(pc.binary_length(table["image"]).to_numpy())
            cut = int(np.searchsorted(sizes, self.shard_bytes)) + 1  # the row that fills the shard
            self._write_shard(table.slice(0, cut))
            rest = table.slice(cut)
            self.pending = [rest] if rest.num_rows else []
            self.pending_bytes = int(sizes[-1] - sizes[cut - 1])

    def close(self) -> None:
        if self.pending:
            self._write_shard(pa.concat_tables(self.pending))
            self.pending, self.pending_bytes = [], 0

    def _write_shard(self, table: pa.Table) -> None:
        name = f"shard-{len(self.shards):05d}.parquet"
        nbytes = pc.sum(pc.binary_length(table["image"])).as_py()
        rows_per_group = max(1, int(table.num_rows * ROW_GROUP_BYTES / max(nbytes, 1)))
        self.fs.create_dir(self.directory, recursive=True)
        pq.write_table(
            table.combine_chunks(),
            posixpath.join(self.directory, name),
            filesystem=self.fs,
            row_group_size=rows_per_group,
            # The image bytes are JPEG/PNG already: compressing them again only costs time.
            compression={
                "id": "zstd",
                "image": "none",
                "label": "zstd",
                "hash": "zstd",
                "width": "zstd",
                "height": "zstd",
            },
            use_dictionary=["label"],
            write_statistics=["id", "label", "width", "height"],
        )
        self.shards.append({"file": name, "rows": table.num_rows, "bytes": nbytes})


def _write_manifest(fs: pafs.FileSystem, directory: str, report: SplitReport, extra: dict) -> None:
    manifest = {
        **extra,
        "classes": report.classes,
        "num_images": report.num_images,
        "class_counts": {name: report.class_counts[name] for name in report.classes},
        "num_unlabeled": report.num_unlabeled,
        "total_bytes": report.total_bytes,
        "num_reencoded": report.num_reencoded,
        "shards": report.shards,
        "num_duplicates": len(report.duplicates),
        "duplicates": sorted(report.duplicates, key=lambda d: d["path"]),
        "num_rejected": len(report.rejected),
        "rejected": sorted(report.rejected, key=lambda r: r["path"]),
    }
    fs.create_dir(directory, recursive=True)
    with fs.open_output_stream(posixpath.join(directory, MANIFEST_NAME), compression=None) as out:
        out.write(json.dumps(manifest, indent=1).encode())


def _options_json(options: IngestOptions) -> dict:
    values = asdict(options)
    values["holdout_ids"] = len(options.holdout_ids)
    del values["overwrite"], values["num_tasks"]
    return values


def read_manifest(out_dir: str) -> dict:
    fs, path = open_uri(out_dir)
    try:
        with fs.open_input_stream(posixpath.join(path, MANIFEST_NAME), compression=None) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise IngestError(f"no {MANIFEST_NAME} in {out_dir}: not a shards directory") from None


def shard_info(out_dir: str) -> dict:
    """What `OUT_DIR` holds, from its manifest(s): counts, classes, sizes and rejects by reason."""
    manifest = read_manifest(out_dir)
    info = {
        "out_dir": out_dir,
        "source": manifest["source"],
        "classes": manifest["classes"],
        "splits": {"train": _split_info(manifest)},
    }
    if manifest.get("heldout_dir"):
        held = read_manifest(posixpath.join(out_dir.rstrip("/"), manifest["heldout_dir"]))
        info["splits"]["heldout"] = _split_info(held)
    return info


def _split_info(manifest: dict) -> dict:
    reasons = Counter(r["reason"].split(" (")[0] for r in manifest["rejected"])
    return {
        key: manifest[key]
        for key in (
            "num_images",
            "class_counts",
            "num_unlabeled",
            "total_bytes",
            "num_reencoded",
            "num_duplicates",
            "num_rejected",
        )
    } | {"num_shards": len(manifest["shards"]), "rejected_by_reason": dict(reasons.most_common())}
