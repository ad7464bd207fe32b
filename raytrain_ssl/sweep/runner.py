"""`raytrain-ssl sweep`: the SimCLRv2 table for your data, as three Ray Tune phases chained by checkpoints.

    pretrain   one trial per model (x pretrain search)              -> <sweep>/pretrain/<key>
    finetune   every pretrained model x label fraction (x search),   -> <sweep>/finetune/<key>
               plus supervised baselines if asked; ASHA may stop the weak ones early
    distill    the best fine-tuned teacher of every (model, fraction) into every student -> <sweep>/distill/<key>
    -> results.csv / results.md / results.png / results.json, and HParams in every trial's TensorBoard run

Each trial is a Tune function trial that starts the stage's own Ray Train run (RAY.md: `Tuner(trainer)` is
gone in Train V2) and forwards its reports to Tune through `TuneReportCallback` (see launch.build_trainer).
Tune queues trials beyond `max_concurrent_trials`, which is capped to what the cluster can hold at once.
`--resume` restores each phase's Tune state (finished trials are not run again) and every trial reuses a
run that has its `trial.json`, or resumes one that has checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from raytrain_ssl.config import ConfigError, RaySection
from raytrain_ssl.stages.pipeline import fraction_tag, merge_sections, recipe_dir, write_subsets
from raytrain_ssl.sweep.config import SweepConfig, grid_points, tune_domain
from raytrain_ssl.sweep.report import write_results
from raytrain_ssl.sweep.trials import PHASES, SCRATCH, SELF, TRIAL_FILE, plan_trial, trial_main

log = logging.getLogger("raytrain_ssl.sweep")

SWEEP_FILE = "sweep.yaml"
# A trial's own process only waits on its Ray Train run: it needs (almost) no CPU (RAY.md).
TRIAL_CPU = 0.01


class SweepInterrupted(RuntimeError):
    """Tune stopped a phase before every trial ended (Ctrl+C / SIGINT / SIGUSR1); its state is saved."""


def sweep_dir(sweep: SweepConfig) -> Path:
    return recipe_dir(sweep, "sweep")


# ---------------------------------------------------------------- the axes of each phase

def _search_axes(sweep: SweepConfig, phase: str) -> dict:
    axes = dict(sweep.search.get(phase, {}))
    if sweep.num_samples > 1:
        axes["sample"] = list(range(sweep.num_samples))
    return axes


def phase_axes(sweep: SweepConfig, phase: str, chain: dict) -> dict:
    """The phase's axes in sweep-file form (lists are grids): chaining axes first, then the search."""
    if phase == "pretrain":
        fixed = {"model": [m for m in sweep.model_names() if m not in sweep.pretrained]}
    elif phase == "finetune":
        sources = list(chain) + ([f"{SCRATCH}{m}" for m in sweep.model_names()] if sweep.supervised_baseline else [])
        fixed = {"source": sources, "label_fraction": list(sweep.label_fractions)}
    else:
        fixed = {"teacher": list(chain), "student": list(sweep.students) or [SELF]}
    return {**fixed, **_search_axes(sweep, phase)}


def param_space(axes: dict) -> dict:
    return {key: tune_domain(spec) for key, spec in axes.items()}


def validate_plan(sweep: SweepConfig, root: Path) -> int:
    """Build and validate every trial's stage config before Ray starts; returns the number of trials."""
    count, (chain, _) = 0, given_pretrained(sweep)
    for phase in PHASES:
        next_chain = dict(chain) if phase == "pretrain" else {}
        for params in grid_points(phase_axes(sweep, phase, chain)):
            plan = plan_trial(sweep, root, phase, params, chain)
            next_chain[plan.key] = _chain_entry(plan.info, str(plan.run_dir))
            count += 1
        # Every fine-tuning of a pretrained model may be a teacher (at run time only the best of its group).
        chain = {k: v for k, v in next_chain.items() if v["pretrained"]} if phase == "finetune" else next_chain
    return count


