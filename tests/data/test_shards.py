"""The shards job end to end on real files made here: bad files, modes, duplicates, labels, splits, idx.

Each `write_shards` runs a real Ray Data job on the shared `ray_local` session (a few seconds each).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_decode import bad_samples, encode, good_samples, rgb_image
from test_sources import write_idx, write_tar

from raytrain_ssl.cli import main
from raytrain_ssl.data.decode import decode_rgb
from raytrain_ssl.data.schema import MANIFEST_NAME, SHARD_SCHEMA
from raytrain_ssl.data.shards import (
    HELDOUT_DIR,
    IngestError,
    IngestOptions,
    _process_batch,
    shard_info,
    write_shards,
)


def read_shards(directory) -> pa.Table:
    files = sorted(directory.glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    assert all(t.schema.equals(SHARD_SCHEMA) for t in tables)
    return pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()


def manifest(directory) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


def rows_by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def wild(ray_local, tmp_path_factory):
    """A folder of class sub-folders holding every kind of good and bad file, ingested once."""
    src = tmp_path_factory.mktemp("wild")
    written = {}
    for cls, seed in (("cats", 0), ("dogs", 1)):
        for name, (data, _) in good_samples(seed).items():
            written[f"{cls}/{name}"] = data
    for name, (data, _) in bad_samples().items():
        written[f"dogs/{name}"] = data
    written["dogs/copy_of_cat.jpg"] = written["cats/rgb.jpg"]  # exact duplicate in another class
    written["cats/zz_again.png"] = written["cats/rgb.png"]  # and in the same class
    written["unsorted.jpg"] = encode(rgb_image(seed=5), "JPEG")  # no class folder: unlabeled
    written["cats/readme.txt"] = b"not listed at all"
    for name, data in written.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    out = tmp_path_factory.mktemp("wild_out") / "shards"
    summary = write_shards(str(src), str(out), IngestOptions(labels_from_folders=True))
    return src, out, written, summary


def test_bad_files_are_counted_skips_with_their_reason(wild):
    src, out, _, summary = wild
    rejected = {r["path"]: r["reason"] for r in manifest(out)["rejected"]}
    assert set(rejected) == {f"dogs/{name}" for name in bad_samples()}
    for name, (_, reason) in bad_samples().items():
        assert rejected[f"dogs/{name}"].startswith(reason), (name, rejected[f"dogs/{name}"])
    assert summary.rejected == len(bad_samples())


def test_good_files_all_present_with_labels_and_modes_normalised(wild):
    src, out, written, _ = wild
    m = manifest(out)
    rows = rows_by_id(read_shards(out))
    good = set(written) - {f"dogs/{name}" for name in bad_samples()} - {"cats/readme.txt"}
    pairs = [{"dogs/copy_of_cat.jpg", "cats/rgb.jpg"}, {"cats/zz_again.png", "cats/rgb.png"}]
    # Every good file is there, except one of each duplicated pair.
    assert set(rows) <= good
    assert [len(pair - set(rows)) for pair in pairs] == [1, 1]
    assert len(rows) == len(good) - 2
    assert m["classes"] == ["cats", "dogs"]
    for id_, row in rows.items():
        expected = None if "/" not in id_ else m["classes"].index(id_.split("/")[0])
        assert row["label"] == expected, id_
        img = decode_rgb(row["image"])
        assert (img.width, img.height) == (row["width"], row["height"]) == (40, 30)
    for name, (data, reencode) in good_samples(1).items():
        stored = rows[f"dogs/{name}"]["image"]
        assert (stored != data) == reencode, name
    assert rows["dogs/cmyk.jpg"]["image"][:3] == b"\xff\xd8\xff"  # a JPEG stays a JPEG
    assert Image.open(io.BytesIO(rows["dogs/sixteen.png"]["image"])).format == "PNG"
    # Greyscale sources stay one channel when re-encoded; colour ones become RGB.
    modes = {name: Image.open(io.BytesIO(rows[f"dogs/{name}"]["image"])).mode for name in good_samples()}
    assert modes["sixteen.png"] == modes["la.png"] == modes["grey.jpg"] == "L"
    assert modes["cmyk.jpg"] == modes["palette_alpha.png"] == modes["rgba.png"] == "RGB"


def test_duplicates_dropped_and_manifest_counts(wild):
    src, out, written, summary = wild
    m = manifest(out)
    dups = {d["path"]: d["duplicate_of"] for d in m["duplicates"]}
    assert len(dups) == 2 == m["num_duplicates"] == summary.duplicates
    pairs = [{"dogs/copy_of_cat.jpg", "cats/rgb.jpg"}, {"cats/zz_again.png", "cats/rgb.png"}]
    assert sorted(map(sorted, ({k, v} for k, v in dups.items()))) == sorted(map(sorted, pairs))
    table = read_shards(out)
    assert len(set(table["hash"].to_pylist())) == table.num_rows
    assert m["num_images"] == table.num_rows == summary.images
    assert m["total_bytes"] == sum(len(b) for b in table["image"].to_pylist())
    assert sum(m["class_counts"].values()) + m["num_unlabeled"] == table.num_rows
    assert m["num_unlabeled"] == 1
    assert m["ignored_files"]["count"] == 1 and m["heldout_dir"] is None


def test_tar_with_heldout_folder_subdir_resize_and_small_shards(ray_local, tmp_path):
    members = {}
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("bird", "cat"):
            for i in range(n):
                members[f"{split}/{cls}/{i:04d}.jpg"] = encode(rgb_image(seed=len(members)), "JPEG")
    members["train/cat/big.jpg"] = encode(rgb_image(200, 100), "JPEG")
    members["train/cat/big.png"] = encode(rgb_image(100, 300), "PNG")
    members["train/bird/leak.jpg"] = members["test/cat/0001.jpg"]  # a copy of a held-out image
    members["extra/elsewhere.jpg"] = encode(rgb_image(seed=9), "JPEG")  # outside --subdir
    archive = tmp_path / "images.tar.gz"
    write_tar(archive, members, mode="w:gz")
    out = tmp_path / "out"
    options = IngestOptions(
        labels_from_folders=True, subdir="train", holdout_folder="test", image_size=64, shard_size_mb=4000 / 2**20
    )
    summary = write_shards(str(archive), str(out), options)

    train, held = read_shards(out), read_shards(out / HELDOUT_DIR)
    assert sorted(held["id"].to_pylist()) == sorted(k for k in members if k.startswith("test/"))
    expected_train = {k for k in members if k.startswith("train/")} - {"train/bird/leak.jpg"}
    assert set(train["id"].to_pylist()) == expected_train
    m, mh = manifest(out), manifest(out / HELDOUT_DIR)
    assert m["classes"] == mh["classes"] == ["bird", "cat"]
    assert m["duplicates"] == [{"path": "train/bird/leak.jpg", "duplicate_of": "test/cat/0001.jpg"}]
    assert mh["class_counts"] == {"bird": 3, "cat": 3}
    assert m["class_counts"] == {"bird": 6, "cat": 8}
    rows = rows_by_id(train)
    for id_, row in rows.items():
        assert row["label"] == ["bird", "cat"].index(id_.split("/")[1])
        assert decode_rgb(row["image"]).size == (row["width"], row["height"])
    assert (rows["train/cat/big.jpg"]["width"], rows["train/cat/big.jpg"]["height"]) == (64, 32)
    assert rows["train/cat/big.jpg"]["image"][:3] == b"\xff\xd8\xff"
    assert (rows["train/cat/big.png"]["width"], rows["train/cat/big.png"]["height"]) == (21, 64)
    assert rows["train/cat/big.png"]["image"][:4] == b"\x89PNG"
    assert rows["train/bird/0000.jpg"]["image"] == members["train/bird/0000.jpg"]  # small: untouched
    # Shards honour the size: each holds at most one image beyond the limit, and all but the last reach it.
    shards = m["shards"]
    assert len(shards) > 3 and all(s["bytes"] >= 4000 for s in shards[:-1])
    assert [s["rows"] for s in shards] == [pq.read_metadata(out / s["file"]).num_rows for s in shards]
    assert summary.images == len(expected_train) + 6
    assert not (out / "_scratch").exists()


def test_idx_round_trip_holdout_ids_and_determinism(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 40)
    images[39] = images[0]  # a copy of a held-out image: the training copy goes
    src = tmp_path / "fmnist"
    src.mkdir()
    name = write_idx(src, "train", images, labels, gz=True)
    held = {f"idx:{name}:{i}" for i in (0, 1, 2)}
    options = IngestOptions(holdout_ids=frozenset(held | {"idx:nope:1"}))
    write_shards(str(src / name), str(tmp_path / "a"), options)
    write_shards(str(src / name), str(tmp_path / "b"), options)

    table, heldout = read_shards(tmp_path / "a"), read_shards(tmp_path / "a" / HELDOUT_DIR)
    assert table.equals(read_shards(tmp_path / "b"))  # same input, same shards, same order
    assert set(heldout["id"].to_pylist()) == held
    assert manifest(tmp_path / "a" / HELDOUT_DIR)["holdout_ids_not_found"] == ["idx:nope:1"]
    assert manifest(tmp_path / "a")["classes"] == [str(i) for i in range(labels.max() + 1)]
    rows = rows_by_id(pa.concat_tables([table, heldout]))
    assert len(rows) == 39
    for i in range(39):
        row = rows[f"idx:{name}:{i}"]
        assert row["label"] == labels[i] and (row["width"], row["height"]) == (28, 28)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), images[i])  # PNG, mode L


def test_order_is_shuffled_so_a_shard_mixes_classes(wild):
    _, out, _, _ = wild
    labels = read_shards(out)["label"].to_pylist()
    assert labels != sorted(labels, key=lambda x: -1 if x is None else x)


def test_an_unexpected_failure_is_a_reject_not_a_crash():
    class BrokenReader:
        def read(self, entries):
            return [object()] * len(entries)  # normalise cannot hash this

    entry = dict(
        id="a.jpg",
        key="a.jpg",
        store="src",
        container="/a.jpg",
        offset=None,
        size=1,
        rows=None,
        cols=None,
        idx_label=None,
        heldout=False,
        label=None,
    )
    out = _process_batch(pa.Table.from_pylist([entry]), BrokenReader(), IngestOptions())
    assert out["reason"][0].as_py().startswith("unexpected error (TypeError")


# -------------------------------------------------------------------------------------------------- CLI


def cli(*argv: str) -> int:
    return main(["shards", *argv])


def test_cli_missing_src_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli(str(tmp_path / "missing"), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SRC not found" in err
    assert not (tmp_path / "out").exists()
    assert cli(str(tmp_path), str(tmp_path / "out"), "--shard-size-mb", "0") == 2
    assert "shard_size_mb must be > 0" in capsys.readouterr().err


def test_cli_info_and_refusal_to_mix_shards(wild, capsys):
    src, out, _, _ = wild
    assert cli("--info", str(out)) == 0
    text = capsys.readouterr().out
    assert "cats" in text and "not an image 1" in text and "decompression bomb 1" in text
    assert cli("--info", str(out), "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info == shard_info(str(out)) and info["splits"]["train"]["num_duplicates"] == 2
    assert cli(str(src), str(out)) == 2
    assert "already holds shards" in capsys.readouterr().err
    with pytest.raises(IngestError):
        shard_info(str(src))


def test_cli_writes_shards(ray_local, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(encode(rgb_image(seed=i), "PNG"))
    assert cli(str(src), str(tmp_path / "out"), "--shard-size-mb", "1") == 0
    assert capsys.readouterr().out.startswith("wrote 3 images")
    assert manifest(tmp_path / "out")["num_unlabeled"] == 3
    assert cli(str(src), str(tmp_path / "out"), "--overwrite") == 0


def test_a_source_of_only_bad_files_is_all_skips_not_a_crash(ray_local, tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    for name, (data, _) in bad_samples().items():
        (src / name).write_bytes(data)
    out = tmp_path / "shards"
    summary = write_shards(str(src), str(out), IngestOptions())
    assert summary.rejected == len(bad_samples())
    assert {r["path"] for r in manifest(out)["rejected"]} == set(bad_samples())
