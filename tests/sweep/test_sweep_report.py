"""The sweep's table, plot and HParams summaries, from rows of known values."""

from __future__ import annotations

import csv
import json

import pytest

from raytrain_ssl.sweep.report import best_rows, markdown_table, write_hparams, write_results


def _row(phase, method, model, params, fraction, top1, key, **extra):
    return {"phase": phase, "method": method, "model": model, "params_m": params, "label_fraction": fraction,
            "top1": top1, "top5": 0.99, "wall_s": 12.5, "status": "done", "key": key, "run_dir": f"/r/{key}",
            "source": f"/src/{key}", "hparams": extra.pop("hparams", {}), **extra}  # fmt: skip


ROWS = [
    _row("distill", "distilled", "small", 0.7, 0.1, 0.81, "d1", teacher_model="big"),
    _row("finetune", "fine-tuned", "big", 2.8, 0.1, 0.85, "f1", hparams={"optim.base_learning_rate": 0.1}),
    _row("finetune", "fine-tuned", "big", 2.8, 0.1, 0.80, "f2", hparams={"optim.base_learning_rate": 0.3}),
    _row("finetune", "fine-tuned", "big", 2.8, 0.01, 0.55, "f3"),
    _row("finetune", "fine-tuned", "small", 0.7, 0.1, 0.78, "f4"),
    _row("finetune", "supervised baseline", "big", 2.8, 0.1, 0.60, "b1"),
    _row("pretrain", "pretrained (kNN)", "big", 2.8, None, 0.90, "p1"),
]


def test_best_rows_take_the_best_setting_per_model_and_fraction():
    lines = best_rows(ROWS, "fine-tuned")
    assert lines == {"big (2.8M)": [(0.01, 55.00000000000001), (0.1, 85.0)], "small (0.7M)": [(0.1, 78.0)]}
    assert list(best_rows(ROWS, "distilled")) == ["big -> small (0.7M)"]


def test_results_files_hold_every_trial_in_stage_order(tmp_path):
    write_results(tmp_path, ROWS)
    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["key"] for r in table] == ["p1", "f3", "f4", "b1", "f1", "f2", "d1"]
    assert json.loads(table[4]["hparams"]) == {"optim.base_learning_rate": 0.1}
    assert set(table[0]) >= {"model", "params_m", "label_fraction", "phase", "top1", "top5", "wall_s", "source"}
    md = (tmp_path / "results.md").read_text()
    assert "| fine-tuned | big | 2.8 | 10% | 85.00 | 99.00 | 12.5 | done | src/f1 | optim.base_learning_rate=0.1 |" in md
    assert json.loads((tmp_path / "results.json").read_text())[0]["key"] == "p1"
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_markdown_marks_missing_values():
    row = dict(ROWS[1], top1=None, top5=None, status="stopped early", hparams={})
    assert "| - | - | 12.5 | stopped early |" in markdown_table([row])


def test_hparams_are_readable_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    write_hparams(tmp_path, ROWS[1])
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Scalars("hparams/top1")[0].value == pytest.approx(0.85)
    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["model"].string_value == "big"
    assert hparams["optim.base_learning_rate"].number_value == 0.1
    assert hparams["label_fraction"].number_value == 0.1