def given_pretrained(sweep: SweepConfig) -> tuple[dict, list[dict]]:
    """The chain entries and table rows of the finished pretraining runs the sweep file names."""
    from raytrain_ssl.launch import RESULT_FILE, load_run_config
    from raytrain_ssl.sweep.trials import encoder_params

    chain, rows = {}, []
    for model, given in sweep.pretrained.items():
        run_dir = Path(given).expanduser().resolve()
        result = run_dir / RESULT_FILE
        if not result.is_file():
            raise ConfigError(f"config error: pretrained.{model}: {run_dir} is not a finished pretraining run (no {RESULT_FILE})")
        cfg = load_run_config(run_dir, "pretrain")
        if cfg.model.name != model:
            raise ConfigError(f"config error: pretrained.{model}: {run_dir} pretrained {cfg.model.name}, not {model}")
        summary = json.loads(result.read_text())
        metrics = summary.get("metrics", {})
        chain[model] = {"model": model, "run_dir": str(run_dir), "label_fraction": None, "pretrained": None}
        rows.append({"phase": "pretrain", "key": model, "method": "pretrained (given)", "model": model,
                     "params_m": round(encoder_params(model, cfg.use_small_image_stem) / 1e6, 3),
                     "label_fraction": None, "top1": metrics.get("knn_top1"), "top5": metrics.get("knn_top5"),
                     "wall_s": summary.get("wall_s"), "status": "given", "source": None, "hparams": {},
                     "run_dir": str(run_dir)})  # fmt: skip
    return chain, rows


def _chain_entry(info: dict, run_dir: str) -> dict:
    return {"model": info["model"], "run_dir": run_dir, "label_fraction": info["label_fraction"],
            "pretrained": info["source"] if info["method"] == "fine-tuned" else None}  # fmt: skip


# ---------------------------------------------------------------- Ray and Tune

def trial_ray_section(sweep: SweepConfig) -> RaySection:
    shared = sweep.shared.get("ray", {})
    return RaySection.model_validate(merge_sections(shared, sweep.trial.model_dump()))


def connect(sweep: SweepConfig) -> None:
    """Attach to the cluster, or start a local Ray that holds `max_concurrent_trials` trials + data tasks."""
    from raytrain_ssl import launch

    trial = trial_ray_section(sweep)
    at_once = trial.model_copy(update={"num_workers": trial.num_workers * sweep.max_concurrent_trials})
    launch.connect(at_once)
    launch.check_resources(trial)  # one trial must fit, or nothing ever runs
    warn_without_state_api()


def warn_without_state_api() -> None:
    """Ray Train frees the workers of a trial that Tune stops (ASHA, Ctrl+C) once its placement-group
    cleaner sees, through the dashboard's State API, that the run's controller is gone. Without the API
    those CPUs/GPUs stay taken, and later trials can wait on them for ever (seen in this project's tests)."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=10)
    except Exception as exc:  # the State API raises its own and connection errors alike
        log.warning("Ray's State API (its dashboard) is not reachable (%s): trials stopped early or interrupted "
                    "will keep their workers' resources; start Ray with its dashboard (ray[default])",
                    type(exc).__name__)  # fmt: skip


def concurrency(sweep: SweepConfig) -> int:
    """`max_concurrent_trials`, capped to the trials the cluster holds at once (the rest queue in Tune;
    more would start worker groups that wait for resources and retry without end, RAY.md)."""
    import ray

    from raytrain_ssl.launch import ray_address

    trial = trial_ray_section(sweep)
    total = ray.cluster_resources()
    reserve = 0 if ray_address(trial) else 1  # a local Ray keeps a CPU for Ray Data (launch.check_resources)
    fits = math.floor((total.get("CPU", 0) - reserve) / (trial.num_workers * trial.cpus_per_worker + TRIAL_CPU))
    if trial.gpus_per_worker:
        fits = min(fits, math.floor(total.get("GPU", 0) / (trial.num_workers * trial.gpus_per_worker)))
    if fits >= sweep.max_concurrent_trials:
        return sweep.max_concurrent_trials
    if ray_address(trial):  # a cluster's autoscaler adds nodes for trials that wait: keep the asked number
        log.warning("max_concurrent_trials=%d needs more than the cluster has now (%d trials fit); trials wait "
                    "for the autoscaler", sweep.max_concurrent_trials, fits)  # fmt: skip
        return sweep.max_concurrent_trials
    fits = max(fits, 1)  # check_resources already refused a local Ray that cannot hold one trial
    log.warning("max_concurrent_trials=%d does not fit this machine at once: running %d at a time, the rest queue",
                sweep.max_concurrent_trials, fits)  # fmt: skip
    return fits


def _scheduler(sweep: SweepConfig, phase: str):
    if phase != "finetune" or sweep.scheduler.name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = int(merge_sections(sweep.shared, sweep.finetune).get("train", {}).get("epochs", 60))
    return ASHAScheduler(time_attr="epoch", metric=sweep.metric, mode=sweep.mode, max_t=epochs,
                         grace_period=sweep.scheduler.grace_period, reduction_factor=sweep.scheduler.reduction_factor)  # fmt: skip


def run_phase(sweep: SweepConfig, root: Path, phase: str, chain: dict, resume: bool, at_once: int):
    """One Tune experiment at `<sweep>/tune/<phase>`; restored (finished trials kept) when resuming."""
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, sweep=sweep.model_dump(mode="json"), root=str(root), phase=phase, chain=chain),
        {"CPU": TRIAL_CPU},
    )
    path = root / "tune" / phase
    if resume and tune.Tuner.can_restore(str(path)):
        log.info("sweep %s: restoring %s (finished trials are kept)", phase, path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(phase_axes(sweep, phase, chain)),
            tune_config=tune.TuneConfig(scheduler=_scheduler(sweep, phase), max_concurrent_trials=at_once,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),  # fmt: skip
            run_config=tune.RunConfig(
                name=phase, storage_path=str(root / "tune"), verbose=0,
                # Tune's JSON/CSV logs let a restored phase report stopped trials' last metrics; its
                # TensorBoard logger is left out (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): every trial's Train
                # run writes its own curves and HParams, and Tune's copies would show each trial twice.
                callbacks=[SweepProgress(phase, sweep.metric, sweep.mode), JsonLoggerCallback(), CSVLoggerCallback()],
                failure_config=tune.FailureConfig(max_failures=0),  # Ray Train retries worker failures itself
            ),
        )  # fmt: skip
    return tuner.fit()


def unfinished_trials(path: Path) -> list[str]:
    """Trials the phase's saved Tune state has not ended. After an interruption Tune marks its trials
    TERMINATED in memory (the ResultGrid cannot tell), but the state it saved first, which `--resume`
    restores, still has them running or pending."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(path)).trials
    return [str(t) for t in trials if t.status not in ("TERMINATED", "ERROR")]


