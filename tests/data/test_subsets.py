"""Label-fraction subsets: class-balanced, deterministic, round-trip through their file."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain_ssl.data.subsets import (
    LabeledIndex,
    SubsetError,
    draw_balanced_subset,
    per_class_count,
    read_labeled_index,
    read_subset,
    resolve_subset,
    write_subset,
)


def _index(sizes: dict[int, int]) -> LabeledIndex:
    ids, labels = [], []
    for cls, size in sizes.items():
        ids += [f"c{cls}/img{i:04d}.png" for i in range(size)]
        labels += [cls] * size
    return LabeledIndex(np.asarray(ids, dtype=object), np.asarray(labels, dtype=np.int64))


SIZES = {0: 100, 1: 250, 2: 37, 3: 60}


@pytest.mark.parametrize("fraction", [0.1, 0.05, 0.5, 1.0])
def test_every_class_keeps_its_fraction(fraction):
    index = _index(SIZES)
    chosen = draw_balanced_subset(index, fraction, seed=3)
    per_class = Counter(int(i.split("/")[0][1:]) for i in chosen)
    for cls, size in SIZES.items():
        assert per_class[cls] == per_class_count(size, fraction)
        assert abs(per_class[cls] - fraction * size) <= 0.5
    assert len(set(chosen)) == len(chosen)


def test_draw_is_deterministic_and_order_independent():
    index = _index(SIZES)
    first = draw_balanced_subset(index, 0.1, seed=7)
    order = np.random.default_rng(0).permutation(len(index.ids))
    shuffled = LabeledIndex(index.ids[order], index.labels[order])
    assert draw_balanced_subset(shuffled, 0.1, seed=7) == first
    assert draw_balanced_subset(index, 0.1, seed=8) != first


def test_fraction_leaving_a_class_empty_is_an_error_naming_it():
    with pytest.raises(SubsetError, match=r"class 2 \(37 images\) with no example"):
        draw_balanced_subset(_index(SIZES), 0.01, seed=0)
    with pytest.raises(SubsetError, match="must be in"):
        draw_balanced_subset(_index(SIZES), 1.5, seed=0)


def test_subset_file_round_trips(tmp_path):
    ids = draw_balanced_subset(_index(SIZES), 0.1, seed=1)
    path = write_subset(tmp_path / "s" / "10pct.txt", ids, {"label_fraction": 0.1, "seed": 1})
    assert path.read_text().startswith("# label_fraction: 0.1\n# seed: 1\n")
    assert read_subset(path) == ids
    with pytest.raises(SubsetError, match="not found"):
        read_subset(tmp_path / "missing.txt")


def _shards(tmp_path, sizes, unlabeled=3):
    index = _index(sizes)
    labels = pa.array(index.labels.tolist() + [None] * unlabeled, pa.int64())
    ids = index.ids.tolist() + [f"u{i}" for i in range(unlabeled)]
    table = pa.table({"id": ids, "label": labels, "image": [b""] * len(ids)})
    pq.write_table(table, tmp_path / "shard-00000.parquet")
    return str(tmp_path)


def test_resolve_subset_from_shards_and_back_from_file(tmp_path):
    shards = _shards(tmp_path, SIZES)
    assert len(read_labeled_index(shards).ids) == sum(SIZES.values())  # unlabeled rows left out
    ids, counts = resolve_subset(shards, 0.1, None, 0, tmp_path / "run" / "subset.txt")
    assert counts == {c: per_class_count(n, 0.1) for c, n in SIZES.items()}
    again, counts_again = resolve_subset(shards, None, str(tmp_path / "run" / "subset.txt"), 99, tmp_path / "b.txt")
    assert again == ids and counts_again == counts
    everything, all_counts = resolve_subset(shards, None, None, 0, tmp_path / "c.txt")
    assert everything is None and all_counts == SIZES


def test_subset_with_unknown_ids_is_refused(tmp_path):
    shards = _shards(tmp_path, SIZES)
    bad = write_subset(tmp_path / "bad.txt", ["c0/img0000.png", "nope.png"], {})
    with pytest.raises(SubsetError, match="1 of 2 ids are not labeled images.*first: nope.png"):
        resolve_subset(shards, None, str(bad), 0, tmp_path / "out.txt")
