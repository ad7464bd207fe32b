"""One DeeperCluster clustering round across the Train workers: features in, identical pseudo-labels out.

    features, keys, labels = embed_keyed_shard(encoder, shard, env)     # this worker's part of the images
    pseudo, stats, sizes = assign_pseudo_labels(features, keys, labels, settings, ...)   # every rank

Every worker embeds its shard of the training images (centre crops, encoder in eval mode); features, image
keys and labels are gathered; rank 0 alone PCA-whitens and clusters them (clustering.py: hierarchical faiss
k-means, empty clusters re-split) and sends its (key, super-cluster, sub-cluster) table to the other ranks
through the same variable-size gather, rank 0 contributing every row and the others none. Only rank 0
clusters because faiss (threads, GPU) is not bitwise reproducible across processes: computing on every rank
could give slightly different labels. A digest of the table is then compared across ranks, so no worker ever
trains on pseudo-labels that differ from the others'.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from raytrain_ssl import dist
from raytrain_ssl.clustering import assignment_stats, hierarchical_kmeans, pca_whiten

EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class PseudoLabels:
    """The pseudo-label of every clustered image, looked up by image key. Identical on every rank.

    Tensors on the CPU (or a device after `to`), rows sorted by key so that a lookup is a binary search.
    """

    keys: Tensor  # (N,) int64, ascending, unique
    super_labels: Tensor  # (N,) int64 in 0..m-1
    sub_labels: Tensor  # (N,) int64 in 0..n_s-1, local to the super-cluster
    weights: Tensor  # (N,) float32: N / (m * n_s * |cluster|), mean 1 (DeepCluster's uniform sampling)
    num_super_clusters: int
    num_sub_clusters: int  # n, the width of each sub-class head
    round_index: int  # 0 for the first clustering of a run
    epoch: int  # the epoch at whose start the round ran

    @classmethod
    def from_rows(cls, rows: Tensor, num_super: int, num_sub: int, round_index: int, epoch: int) -> "PseudoLabels":
        """`rows`: (N, 3) int64 [key, super, sub], any order."""
        rows = rows.cpu().long()
        order = torch.argsort(rows[:, 0])
        keys, super_labels, sub_labels = rows[order].unbind(1)
        return cls(
            keys=keys.contiguous(),
            super_labels=super_labels.contiguous(),
            sub_labels=sub_labels.contiguous(),
            weights=_balancing_weights(super_labels, sub_labels, num_super, num_sub),
            num_super_clusters=num_super,
            num_sub_clusters=num_sub,
            round_index=round_index,
            epoch=epoch,
        )

    def to(self, device: torch.device) -> "PseudoLabels":
        return PseudoLabels(
            self.keys.to(device), self.super_labels.to(device), self.sub_labels.to(device),
            self.weights.to(device), self.num_super_clusters, self.num_sub_clusters, self.round_index, self.epoch,
        )  # fmt: skip

    @property
    def flat_labels(self) -> Tensor:
        """super * n + sub: one index per (super, sub) cluster, for statistics."""
        return self.super_labels * self.num_sub_clusters + self.sub_labels

    def lookup(self, keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(super, sub, weight, found) for a batch of image keys; images not clustered (the equal split
        of the clustering stream may drop a few rows) get labels 0 and weight 0, found False."""
        position = torch.searchsorted(self.keys, keys).clamp_max(len(self.keys) - 1)
        found = self.keys[position] == keys
        super_labels = torch.where(found, self.super_labels[position], 0)
        sub_labels = torch.where(found, self.sub_labels[position], 0)
        weights = torch.where(found, self.weights[position], 0.0)
        return super_labels, sub_labels, weights, found

    def digest(self) -> int:
        """A 63-bit fingerprint of the table, to check that every rank holds the same one."""
        data = torch.stack([self.keys, self.super_labels, self.sub_labels]).cpu().numpy().tobytes()
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)

    def state_dict(self) -> dict:
        return {
            "keys": self.keys.cpu(), "super_labels": self.super_labels.cpu(), "sub_labels": self.sub_labels.cpu(),
            "num_super_clusters": self.num_super_clusters, "num_sub_clusters": self.num_sub_clusters,
            "round_index": self.round_index, "epoch": self.epoch,
        }  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict) -> "PseudoLabels":
        rows = torch.stack([state["keys"], state["super_labels"], state["sub_labels"]], dim=1)
        return cls.from_rows(
            rows, state["num_super_clusters"], state["num_sub_clusters"], state["round_index"], state["epoch"]
        )


