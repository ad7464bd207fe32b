"""The sweep file: a recipe (as in `pipeline`) plus the axes to sweep, the resources of one trial and the
scheduler, validated in full before Ray starts.

    stage: sweep
    base: ../quickstart_pipeline.yaml      # optional: a pipeline file whose sections this one extends
    models: [r18_0.25x_sk0, r18_0.5x_sk0]  # and/or model_grid: {depth: [..], width: [..], selective_kernel: [..]}
    label_fractions: [0.01, 0.1]
    students: [r18_0.25x_sk0]              # every fine-tuned teacher is distilled into each (empty: itself)
    search:                                # any other setting, per stage: dotted key -> values
      finetune: {optim.base_learning_rate: [0.05, 0.1]}          # a list is a grid
      distill: {distill.temperature: {choice: [1.0, 2.0]}}       # or choice/uniform/loguniform/randint
    trial: {num_workers: 2, cpus_per_worker: 1, gpus_per_worker: 0}
    max_concurrent_trials: 2
    metric: val_top1
    scheduler: {name: asha, grace_period: 5}                    # early stopping of fine-tuning trials
    export_programs: best                  # model.pt2 of the best student and teacher (all | none)
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raytrain_ssl.config import ConfigError, Section, apply_overrides, read_config_file, validate
from raytrain_ssl.stages.pipeline import RecipeConfig, merge_sections

SEARCH_STAGES = ("pretrain", "finetune", "distill")
# Tune's sampling primitives a sweep file may name; a plain list is a grid.
DISTRIBUTIONS = {"grid": 1, "choice": 1, "uniform": 2, "loguniform": 2, "randint": 2}


class TrialResources(Section):
    num_workers: int = Field(1, gt=0, description="Ray Train workers of one trial")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class ModelGrid(Section):
    depth: list[int] = Field([], description="ResNet depths, e.g. [50, 101]")
    width: list[float] = Field([], description="width multipliers, e.g. [1, 2]")
    selective_kernel: list[bool] = Field([False], description="SK off and/or on")


class SchedulerSection(Section):
    name: Literal["none", "asha"] = Field("none", description="early stopping of fine-tuning trials")
    grace_period: int = Field(1, gt=0, description="epochs a fine-tuning trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(RecipeConfig):
    stage: str = Field("sweep", pattern="^sweep$")
    base: str | None = Field(None, description="pipeline YAML whose sections this sweep extends")
    supervised_baseline: bool = Field(False, description="also train each model from scratch on each subset")
    models: list[str] = Field([], description="models to pretrain (each once), by registry name")
    model_grid: ModelGrid | None = Field(None, description="models as depth x width x selective_kernel")
    pretrained: dict[str, str] = Field(
        {}, description="model name -> a finished pretraining run of it, used instead of pretraining it again"
    )
    search: dict[str, dict[str, Any]] = Field({}, description="per stage: dotted key -> list (grid) or {choice|uniform|loguniform|randint|grid: args}")
    num_samples: int = Field(1, gt=0, description="repeats of every grid point (random axes drawn anew)")
    trial: TrialResources = Field(TrialResources(), description="resources of one trial")
    max_concurrent_trials: int = Field(1, gt=0, description="trials at once (capped to what the cluster fits)")
    metric: str = Field("val_top1", description="what picks the best fine-tuned teacher and the scheduler watches")
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSection = Field(SchedulerSection(), description="for fine-tuning trials")
    export_programs: Literal["best", "all", "none"] = Field(
        "best",
        description="torch.export programs (model.pt2): of the best student and the best teacher once the sweep "
        "ends, of every trial, or none; every trial always exports model.pt + model.json",
    )

    @field_validator("search")
    @classmethod
    def _search(cls, search: dict) -> dict:
        for stage, axes in search.items():
            if stage not in SEARCH_STAGES:
                raise ValueError(f"search.{stage}: not a stage; use one of {list(SEARCH_STAGES)}")
            if not isinstance(axes, dict):
                raise ValueError(f"search.{stage}: must map dotted keys to values")
            for key, spec in axes.items():
                _check_axis(f"search.{stage}.{key}", spec)
        return search

    @model_validator(mode="after")
    def _models(self) -> "SweepConfig":
        from raytrain_ssl.models.registry import parse_model_name

        names = self.model_names()
        if not names:
            raise ValueError("models (or model_grid) must name at least one model to pretrain")
        for name in [*names, *self.students]:
            parse_model_name(name)  # ValueError naming the allowed forms
        extra = sorted(set(self.pretrained) - set(names))
        if extra:
            raise ValueError(f"pretrained: {extra} not among the sweep's models {names}")
        return self

    def model_names(self) -> list[str]:
        from raytrain_ssl.models.registry import model_name

        names = list(self.models)
        grid = self.model_grid
        if grid is not None:
            for depth, width, sk in itertools.product(grid.depth, grid.width, grid.selective_kernel):
                names.append(model_name(depth, width, sk))
        return list(dict.fromkeys(names))


def _check_axis(where: str, spec: Any) -> None:
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"{where}: an empty list sweeps nothing")
        return
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise ValueError(f"{where}: give a list (a grid) or one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args or (DISTRIBUTIONS[kind] == 2 and len(args) != 2):
        want = "[low, high]" if DISTRIBUTIONS[kind] == 2 else "a non-empty list"
        raise ValueError(f"{where}: {kind} takes {want}, got {args!r}")


def tune_domain(spec: Any):
    """A sweep-file axis as a Tune search-space object (Tune does the grid expansion and sampling)."""
    from ray import tune

    if isinstance(spec, list):
        return tune.grid_search(spec)
    kind, args = next(iter(spec.items()))
    if kind == "grid":
        return tune.grid_search(args)
    if kind == "choice":
        return tune.choice(args)
    return getattr(tune, kind)(*args)


def axis_points(spec: Any) -> list:
    """The values checked before Ray starts: every grid value, the ends of a range."""
    if isinstance(spec, list):
        return spec
    kind, args = next(iter(spec.items()))
    if kind == "randint":
        return [args[0], args[1] - 1]
    return list(args)


def grid_points(axes: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the checked values of `axes` (for validation, not for running)."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axis_points(axes[k]) for k in keys))]


def load_sweep(path: str | None, overrides: list[str]) -> SweepConfig:
    """The sweep file over its `base` pipeline file (sections merged key by key), then the overrides."""
    raw = read_config_file(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    base = raw.get("base")
    if base:
        base_path = Path(base) if Path(base).is_absolute() or path is None else Path(path).parent / base
        base_raw = read_config_file(base_path)
        if base_raw.get("stage", "pipeline") != "pipeline":
            raise ConfigError(f"config error: base: {base_path} is a '{base_raw['stage']}' file, not a pipeline")
        for key in ("stage", "name", "linear_probe"):
            base_raw.pop(key, None)
        raw = merge_sections(base_raw, raw)
    return validate(SweepConfig, raw)