def _trial_name(trial) -> str:
    params = trial.config
    words = [str(params.get(k)) for k in ("model", "source", "teacher", "student") if k in params]
    if "label_fraction" in params:
        words.append(fraction_tag(float(params["label_fraction"])))
    return "-".join(words)[:80] + f"-{trial.trial_id}"


class SweepProgress(tune.Callback):
    """One line per trial event: done / running / pending / failed, and the best result so far."""

    def __init__(self, phase: str, metric: str, mode: str):
        # Pretraining trials are watched by the kNN top-1 of their encoder (higher is better).
        self.phase = phase
        self.metric, self.mode = ("knn_top1", "max") if phase == "pretrain" else (metric, mode)
        self.best: tuple[float, str] | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if not isinstance(value, (int, float)):
            return
        if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
            self.best = (float(value), str(trial))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trials, f"started {trial}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, f"finished {trial}", ended=trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, f"FAILED {trial}", ended=trial, failed=True)

    def _line(self, trials, event: str, ended=None, failed: bool = False) -> None:
        # The ending trial's status is updated after the callback: count it by the event instead.
        status = Counter(t.status for t in trials if t is not ended)
        done = status["TERMINATED"] + (ended is not None and not failed)
        errors = status["ERROR"] + (ended is not None and failed)
        best = f" | best {self.metric} {100 * self.best[0]:.2f}% ({self.best[1]})" if self.best else ""
        log.info("sweep %s: %s | %d/%d done, %d running, %d pending, %d failed%s", self.phase, event, done,
                 len(trials), status["RUNNING"], status["PENDING"], errors, best)  # fmt: skip


# ---------------------------------------------------------------- rows and chaining

def collect_rows(sweep: SweepConfig, root: Path, phase: str, chain: dict, grid) -> list[dict]:
    """One row per trial: its `trial.json` when it finished, else what Tune saw (stopped early / failed)."""
    rows = []
    for result in grid:
        plan = plan_trial(sweep, root, phase, result.config, chain)
        done = plan.run_dir / TRIAL_FILE
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        metrics = result.metrics or {}
        status = f"failed: {str(result.error).splitlines()[0][:120]}" if result.error else "stopped early"
        rows.append({"phase": phase, "key": plan.key, **plan.info, "top1": metrics.get("val_top1"),
                     "top5": metrics.get("val_top5"), "status": status, "run_dir": str(plan.run_dir)})  # fmt: skip
    return rows


