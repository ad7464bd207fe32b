"""`raytrain-ssl pipeline`: the whole SimCLRv2 recipe in one command, and the table that judges it.

    pretrain (once) -> for each label fraction:
        class-balanced subset (one file, shared by every step below)
        supervised baseline from scratch on the subset
        linear probe of the pretrained encoder on the subset (offline, frozen features)
        fine-tune from head layer k on the subset
        distil the fine-tuned teacher into each student, on all images without labels
    -> results.md / results.csv / results.json / results.png in the pipeline directory

Every step is an ordinary stage run in `<storage_path>/<name>/<step>/`; a step whose result.json exists
is skipped, and one with checkpoints but no result is resumed, so re-running an interrupted pipeline
continues it. Every stage config is built and validated before the first step starts.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from raytrain_ssl.config import ConfigError, Section, apply_overrides, expand_alias, read_config_file, validate

log = logging.getLogger("raytrain_ssl.pipeline")

RESULTS = "results"


class RecipeConfig(Section):
    """The SimCLRv2 recipe's sections and chaining switches, shared by `pipeline` and `sweep` files."""

    name: str | None = Field(None, description="directory under storage_path")
    storage_path: str = Field("./runs", description="where the directory goes")
    label_fractions: list[float] = Field([0.1], min_length=1, description="fine-tune at each fraction")
    subset_seed: int = Field(0, description="seed of the class-balanced subsets")
    students: list[str] = Field([], description="models to distil into (empty: the pretrained model itself)")
    supervised_baseline: bool = Field(True, description="also train from scratch on each subset")
    distill_from_pretrained: bool = Field(
        False, description="start a student of the pretrained architecture from the pretrained encoder"
    )
    shared: dict = Field({}, description="config sections merged into every stage (e.g. data, ray)")
    pretrain: dict = Field({}, description="pretrain stage settings")
    finetune: dict = Field({}, description="fine-tune stage settings (also the supervised baseline's)")
    supervised: dict = Field({}, description="settings of the supervised baseline on top of finetune's")
    distill: dict = Field({}, description="distill stage settings")

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0 < v <= 1]
        if bad:
            raise ValueError("each label fraction must be in (0, 1]")
        return values


class PipelineConfig(RecipeConfig):
    stage: str = Field("pipeline", pattern="^pipeline$")
    linear_probe: bool = Field(True, description="also score a linear probe of the pretrained encoder")


@dataclass(frozen=True)
class Step:
    """One stage run of the pipeline."""

    key: str  # the step's directory name
    stage: str
    config: Section
    fraction: float | None = None


def load_pipeline(path: str | None, overrides: list[str]) -> PipelineConfig:
    raw = read_config_file(path) if path is not None else {}
    return validate(PipelineConfig, apply_overrides(raw, overrides))


