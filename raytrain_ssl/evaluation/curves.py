"""Learning curves of finished runs as one PNG, read back from their TensorBoard event files (the same
numbers TensorBoard shows), for READMEs and reports where TensorBoard is not at hand."""

from __future__ import annotations

from pathlib import Path

# (panel title, tag, y label, scale to percent)
PANELS = [
    ("pretraining loss (NT-Xent)", "train/loss", "loss", False, "pretrain"),
    ("pretraining: kNN top-1 on held-out images", "eval/knn_top1", "top-1 %", True, "pretrain"),
    ("fine-tuning / distillation loss", "train/loss", "loss", False, "classifier"),
    ("fine-tuning / distillation: validation top-1", "eval/val_top1", "top-1 %", True, "classifier"),
]


def read_scalars(run_dir: str | Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar tag of a run's TensorBoard directory; empty when absent."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(run_dir) / "tensorboard"
    if not log_dir.is_dir():  # a step that never ran (stopped early, failed): no curve
        return [], []
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return [], []
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def plot_curves(pretrain: dict[str, Path], classifiers: dict[str, Path], out: Path) -> None:
    """2x2 panels: pretraining loss and kNN; fine-tune/baseline/distil loss and validation top-1.
    `pretrain` and `classifiers` map a legend label to a run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (title, tag, ylabel, percent, group) in zip(axes.flat, PANELS):
        runs = pretrain if group == "pretrain" else classifiers
        for label, run_dir in runs.items():
            steps, values = read_scalars(run_dir, tag)
            if steps:
                ax.plot(steps, [100 * v if percent else v for v in values], marker="o" if len(steps) < 30 else None,
                        markersize=3, label=label)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