def _balancing_weights(super_labels: Tensor, sub_labels: Tensor, num_super: int, num_sub: int) -> Tensor:
    """N / (m * n_s * |cluster|): as if images were drawn uniformly over super-clusters, then uniformly over
    the n_s sub-clusters of each (the reference's per-group uniform sampler); the weights average to 1."""
    flat = super_labels * num_sub + sub_labels
    sizes = torch.bincount(flat, minlength=num_super * num_sub).double()
    present = (sizes > 0).view(num_super, num_sub)
    subs_per_super = present.sum(1).double()  # n_s: a small super-cluster has fewer sub-clusters
    num_supers_present = float((subs_per_super > 0).sum())
    weights = len(flat) / (num_supers_present * subs_per_super[super_labels] * sizes[flat])
    return weights.float()


@torch.no_grad()
def embed_keyed_shard(encoder: nn.Module, shard, env) -> tuple[Tensor, Tensor, Tensor]:
    """(features, keys, labels) of this worker's part of the clustering stream, not gathered.

    The encoder runs in eval mode: BatchNorm uses running statistics and issues no collective, so ranks
    with different numbers of batches cannot fall out of step."""
    # Imported here: augment pulls in torchvision (seconds), which the clustering itself never needs.
    from raytrain_ssl.data.augment import to_float_images

    was_training = encoder.training
    encoder.eval()
    features, keys, labels = [], [], []
    for batch in shard.iter_torch_batches(batch_size=EVAL_BATCH_SIZE, device=env.device):
        images = to_float_images(batch["image"], env.channels_last)
        with torch.autocast(device_type=env.device.type, dtype=torch.bfloat16, enabled=env.use_bf16):
            features.append(encoder(images).float())
        keys.append(batch["key"])
        labels.append(batch["label"])
    encoder.train(was_training)
    if not features:
        empty_long = torch.zeros(0, dtype=torch.long, device=env.device)
        return torch.zeros(0, encoder.num_features, device=env.device), empty_long, empty_long.clone()
    return torch.cat(features), torch.cat(keys), torch.cat(labels)


def cluster_features(
    features: np.ndarray,
    keys: np.ndarray,
    labels: np.ndarray,
    settings,
    seed: int,
    previous: PseudoLabels | None,
    use_gpu: bool,
) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
    """The clustering itself, on one process: PCA-whitening, then the two-level k-means.

    Args:
        features: (N, d) float32; keys: (N,) int64, unique; labels: (N,) int64, -1 where unknown.
        settings: the `deepercluster` config section (num_super_clusters, num_sub_clusters, pca_dim,
            kmeans_iterations, kmeans_init, kmeans_restarts).
        previous: the last round's pseudo-labels, for the stability statistics.

    Returns:
        rows: (N, 3) int64 [key, super, sub]; stats: scalars for TensorBoard; sizes: (m*n,) images per cluster.
    """
    num_super, num_sub = settings.num_super_clusters, settings.num_sub_clusters
    duplicates = len(keys) - len(np.unique(keys))
    if duplicates:
        raise ValueError(f"{duplicates} images share a key with another (duplicate ids in the training shards?)")
    if len(keys) < num_super * num_sub:
        raise ValueError(f"{len(keys)} images cannot fill {num_super} x {num_sub} clusters")
    start = time.perf_counter()
    projected, whitening = pca_whiten(features, dim=settings.pca_dim)
    tree = hierarchical_kmeans(
        projected, num_super, num_sub, seed=seed, niter=settings.kmeans_iterations, use_gpu=use_gpu,
        init=settings.kmeans_init, nredo=settings.kmeans_restarts,
    )  # fmt: skip
    rows = np.stack([keys, tree.super_labels, tree.sub_labels], axis=1).astype(np.int64)
    flat = tree.super_labels * num_sub + tree.sub_labels
    stats = {
        "num_images": float(len(keys)),
        "pca_energy_kept": whitening.energy_kept,
        "seconds": time.perf_counter() - start,
        **_level_stats(keys, tree.super_labels, flat, labels, previous, num_super, num_sub),
    }
    return rows, stats, np.bincount(flat, minlength=num_super * num_sub)