def next_chain(sweep: SweepConfig, phase: str, rows: list[dict]) -> dict:
    """What the next phase starts from: every finished pretraining; the best finished fine-tuning (by the
    sweep's metric over the searched settings) of each (pretrained model, label fraction)."""
    done = [r for r in rows if r["status"] == "done"]
    if phase == "pretrain":
        return {r["key"]: _chain_entry(r, r["run_dir"]) for r in done}
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault((r["source"], r["label_fraction"]), []).append(r)
    best = (best_row(group, "fine-tuned", sweep.mode) for group in groups.values())
    return {r["key"]: _chain_entry(r, r["run_dir"]) for r in best if r is not None}


# ---------------------------------------------------------------- the command

def prepare_dir(sweep: SweepConfig, root: Path, resume: bool) -> None:
    """A fresh sweep needs a fresh directory; a resumed one must be the same sweep."""
    from raytrain_ssl.stages.pipeline import _yaml

    saved = root / SWEEP_FILE
    text = _yaml(sweep)
    if saved.is_file() and not resume:
        raise ConfigError(f"sweep directory {root} exists: pass --resume to continue it, or choose another name")
    if resume and not saved.is_file():
        raise ConfigError(f"--resume: {root} has no {SWEEP_FILE} (no sweep was started there)")
    if resume and saved.read_text() != text:
        raise ConfigError(f"--resume: the sweep file differs from the one {root} was started with ({saved})")
    root.mkdir(parents=True, exist_ok=True)
    saved.write_text(text)


def run_sweep(sweep: SweepConfig, resume: bool = False) -> dict:
    root = sweep_dir(sweep)
    trials = validate_plan(sweep, root)  # every config checked before Ray starts
    prepare_dir(sweep, root, resume)
    # Step reports carry no val_top1 (only epoch ends do): Tune's strict check would fail those trials.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    connect(sweep)
    at_once = concurrency(sweep)
    log.info("sweep %s: up to %d trials over 3 phases, %d at a time", root, trials, at_once)
    given, rows = given_pretrained(sweep)
    chain = {}
    for phase in PHASES:
        if phase == "finetune":
            write_subsets(sweep, _finetune_probe_config(sweep, root), root)
        if phase_axes(sweep, phase, chain)[{"pretrain": "model", "finetune": "source", "distill": "teacher"}[phase]]:
            grid = run_phase(sweep, root, phase, chain, resume, at_once)
            if unfinished_trials(root / "tune" / phase):
                raise SweepInterrupted(f"sweep interrupted during {phase}; continue it with: --resume (directory {root})")
            phase_rows = collect_rows(sweep, root, phase, chain, grid)
        elif phase == "pretrain":
            phase_rows = []  # every model was given pretrained
        else:
            log.warning("sweep %s: nothing to run (no finished trial to start from)", phase)
            continue
        rows += phase_rows
        chain = next_chain(sweep, phase, phase_rows)
        if phase == "pretrain":
            chain = {**given, **chain}
        write_results(root, rows)  # the table grows phase by phase
    return {"sweep_dir": str(root), "rows": rows, "exported": export_best(sweep, rows)}


def best_row(rows: list[dict], method: str, mode: str) -> dict | None:
    """The finished row of `method` with the best top-1 (the first of equals), or None."""
    done = [r for r in rows if r["method"] == method and r["status"] == "done" and r.get("top1") is not None]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r["top1"])


def export_best(sweep: SweepConfig, rows: list[dict]) -> dict[str, str]:
    """`export_programs: best`: the torch.export program of the best student and the best teacher, once
    (trials skip it: torch.export's compiler costs more than a tiny trial; see export.py). Returns
    method -> model.pt2 path."""
    from raytrain_ssl.export import export_finished_run
    from raytrain_ssl.launch import RESULT_FILE

    if sweep.export_programs != "best":
        return {}
    exported = {}
    for method in ("distilled", "fine-tuned"):
        best = best_row(rows, method, sweep.mode)
        if best is None:
            continue
        files = json.loads((Path(best["run_dir"]) / RESULT_FILE).read_text()).get("export", {})
        program = files.get("program")
        if not (program and Path(program).is_file()):  # a resumed sweep may have written it already
            files = export_finished_run(best["run_dir"])["export"]
        exported[method] = files["program"]
        log.info("sweep: best %s %s (top-1 %.2f%%), deployable: %s", method, best["key"], 100 * best["top1"],
                 files["program"])  # fmt: skip
    return exported


def _finetune_probe_config(sweep: SweepConfig, root: Path):
    """Any fine-tune config of this sweep: the subsets only need its data section."""
    from raytrain_ssl.stages.pipeline import stage_config

    return stage_config(sweep, "finetune", sweep.finetune, "subsets", ["pretrained=null"], root / "finetune")
