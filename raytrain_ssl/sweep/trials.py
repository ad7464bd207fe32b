"""One sweep trial: from Tune's parameters to a stage config, a stage run, and a row of the results table.

A trial's run directory is `<sweep dir>/<phase>/<key>`, the key built from its parameters, so the same
parameters always mean the same directory: a trial whose `trial.json` exists is reused (never run again),
one with checkpoints but no result is resumed by Ray Train, and the next phase finds its source by key.

Phases and their parameters (what Tune's grid and sampling produce):
    pretrain  {model, [sample], <search.pretrain keys>}
    finetune  {source: a pretrain key or "scratch-<model>", label_fraction, [sample], <search.finetune keys>}
    distill   {teacher: a finetune key, student: a model or "self", [sample], <search.distill keys>}
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from raytrain_ssl.stages.pipeline import Step, fraction_tag, merge_sections, run_step, stage_config, subset_file
from raytrain_ssl.sweep.config import SweepConfig

log = logging.getLogger("raytrain_ssl.sweep")

PHASES = ("pretrain", "finetune", "distill")
TRIAL_FILE = "trial.json"
SCRATCH = "scratch-"
SELF = "self"
FIXED_PARAMS = {"model", "source", "label_fraction", "teacher", "student", "sample"}


@dataclass(frozen=True)
class TrialPlan:
    phase: str
    step: Step  # key, stage, validated stage config, label fraction
    info: dict  # table columns known before the run: method, model, source, label_fraction, hparams

    @property
    def key(self) -> str:
        return self.step.key

    @property
    def run_dir(self) -> Path:
        return Path(self.step.config.ray.storage_path) / self.step.key


def search_values(params: dict) -> dict:
    """The swept settings of a trial (every parameter that is not a chaining one)."""
    return {k: v for k, v in params.items() if k not in FIXED_PARAMS}


def trial_key(parts: list[str], params: dict) -> str:
    """`r18_0.25x_sk0-10pct-base_learning_rate0.05`: readable, stable, safe as a directory name."""
    words = list(parts)
    for key, value in sorted(search_values(params).items()):
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        words.append(f"{key.rsplit('.', 1)[-1]}{text}")
    if "sample" in params:
        words.append(f"s{params['sample']}")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join(words))


def _overrides(params: dict, seed: int) -> list[str]:
    overrides = [f"{key}={json.dumps(value)}" for key, value in search_values(params).items()]
    if params.get("sample"):  # repeats of one grid point differ by seed
        overrides.append(f"train.seed={seed + int(params['sample'])}")
    return overrides


def _settings(sweep: SweepConfig, stage_settings: dict, classifier: bool = False) -> dict:
    """A stage's settings with the sweep's per-trial resources over everything else; a fine-tune or distill
    trial writes its torch.export program only with `export_programs: all` (the sweep exports its best)."""
    fixed = {"ray": sweep.trial.model_dump()}
    if classifier:
        fixed["export"] = {"program": sweep.export_programs == "all"}
    return merge_sections(stage_settings, fixed)


def plan_trial(sweep: SweepConfig, root: Path, phase: str, params: dict, chain: dict) -> TrialPlan:
    """The stage config of one trial. `chain` maps the previous phase's keys to what they produced:
    {key: {"model", "run_dir", "label_fraction", ...}} (pretrain keys for fine-tuning, fine-tune keys for
    distillation)."""
    planner = {"pretrain": _plan_pretrain, "finetune": _plan_finetune, "distill": _plan_distill}[phase]
    return planner(sweep, root, params, chain)


def _seed(sweep: SweepConfig, stage: str) -> int:
    return int(merge_sections(sweep.shared, getattr(sweep, stage)).get("train", {}).get("seed", 0))


def _plan_pretrain(sweep: SweepConfig, root: Path, params: dict, chain: dict) -> TrialPlan:
    model = params["model"]
    key = trial_key([model], params)
    overrides = [f"model.name={model}", *_overrides(params, _seed(sweep, "pretrain"))]
    cfg = stage_config(sweep, "pretrain", _settings(sweep, sweep.pretrain), key, overrides, root / "pretrain")
    info = {"method": "pretrained (kNN)", "model": model, "source": None, "label_fraction": None}
    return TrialPlan("pretrain", Step(key, "pretrain", cfg), {**info, "hparams": search_values(params)})


def _plan_finetune(sweep: SweepConfig, root: Path, params: dict, chain: dict) -> TrialPlan:
    source, fraction = params["source"], float(params["label_fraction"])
    key = trial_key([source, fraction_tag(fraction)], params)
    overrides = [f"label_subset={subset_file(root, fraction)}", *_overrides(params, _seed(sweep, "finetune"))]
    if source.startswith(SCRATCH):
        model, pretrained = source.removeprefix(SCRATCH), None
        settings = merge_sections(sweep.finetune, sweep.supervised)
        overrides += ["pretrained=null", f"model.name={model}"]
        method = "supervised baseline"
    else:
        model, pretrained = chain[source]["model"], chain[source]["run_dir"]
        settings = sweep.finetune
        overrides.append(f"pretrained={pretrained}")
        method = "fine-tuned"
    cfg = stage_config(sweep, "finetune", _settings(sweep, settings, classifier=True), key, overrides, root / "finetune")
    info = {"method": method, "model": model, "source": pretrained, "label_fraction": fraction}
    return TrialPlan("finetune", Step(key, "finetune", cfg, fraction), {**info, "hparams": search_values(params)})


def _plan_distill(sweep: SweepConfig, root: Path, params: dict, chain: dict) -> TrialPlan:
    teacher = chain[params["teacher"]]
    student = teacher["model"] if params["student"] == SELF else params["student"]
    key = trial_key([params["teacher"], "to", student], params)
    overrides = [f"teacher={teacher['run_dir']}", f"student={student}", *_overrides(params, _seed(sweep, "distill"))]
    pretrained = teacher.get("pretrained")
    if sweep.distill_from_pretrained and pretrained and student == teacher["model"]:
        overrides.append(f"init={pretrained}")
    cfg = stage_config(sweep, "distill", _settings(sweep, sweep.distill, classifier=True), key, overrides, root / "distill")
    fraction = teacher["label_fraction"]
    info = {"method": "distilled", "model": student, "source": teacher["run_dir"], "label_fraction": fraction,
            "teacher_model": teacher["model"]}  # fmt: skip
    return TrialPlan("distill", Step(key, "distill", cfg, fraction), {**info, "hparams": search_values(params)})


def run_trial(plan: TrialPlan) -> dict:
    """Run (or reuse, or resume) the trial's stage and return its table row; `trial.json` marks it done."""
    done = plan.run_dir / TRIAL_FILE
    if done.is_file():
        log.info("trial %s/%s: finished earlier, reusing it", plan.phase, plan.key)
        return json.loads(done.read_text())
    start = time.monotonic()
    summary = run_step(plan.step)
    row = make_row(plan, summary, wall_s=summary.get("wall_s", time.monotonic() - start))
    from raytrain_ssl.sweep.report import write_hparams

    write_hparams(plan.run_dir / "tensorboard", row)
    done.write_text(json.dumps(row, indent=2))
    return row


