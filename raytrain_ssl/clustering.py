"""The clustering core of DeeperCluster (Caron et al. 2019, "Unsupervised Pre-training of Image Features on
Non-Curated Data", arXiv 1905.01278): PCA whitening, k-means with empty-cluster re-split, the two-level
(hierarchical) k-means, the pseudo-labels and loss it trains on, and statistics to monitor it.

Pure library code: numpy/faiss in, numpy out (torch only for the targets and the loss). No distributed code;
the training stage gathers the features, calls these on one process and broadcasts the result.

The pipeline of one DeeperCluster epoch, as in facebookresearch/DeeperCluster (src/distributed_kmeans.py,
src/clustering.py):

    projected, whitening = pca_whiten(features, dim=256)          # whitening power 0.5, then L2 norm
    tree = hierarchical_kmeans(projected, num_super_clusters=m, num_sub_clusters=n)
    super_target, sub_target = deepercluster_targets(tree.super_labels, tree.sub_labels, rotation)
    loss = deepercluster_loss(super_logits, sub_logits, super_target, sub_target)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Relative size of the perturbation that separates a re-split centroid from its donor (faiss's own
# split_clusters uses 1/1024 too).
_SPLIT_EPS = 1.0 / 1024

_INIT_METHODS = {
    "random": faiss.ClusteringInitMethod_RANDOM,
    "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
}


def _as_float32(features: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(features, Tensor):
        features = features.detach().cpu().numpy()
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {features.shape}")
    return features


def _l2_normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------------
# PCA whitening


@dataclass(frozen=True)
class PCAWhitening:
    """A trained PCA whitening, kept as plain arrays so that it pickles and can be shipped to other workers.

    `apply` computes `x @ matrix.T + bias` (mean removal, rotation onto the principal axes and division by
    sqrt(eigenvalue + eps), all folded into `matrix` and `bias`) and then, by default, L2-normalises rows.
    """

    matrix: np.ndarray  # (dim_out, dim_in) float32
    bias: np.ndarray  # (dim_out,) float32
    energy_kept: float  # fraction of the total variance carried by the dim_out kept components

    @property
    def dim_in(self) -> int:
        return self.matrix.shape[1]

    @property
    def dim_out(self) -> int:
        return self.matrix.shape[0]

    def apply(self, features: np.ndarray | Tensor, normalize: bool = True) -> np.ndarray:
        """(N, dim_in) -> (N, dim_out) float32; unit rows when `normalize`."""
        x = _as_float32(features)
        if x.shape[1] != self.dim_in:
            raise ValueError(f"features have dimension {x.shape[1]}, the PCA was trained on {self.dim_in}")
        projected = x @ self.matrix.T + self.bias
        return _l2_normalized(projected) if normalize else projected


def pca_whiten(features: np.ndarray | Tensor, dim: int, eps: float = 1e-5) -> tuple[np.ndarray, PCAWhitening]:
    """Fit a whitening PCA on `features` and return (projected, whitening).

    As DeepCluster / DeeperCluster: project onto the top `dim` principal components, scale each by
    eigenvalue^-0.5 (`faiss.PCAMatrix(d_in, dim, eigen_power=-0.5)`), then L2-normalise every row.

    Args:
        features: (N, d_in) features; converted to float32.
        dim: output dimension. A `dim` >= d_in keeps all d_in components (a whitening rotation, no reduction);
            with N <= d_in points only the N - 1 components that carry variance are kept.
        eps: added to the eigenvalues (variances along the principal axes) before the power -0.5, so that
            directions with (near) zero variance are not blown up.

    Returns:
        projected: (N, min(dim, d_in, N - 1)) float32, whitened (unit variance, uncorrelated) then unit-normalised
            rows.
        whitening: the trained transform, to apply the same projection to other features.
    """
    x = _as_float32(features)
    num_points, dim_in = x.shape
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if num_points < 2:
        raise ValueError(f"PCA needs at least 2 points, got {num_points}")
    # N points span at most N - 1 directions once centred; further "components" would be numerical noise.
    dim_out = min(dim, dim_in, num_points - 1)
    pca = faiss.PCAMatrix(dim_in, dim_out, -0.5)
    # faiss trains on at most max_points_per_d * d_in points (a random subset beyond) and its eigenvalues are
    # those of the unnormalised scatter matrix, i.e. num_used * variance: its output has variance
    # 1 / num_used. Scale eps to match, and the transform back to unit variance.
    num_used = min(num_points, pca.max_points_per_d * dim_in)
    pca.epsilon = eps * num_used
    pca.train(x)
    scale = np.float32(np.sqrt(num_used))
    matrix = faiss.vector_to_array(pca.A).reshape(dim_out, dim_in).astype(np.float32) * scale
    bias = faiss.vector_to_array(pca.b).astype(np.float32) * scale
    eigenvalues = np.clip(faiss.vector_to_array(pca.eigenvalues), 0.0, None)
    total = float(eigenvalues.sum())
    energy_kept = min(1.0, float(eigenvalues[:dim_out].sum()) / total) if total > 0 else 1.0
    whitening = PCAWhitening(matrix=matrix, bias=bias, energy_kept=energy_kept)
    return whitening.apply(x), whitening


# ---------------------------------------------------------------------------------------------------------
# k-means


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32
    assignments: np.ndarray  # (N,) int64, every cluster in 0..k-1 has at least one member
    inertia: float  # sum over points of the squared L2 distance to their assigned centroid
    num_resplit: int = 0  # re-splits after the faiss run, one per empty cluster per round (usually 0)


def _faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def use_faiss_gpu(worker_on_gpu: bool) -> bool:
    """Where a training worker should run k-means: on its GPU when it has one and faiss can use it (faiss-gpu
    installed: `StandardGpuResources` exists and `get_num_gpus() > 0`), on the CPU with faiss-cpu otherwise.

    A CPU worker stays on the CPU even on a GPU node: its GPUs belong to other workers (Ray hides them from
    it through CUDA_VISIBLE_DEVICES anyway)."""
    return worker_on_gpu and _faiss_gpu_available()


def _resolve_use_gpu(use_gpu: bool | None) -> bool:
    if use_gpu is None:
        return _faiss_gpu_available()
    if use_gpu and not _faiss_gpu_available():
        raise ValueError("use_gpu=True but faiss sees no GPU (faiss-cpu installed, or no CUDA device)")
    return use_gpu


def _nearest_centroid(features: np.ndarray, centroids: np.ndarray, use_gpu: bool) -> np.ndarray:
    index = faiss.IndexFlatL2(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(features, 1)
    return nearest[:, 0].astype(np.int64)


def _inertia(features: np.ndarray, centroids: np.ndarray, assignments: np.ndarray, chunk: int = 65536) -> float:
    """Sum of squared distances to the assigned centroids, in float64, a chunk of rows at a time."""
    total = 0.0
    for start in range(0, len(features), chunk):
        rows = slice(start, start + chunk)
        residual = features[rows].astype(np.float64) - centroids[assignments[rows]]
        total += float(np.einsum("ij,ij->", residual, residual))
    return total


def _split_into(
    features: np.ndarray,
    centroids: np.ndarray,
    assignments: np.ndarray,
    empty: int,
    donor: int,
    rng: np.random.Generator,
) -> None:
    """Give part of `donor`'s members to the empty cluster `empty`, in place.

    The two clusters start from the donor's centroid pushed apart by +-_SPLIT_EPS along an alternating-sign
    direction; the donor's members go to the nearer of the two. When that leaves one side empty (duplicated
    points, ties) a random half moves. Both centroids then become the mean of their members.
    """
    members = np.flatnonzero(assignments == donor)
    centre = centroids[donor].astype(np.float64)
    signs = np.where(np.arange(centre.size) % 2 == 0, 1.0, -1.0)
    step = _SPLIT_EPS * max(float(np.sqrt(np.mean(centre**2))), 1e-6) * signs
    towards_new = np.sum((features[members] - (centre + step)) ** 2, axis=1) < np.sum(
        (features[members] - (centre - step)) ** 2, axis=1
    )
    if towards_new.all() or not towards_new.any():
        towards_new = np.zeros(len(members), dtype=bool)
        towards_new[rng.permutation(len(members))[: len(members) // 2]] = True
    assignments[members[towards_new]] = empty
    centroids[empty] = features[members[towards_new]].mean(axis=0)
    centroids[donor] = features[members[~towards_new]].mean(axis=0)


def _resplit_empty_clusters(
    features: np.ndarray,
    centroids: np.ndarray,
    assignments: np.ndarray,
    rng: np.random.Generator,
    use_gpu: bool,
    max_rounds: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Re-split empty clusters until none is left (DeepCluster's "empty cluster" handling).

    Each empty cluster takes a perturbed copy of a donor cluster drawn with probability proportional to its
    size (among clusters of >= 2 members) and half-splits its members; then every point is reassigned to its
    nearest centroid, which can empty clusters again, so the loop repeats. After `max_rounds` rounds the last
    split is kept without the reassignment: only ties (duplicated points) get that far, and there a split is
    as good as any assignment. Needs N >= k, which guarantees a donor with >= 2 members.
    """
    centroids = centroids.copy()
    assignments = assignments.copy()
    num_clusters = len(centroids)
    num_resplit = 0
    for round_index in range(max_rounds):
        counts = np.bincount(assignments, minlength=num_clusters)
        empty_clusters = np.flatnonzero(counts == 0)
        if empty_clusters.size == 0:
            break
        for empty in empty_clusters:
            weights = np.where(counts >= 2, counts, 0).astype(np.float64)
            donor = int(rng.choice(num_clusters, p=weights / weights.sum()))
            _split_into(features, centroids, assignments, int(empty), donor, rng)
            counts[empty] = np.count_nonzero(assignments == empty)
            counts[donor] -= counts[empty]
        num_resplit += empty_clusters.size
        if round_index + 1 < max_rounds:
            assignments = _nearest_centroid(features, centroids, use_gpu)
    return centroids, assignments, num_resplit


