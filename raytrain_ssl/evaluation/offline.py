"""`raytrain-ssl eval`: score a finished run of any stage on frozen features, with Ray Data batch inference.

Images stream through `map_batches` into a pool of actors that each hold the network once (GPU actors on a
GPU cluster); features and logits come back to the driver, where faiss (kNN), scikit-learn (linear probe)
and the classifier's own logits (top-1/top-5) score them. Results go to `<run_dir>/eval.json` and to the
run's TensorBoard directory under `eval_offline/`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raytrain_ssl.checkpointing import latest_checkpoint_dir, load_checkpoint

log = logging.getLogger("raytrain_ssl.eval")

EVAL_FILE = "eval.json"


@dataclass(frozen=True)
class EvalRequest:
    run_dir: str
    knn: bool = True
    linear_probe: bool = True
    label_subset: str | None = None  # ids the linear probe may train on (None: every labeled image)
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_c: float = 1.0
    batch_size: int = 256
    actors: int = 1
    gpus_per_actor: float = 0.0


class Embedder:
    """Ray Data actor: the run's network, loaded once per actor; batch of uint8 views -> features (+logits)."""

    def __init__(self, checkpoint_dir: str, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.encoder, self.classifier = networks_of(load_checkpoint(checkpoint_dir))
        self.encoder.to(self.device)
        if self.classifier is not None:
            self.classifier.to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        images = torch.as_tensor(batch["image"], device=self.device).float().div_(255.0)
        out = {"features": self.encoder(images).float().cpu().numpy(), "label": batch["label"]}
        if self.classifier is not None:
            out["logits"] = self.classifier(images).float().cpu().numpy()
        return out


def networks_of(state: dict) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(encoder, classifier or None) of a checkpoint of any stage, in eval mode."""
    from raytrain_ssl.export import classifier_from_state
    from raytrain_ssl.models import create_encoder
    from raytrain_ssl.stages.finetune import encoder_facts

    if "spec" in state:
        classifier = classifier_from_state(state)
        return classifier.encoder, classifier
    name, stem = encoder_facts(state)
    encoder = create_encoder(name, small_image_stem=stem)
    encoder.load_state_dict(state["encoder"])
    return encoder.eval(), None


def embed(path: str, checkpoint_dir: str, request: EvalRequest, image_size: int, keep_ids=None) -> dict:
    """Features, labels (and logits) of every labeled image of `path`, computed by an actor pool."""
    from ray.data import ActorPoolStrategy

    from raytrain_ssl.data.stream import ViewSpec, labeled_dataset

    ds = labeled_dataset(path, ViewSpec(image_size=image_size), train=False, batch_size=64, concurrency=None,
                         keep_ids=keep_ids)  # fmt: skip
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint_dir": checkpoint_dir, "use_gpu": request.gpus_per_actor > 0},
        batch_size=request.batch_size,
        compute=ActorPoolStrategy(size=request.actors),
        num_gpus=request.gpus_per_actor or None,
    )
    parts: dict[str, list] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def evaluate_run(request: EvalRequest) -> dict:
    """Score a run; returns (and writes to eval.json) every metric asked for."""
    from raytrain_ssl.config import ConfigError
    from raytrain_ssl.data.paths import resolve_data_paths
    from raytrain_ssl.data.subsets import read_subset
    from raytrain_ssl.evaluation.knn import knn_accuracy
    from raytrain_ssl.evaluation.linear_probe import linear_probe_accuracy
    from raytrain_ssl.evaluation.metrics import topk_accuracy

    checkpoint_dir = str(latest_checkpoint_dir(request.run_dir))
    state = load_checkpoint(checkpoint_dir)
    config = state["config"]
    data_cfg = _DataView(config["data"])
    data = resolve_data_paths(data_cfg, config["ray"]["storage_path"])
    train = data.knn_bank or data.train
    if not data.val:
        raise ConfigError(f"eval: the run {request.run_dir} has no labeled validation split (data.val)")
    size = config["data"]["image_size"]
    val = embed(data.val, checkpoint_dir, request, size)
    results: dict = {"checkpoint": checkpoint_dir, "stage": state.get("stage"), "val_images": int(len(val["label"]))}
    if "logits" in val:
        top1, top5 = topk_accuracy(torch.from_numpy(val["logits"]), torch.from_numpy(val["label"]))
        results.update(val_top1=top1, val_top5=top5)
    if request.knn or request.linear_probe:
        bank = embed(train, checkpoint_dir, request, size)
        if request.knn:
            results.update(knn_accuracy(bank["features"], bank["label"], val["features"], val["label"],
                                        k=request.knn_k, temperature=request.knn_temperature))  # fmt: skip
        if request.linear_probe:
            probe_train = bank
            if request.label_subset:
                keep = frozenset(read_subset(request.label_subset))
                probe_train = embed(train, checkpoint_dir, request, size, keep_ids=keep)
            results["linear_probe_images"] = int(len(probe_train["label"]))
            results.update(linear_probe_accuracy(probe_train["features"], probe_train["label"], val["features"],
                                                 val["label"], c=request.probe_c))  # fmt: skip
    _record(request.run_dir, results, step=state.get("progress", {}).get("global_step", 0))
    return results


class _DataView:
    """The attribute view of a saved `data:` section that `resolve_data_paths` reads."""

    def __init__(self, raw: dict):
        self.train, self.val, self.knn_bank = raw["train"], raw.get("val"), raw.get("knn_bank")


def _record(run_dir: str, results: dict, step: int) -> None:
    from raytrain_ssl.tensorboard_logger import TensorBoardLogger

    path = Path(run_dir)
    if not (path / "config.yaml").is_file() and path.name.startswith("checkpoint_"):
        path = path.parent
    (path / EVAL_FILE).write_text(json.dumps(results, indent=2))
    tb = TensorBoardLogger(path / "tensorboard")
    tb.scalars({k: v for k, v in results.items() if isinstance(v, float)}, step, prefix="eval_offline/")
    tb.close()
    log.info("evaluation of %s: %s", run_dir, {k: v for k, v in results.items() if isinstance(v, float)})