def merge_sections(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_sections(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stage_config(
    pipe: RecipeConfig, stage: str, settings: dict, key: str, overrides: list[str], storage: Path | None = None
) -> Section:
    """A stage's config: shared sections, then the stage's settings, then the step's own keys; the run
    directory is `<storage>/<key>` (storage: the pipeline directory unless given)."""
    from raytrain_ssl.config import STAGE_CONFIGS

    storage = storage if storage is not None else pipeline_dir(pipe)
    raw = merge_sections(pipe.shared, settings)
    raw = merge_sections(raw, {"stage": stage, "ray": {"storage_path": str(storage), "name": key}})
    cls = STAGE_CONFIGS[stage]
    raw = apply_overrides(raw, [expand_alias(text, cls) for text in overrides])
    try:
        return validate(cls, raw)
    except ConfigError as exc:
        raise ConfigError(f"{pipe.stage} step {key}: {exc}") from None


def recipe_dir(recipe: RecipeConfig, default_name: str) -> Path:
    from raytrain_ssl.launch import resolve_run_paths
    from raytrain_ssl.config import RaySection

    ray_cfg = RaySection(storage_path=recipe.storage_path, name=recipe.name or default_name)
    return resolve_run_paths(ray_cfg, default_name).run_dir


def pipeline_dir(pipe: PipelineConfig) -> Path:
    return recipe_dir(pipe, "pipeline")


def fraction_tag(fraction: float) -> str:
    return f"{100 * fraction:g}pct"


def plan(pipe: PipelineConfig) -> list[Step]:
    """Every step, its config built and validated now (before any Ray work)."""
    root = pipeline_dir(pipe)
    pretrain = stage_config(pipe, "pretrain", pipe.pretrain, "pretrain", [])
    pretrained = str(root / "pretrain")
    steps = [Step("pretrain", "pretrain", pretrain)]
    students = pipe.students or [pretrain.model.name]
    for fraction in pipe.label_fractions:
        tag = fraction_tag(fraction)
        subset = str(subset_file(root, fraction))
        if pipe.supervised_baseline:
            settings = merge_sections(pipe.finetune, pipe.supervised)
            overrides = [f"label_subset={subset}", "pretrained=null", f"model.name={pretrain.model.name}"]
            steps.append(Step(f"{tag}-supervised", "finetune", stage_config(pipe, "finetune", settings, f"{tag}-supervised", overrides), fraction))
        overrides = [f"label_subset={subset}", f"pretrained={pretrained}"]
        steps.append(Step(f"{tag}-finetune", "finetune", stage_config(pipe, "finetune", pipe.finetune, f"{tag}-finetune", overrides), fraction))
        for student in students:
            key = f"{tag}-distill-{student}"
            overrides = [f"teacher={root / f'{tag}-finetune'}", f"student={student}"]
            if pipe.distill_from_pretrained and student == pretrain.model.name:
                overrides.append(f"init={pretrained}")
            steps.append(Step(key, "distill", stage_config(pipe, "distill", pipe.distill, key, overrides), fraction))
    return steps


def subset_file(root: Path, fraction: float) -> Path:
    return root / "subsets" / f"{fraction_tag(fraction)}.txt"


def write_subsets(pipe: RecipeConfig, finetune_cfg, root: Path | None = None) -> None:
    """One class-balanced subset file per fraction, drawn once and shared by every step of that fraction."""
    from raytrain_ssl.data.paths import resolve_data_paths
    from raytrain_ssl.data.subsets import SubsetError, draw_balanced_subset, read_labeled_index, write_subset

    root = root if root is not None else pipeline_dir(pipe)
    train = resolve_data_paths(finetune_cfg.data, str(root)).train
    index = read_labeled_index(train)
    for fraction in pipe.label_fractions:
        path = subset_file(root, fraction)
        if path.is_file():
            continue
        try:
            ids = draw_balanced_subset(index, fraction, pipe.subset_seed)
        except SubsetError as exc:
            raise ConfigError(f"config error: label_fractions: {exc}") from None
        write_subset(path, ids, {"label_fraction": fraction, "seed": pipe.subset_seed, "images": len(ids), "from": train})


def run_step(step: Step) -> dict:
    """Run one stage, or reuse its result: skip when finished, resume when interrupted."""
    import importlib

    run_dir = Path(step.config.ray.storage_path) / step.key
    result = run_dir / "result.json"
    if result.is_file():
        log.info("step %s: finished earlier, reusing %s", step.key, result)
        return json.loads(result.read_text())
    resume = run_dir.is_dir() and any(run_dir.glob("checkpoint_*"))
    log.info("step %s: %s", step.key, "resuming" if resume else "starting")
    return importlib.import_module(f"raytrain_ssl.stages.{step.stage}").run(step.config, resume=resume)


def probe_step(pipe: PipelineConfig, fraction: float) -> dict:
    """Linear probe of the pretrained encoder on the fraction's subset (cached in the pipeline dir)."""
    from raytrain_ssl.evaluation.offline import EvalRequest, evaluate_run

    root = pipeline_dir(pipe)
    out = root / "linear_probe" / f"{fraction_tag(fraction)}.json"
    if out.is_file():
        return json.loads(out.read_text())
    subset = subset_file(root, fraction)
    request = EvalRequest(str(root / "pretrain"), knn=False, linear_probe=True, label_subset=str(subset))
    results = evaluate_run(request)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


def run_pipeline(pipe: PipelineConfig) -> dict:
    from raytrain_ssl import launch

    steps = plan(pipe)
    root = pipeline_dir(pipe)
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.yaml").write_text(_yaml(pipe))
    finetune_cfg = next(s.config for s in steps if s.stage == "finetune")
    launch.connect(steps[0].config.ray)
    results = {"pretrain": run_step(steps[0])}
    write_subsets(pipe, finetune_cfg)
    for fraction in pipe.label_fractions:
        if pipe.linear_probe:
            results[f"{fraction_tag(fraction)}-linear_probe"] = probe_step(pipe, fraction)
        for step in (s for s in steps[1:] if s.fraction == fraction):
            results[step.key] = run_step(step)
    table = results_table(pipe, results)
    write_results(root, table)
    write_curves(root, steps)
    return {"pipeline_dir": str(root), "table": table}


def write_curves(root: Path, steps: list[Step]) -> None:
    """curves.png: every step's learning curves, read back from its TensorBoard events."""
    from raytrain_ssl.evaluation.curves import plot_curves

    dirs = {step.key: root / step.key for step in steps}
    pretrain = {key: path for key, path in dirs.items() if key == "pretrain"}
    classifiers = {key: path for key, path in dirs.items() if key != "pretrain"}
    plot_curves(pretrain, classifiers, root / "curves.png")


def results_table(pipe: PipelineConfig, results: dict) -> list[dict]:
    """One row per (label fraction, method): top-1 and top-5 on the validation split."""
    rows = []
    model = results["pretrain"].get("run_dir")
    for fraction in pipe.label_fractions:
        tag = fraction_tag(fraction)
        entries = []
        if f"{tag}-supervised" in results:
            entries.append(("supervised baseline", results[f"{tag}-supervised"], "val"))
        if f"{tag}-linear_probe" in results:
            entries.append(("linear probe", {"metrics": results[f"{tag}-linear_probe"]}, "linear_probe"))
        entries.append(("fine-tuned", results[f"{tag}-finetune"], "val"))
        for key in sorted(k for k in results if k.startswith(f"{tag}-distill-")):
            entries.append((f"distilled -> {key.removeprefix(f'{tag}-distill-')}", results[key], "val"))
        for method, result, prefix in entries:
            metrics = result.get("metrics", {})
            rows.append({
                "label_fraction": fraction,
                "labeled_images": results[f"{tag}-finetune"].get("labeled_images"),
                "method": method,
                "model": (result.get("spec") or {}).get("model_name", _pretrained_name(results["pretrain"])),
                "top1": metrics.get(f"{prefix}_top1"),
                "top5": metrics.get(f"{prefix}_top5"),
                "run_dir": result.get("run_dir", model),
            })  # fmt: skip
    return rows


def _pretrained_name(pretrain_result: dict) -> str:
    config = Path(pretrain_result.get("run_dir", "")) / "config.yaml"
    if config.is_file():
        import yaml

        return yaml.safe_load(config.read_text())["model"]["name"]
    return "?"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| labels | images | method | model | top-1 % | top-5 % |", "|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{100 * r['top1']:.2f}" if r["top1"] is not None else "-"
        top5 = f"{100 * r['top5']:.2f}" if r["top5"] is not None else "-"
        lines.append(f"| {100 * r['label_fraction']:g}% | {r['labeled_images']} | {r['method']} | {r['model']} | {top1} | {top5} |")
    return "\n".join(lines)


def write_results(root: Path, rows: list[dict]) -> None:
    (root / f"{RESULTS}.json").write_text(json.dumps(rows, indent=2))
    (root / f"{RESULTS}.md").write_text(markdown_table(rows) + "\n")
    with open(root / f"{RESULTS}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_results(rows, root / f"{RESULTS}.png")


def plot_results(rows: list[dict], path: Path) -> None:
    """Grouped bars: top-1 of every method at every label fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["label_fraction"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(fractions) * len(methods) / 2, 4))
    for i, method in enumerate(methods):
        values = [next((100 * (r["top1"] or 0) for r in rows if r["method"] == method and r["label_fraction"] == f), 0) for f in fractions]
        positions = [x + (i - (len(methods) - 1) / 2) * width for x in range(len(fractions))]
        bars = ax.bar(positions, values, width, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(fractions)), [f"{100 * f:g}% labels" for f in fractions])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("pretrain + fine-tune vs. baselines, by label fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _yaml(pipe: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(pipe.model_dump(mode="json"), sort_keys=False)