def kmeans(
    features: np.ndarray | Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    use_gpu: bool | None = None,
    init: Literal["random", "kmeans++"] = "random",
    nredo: int = 1,
    max_points_per_centroid: int | None = None,
    max_resplit_rounds: int = 10,
) -> KMeansResult:
    """Lloyd's k-means with faiss, then no empty cluster left.

    faiss already re-splits clusters that empty *during* its iterations; the final assignment to the final
    centroids can still leave some empty (ties, duplicated points, k close to N). Those are re-split as
    DeepCluster does (see `_resplit_empty_clusters`), so every one of the k pseudo-classes has a member.

    Args:
        features: (N, d), N >= k; float32 (converted).
        k: number of clusters.
        niter: Lloyd iterations (DeepCluster: 20). No early stop.
        seed: seeds the faiss initialisation and the re-split draws; the CPU result is a function of
            (features, k, niter, seed, init) for a fixed number of faiss threads. faiss on GPU is not bitwise
            reproducible.
        use_gpu: None: on the GPU(s) when faiss-gpu sees one; True: require one; False: CPU.
        init: "random" (k random points; faiss's default and DeepCluster's) or "kmeans++" (D^2 sampling, slower
            O(Nkd) initialisation, far less prone to merging well-separated groups).
        nredo: run k-means this many times (from different initialisations) and keep the lowest objective.
        max_points_per_centroid: faiss subsamples the training set to k * this many points; None trains on all
            N points, as DeepCluster does. The assignments always cover all N points.
        max_resplit_rounds: bound on the re-split / reassign loop (only reached with duplicated points).
    """
    x = _as_float32(features)
    num_points, dim = x.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if num_points < k:
        raise ValueError(f"k-means into {k} clusters needs at least {k} points, got {num_points}")
    if init not in _INIT_METHODS:
        raise ValueError(f"unknown init {init!r}; known: {', '.join(_INIT_METHODS)}")
    if max_resplit_rounds < 1:
        raise ValueError(f"max_resplit_rounds must be >= 1, got {max_resplit_rounds}")
    on_gpu = _resolve_use_gpu(use_gpu)
    clustering = faiss.Kmeans(
        dim,
        k,
        niter=niter,
        seed=seed,
        gpu=on_gpu,
        verbose=False,
        init_method=_INIT_METHODS[init],
        nredo=nredo,
        max_points_per_centroid=num_points if max_points_per_centroid is None else max_points_per_centroid,
        # Small sub-clusters are expected in the hierarchy; faiss would print a warning below 39 points/cluster.
        min_points_per_centroid=1,
    )
    clustering.train(x)
    centroids = np.ascontiguousarray(clustering.centroids, dtype=np.float32)
    assignments = _nearest_centroid(x, centroids, on_gpu)
    rng = np.random.default_rng(seed)
    centroids, assignments, num_resplit = _resplit_empty_clusters(
        x, centroids, assignments, rng, on_gpu, max_resplit_rounds
    )
    return KMeansResult(
        centroids=centroids,
        assignments=assignments,
        inertia=_inertia(x, centroids, assignments),
        num_resplit=num_resplit,
    )