def make_row(plan: TrialPlan, summary: dict, wall_s: float) -> dict:
    metrics = summary.get("metrics", {})
    if plan.phase == "pretrain":
        top1, top5 = metrics.get("knn_top1"), metrics.get("knn_top5")
    else:
        top1, top5 = metrics.get("val_top1"), metrics.get("val_top5")
    cfg = plan.step.config
    return {
        "phase": plan.phase,
        "key": plan.key,
        **plan.info,
        "params_m": round(encoder_params(plan.info["model"], cfg.use_small_image_stem) / 1e6, 3),
        "labeled_images": summary.get("labeled_images"),
        "top1": top1,
        "top5": top5,
        "wall_s": round(float(wall_s), 1),
        "status": "done",
        "run_dir": str(plan.run_dir),
        "checkpoint": summary.get("checkpoint"),
    }


def encoder_params(model: str, small_image_stem: bool) -> int:
    """Encoder parameters, counted on the meta device (no memory, even for r152_3x)."""
    import torch

    from raytrain_ssl.models.registry import count_parameters, create_encoder

    with torch.device("meta"):
        return count_parameters(create_encoder(model, small_image_stem=small_image_stem))


def trial_main(params: dict, sweep: dict, root: str, phase: str, chain: dict) -> None:
    """The Tune trainable: runs in a Tune trial actor and starts the stage's own TorchTrainer there."""
    import logging as logging_module

    from ray import tune

    if not logging_module.getLogger().handlers:  # a Tune actor has no handler: show stage progress
        logging_module.basicConfig(level=logging_module.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    plan = plan_trial(SweepConfig.model_validate(sweep), Path(root), phase, params, chain)
    row = run_trial(plan)
    prefix = "knn" if phase == "pretrain" else "val"  # what top1/top5 are: kNN of the encoder, or validation
    tune.report({"trial_complete": 1, f"{prefix}_top1": row["top1"], f"{prefix}_top5": row["top5"],
                 "top1": row["top1"], "top5": row["top5"], "wall_s": row["wall_s"], "run_key": row["key"]})  # fmt: skip
