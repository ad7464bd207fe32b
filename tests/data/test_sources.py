"""Listing and reading folders, tar archives and idx files, on real files made in tmp_path (no Ray)."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile

import numpy as np
import pytest

from raytrain_ssl.data.sources import Reader, SourceError, class_folder, list_source


def write_idx(folder, prefix: str, images: np.ndarray, labels: np.ndarray | None, gz: bool) -> str:
    """MNIST's layout: `<prefix>-images-idx3-ubyte[.gz]` beside `<prefix>-labels-idx1-ubyte[.gz]`."""
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    count, rows, cols = images.shape
    name = f"{prefix}-images-idx3-ubyte{suffix}"
    with opener(folder / name, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, count, rows, cols) + images.astype(np.uint8).tobytes())
    if labels is not None:
        with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
            f.write(struct.pack(">II", 0x801, count) + labels.astype(np.uint8).tobytes())
    return name


def write_tar(path, members: dict[str, bytes], fmt=tarfile.PAX_FORMAT, mode: str = "w") -> None:
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def read_all(src, listing, scratch) -> dict[str, bytes]:
    data = Reader(str(src), str(scratch)).read(listing.entries)
    return {e["id"]: d for e, d in zip(listing.entries, data)}


def test_folder_lists_images_by_relative_path(tmp_path):
    src = tmp_path / "src"
    files = {"cat/a.jpg": b"A", "cat/deep/b.PNG": b"BB", "dog/c.jpeg": b"", "top.webp": b"T"}
    skipped = {"README.md": b"x", "cat/.hidden.jpg": b"x", "__MACOSX/cat/._a.jpg": b"x", "dog/l.csv": b""}
    for name, data in {**files, **skipped}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    listing = list_source(str(src), str(tmp_path / "scratch"))
    assert listing.kind == "folder"
    assert [e["id"] for e in listing.entries] == sorted(files)
    assert sorted(listing.ignored) == sorted(skipped)
    assert read_all(src, listing, tmp_path) == files
    # A URI reads the same folder.
    assert len(list_source(f"file://{src}", str(tmp_path / "scratch")).entries) == len(files)


def test_class_folder_is_the_first_folder_below_the_root():
    assert class_folder("cat/a.jpg") == "cat"
    assert class_folder("cat/deep/b.jpg") == "cat"
    assert class_folder("a.jpg") is None
    assert class_folder("train/cat/a.jpg", "train") == "cat"
    assert class_folder("train/a.jpg", "train") is None


@pytest.mark.parametrize(
    "fmt, mode",
    [
        (tarfile.PAX_FORMAT, "w"),
        (tarfile.GNU_FORMAT, "w:gz"),
        (tarfile.USTAR_FORMAT, "w:bz2"),
        (tarfile.PAX_FORMAT, "w:xz"),
    ],
)
def test_tar_members_read_back_by_byte_range(tmp_path, fmt, mode):
    long_dir = "d" * 90 + "/" + "e" * 40  # beyond the 100 characters of a plain header
    members = {
        "./train/cat/a.jpg": b"a" * 700,
        f"{long_dir}/long.png": b"long",
        "train/dog/b.png": b"b" * 513,
        "train/dog/empty.jpg": b"",
        "notes.txt": b"not listed",
    }
    archive = tmp_path / "images.tar"
    write_tar(archive, members, fmt, mode)
    listing = list_source(str(archive), str(tmp_path / "scratch"))
    assert listing.kind == "tar" and listing.rejected == []
    expected = {name.removeprefix("./"): data for name, data in members.items() if name != "notes.txt"}
    assert [e["id"] for e in listing.entries] == sorted(expected)
    assert listing.ignored == ["notes.txt"]
    assert read_all(archive, listing, tmp_path / "scratch") == expected
    assert bool(listing.scratch_files) == (mode != "w")  # only compressed archives are copied out


def test_damaged_archive_keeps_what_comes_before_the_damage(tmp_path):
    archive = tmp_path / "images.tar.gz"
    rng = np.random.default_rng(0)  # incompressible, so that the cut falls inside the members
    members = {f"img{i}.png": rng.bytes(200_000) for i in range(6)}
    write_tar(archive, members, mode="w:gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) * 2 // 3])
    listing = list_source(str(archive), str(tmp_path / "scratch"))
    assert listing.rejected and listing.rejected[0]["reason"].startswith("damaged archive")
    assert 1 <= len(listing.entries) < 6
    read = read_all(archive, listing, tmp_path / "scratch")
    complete = [k for k, v in read.items() if isinstance(v, bytes)]
    assert complete and all(read[k] == members[k] for k in complete)
    # The member the damage cut short reads as truncated, not as short bytes.
    assert all(isinstance(v, EOFError) for k, v in read.items() if k not in complete)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_records_and_labels(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2])
    name = write_idx(tmp_path, "train", images, labels, gz)
    listing = list_source(str(tmp_path / name), str(tmp_path / "scratch"))
    assert listing.kind == "idx"
    assert [e["id"] for e in listing.entries] == [f"idx:{name}:{i}" for i in range(7)]
    assert [e["idx_label"] for e in listing.entries] == labels.tolist()
    assert {(e["rows"], e["cols"]) for e in listing.entries} == {(5, 4)}
    read = read_all(tmp_path / name, listing, tmp_path / "scratch")
    assert [read[f"idx:{name}:{i}"] for i in range(7)] == [img.tobytes() for img in images]


def test_idx_folder_and_missing_labels(tmp_path):
    write_idx(tmp_path, "train", np.zeros((3, 2, 2)), np.array([0, 1, 2]), gz=True)
    write_idx(tmp_path, "t10k", np.ones((2, 2, 2)), None, gz=False)
    listing = list_source(str(tmp_path), str(tmp_path / "scratch"))
    assert [e["key"] for e in listing.entries] == [
        "t10k-images-idx3-ubyte/0",
        "t10k-images-idx3-ubyte/1",
        "train-images-idx3-ubyte.gz/0",
        "train-images-idx3-ubyte.gz/1",
        "train-images-idx3-ubyte.gz/2",
    ]
    assert [e["idx_label"] for e in listing.entries] == [None, None, 0, 1, 2]


def test_sources_that_cannot_be_listed(tmp_path):
    with pytest.raises(SourceError, match="SRC not found"):
        list_source(str(tmp_path / "missing"), str(tmp_path / "scratch"))
    (tmp_path / "model.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(SourceError, match="neither a folder"):
        list_source(str(tmp_path / "model.bin"), str(tmp_path / "scratch"))
    with gzip.open(tmp_path / "labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + b"\0" * 100)
    with pytest.raises(SourceError, match="neither a folder"):
        list_source(str(tmp_path / "labels-idx1-ubyte.gz"), str(tmp_path / "scratch"))
