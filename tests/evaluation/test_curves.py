"""Learning curves read back from real TensorBoard event files."""

from __future__ import annotations

from torch.utils.tensorboard import SummaryWriter

from raytrain_ssl.evaluation.curves import plot_curves, read_scalars


def _run(path, tag_values):
    writer = SummaryWriter(log_dir=str(path / "tensorboard"))
    for tag, values in tag_values.items():
        for step, value in enumerate(values, start=1):
            writer.add_scalar(tag, value, step * 10)
    writer.close()
    return path


def test_curves_come_from_the_event_files(tmp_path):
    pre = _run(tmp_path / "pre", {"train/loss": [6.0, 5.5, 5.0], "eval/knn_top1": [0.5, 0.7]})
    ft = _run(tmp_path / "ft", {"train/loss": [2.0, 1.0], "eval/val_top1": [0.4, 0.8]})
    assert read_scalars(pre, "eval/knn_top1") == ([10, 20], [0.5, 0.699999988079071])
    assert read_scalars(ft, "eval/knn_top1") == ([], [])  # an absent tag is no curve, not an error
    plot_curves({"pretrain": pre}, {"finetune": ft, "missing": tmp_path / "none"}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
