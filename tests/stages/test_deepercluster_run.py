"""DeeperCluster pretraining: its data functions and model, then a real 2-worker CPU run on Ray Train that
clusters, checkpoints, resumes and writes TensorBoard, and whose checkpoint fine-tuning can load."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raytrain_ssl.checkpointing import load_checkpoint
from raytrain_ssl.config import ConfigError, PretrainConfig, load_config
from raytrain_ssl.data.stream import ViewSpec, image_keys, keyed_eval_batch_fn, rotation_batch_fn
from raytrain_ssl.models import create_encoder
from raytrain_ssl.stages import deepercluster, pretrain


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _asymmetric_image(size: int = 8) -> np.ndarray:
    """RGB, no rotation or flip maps it onto itself (so the applied turn can be read back)."""
    return (np.arange(size * size * 3).reshape(size, size, 3) * 7 % 251).astype(np.uint8)


def test_image_keys_are_stable_int64_and_distinct():
    keys = image_keys(["digits:0001", "digits:0002", "a/b.png"])
    assert keys.dtype == np.int64 and (keys >= 0).all() and len(set(keys.tolist())) == 3
    assert image_keys(np.array(["a/b.png"], dtype=object))[0] == keys[2]  # object arrays as Ray Data gives
    assert image_keys([]).shape == (0,)


def test_rotation_fn_rotates_by_the_reported_quarter_turns_and_keeps_keys_aligned(caplog):
    pixels = _asymmetric_image()
    batch = {
        "image": np.array([_png(pixels)] * 12 + [b"not an image"], dtype=object),
        "id": np.array([f"img{i}" for i in range(12)] + ["bad.jpg"], dtype=object),
    }
    # min_crop_scale=1: the crop is the whole image, so the output is the image, maybe flipped, then turned.
    fn = rotation_batch_fn(ViewSpec(image_size=8, min_crop_scale=1.0), num_rotations=4)
    with caplog.at_level(logging.WARNING):
        out = fn(batch)
    assert out["image"].shape == (12, 3, 8, 8) and out["image"].dtype == np.uint8
    assert out["key"].tolist() == image_keys([f"img{i}" for i in range(12)]).tolist()
    assert "bad.jpg" in caplog.text
    upright = torch.from_numpy(pixels).permute(2, 0, 1)
    for image, rotation in zip(out["image"], out["rotation"]):
        candidates = [torch.rot90(v, int(rotation), dims=(1, 2)) for v in (upright, upright.flip(2))]
        assert any(torch.equal(torch.from_numpy(image), c) for c in candidates), rotation
    assert set(out["rotation"].tolist()) <= {0, 1, 2, 3} and len(set(out["rotation"].tolist())) > 1

    upright_only = rotation_batch_fn(ViewSpec(image_size=8), num_rotations=1)(batch)
    assert set(upright_only["rotation"].tolist()) == {0}


def test_keyed_eval_fn_is_deterministic_and_marks_missing_labels():
    batch = {
        "image": np.array([_png(_asymmetric_image()), b"broken", _png(_asymmetric_image())], dtype=object),
        "id": np.array(["a", "b", "c"], dtype=object),
        "label": np.array([4, 5, None], dtype=object),
    }
    fn = keyed_eval_batch_fn(ViewSpec(image_size=8))
    out = fn(batch)
    assert out["label"].tolist() == [4, -1] and out["key"].tolist() == image_keys(["a", "c"]).tolist()
    np.testing.assert_array_equal(out["image"], fn(batch)["image"])


def test_model_picks_each_samples_own_sub_head_and_resets_heads_alike():
    cfg = load_config(None, ["method=deepercluster", "model.name=r18_0.25x_sk0", "data.image_size=16",
                             "deepercluster.num_super_clusters=2", "deepercluster.num_sub_clusters=3"])  # fmt: skip
    model = deepercluster.build_model(cfg)
    images = torch.rand(4, 3, 16, 16)
    super_target = torch.tensor([0, 7, 3, 7])
    super_logits, sub_logits = model(images, super_target)
    assert super_logits.shape == (4, 8) and sub_logits.shape == (4, 3)  # 2 clusters x 4 rotations
    all_sub = model.sub_heads(model.encoder(images)).view(4, 8, 3)
    torch.testing.assert_close(sub_logits, all_sub[torch.arange(4), super_target])

    other = deepercluster.build_model(cfg)
    model.reset_heads(seed=5)
    other.reset_heads(seed=5)
    assert torch.equal(model.sub_heads.weight, other.sub_heads.weight)
    assert model.super_head.bias.abs().sum() == 0


def test_special_cases_and_cluster_count_check():
    base = ["method=deepercluster", "deepercluster.num_super_clusters=1"]
    rotnet = load_config(None, base + ["deepercluster.num_sub_clusters=1"])
    deepcluster = load_config(None, base + ["deepercluster.num_rotations=1", "deepercluster.num_sub_clusters=10"])
    assert not deepercluster.clustering_enabled(rotnet) and deepercluster.clustering_enabled(deepcluster)
    deepercluster.check_cluster_count(rotnet, num_rows=1)
    with pytest.raises(ConfigError, match="clusters need at least as many training images"):
        deepercluster.check_cluster_count(deepcluster, num_rows=9)
    with pytest.raises(ConfigError, match="num_rotations"):
        load_config(None, ["method=deepercluster", "deepercluster.num_rotations=3"])


# ---------------------------------------------------------------------------------------------------------
# A real run: 2 Ray Train workers, builtin digits, a tiny ResNet.

TINY = [
    "method=deepercluster",
    "model.name=r18_0.25x_sk0",
    "data.train=builtin:digits",
    "data.image_size=16",
    "data.decode_batch_size=128",
    "train.global_batch_size=256",  # 1,437 training digits: 5 steps per epoch
    "train.epochs=3",
    "train.log_every_steps=1",
    "optim.name=sgd",
    "optim.base_learning_rate=0.1",
    "optim.warmup_epochs=0.5",
    "deepercluster.num_super_clusters=2",
    "deepercluster.num_sub_clusters=5",
    "deepercluster.recluster_every_epochs=1",
    "deepercluster.pca_dim=32",
    "eval.knn_every_epochs=null",  # kNN only in the second fit: each Ray Data pass costs seconds
    "eval.knn_k=10",
    "eval.view_grid_pairs=2",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1",
    "ray.max_failures=0",
]


def _event_tags(log_dir: Path) -> tuple[dict[str, list], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, acc.Tags()["histograms"]


@pytest.mark.ray
def test_two_worker_run_clusters_checkpoints_resumes_and_feeds_finetuning(ray_local, tmp_path):
    common = TINY + [f"ray.storage_path={tmp_path}", "ray.name=dc"]
    # Through pretrain.run: method=deepercluster is dispatched to the DeeperCluster stage. One epoch: a
    # clustering round, 5 steps, a checkpoint.
    first = pretrain.run(load_config(None, common + ["train.max_steps=5"]))
    run_dir = Path(first["run_dir"])
    state = load_checkpoint(run_dir)
    assert state["progress"]["global_step"] == 5 and state["progress"]["epoch"] == 1
    assert state["assignments"]["round_index"] == 0 and state["assignments"]["epoch"] == 0
    assert 0.0 <= first["metrics"]["cluster_sub_nmi_labels"] <= 1.0

    # The second fit() of the same run directory resumes at step 5, at the start of epoch 1: a second
    # round (compared with the first one), then 2 steps and the kNN.
    second = pretrain.run(
        load_config(run_dir / "config.yaml", ["train.max_steps=7", "eval.knn_every_epochs=1"]), resume=True
    )
    assert "knn_top1" in second["metrics"]
    state = load_checkpoint(second["run_dir"])
    assert state["progress"]["resumed_from_steps"] == [5] and state["progress"]["global_step"] == 7
    assert state["scheduler"]["last_epoch"] == 7
    assignments = state["assignments"]
    assert assignments["round_index"] == 1 and assignments["epoch"] == 1
    assert len(assignments["keys"]) >= 1442 - 1  # every training digit clustered (an equal split may drop 1)
    assert assignments["super_labels"].max() == 1 and assignments["sub_labels"].max() == 4

    # What fine-tuning needs: the encoder's weights, its name and the config, no projection head.
    assert state["head"] is None and state["model_name"] == "r18_0.25x_sk0" and state["stage"] == "pretrain"
    encoder = create_encoder(state["model_name"], small_image_stem=True)
    encoder.load_state_dict(state["encoder"])  # strict: every key matches
    assert PretrainConfig.model_validate(state["config"]).method == "deepercluster"

    scalars, histograms = _event_tags(run_dir / "tensorboard")
    for tag in ["train/loss", "train/super_accuracy", "train/sub_accuracy", "train/rotation_accuracy",
                "train/learning_rate", "eval/knn_top1", "clusters/sub_cluster_size_min",
                "clusters/sub_cluster_size_max", "clusters/sub_num_empty_clusters", "clusters/sub_nmi_labels",
                "clusters/super_nmi_labels", "clusters/sub_fraction_changed", "clusters/sub_nmi_previous"]:  # fmt: skip
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 8))  # no step redone after resume
    assert all(np.isfinite(v) for _, v in scalars["train/loss"])
    assert len(scalars["clusters/sub_cluster_size_min"]) == 2  # one entry per clustering round
    assert all(v >= 1 for _, v in scalars["clusters/sub_cluster_size_min"])  # empty clusters were re-split
    assert all(0.0 <= v <= 1.0 for _, v in scalars["clusters/sub_fraction_changed"])
    assert "clusters/sub_cluster_sizes" in histograms