# ---------------------------------------------------------------------------------------------------------
# Hierarchical k-means


@dataclass(frozen=True)
class HierarchicalAssignments:
    super_labels: np.ndarray  # (N,) int64 in 0..m-1
    sub_labels: np.ndarray  # (N,) int64, local to the super-cluster: 0..len(sub_centroids_per_super[s])-1
    super_centroids: np.ndarray  # (m, d)
    # one (n_s, d) array per super-cluster s, n_s = min(n, size of s): a small super-cluster has fewer.
    sub_centroids_per_super: list[np.ndarray]


def hierarchical_kmeans(
    features: np.ndarray | Tensor,
    num_super_clusters: int,
    num_sub_clusters: int,
    seed: int = 0,
    niter: int = 20,
    use_gpu: bool | None = None,
    init: Literal["random", "kmeans++"] = "random",
    nredo: int = 1,
) -> HierarchicalAssignments:
    """DeeperCluster's two-level k-means: m super-clusters, then n sub-clusters inside each.

    The paper clusters the whole set into m super-clusters, then each super-cluster independently (on its own
    workers) into k/m sub-clusters; a sample's pseudo-label is the pair (super, sub). Here the sub-clustering
    of super-cluster c runs with seed `seed + 1 + c`, so the whole tree is a function of `seed`. A super-cluster
    with fewer than n points gets one sub-cluster per point.

    With few clusters per level, random initialisation easily seeds two centroids in one true group and
    merges two others: on the 4 x 5 blobs of tests/test_clustering.py it recovers both levels (NMI >= 0.95)
    for 1 seed in 20 with init="random", nredo=1, and for 50 in 50 with init="random", nredo=10 or
    init="kmeans++", nredo=5.

    Args:
        features: (N, d), normally the output of `pca_whiten`.
        num_super_clusters: m (N >= m).
        num_sub_clusters: n, sub-clusters per super-cluster.
        seed, niter, use_gpu, init, nredo: as `kmeans`, for both levels.
    """
    x = _as_float32(features)
    if num_sub_clusters < 1:
        raise ValueError(f"num_sub_clusters must be >= 1, got {num_sub_clusters}")
    top = kmeans(x, num_super_clusters, niter=niter, seed=seed, use_gpu=use_gpu, init=init, nredo=nredo)
    sub_labels = np.zeros(len(x), dtype=np.int64)
    sub_centroids_per_super = []
    for cluster in range(num_super_clusters):
        members = np.flatnonzero(top.assignments == cluster)  # non-empty: kmeans re-splits empty clusters
        inner = kmeans(
            x[members],
            min(num_sub_clusters, len(members)),
            niter=niter,
            seed=seed + 1 + cluster,
            use_gpu=use_gpu,
            init=init,
            nredo=nredo,
        )
        sub_labels[members] = inner.assignments
        sub_centroids_per_super.append(inner.centroids)
    return HierarchicalAssignments(
        super_labels=top.assignments,
        sub_labels=sub_labels,
        super_centroids=top.centroids,
        sub_centroids_per_super=sub_centroids_per_super,
    )


