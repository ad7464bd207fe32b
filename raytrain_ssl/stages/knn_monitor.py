"""Per-epoch kNN accuracy of the encoder, computed inside the Train workers.

Each worker embeds its part of the labeled bank and query streams; features are gathered to every rank
(the same collective on all ranks keeps them in step) and rank 0 scores them with faiss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from raytrain_ssl import dist
from raytrain_ssl.data.augment import to_float_images
from raytrain_ssl.evaluation.knn import knn_accuracy

EVAL_BATCH_SIZE = 256


@torch.no_grad()
def embed_shard(encoder: nn.Module, shard, env) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features and labels of this worker's part of a labeled stream, gathered from all ranks."""
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    for batch in shard.iter_torch_batches(batch_size=EVAL_BATCH_SIZE, device=env.device):
        images = to_float_images(batch["image"], env.channels_last)
        with torch.autocast(device_type=env.device.type, dtype=torch.bfloat16, enabled=env.use_bf16):
            features.append(encoder(images).float())
        labels.append(batch["label"])
    encoder.train(was_training)
    dim = getattr(encoder, "num_features", None) or (features[0].shape[1] if features else 0)
    local_features = torch.cat(features) if features else torch.zeros(0, dim, device=env.device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=env.device)
    return dist.all_gather_variable(local_features), dist.all_gather_variable(local_labels)


def knn_eval(encoder: nn.Module, env, k: int, temperature: float) -> dict[str, float]:
    """kNN top-1/top-5 of the query stream against the bank stream (every rank returns the same)."""
    bank, bank_labels = embed_shard(encoder, env.dataset_shard("knn_bank"), env)
    queries, query_labels = embed_shard(encoder, env.dataset_shard("knn_query"), env)
    return knn_accuracy(
        bank.cpu().numpy(),
        bank_labels.cpu().numpy().astype(np.int64),
        queries.cpu().numpy(),
        query_labels.cpu().numpy().astype(np.int64),
        k=k,
        temperature=temperature,
    )
