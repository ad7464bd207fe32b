"""Typed run configuration: YAML file + `key=value` overrides, validated before Ray starts.

Every stage reads one frozen `PretrainConfig` (more stages add their own top-level classes). Unknown keys
and bad values stop the run with one line naming the key and what is allowed. The configuration is never
mutated after loading: derived values (per-worker batch, scaled learning rate, ...) get new names in the
code that derives them, so the `config.yaml` saved in the run directory is exactly what ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raytrain_ssl.errors import ConfigError  # noqa: F401  (re-exported: where callers have always found it)
from raytrain_ssl.models.registry import parse_model_name


class Section(BaseModel):
    # extra="forbid": a typo in a key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSection(Section):
    name: str = Field("r50_1x_sk0", description="encoder, r{depth}_{width}x_sk{0|1}, e.g. r50_2x_sk1")
    small_image_stem: bool | None = Field(
        None, description="3x3 stride-1 stem without max-pool; None: on when data.image_size <= 64"
    )
    head_layers: int = Field(3, ge=0, le=8, description="projection head depth (SimCLRv2 uses 3)")
    head_hidden_dim: int | None = Field(None, gt=0, description="None: the encoder's feature width")
    projection_dim: int = Field(128, gt=0, description="output width of the projection head")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        parse_model_name(name)  # raises ValueError listing the valid names
        return name


class DataSection(Section):
    train: str = Field(
        "builtin:digits", description="shard directory / URI of the unlabeled training images, or builtin:digits"
    )
    val: str | None = Field(
        None, description="labeled shards for the per-epoch kNN (None: the builtin's test split, or no kNN)"
    )
    knn_bank: str | None = Field(
        None, description="labeled shards used as the kNN memory bank (None: data.train if it has labels)"
    )
    image_size: int = Field(224, ge=8, le=1024, description="side of the square training crops, in pixels")
    shuffle_seed: int = Field(0, description="seed of the per-epoch file and buffer shuffle")
    shuffle_buffer_rows: int = Field(
        2048,
        ge=0,
        description="local shuffle buffer per worker (0: off), capped at a quarter of a worker's epoch and never "
        "under 2 batches; the first batch of an epoch waits for it to fill",
    )
    ordered: bool = Field(
        True,
        description="training rows reach the workers in a seeded order, so a run restarted mid-epoch skips "
        "exactly the batches it had trained on (false: Ray Data's faster unordered streaming)",
    )
    decode_batch_size: int = Field(64, gt=0, description="images per Ray Data decode+augment task batch")
    decode_concurrency: int | None = Field(
        None, gt=0, description="max Ray Data decode tasks at once (None: Ray decides)"
    )
    max_pixels: int = Field(64_000_000, gt=0, description="images with more pixels are skipped (bomb guard)")
    decode_on: Literal["ray_data", "worker"] = Field(
        "ray_data",
        description="where training images are decoded and augmented: ray_data (CPU tasks send uint8 views) or "
        "worker (Ray Data sends the encoded bytes; each Train worker decodes JPEGs on its GPU with nvJPEG and "
        "augments there, or on its CPU without a GPU); worker: contrastive pretraining only",
    )


class AugmentSection(Section):
    color_jitter_strength: float = Field(1.0, ge=0, le=2, description="SimCLR's s (0.5 suits CIFAR)")
    min_crop_scale: float = Field(0.08, gt=0, le=1, description="lower area bound of RandomResizedCrop")
    gaussian_blur: bool | None = Field(None, description="None: on when data.image_size > 64 (as SimCLR)")
    grayscale_probability: float = Field(0.2, ge=0, le=1)


class OptimSection(Section):
    name: Literal["lars", "sgd", "adamw"] = "lars"
    base_learning_rate: float = Field(0.3, gt=0, description="before scaling with the global batch")
    learning_rate_scaling: Literal["linear", "sqrt"] = Field(
        "linear", description="linear: base*B/256; sqrt: base*sqrt(B) (SimCLRv2: 0.075*sqrt(B) for small B)"
    )
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    trust_coefficient: float = Field(0.001, gt=0, description="LARS eta")
    warmup_epochs: float = Field(10, ge=0)


class ContrastiveSection(Section):
    temperature: float = Field(0.1, gt=0, description="NT-Xent temperature (SimCLRv2: 0.1)")
    queue_size: int | None = Field(None, gt=0, description="MoCo-style memory of negatives (None: off)")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="EMA key encoder momentum, e.g. 0.999 (None: off)"
    )


class DeeperClusterSection(Section):
    """method: deepercluster (Caron et al. 2019). DeepCluster: num_rotations=1, num_super_clusters=1
    (k = num_sub_clusters). RotNet: num_super_clusters=1, num_sub_clusters=1 (no clustering at all)."""

    num_super_clusters: int = Field(4, gt=0, description="m: clusters of the first k-means level")
    num_sub_clusters: int = Field(
        250, gt=0, description="n: sub-clusters inside each super-cluster (k = m*n clusters in all)"
    )
    num_rotations: Literal[1, 4] = Field(
        4, description="4: predict the 0/90/180/270 degree rotation with the super-cluster (4m classes); 1: off"
    )
    recluster_every_epochs: int = Field(3, gt=0, description="new pseudo-labels every N epochs (paper: 3)")
    pca_dim: int = Field(256, gt=0, description="PCA-whitening dimension before k-means (capped at the feature width)")
    kmeans_iterations: int = Field(10, gt=0, description="Lloyd iterations per k-means (paper: 10)")
    kmeans_init: Literal["random", "kmeans++"] = Field("random", description="k-means initialisation")
    kmeans_restarts: int = Field(1, gt=0, description="k-means runs per level, the lowest objective kept")
    balance_clusters: bool = Field(
        True, description="weight images by inverse cluster size (DeepCluster's uniform sampling over pseudo-labels)"
    )


class TrainSection(Section):
    epochs: int = Field(100, gt=0)
    global_batch_size: int = Field(256, gt=0, description="over all workers; must divide by ray.num_workers")
    max_steps: int | None = Field(None, gt=0, description="stop after this many steps (None: all epochs)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    channels_last: bool | None = Field(None, description="None: on for GPU workers")
    seed: int = 0
    log_every_steps: int = Field(10, gt=0)
    record_batch_ids: bool = Field(
        False, description="log every step's image keys per worker to <run_dir>/batch_ids/ (a data audit)"
    )
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN/inf loss on any worker: stop (error naming the step; the last checkpoint stays the "
        "last good one) or skip (the batch is dropped on all workers, the schedule advances; train/skipped_steps)",
    )


class CheckpointSection(Section):
    every_n_steps: int | None = Field(None, gt=0, description="also checkpoint every N steps (None: epochs only)")
    num_to_keep: int = Field(2, gt=0)


class EvalSection(Section):
    knn_every_epochs: int | None = Field(1, gt=0, description="kNN top-1 every N epochs (None: never)")
    knn_at_start: bool = Field(False, description="also score the randomly initialised encoder (a baseline)")
    knn_k: int = Field(200, gt=0)
    knn_temperature: float = Field(0.07, gt=0)
    knn_bank_max_images: int = Field(20000, gt=0, description="cap on memory-bank images")
    view_grid_pairs: int = Field(8, ge=0, description="augmented view pairs shown in TensorBoard (0: none)")


class RaySection(Section):
    address: str | None = Field(None, description="Ray cluster address (None: RAY_ADDRESS, else a local Ray)")
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    local_num_cpus: int | None = Field(
        None, gt=0, description="logical CPUs of an embedded local Ray (None: enough for workers + data)"
    )
    object_store_memory_mb: int | None = Field(None, ge=100, description="embedded local Ray only")
    storage_path: str = Field("./runs", description="where run directories go; shared by all nodes on a cluster")
    name: str | None = Field(None, description="run name (None: <stage>-<timestamp>)")
    max_failures: int = Field(2, ge=0, description="worker failures retried from the last checkpoint")


class RunConfig(Section):
    """What every stage's config derives from its model, data, train and ray sections (no fields here)."""

    @model_validator(mode="after")
    def _batch_divides(self):
        _check_batch_divides(self.train.global_batch_size, self.ray.num_workers)
        return self

    # Derived values: new names, computed from the frozen config, never written back into it.
    @property
    def batch_size_per_worker(self) -> int:
        return self.train.global_batch_size // self.ray.num_workers

    @property
    def use_small_image_stem(self) -> bool:
        stem = self.model.small_image_stem
        return self.data.image_size <= 64 if stem is None else stem