# ---------------------------------------------------------------------------------------------------------
# Pseudo-labels and loss


def deepercluster_targets(
    super_labels: np.ndarray | Tensor,
    sub_labels: np.ndarray | Tensor,
    rotation: int | np.ndarray | Tensor,
    num_rotations: int = 4,
) -> tuple[Tensor, Tensor]:
    """DeeperCluster's pseudo-labels for a batch: (super_target, sub_target), both (N,) int64.

    The first level combines the clustering with RotNet: its classes are the Cartesian product of the m
    super-clusters and the `num_rotations` rotations applied to the input, so
    super_target = super_label * num_rotations + rotation, in 0..m*num_rotations-1 (4m classes for the usual
    0/90/180/270 degrees). The second level is the sub-cluster inside the super-cluster, sub_target = sub_label
    in 0..n-1; sub-clusters are computed on the unrotated images and shared by the 4 rotations.

    Args:
        super_labels, sub_labels: (N,) from `hierarchical_kmeans` for the images of the batch.
        rotation: index of the rotation applied to each image: an int for the whole batch or (N,).
        num_rotations: 4 in the paper; 1 turns the rotation part off (super_target = super_label).
    """
    super_labels = torch.as_tensor(super_labels, dtype=torch.long)
    sub_labels = torch.as_tensor(sub_labels, dtype=torch.long, device=super_labels.device)
    rotation = torch.as_tensor(rotation, dtype=torch.long, device=super_labels.device)
    if super_labels.shape != sub_labels.shape or super_labels.dim() != 1:
        raise ValueError(f"labels must both be (N,), got {tuple(super_labels.shape)} and {tuple(sub_labels.shape)}")
    if rotation.numel() and (rotation.min() < 0 or rotation.max() >= num_rotations):
        raise ValueError(f"rotation must be in 0..{num_rotations - 1}")
    return super_labels * num_rotations + rotation, sub_labels.clone()


