"""Weighted k-nearest-neighbour classification on frozen features, with faiss.

The protocol of Wu et al. 2018 (InstDisc), used by SimCLR/DINO-style monitors: cosine similarity,
top-k neighbours from the labeled memory bank, votes weighted by exp(similarity / temperature).
"""

from __future__ import annotations

import faiss
import numpy as np


def _index(dim: int) -> "faiss.Index":
    """Exact inner-product index, on the GPU when faiss-gpu sees one."""
    index = faiss.IndexFlatIP(dim)
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_class_scores(
    bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, k: int, temperature: float, num_classes: int
) -> np.ndarray:
    """(num_queries, num_classes) weighted votes of the k nearest bank features."""
    k = min(k, len(bank))
    index = _index(bank.shape[1])
    index.add(_normalized(bank))
    similarities, neighbours = index.search(_normalized(queries), k)
    weights = np.exp(similarities / temperature)
    scores = np.zeros((len(queries), num_classes), dtype=np.float64)
    np.add.at(scores, (np.arange(len(queries))[:, None], bank_labels[neighbours]), weights)
    return scores


def knn_accuracy(
    bank: np.ndarray,
    bank_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    k: int = 200,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Top-1 and top-5 kNN accuracy (fractions in [0, 1])."""
    if len(bank) == 0 or len(queries) == 0:
        raise ValueError("kNN needs a non-empty memory bank and query set")
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    scores = knn_class_scores(bank, bank_labels, queries, k, temperature, num_classes)
    ranked = np.argsort(-scores, axis=1)
    top1 = float(np.mean(ranked[:, 0] == query_labels))
    top5 = float(np.mean((ranked[:, : min(5, num_classes)] == query_labels[:, None]).any(axis=1)))
    return {"knn_top1": top1, "knn_top5": top5}
