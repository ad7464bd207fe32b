"""Label-fraction subsets: which labeled images a fine-tuning run may use.

A subset is a text file of image ids, one per line (the way SimCLR publishes its 1% and 10% ImageNet
lists), with `#` comment lines recording how it was drawn. It is drawn class-balanced: every class keeps
the same fraction of its images (rounded half up), so a 10% subset of a skewed collection stays skewed the
same way. The draw depends only on (ids, labels, fraction, seed), never on file order, so two runs or two
teams that share a fraction and seed share the labels; the file itself can be passed back as input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raytrain_ssl.data.stream import parquet_files


class SubsetError(ValueError):
    """A subset that cannot be drawn or read; the message is one line."""


@dataclass(frozen=True)
class LabeledIndex:
    """Ids and labels of every labeled image of a shard directory (read from Parquet, no image decoded)."""

    ids: np.ndarray  # str
    labels: np.ndarray  # int64

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def class_counts(self) -> dict[int, int]:
        classes, counts = np.unique(self.labels, return_counts=True)
        return {int(c): int(n) for c, n in zip(classes, counts)}


def read_labeled_index(path: str) -> LabeledIndex:
    """Only the id and label columns are read; rows with a null label are left out."""
    ids, labels = [], []
    for file in parquet_files(path):
        table = pq.read_table(file, columns=["id", "label"])
        label = table.column("label").to_numpy(zero_copy_only=False)
        keep = ~np.isnan(label.astype(np.float64))
        ids.append(np.asarray(table.column("id").to_pylist(), dtype=object)[keep])
        labels.append(label[keep].astype(np.int64))
    if not ids or not sum(len(i) for i in ids):
        raise SubsetError(f"no labeled images in {path}: fine-tuning needs shards with labels")
    return LabeledIndex(ids=np.concatenate(ids), labels=np.concatenate(labels))


def per_class_count(class_size: int, fraction: float) -> int:
    """Images a class keeps: fraction of its size, rounded half up (Python's round() rounds half to even)."""
    return math.floor(class_size * fraction + 0.5)


def draw_balanced_subset(index: LabeledIndex, fraction: float, seed: int) -> list[str]:
    """Class-balanced subset of ids; raises SubsetError when a class would get no example."""
    if not 0 < fraction <= 1:
        raise SubsetError(f"label fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for cls, size in sorted(index.class_counts().items()):
        take = per_class_count(size, fraction)
        if take == 0:
            raise SubsetError(
                f"label fraction {fraction} leaves class {cls} ({size} images) with no example; "
                f"the smallest usable fraction here is {0.5 / min(index.class_counts().values()):.4g}"
            )
        # Sorting first makes the draw independent of the order the shards list the images in.
        members = np.sort(index.ids[index.labels == cls].astype(str))
        chosen += members[rng.permutation(size)[:take]].tolist()
    return sorted(chosen)


def write_subset(path: str | Path, ids: list[str], header: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {key}: {value}" for key, value in header.items()] + list(ids)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(path)  # never a half-written subset file
    return path


def read_subset(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SubsetError(f"label subset file not found: {path}")
    ids = [line.strip() for line in path.read_text().splitlines()]
    ids = [i for i in ids if i and not i.startswith("#")]
    if not ids:
        raise SubsetError(f"label subset file {path} lists no image id")
    return ids


def resolve_subset(
    train_path: str, fraction: float | None, subset_file: str | None, seed: int, out_file: Path
) -> tuple[list[str] | None, dict[int, int]]:
    """The ids a run trains on (None: every labeled image) and the per-class counts; the subset used
    is always written to `out_file`, so the run directory records exactly which labels it saw."""
    index = read_labeled_index(train_path)
    if subset_file is None and fraction is None:
        return None, index.class_counts()
    if subset_file is not None:
        ids = read_subset(subset_file)
        known = set(index.ids.astype(str).tolist())
        missing = [i for i in ids if i not in known]
        if missing:
            raise SubsetError(
                f"label subset {subset_file}: {len(missing)} of {len(ids)} ids are not labeled images of "
                f"{train_path} (first: {missing[0]})"
            )
        header = {"source": subset_file, "images": len(ids)}
    else:
        ids = draw_balanced_subset(index, fraction, seed)
        header = {"label_fraction": fraction, "seed": seed, "images": len(ids), "from": train_path}
    write_subset(out_file, ids, header)
    chosen = np.isin(index.ids.astype(str), np.asarray(ids))
    classes, counts = np.unique(index.labels[chosen], return_counts=True)
    return ids, {int(c): int(n) for c, n in zip(classes, counts)}