def deepercluster_loss(
    super_logits: Tensor,
    sub_logits: Tensor,
    super_target: Tensor,
    sub_target: Tensor,
    weights: Tensor | None = None,
) -> Tensor:
    """DeeperCluster's loss: cross-entropy on the super-class plus cross-entropy on the sub-class within it.

    The paper (eq. 4-5) trains a convnet f with a super-class head V and one sub-class head W_s per super-class:

        min  1/N sum_i [ l(V f(x_i), y_i) + sum_s 1[y_i = s] l(W_s f(x_i), z_i) ]

    l the cross-entropy, y_i the super-class (cluster x rotation, `deepercluster_targets`), z_i the sub-class.
    Only the head of the sample's own super-class sees it, so the caller selects those logits, e.g.
    `all_heads(features)[torch.arange(N), head_index]` from (N, num_heads, n). Note the reference code
    (facebookresearch/DeeperCluster, src/trainer.py) keeps one sub-class head per super-*class*, i.e. per
    (super-cluster, rotation) pair, so head_index = super_target there; with num_rotations=1 it is the
    super-cluster. Both terms are batch means, summed with weight 1 as in the reference.

    Args:
        super_logits: (N, m * num_rotations).
        sub_logits: (N, n) logits of each sample's own sub-class head.
        super_target, sub_target: (N,) int64 from `deepercluster_targets`.
        weights: optional (N,) non-negative per-sample weights; both terms become weighted means
            sum(w * l) / sum(w) (0 when every weight is 0). DeepCluster samples images uniformly over the
            pseudo-labels, which equals weighting each image by the inverse size of its cluster; a weight of 0
            drops a sample (one without a pseudo-label) while keeping the batch shape.

    Returns:
        scalar loss.
    """
    if super_logits.dim() != 2 or sub_logits.dim() != 2 or len(super_logits) != len(sub_logits):
        raise ValueError(
            f"logits must be (N, classes) with the same N, got {tuple(super_logits.shape)} and "
            f"{tuple(sub_logits.shape)}"
        )
    if weights is None:
        return F.cross_entropy(super_logits.float(), super_target) + F.cross_entropy(sub_logits.float(), sub_target)
    per_sample = F.cross_entropy(super_logits.float(), super_target, reduction="none") + F.cross_entropy(
        sub_logits.float(), sub_target, reduction="none"
    )
    weights = weights.to(per_sample.dtype)
    # clamp: a batch whose samples all have weight 0 gives a loss of 0 (and zero gradients), not NaN.
    return (weights * per_sample).sum() / weights.sum().clamp_min(torch.finfo(per_sample.dtype).tiny)


