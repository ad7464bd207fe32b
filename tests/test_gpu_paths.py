"""The GPU code paths: NCCL collectives with SyncBatchNorm, bf16 autocast with channels_last, faiss on the
GPU, and a 1-GPU Ray Train pretraining run with worker-side (nvJPEG) decoding. Each test skips cleanly on a
machine without CUDA (CI has none); on a GPU machine, `python -m pytest -m gpu` runs them all."""

from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nccl_group():
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def test_sync_batchnorm_and_gathered_negatives_on_nccl_match_the_plain_computation(nccl_group):
    from raytrain_ssl import dist
    from raytrain_ssl.losses import nt_xent

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    synced = dist.convert_to_global_batchnorm(copy.deepcopy(plain), use_sync_batchnorm=True).cuda()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    x = torch.randn(16, 3, 12, 12)
    z_plain, z_synced = plain(x), synced(x.cuda())
    torch.testing.assert_close(z_synced.cpu(), z_plain, rtol=1e-4, atol=1e-5)
    gathered = dist.all_gather_with_grad(z_synced)
    assert gathered.shape == z_synced.shape and gathered.requires_grad
    loss_gpu, _ = nt_xent(*z_synced.chunk(2), temperature=0.2)
    loss_cpu, _ = nt_xent(*z_plain.chunk(2), temperature=0.2)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_with_channels_last_stays_close_to_fp32():
    from raytrain_ssl.models import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("r18_0.25x_sk1", small_image_stem=True).cuda().to(memory_format=torch.channels_last)
    images = torch.rand(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    full = encoder(images)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = encoder(images)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    cosine = nn.functional.cosine_similarity(half.float(), full, dim=1)
    assert cosine.min() > 0.99, cosine.min()
    half.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)


def test_faiss_kmeans_on_the_gpu_recovers_known_clusters():
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    from raytrain_ssl.clustering import kmeans, use_faiss_gpu

    if not use_faiss_gpu(worker_on_gpu=True):
        pytest.skip(f"faiss {faiss.__version__} has no GPU support here (install .[gpu]: faiss-gpu)")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 64)) * 10
    labels = rng.integers(0, 20, 20_000)
    features = (centres[labels] + rng.normal(size=(20_000, 64))).astype(np.float32)
    result = kmeans(features, 20, niter=20, use_gpu=True, init="kmeans++")
    assert normalized_mutual_info_score(labels, result.assignments) > 0.95


@pytest.mark.ray
def test_one_gpu_pretraining_run_with_worker_side_decoding(ray_local, tmp_path):
    from raytrain_ssl.checkpointing import load_checkpoint
    from raytrain_ssl.config import load_config
    from raytrain_ssl.stages import pretrain

    overrides = ["model.name=r18_0.25x_sk0", "data.train=builtin:digits", "data.image_size=32",
                 "data.decode_on=worker", "train.global_batch_size=64", "train.max_steps=4", "train.epochs=1",
                 "eval.knn_every_epochs=1", "eval.knn_k=10", "ray.num_workers=1", "ray.gpus_per_worker=1",
                 "ray.cpus_per_worker=1", "ray.max_failures=0", f"ray.storage_path={tmp_path}", "ray.name=gpu"]  # fmt: skip
    summary = pretrain.run(load_config(None, overrides))
    state = load_checkpoint(summary["run_dir"])
    assert state["progress"]["global_step"] == 4 and 0 <= summary["metrics"]["knn_top1"] <= 1