def _level_stats(keys, super_labels, flat, labels, previous, num_super, num_sub) -> dict[str, float]:
    """assignment_stats of both levels, against the previous round (matched by key) and the true labels."""
    previous_super = previous_flat = None
    current = slice(None)
    if previous is not None:
        common, here, there = np.intersect1d(keys, previous.keys.numpy(), assume_unique=True, return_indices=True)
        if len(common):
            current = here
            previous_super = previous.super_labels.numpy()[there]
            previous_flat = previous.flat_labels.numpy()[there]
    # NMI against labels only when every image has one: a partly labeled set would bias it.
    known = labels if len(labels) and (labels >= 0).all() else None
    super_stats = assignment_stats(None, super_labels, known, num_super)
    sub_stats = assignment_stats(None, flat, known, num_super * num_sub)
    if previous_super is not None:
        moved_super = assignment_stats(previous_super, super_labels[current], None, num_super)
        moved_sub = assignment_stats(previous_flat, flat[current], None, num_super * num_sub)
        for name in ("nmi_previous", "fraction_changed"):
            super_stats[name], sub_stats[name] = moved_super[name], moved_sub[name]
    return {**{f"super_{k}": v for k, v in super_stats.items()}, **{f"sub_{k}": v for k, v in sub_stats.items()}}


def assign_pseudo_labels(
    features: Tensor,
    keys: Tensor,
    labels: Tensor,
    settings,
    round_index: int,
    epoch: int,
    seed: int,
    previous: PseudoLabels | None,
    use_gpu: bool,
) -> tuple[PseudoLabels, dict[str, float], np.ndarray | None]:
    """Collective: every rank calls it with its own part of the features; every rank gets the same labels.

    Rank 0 returns the statistics and cluster sizes; the other ranks return {} and None. Raises
    RuntimeError if the ranks end up with different tables (they never should)."""
    device = features.device  # collectives run where the backend wants them (NCCL: GPU, gloo: CPU)
    all_features = dist.all_gather_variable(features.float())
    all_keys = dist.all_gather_variable(keys.long())
    all_labels = dist.all_gather_variable(labels.long())
    stats, sizes = {}, None
    rows = torch.zeros(0, 3, dtype=torch.long, device=device)
    if dist.is_main_process():
        rows_np, stats, sizes = cluster_features(
            all_features.cpu().numpy(), all_keys.cpu().numpy(), all_labels.cpu().numpy(),
            settings, seed, previous, use_gpu,
        )  # fmt: skip
        rows = torch.from_numpy(rows_np).to(device)
    del all_features  # only rank 0 needed them; free the copy before training resumes
    # A broadcast through the variable-size gather: rank 0 holds every row, the other ranks none.
    rows = dist.all_gather_variable(rows)
    pseudo = PseudoLabels.from_rows(rows, settings.num_super_clusters, settings.num_sub_clusters, round_index, epoch)
    check_identical_on_all_ranks(pseudo, device)
    return pseudo, stats, sizes


def check_identical_on_all_ranks(pseudo: PseudoLabels, device: torch.device) -> None:
    digest = torch.tensor([pseudo.digest()], dtype=torch.long, device=device)
    digests = dist.all_gather_no_grad(digest).cpu().tolist()
    if len(set(digests)) != 1:
        raise RuntimeError(f"pseudo-labels differ across ranks (digests {digests}); refusing to train on them")