# ---------------------------------------------------------------------------------------------------------
# Monitoring


def assignment_stats(
    previous: np.ndarray | None,
    current: np.ndarray,
    labels: np.ndarray | None = None,
    num_clusters: int | None = None,
) -> dict[str, float]:
    """Statistics of a clustering, for the log of every epoch.

    Keys: cluster_size_min / _max / _mean (over the num_clusters clusters, empty ones included),
    num_empty_clusters; nmi_previous (NMI between `previous` and `current`: how much the pseudo-labels moved
    since the last epoch, DeepCluster's stability curve) and fraction_changed (`fraction_changed`) when
    `previous` is given; nmi_labels (NMI against the true labels) when `labels` is given.

    Args:
        previous: (N,) assignments of the previous epoch, None on the first.
        current: (N,) assignments now. For a hierarchy, pass `super * n + sub` and num_clusters = m * n.
        labels: (N,) ground-truth classes, when known.
        num_clusters: k; None takes max(current) + 1 (then trailing empty clusters go unseen).
    """
    # Imported here: scikit-learn costs seconds to import, and processes that only cluster never need it.
    from sklearn.metrics import normalized_mutual_info_score

    current = np.asarray(current, dtype=np.int64)
    if num_clusters is None:
        num_clusters = int(current.max()) + 1 if current.size else 0
    sizes = np.bincount(current, minlength=num_clusters)
    stats = {
        "cluster_size_min": float(sizes.min()) if sizes.size else 0.0,
        "cluster_size_max": float(sizes.max()) if sizes.size else 0.0,
        "cluster_size_mean": float(sizes.mean()) if sizes.size else 0.0,
        "num_empty_clusters": float(np.count_nonzero(sizes == 0)),
    }
    if previous is not None:
        stats["nmi_previous"] = float(normalized_mutual_info_score(np.asarray(previous), current))
        stats["fraction_changed"] = fraction_changed(previous, current)
    if labels is not None:
        stats["nmi_labels"] = float(normalized_mutual_info_score(np.asarray(labels), current))
    return stats


def fraction_changed(previous: np.ndarray, current: np.ndarray) -> float:
    """Share of images that changed cluster between two clusterings of the same images.

    Cluster indices are arbitrary in every round, so clusters are matched first: each current cluster is
    identified with the previous cluster most of its members came from, and an image has changed when its
    previous cluster is not that one. A cluster split in two therefore counts as unchanged (each half keeps
    its majority); a cluster whose members scatter counts as changed. Majority matching, unlike a one-to-one
    (Hungarian) matching, scales to DeeperCluster's hundreds of thousands of clusters: one sparse contingency
    table.
    """
    from scipy.sparse import coo_matrix

    previous = np.asarray(previous, dtype=np.int64)
    current = np.asarray(current, dtype=np.int64)
    if previous.shape != current.shape:
        raise ValueError(f"previous and current must have the same shape, got {previous.shape} and {current.shape}")
    if current.size == 0:
        return 0.0
    ones = np.ones(current.size, dtype=np.int64)
    # duplicate (current, previous) pairs are summed when converted to CSR: the contingency table.
    table = coo_matrix((ones, (current, previous))).tocsr()
    kept = int(np.asarray(table.max(axis=1).todense()).sum())
    return 1.0 - kept / current.size