class PretrainConfig(RunConfig):
    stage: Literal["pretrain"] = "pretrain"
    method: Literal["simclr", "deepercluster"] = "simclr"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    augment: AugmentSection = AugmentSection()
    optim: OptimSection = OptimSection()
    contrastive: ContrastiveSection = ContrastiveSection()
    deepercluster: DeeperClusterSection = DeeperClusterSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    ray: RaySection = RaySection()

    @model_validator(mode="after")
    def _worker_decode_is_contrastive(self):
        if self.data.decode_on == "worker" and self.method != "simclr":
            raise ValueError(
                f"data.decode_on=worker is implemented for method=simclr only, not method={self.method}; "
                "use data.decode_on=ray_data"
            )
        return self

    @property
    def use_gaussian_blur(self) -> bool:
        blur = self.augment.gaussian_blur
        return self.data.image_size > 64 if blur is None else blur


# ------------------------------------------------------------------------------- fine-tune and distill
# Stage-specific defaults live in subclasses, so a partial `optim:` block in a YAML file keeps the
# stage's defaults for the keys it does not name (a default *instance* would be replaced whole).


class FinetuneOptimSection(OptimSection):
    """SimCLRv2 fine-tuning: LARS, lr 0.005*sqrt(B) (0.16 at B=1024), no weight decay, no warmup."""

    base_learning_rate: float = Field(0.005, gt=0, description="before scaling with the global batch")
    learning_rate_scaling: Literal["linear", "sqrt"] = Field("sqrt", description="sqrt: base*sqrt(B)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(0, ge=0)


class DistillOptimSection(OptimSection):
    """SimCLRv2 distillation trains the student like pretraining: LARS, linear scaling, short warmup."""

    base_learning_rate: float = Field(0.3, gt=0, description="before scaling with the global batch")
    weight_decay: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(5, ge=0)


class ClassifierTrainSection(TrainSection):
    epochs: int = Field(60, gt=0, description="SimCLRv2: 60 epochs at 1% labels, 30 at 10%")
    global_batch_size: int = Field(
        256, gt=0, description="over all workers; lowered to the labeled-subset size when larger"
    )


class DistillTrainSection(ClassifierTrainSection):
    epochs: int = Field(100, gt=0, description="passes over the unlabeled images")


class ClassifierEvalSection(Section):
    every_epochs: int | None = Field(
        5, gt=0, description="top-1/top-5 on data.val every N epochs, and always at the end (None: end only)"
    )


class FinetuneSection(Section):
    pretrained: str | None = Field(
        None, description="pretrain run directory or checkpoint (None: train from scratch, the supervised baseline)"
    )
    head_layer: int = Field(1, ge=0, description="keep projection-head layers 1..k (SimCLRv2: 1; 0: none)")
    label_fraction: float | None = Field(
        None, gt=0, le=1, description="class-balanced fraction of labeled images (None: all, or label_subset)"
    )
    label_subset: str | None = Field(None, description="file of image ids to train on (overrides label_fraction)")
    subset_seed: int = Field(0, description="seed of the class-balanced subset draw")

    @model_validator(mode="after")
    def _one_subset(self) -> "FinetuneSection":
        if self.label_fraction is not None and self.label_subset is not None:
            raise ValueError("give finetune.label_fraction or finetune.label_subset, not both")
        return self


class DistillSection(Section):
    teacher: str | None = Field(None, description="fine-tune run directory or checkpoint of the teacher (required)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of teacher and student (SimCLRv2: 1)")
    labeled_weight: float = Field(
        0.0, ge=0, le=1, description="weight of the labeled cross-entropy on the teacher's labeled subset (0: off)"
    )
    init: str | None = Field(None, description="initialise the student from this run/checkpoint (None: scratch)")


class ExportSection(Section):
    program: bool = Field(
        True,
        description="also write export/model.pt2, a torch.export program (its compiler costs ~15 CPU-seconds "
        "a run); model.pt and model.json are always written",
    )


class StageConfig(RunConfig):
    """What fine-tune and distill share with pretraining: model, data, optimiser, training, Ray."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    augment: AugmentSection = AugmentSection()
    train: ClassifierTrainSection = ClassifierTrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: ClassifierEvalSection = ClassifierEvalSection()
    export: ExportSection = ExportSection()
    ray: RaySection = RaySection()

    @model_validator(mode="after")
    def _decodes_in_ray_data(self):
        if self.data.decode_on != "ray_data":
            raise ValueError(
                f"data.decode_on={self.data.decode_on} is implemented for contrastive pretraining only; "
                "fine-tuning and distillation decode in Ray Data (data.decode_on=ray_data)"
            )
        return self


class FinetuneConfig(StageConfig):
    """Fine-tune a pretrained encoder (+ head layers 1..k) with a new linear classifier on labeled images."""

    ALIASES: ClassVar[dict[str, str]] = {
        "pretrained": "finetune.pretrained",
        "head_layer": "finetune.head_layer",
        "label_fraction": "finetune.label_fraction",
        "label_subset": "finetune.label_subset",
    }
    stage: Literal["finetune"] = "finetune"
    finetune: FinetuneSection = FinetuneSection()
    optim: FinetuneOptimSection = FinetuneOptimSection()


class DistillConfig(StageConfig):
    """Distil a fine-tuned teacher into a student (model.name) on unlabeled images."""

    ALIASES: ClassVar[dict[str, str]] = {
        "teacher": "distill.teacher",
        "student": "model.name",
        "init": "distill.init",
    }
    stage: Literal["distill"] = "distill"
    distill: DistillSection = DistillSection()
    optim: DistillOptimSection = DistillOptimSection()
    train: DistillTrainSection = DistillTrainSection()

    @model_validator(mode="after")
    def _needs_teacher(self) -> "DistillConfig":
        if not self.distill.teacher:
            raise ValueError("distill.teacher is required: a fine-tune run directory (teacher=RUN_DIR)")
        return self


def _check_batch_divides(global_batch_size: int, num_workers: int) -> None:
    if global_batch_size % num_workers:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a multiple of ray.num_workers={num_workers}"
        )


STAGE_CONFIGS: dict[str, type[Section]] = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "distill": DistillConfig,
}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML, so 0.1 is a float and null is None)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `key=value` set; intermediate sections are created as needed."""
    merged = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def _deep_copy(raw: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def read_config_file(path: str | os.PathLike) -> dict:
    """The mapping a YAML config file holds; a missing file or bad YAML is a one-line ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{file}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    return raw


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), stage: str | None = None):
    """Load, override and validate a run config; raises ConfigError with one line on any problem.

    `stage` is the command's stage (None: the file's `stage:`, else pretrain); a file for another stage
    is an error rather than a silently different run."""
    raw = read_config_file(path) if path is not None else {}
    file_stage = raw.get("stage")
    if stage is not None and file_stage is not None and file_stage != stage:
        raise ConfigError(f"stage: this command runs '{stage}' but {path} is a '{file_stage}' config")
    stage = stage or file_stage or "pretrain"
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"stage: '{stage}' is not one of {sorted(STAGE_CONFIGS)}")
    cls = STAGE_CONFIGS[stage]
    raw = apply_overrides(raw, [expand_alias(text, cls) for text in overrides])
    if raw.get("stage", stage) != stage:
        raise ConfigError(f"stage: this command runs '{stage}', the config says '{raw['stage']}'")
    return validate(cls, raw)


def expand_alias(text: str, cls: type[Section]) -> str:
    """`pretrained=DIR` -> `finetune.pretrained=DIR`: the short forms each stage documents."""
    key, sep, value = text.partition("=")
    aliases = getattr(cls, "ALIASES", {})
    return f"{aliases[key]}{sep}{value}" if key in aliases else text


def validate(cls: type[Section], raw: dict):
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(cls, exc)) from None


def format_validation_error(cls: type[Section], exc: ValidationError) -> str:
    """One line for the first error: the dotted key, what was given and what is allowed."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(cls, loc[:-1])
        return f"config error: unknown key '{key}'; allowed here: {', '.join(allowed)}"
    message = err["msg"].removeprefix("Value error, ")
    if not loc:  # a model-level validator
        return f"config error: {message}"
    given = err.get("input")
    extra = f" (got {given!r})" if not isinstance(given, dict) else ""
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"config error: {key}: {message}{extra}{more}"


def _fields_at(cls: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = cls.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


def config_to_yaml(cfg: Section) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_options(cls: type[BaseModel] = PretrainConfig, prefix: str = "") -> list[str]:
    """`key (type, default): description` lines for --help, generated from the config classes."""
    lines = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += describe_options(ann, prefix=f"{key}.")
            continue
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        desc = f": {field.description}" if field.description else ""
        lines.append(f"  {key} ({type_name}, default {field.default!r}){desc}")
    return lines
