"""Turn the data section's strings into concrete shard locations, before any worker starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raytrain_ssl.config import ConfigError
from raytrain_ssl.data.builtin import is_builtin, materialize_builtin
from raytrain_ssl.data.stream import has_labels, parquet_files


@dataclass(frozen=True)
class DataPaths:
    train: str
    val: str | None  # labeled split scored by kNN / evaluation
    knn_bank: str | None  # labeled images the kNN looks up


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _check(key: str, path: str) -> str:
    try:
        parquet_files(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"config error: {key}: {exc}") from None
    return path


def resolve_data_paths(data_cfg, storage_path: str) -> DataPaths:
    """Builtins are written under `<storage_path>/datasets/` (shared by all nodes) on first use."""
    val, bank = data_cfg.val, data_cfg.knn_bank
    if is_builtin(data_cfg.train):
        try:
            splits = materialize_builtin(data_cfg.train, Path(storage_path) / "datasets")
        except ValueError as exc:
            raise ConfigError(f"config error: data.train: {exc}") from None
        train = str(splits["train"])
        val = val or str(splits["test"])
        bank = bank or train
    else:
        train = _check("data.train", _absolute(data_cfg.train))
        if bank is None and val is not None and has_labels(train):
            bank = train
    val = _check("data.val", _absolute(val)) if val else None
    bank = _check("data.knn_bank", _absolute(bank)) if bank else None
    return DataPaths(train=train, val=val, knn_bank=bank)
