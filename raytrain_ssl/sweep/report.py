"""What a sweep leaves for people: results.csv / results.md (one row per trial), results.png (top-1
against label fraction, one line per model size, fine-tuned and distilled side by side), and HParams
summaries in every trial's TensorBoard run so TensorBoard's HParams tab compares trials."""

from __future__ import annotations

import csv
import json
from pathlib import Path

RESULTS = "results"
COLUMNS = ["phase", "method", "model", "params_m", "label_fraction", "labeled_images", "top1", "top5",
           "wall_s", "status", "hparams", "source", "key", "run_dir"]  # fmt: skip


def _pct(value) -> str:
    return f"{100 * value:.2f}" if isinstance(value, (int, float)) else "-"


def markdown_table(rows: list[dict]) -> str:
    """Fine-tuned, supervised and distilled rows by label fraction and model; pretraining's kNN first."""
    lines = [
        "| stage | model | params (M) | labels | top-1 % | top-5 % | wall (s) | status | from | settings |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sort_rows(rows):
        labels = f"{100 * r['label_fraction']:g}%" if r.get("label_fraction") is not None else "-"
        source = "/".join(Path(r["source"]).parts[-2:]) if r.get("source") else "-"  # <phase or run>/<run>
        settings = ", ".join(f"{k}={v}" for k, v in (r.get("hparams") or {}).items()) or "-"
        lines.append(
            f"| {r['method']} | {r['model']} | {r.get('params_m', '-')} | {labels} | {_pct(r.get('top1'))} | "
            f"{_pct(r.get('top5'))} | {r.get('wall_s', '-')} | {r.get('status', '-')} | {source} | {settings} |"
        )
    return "\n".join(lines)


def sort_rows(rows: list[dict]) -> list[dict]:
    order = {"pretrain": 0, "finetune": 1, "distill": 2}
    return sorted(rows, key=lambda r: (order[r["phase"]], r.get("label_fraction") or 0, r.get("params_m") or 0, r["key"]))


def write_results(root: Path, rows: list[dict]) -> None:
    rows = sort_rows(rows)
    (root / f"{RESULTS}.json").write_text(json.dumps(rows, indent=2))
    (root / f"{RESULTS}.md").write_text(markdown_table(rows) + "\n")
    with open(root / f"{RESULTS}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "hparams": json.dumps(row.get("hparams") or {})})
    plot_results(rows, root / f"{RESULTS}.png")


def best_rows(rows: list[dict], method: str) -> dict[str, list[tuple[float, float]]]:
    """For one method: line label -> [(label fraction, best top-1)], the best over the swept settings."""
    best: dict[tuple[str, float], float] = {}
    for r in rows:
        if r["method"] != method or r.get("top1") is None or r.get("label_fraction") is None:
            continue
        label = r["model"] if method != "distilled" else f"{r.get('teacher_model', '?')} -> {r['model']}"
        label = f"{label} ({r.get('params_m', '?')}M)"
        point = (label, r["label_fraction"])
        best[point] = max(best.get(point, 0.0), r["top1"])
    lines: dict[str, list[tuple[float, float]]] = {}
    for (label, fraction), top1 in sorted(best.items(), key=lambda kv: kv[0][1]):
        lines.setdefault(label, []).append((fraction, 100 * top1))
    return lines


def plot_results(rows: list[dict], path: Path) -> None:
    """Top-1 against label fraction: one line per model size; fine-tuned | distilled (+ baseline dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fine-tuned", "fine-tuned (dashed: supervised baseline)"), ("distilled", "distilled students")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (method, title) in zip(axes, panels):
        for label, points in best_rows(rows, method).items():
            xs, ys = zip(*points)
            line, = ax.plot(xs, ys, marker="o", label=label)
            if method == "fine-tuned":
                model = label.split(" (")[0]
                base = [p for lbl, p in best_rows(rows, "supervised baseline").items() if lbl.split(" (")[0] == model]
                if base:
                    bx, by = zip(*base[0])
                    ax.plot(bx, by, linestyle="--", marker="x", color=line.get_color(), alpha=0.7)
        fractions = sorted({r["label_fraction"] for r in rows if r.get("label_fraction") is not None})
        if fractions:
            ax.set_xscale("log")
            ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
            ax.minorticks_off()
        ax.set_xlabel("labeled fraction")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    axes[0].set_ylabel("top-1 accuracy (%)")
    fig.suptitle("sweep: top-1 by labeled fraction and model size (best setting per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hparams_of(row: dict) -> dict:
    """HParams-tab columns: the trial's identity plus every swept setting (numbers, strings, booleans)."""
    values = {"phase": row["phase"], "method": row["method"], "model": row["model"],
              "params_m": row.get("params_m") or 0.0, "label_fraction": row.get("label_fraction") or 0.0}  # fmt: skip
    for key, value in (row.get("hparams") or {}).items():
        values[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return values


def write_hparams(log_dir: Path, row: dict) -> None:
    """HParams summaries beside the run's own curves (same directory = same TensorBoard run), with the
    final top-1/top-5 as the metrics the HParams tab shows."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    metrics = {f"hparams/{name}": row[name] for name in ("top1", "top5", "wall_s") if row.get(name) is not None}
    exp, ssi, sei = hparams(hparams_of(row), metrics)
    writer = SummaryWriter(log_dir=str(log_dir))
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, 0)
    writer.close()
