"""Listing and reading the images of a source: a folder, a tar archive or MNIST-style idx files.

A source is a local path or any URI pyarrow's filesystems read (`s3://...`, `gs://...`, `file://...`):

- a folder: every file with an image extension below it, at any depth; class sub-folders give labels
  when the caller asks (see `class_folder`);
- a tar archive, plain or compressed (gzip, bzip2, xz, zstd): every regular member with an image
  extension;
- idx files (the form MNIST and Fashion-MNIST ship in, plain or .gz): one `*-images-idx3-ubyte` file,
  or a folder holding several; labels come from the matching `*-labels-idx1-ubyte` file.

Listing runs on the driver and only reads headers; the image bytes are read later, in the Ray Data
tasks, by `Reader`. A compressed archive cannot be read by byte ranges, so it is first decompressed
once into a scratch folder (beside the output, where every node can read it).

Each listed entry is a flat dict (Ray Data turns a list of them into blocks):
    id         stable id: path relative to the source root, tar member name, or `idx:<file>:<index>`
    key        the path used for folders (sub-folder selection, class names): the id for files and tar
               members, `<file>/<index>` for idx records
    store      "src" or "scratch": which filesystem holds `container`
    container  path of the file holding the bytes on that filesystem
    offset     byte offset inside `container`, or None for a whole file
    size       number of bytes
    rows, cols raw 8-bit pixel shape for idx records, else None
    idx_label  the label an idx labels file gives, else None
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import os
import posixpath
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .webp .tif .tiff .ppm .pgm .pbm .pnm .ico .avif".split()
)
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_COPY_CHUNK = 16 * 1024 * 1024


class SourceError(Exception):
    """A source that cannot be listed at all (missing, unsupported); the message is one line."""


@dataclass
class Listing:
    """What a source holds, in the canonical order (sorted keys; idx: by file, then index)."""

    kind: str  # "folder" | "tar" | "idx"
    entries: list[dict]
    ignored: list[str] = field(default_factory=list)  # files skipped for their name, not their content
    scratch_files: list[str] = field(default_factory=list)  # decompressed copies, on the scratch fs
    rejected: list[dict] = field(default_factory=list)  # {"path", "reason"} found while listing


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path (relative ones too) or a URI."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise SourceError(f"cannot open {uri}: {exc}") from None


def class_folder(key: str, root: str = "") -> str | None:
    """The class of an image at `key` below `root`: its first folder there (torchvision's ImageFolder
    convention), or None for an image directly in `root`."""
    rel = key[len(root) + 1 :] if root else key
    head, sep, _ = rel.partition("/")
    return head if sep else None


def is_hidden(key: str) -> bool:
    """Dot files and macOS resource forks (`._x.jpg`, `__MACOSX/`) are not images of the collection."""
    return any(part.startswith(".") or part == "__MACOSX" for part in key.split("/"))


def has_image_extension(key: str) -> bool:
    return posixpath.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def list_source(src: str, scratch_dir: str) -> Listing:
    """List the images of `src`; compressed archives are decompressed into `scratch_dir` (a path or URI)."""
    fs, path = open_uri(src)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"SRC not found: {src}")
    if info.type == pafs.FileType.Directory:
        children = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        idx_files = sorted(c.path for c in children if c.is_file and _is_idx_images_name(c.base_name))
        if idx_files:
            return _list_idx(fs, idx_files, scratch_dir)
        return _list_folder(fs, path)
    compression = _compression(fs, path)
    head = _peek(fs, path, 512, compression)
    if head[257:262] == b"ustar":
        return _list_tar(fs, path, compression, scratch_dir)
    if len(head) >= 4 and struct.unpack(">I", head[:4])[0] == _IDX_IMAGES:
        return _list_idx(fs, [path], scratch_dir)
    raise SourceError(f"SRC is neither a folder, a tar archive nor an idx images file: {src}")


# ---------------------------------------------------------------------------------------------- folders


def _list_folder(fs: pafs.FileSystem, root: str) -> Listing:
    entries, ignored = [], []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if not info.is_file:
            continue
        key = info.path[len(root) :].lstrip("/")
        if is_hidden(key) or not has_image_extension(key):
            ignored.append(key)
            continue
        entries.append(_entry(key, key, "src", info.path, None, info.size))
    entries.sort(key=lambda e: e["key"])
    return Listing("folder", entries, sorted(ignored))


# ------------------------------------------------------------------------------------------------- tars


def _list_tar(fs: pafs.FileSystem, path: str, compression: str | None, scratch_dir: str) -> Listing:
    """Members by byte range, from one sequential pass (a compressed archive is copied out meanwhile)."""
    entries, ignored, rejected, scratch_files = [], [], [], []
    store, container = "src", path
    with contextlib.ExitStack() as stack:
        stream = _decompressing(stack.enter_context(_open_stream(fs, path)), compression)
        if compression:
            sfs, container = _scratch_path(scratch_dir, path)
            store, scratch_files = "scratch", [container]
            log.info("decompressing %s into %s", path, container)
            stream = _Tee(stream, stack.enter_context(sfs.open_output_stream(container, compression=None)))
        try:
            for name, offset, size, typeflag in _scan_tar(stream):
                key = posixpath.normpath("/" + name).lstrip("/")
                if typeflag in _TAR_FILE_TYPES and not is_hidden(key) and has_image_extension(key):
                    entries.append(_entry(key, key, store, container, offset, size))
                elif typeflag != b"5":  # directories are not worth a line
                    ignored.append(key)
        except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
            # A damaged archive still gives every member before the damage.
            reason = f"damaged archive after {len(entries)} images ({type(exc).__name__}: {exc})"
            log.warning("%s: %s", path, reason)
            rejected.append({"path": path, "reason": reason})
    entries.sort(key=lambda e: e["key"])
    return Listing("tar", entries, sorted(ignored), scratch_files, rejected)


_TAR_FILE_TYPES = (b"0", b"\0", b"7")
_TAR_BLOCK = 512
_SCAN_CHUNK = 256 * 1024  # small enough that damage at the end of an archive loses little


def _scan_tar(stream) -> Iterator[tuple[str, int, int, bytes]]:
    """(name, data offset, size, typeflag) of every member of a tar stream, read front to back.

    Faster than `tarfile` (which parses every field in Python, about 0.1 ms a member) and it never
    seeks, so it works on decompressing streams and object stores alike. Handles ustar prefixes, GNU
    long names and pax `path`/`size` records, which is what tar, Python and WebDataset tools write.
    """
    blocks = _SequentialReader(stream)
    offset, long_name, pax = 0, None, {}
    while True:
        header = blocks.read(offset, _TAR_BLOCK)
        if len(header) < _TAR_BLOCK or header.count(0) == _TAR_BLOCK:
            return  # end of archive (two zero blocks, or a stream that simply stops)
        stored = _tar_number(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ValueError(f"bad tar header checksum at byte {offset}")
        size, typeflag = _tar_number(header[124:136]), header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        data = offset + _TAR_BLOCK
        offset = data + -(-size // _TAR_BLOCK) * _TAR_BLOCK
        if typeflag == b"L":
            long_name = blocks.read(data, size).split(b"\0", 1)[0]
        elif typeflag == b"x":
            pax = _pax_records(blocks.read(data, size))
        elif typeflag in (b"g", b"K"):
            pass
        else:
            size = int(pax.get(b"size", size))
            name = pax.get(b"path", long_name or name)
            yield name.decode("utf-8", "surrogateescape"), data, size, typeflag
            offset = data + -(-size // _TAR_BLOCK) * _TAR_BLOCK
            long_name, pax = None, {}


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b" \0")
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    records, i = {}, 0
    while i < len(data) and data[i : i + 1].isdigit():
        length = int(data[i : data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1 : i + length - 1].partition(b"=")
        records[key] = value
        i += length
    return records


class _SequentialReader:
    """Reads a stream by absolute offsets that only move forward, in large chunks."""

    def __init__(self, stream):
        self.stream, self.buf, self.start = stream, b"", 0

    def read(self, offset: int, n: int) -> bytes:
        rel = offset - self.start
        if rel > len(self.buf):  # skip over member data we never keep
            gap = rel - len(self.buf)
            while gap > 0 and (chunk := self.stream.read(min(gap, _SCAN_CHUNK))):
                gap -= len(chunk)
            self.buf, self.start, rel = b"", offset, 0
        if rel + n > len(self.buf):
            parts = [self.buf[rel:]]
            have = len(parts[0])
            while have < n and (chunk := self.stream.read(max(_SCAN_CHUNK, n - have))):
                parts.append(chunk)
                have += len(chunk)
            self.buf, self.start, rel = b"".join(parts), offset, 0
        return self.buf[rel : rel + n]


class _Tee:
    """A read-only stream that copies everything read from it into `out`."""

    def __init__(self, stream, out):
        self.stream, self.out = stream, out

    def read(self, n: int) -> bytes:
        chunk = self.stream.read(n)
        self.out.write(chunk)
        return chunk


# -------------------------------------------------------------------------------------------------- idx


def _is_idx_images_name(name: str) -> bool:
    return "idx3-ubyte" in name and "images" in name


def _labels_name(images_name: str) -> str:
    return images_name.replace("images", "labels").replace("idx3", "idx1")


def _list_idx(fs: pafs.FileSystem, image_files: list[str], scratch_dir: str) -> Listing:
    entries, scratch_files = [], []
    for path in image_files:
        name = posixpath.basename(path)
        store, container, cfs = "src", path, fs
        if _compression(fs, path):
            cfs, container = _spool(fs, path, scratch_dir)
            store = "scratch"
            scratch_files.append(container)
        header = _peek(cfs, container, 16)
        magic, count, rows, cols = struct.unpack(">IIII", header) if len(header) == 16 else (0, 0, 0, 0)
        if magic != _IDX_IMAGES:
            raise SourceError(f"{path}: not an idx file of 8-bit images (magic {magic:#010x})")
        labels = _read_idx_labels(fs, posixpath.join(posixpath.dirname(path), _labels_name(name)))
        if labels is not None and len(labels) != count:
            raise SourceError(f"{path}: {count} images but {len(labels)} labels in its labels file")
        record = rows * cols
        for i in range(count):
            entry = _entry(f"idx:{name}:{i}", f"{name}/{i}", store, container, 16 + i * record, record)
            entry.update(rows=rows, cols=cols, idx_label=None if labels is None else labels[i])
            entries.append(entry)
    return Listing("idx", entries, [], scratch_files)


def _read_idx_labels(fs: pafs.FileSystem, path: str) -> bytes | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        log.warning("no labels file %s: idx images are unlabeled", path)
        return None
    with _open_stream(fs, path) as raw:
        data = _decompressing(raw, _compression(fs, path)).read()
    magic, count = struct.unpack(">II", data[:8]) if len(data) >= 8 else (0, 0)
    if magic != _IDX_LABELS or len(data) < 8 + count:
        raise SourceError(f"{path}: not an idx labels file")
    return data[8 : 8 + count]


# ----------------------------------------------------------------------------- compression and scratch


def _open_stream(fs: pafs.FileSystem, path: str):
    # compression=None: pyarrow would otherwise guess from the extension and decompress behind our back.
    return fs.open_input_stream(path, compression=None, buffer_size=1 << 20)


def _peek(fs: pafs.FileSystem, path: str, n: int, compression: str | None = None) -> bytes:
    """The first `n` bytes of `path`, after decompression when `compression` is given."""
    with _open_stream(fs, path) as raw:
        try:
            return _decompressing(raw, compression).read(n)
        except (OSError, EOFError, lzma.LZMAError):
            return b""


def _compression(fs: pafs.FileSystem, path: str) -> str | None:
    head = _peek(fs, path, 6)
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def _decompressing(raw, compression: str | None):
    if compression is None:
        return raw
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "bz2":
        return bz2.BZ2File(raw)
    if compression == "xz":
        return lzma.LZMAFile(raw)
    return pa.CompressedInputStream(raw, "zstd")


def _scratch_path(scratch_dir: str, path: str) -> tuple[pafs.FileSystem, str]:
    sfs, sdir = open_uri(scratch_dir)
    sfs.create_dir(sdir, recursive=True)
    return sfs, posixpath.join(sdir, posixpath.basename(path) + ".raw")


def _spool(fs: pafs.FileSystem, path: str, scratch_dir: str) -> tuple[pafs.FileSystem, str]:
    """Decompress `path` into `scratch_dir` once, so that tasks can read it by byte ranges."""
    sfs, target = _scratch_path(scratch_dir, path)
    log.info("decompressing %s into %s", path, target)
    try:
        with _open_stream(fs, path) as raw, sfs.open_output_stream(target, compression=None) as out:
            stream = _decompressing(raw, _compression(fs, path))
            while chunk := stream.read(_COPY_CHUNK):
                out.write(chunk)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise SourceError(f"cannot decompress {path}: {exc}") from None
    return sfs, target


def _entry(id_: str, key: str, store: str, container: str, offset: int | None, size: int) -> dict:
    return dict(
        id=id_,
        key=key,
        store=store,
        container=container,
        offset=offset,
        size=size,
        rows=None,
        cols=None,
        idx_label=None,
    )


# -------------------------------------------------------------------------------------------- reading


class Reader:
    """Reads entries' bytes inside Ray Data tasks; picklable (holds the two filesystems)."""

    def __init__(self, src: str, scratch_dir: str, threads: int = 8):
        self.filesystems = {"src": open_uri(src)[0], "scratch": open_uri(scratch_dir)[0]}
        self.threads = threads

    def read(self, entries: list[dict]) -> list[bytes | Exception]:
        """Bytes of each entry, or the exception that reading it raised (a bad file is not a crash)."""
        results: list[bytes | Exception] = [b""] * len(entries)
        whole = [i for i, e in enumerate(entries) if e["offset"] is None]
        ranged: dict[tuple[str, str], list[int]] = {}
        for i, e in enumerate(entries):
            if e["offset"] is not None:
                ranged.setdefault((e["store"], e["container"]), []).append(i)
        for (store, container), indices in ranged.items():
            try:
                with self.filesystems[store].open_input_file(container) as f:
                    for i in sorted(indices, key=lambda i: entries[i]["offset"]):  # front to back
                        data = f.read_at(entries[i]["size"], entries[i]["offset"])
                        short = len(data) < entries[i]["size"]
                        results[i] = EOFError("the file ends inside this record") if short else data
            except OSError as exc:
                for i in indices:
                    results[i] = exc
        if whole and not isinstance(self.filesystems["src"], pafs.LocalFileSystem):
            # Object stores answer each file after a round trip: read several at once.
            with ThreadPoolExecutor(min(self.threads, len(whole))) as pool:
                for i, data in zip(whole, pool.map(lambda i: self._read_file(entries[i]), whole)):
                    results[i] = data
        else:
            for i in whole:
                results[i] = self._read_file(entries[i])
        return results

    def _read_file(self, entry: dict) -> bytes | Exception:
        try:
            with self.filesystems[entry["store"]].open_input_stream(entry["container"], compression=None) as f:
                return f.read()
        except OSError as exc:
            return exc
