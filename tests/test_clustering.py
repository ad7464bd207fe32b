"""DeeperCluster's clustering core on small synthetic data (all CPU, a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from raytrain_ssl.clustering import (
    _resplit_empty_clusters,
    assignment_stats,
    deepercluster_loss,
    deepercluster_targets,
    fraction_changed,
    hierarchical_kmeans,
    kmeans,
    pca_whiten,
    use_faiss_gpu,
)


def hierarchical_blobs(seed: int, num_super: int = 4, num_sub: int = 5, per_sub: int = 40, dim: int = 32):
    """Gaussian blobs in two levels: super centres far apart, sub centres around them, points around those.

    Returns (features, super_truth, flat_sub_truth) with flat_sub_truth = super * num_sub + sub.
    """
    rng = np.random.default_rng(seed)
    super_centres = rng.normal(scale=10.0, size=(num_super, 1, dim))
    sub_centres = super_centres + rng.normal(scale=2.5, size=(num_super, num_sub, dim))
    points = sub_centres[:, :, None, :] + rng.normal(scale=0.3, size=(num_super, num_sub, per_sub, dim))
    super_truth = np.repeat(np.arange(num_super), num_sub * per_sub)
    flat_sub_truth = np.repeat(np.arange(num_super * num_sub), per_sub)
    return points.reshape(-1, dim).astype(np.float32), super_truth, flat_sub_truth


# ---------------------------------------------------------------------------------------------------------
# pca_whiten


def test_pca_whiten_whitens_then_normalises():
    rng = np.random.default_rng(0)
    # correlated, anisotropic, off-centre features
    mixing = rng.normal(size=(48, 48)) * np.linspace(0.1, 5.0, 48)
    features = (rng.normal(size=(4000, 48)) @ mixing + 3.0).astype(np.float32)

    projected, whitening = pca_whiten(features, dim=16)

    assert projected.shape == (4000, 16) and projected.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)
    raw = whitening.apply(features, normalize=False)
    np.testing.assert_allclose(raw.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(raw.T, bias=True), np.eye(16), atol=1e-3)
    np.testing.assert_allclose(whitening.apply(features), projected, atol=1e-6)
    assert 0.0 < whitening.energy_kept < 1.0


def test_pca_whiten_dim_not_below_input_keeps_every_component():
    features = np.random.default_rng(1).normal(size=(500, 10)).astype(np.float32)
    projected, whitening = pca_whiten(features, dim=64)
    assert projected.shape == (500, 10) and whitening.dim_out == 10
    assert whitening.energy_kept == pytest.approx(1.0)


def test_pca_whiten_fewer_points_than_dimensions_stays_finite():
    features = np.random.default_rng(2).normal(size=(20, 64)).astype(np.float32)
    projected, _ = pca_whiten(features, dim=64)
    assert projected.shape == (20, 19)  # 20 centred points span 19 directions
    assert np.isfinite(projected).all()


# ---------------------------------------------------------------------------------------------------------
# kmeans and the empty-cluster re-split


def test_kmeans_is_deterministic_from_the_seed():
    features, _, _ = hierarchical_blobs(seed=3)
    first, again = kmeans(features, 12, seed=7), kmeans(features, 12, seed=7)
    np.testing.assert_array_equal(first.assignments, again.assignments)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    assert first.inertia == again.inertia
    other = kmeans(features, 12, seed=8)
    assert not np.array_equal(first.centroids, other.centroids)


def test_kmeans_inertia_matches_assignments():
    features, _, _ = hierarchical_blobs(seed=4)
    result = kmeans(features, 8)
    expected = ((features.astype(np.float64) - result.centroids[result.assignments]) ** 2).sum()
    assert result.inertia == pytest.approx(expected, rel=1e-6)
    assert result.assignments.dtype == np.int64 and result.centroids.shape == (8, 32)


@pytest.mark.parametrize("k", [60, 150, 200])
def test_kmeans_leaves_no_empty_cluster_with_duplicated_points(k):
    # 50 distinct points, each 4 times: with k > 50 identical centroids tie and faiss's final assignment
    # leaves clusters empty; the re-split must fill all k, and stay deterministic.
    distinct = np.random.default_rng(5).normal(size=(50, 16)).astype(np.float32)
    features = np.repeat(distinct, 4, axis=0)
    result = kmeans(features, k, seed=1)
    assert result.num_resplit > 0
    assert np.bincount(result.assignments, minlength=k).min() >= 1
    again = kmeans(features, k, seed=1)
    np.testing.assert_array_equal(result.assignments, again.assignments)


def test_kmeans_k_equal_to_number_of_points():
    features = np.random.default_rng(6).normal(size=(30, 4)).astype(np.float32)
    result = kmeans(features, 30)
    assert sorted(result.assignments.tolist()) == list(range(30))
    assert result.inertia == pytest.approx(0.0, abs=1e-8)


def test_resplit_takes_members_from_a_donor_with_at_least_two():
    # cluster 0: one point at -10; cluster 1: 19 points around +10; cluster 2: a centroid far from everything.
    rng = np.random.default_rng(7)
    features = np.concatenate([np.full((1, 2), -10.0), 10.0 + rng.normal(size=(19, 2))]).astype(np.float32)
    centroids = np.array([[-10.0, -10.0], [10.0, 10.0], [500.0, 500.0]], dtype=np.float32)
    assignments = np.array([0] + [1] * 19, dtype=np.int64)

    new_centroids, new_assignments, num_resplit = _resplit_empty_clusters(
        features, centroids, assignments, np.random.default_rng(0), use_gpu=False, max_rounds=10
    )

    assert num_resplit == 1
    assert new_assignments[0] == 0  # the singleton is never a donor
    sizes = np.bincount(new_assignments, minlength=3)
    assert sizes[1] >= 1 and sizes[2] >= 1 and sizes.sum() == 20
    # both halves of the donor sit where their members are, near +10
    assert np.abs(new_centroids[1:] - 10.0).max() < 3.0


def test_kmeans_rejects_bad_arguments():
    features = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="at least 6 points"):
        kmeans(features, 6)
    with pytest.raises(ValueError, match="known: random, kmeans\\+\\+"):
        kmeans(features, 2, init="greedy")


# ---------------------------------------------------------------------------------------------------------
# hierarchical_kmeans


def test_hierarchical_kmeans_recovers_both_levels():
    features, super_truth, flat_sub_truth = hierarchical_blobs(seed=0)
    # Random initialisation (the default, DeepCluster's) often merges two of 4 well-separated groups;
    # k-means++ with a few restarts does not.
    tree = hierarchical_kmeans(features, num_super_clusters=4, num_sub_clusters=5, seed=0, init="kmeans++", nredo=5)

    assert normalized_mutual_info_score(super_truth, tree.super_labels) >= 0.95
    flat_sub = tree.super_labels * 5 + tree.sub_labels
    assert normalized_mutual_info_score(flat_sub_truth, flat_sub) >= 0.95
    assert tree.super_centroids.shape == (4, 32)
    assert [c.shape for c in tree.sub_centroids_per_super] == [(5, 32)] * 4
    assert tree.sub_labels.min() == 0 and tree.sub_labels.max() == 4


def test_hierarchical_kmeans_is_deterministic_from_the_seed():
    features, _, _ = hierarchical_blobs(seed=1)
    first = hierarchical_kmeans(features, 4, 5, seed=3)
    again = hierarchical_kmeans(features, 4, 5, seed=3)
    np.testing.assert_array_equal(first.super_labels, again.super_labels)
    np.testing.assert_array_equal(first.sub_labels, again.sub_labels)
    for a, b in zip(first.sub_centroids_per_super, again.sub_centroids_per_super):
        np.testing.assert_array_equal(a, b)


def test_hierarchical_kmeans_small_super_cluster_gets_fewer_sub_clusters():
    rng = np.random.default_rng(2)
    big = rng.normal(size=(200, 8))
    tiny = 100.0 + rng.normal(size=(3, 8))  # a far group of 3 points: its own super-cluster
    features = np.concatenate([big, tiny]).astype(np.float32)

    tree = hierarchical_kmeans(features, num_super_clusters=2, num_sub_clusters=5, seed=0, init="kmeans++")

    tiny_cluster = tree.super_labels[-1]
    assert (tree.super_labels[-3:] == tiny_cluster).all() and (tree.super_labels[:200] != tiny_cluster).all()
    assert tree.sub_centroids_per_super[tiny_cluster].shape == (3, 8)
    assert sorted(tree.sub_labels[-3:].tolist()) == [0, 1, 2]
    assert tree.sub_centroids_per_super[1 - tiny_cluster].shape == (5, 8)


# ---------------------------------------------------------------------------------------------------------
# targets and loss


def test_deepercluster_targets_by_hand():
    super_labels = np.array([0, 2, 1, 2])
    sub_labels = np.array([3, 0, 4, 1])
    super_target, sub_target = deepercluster_targets(super_labels, sub_labels, rotation=torch.tensor([0, 1, 2, 3]))
    assert super_target.tolist() == [0, 9, 6, 11]  # super * 4 + rotation
    assert sub_target.tolist() == [3, 0, 4, 1]
    assert super_target.dtype == sub_target.dtype == torch.long

    same_rotation, _ = deepercluster_targets(super_labels, sub_labels, rotation=1)
    assert same_rotation.tolist() == [1, 9, 5, 9]
    no_rotation, _ = deepercluster_targets(super_labels, sub_labels, rotation=0, num_rotations=1)
    assert no_rotation.tolist() == [0, 2, 1, 2]
    with pytest.raises(ValueError, match="rotation"):
        deepercluster_targets(super_labels, sub_labels, rotation=4)


def test_deepercluster_loss_by_hand():
    super_logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0]])
    sub_logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    super_target = torch.tensor([0, 3])
    sub_target = torch.tensor([1, 2])

    loss = deepercluster_loss(super_logits, sub_logits, super_target, sub_target)

    def nll(logits, target):
        return math.log(sum(math.exp(v) for v in logits)) - logits[target]

    expected_super = (nll([2.0, 0.0, 0.0, 0.0], 0) + nll([0.0, 1.0, 0.0, 3.0], 3)) / 2
    expected_sub = (nll([0.0, 0.0, 0.0], 1) + nll([1.0, 2.0, 3.0], 2)) / 2
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected_super + expected_sub, rel=1e-6)


def test_deepercluster_loss_gradient_reaches_both_heads():
    generator = torch.Generator().manual_seed(0)
    super_logits = torch.randn(6, 8, generator=generator, requires_grad=True)
    sub_logits = torch.randn(6, 5, generator=generator, requires_grad=True)
    super_target = torch.randint(8, (6,), generator=generator)
    sub_target = torch.randint(5, (6,), generator=generator)
    loss = deepercluster_loss(super_logits, sub_logits, super_target, sub_target)
    loss.backward()
    assert super_logits.grad.abs().sum() > 0 and sub_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same N"):
        deepercluster_loss(super_logits, sub_logits[:5], torch.zeros(6, dtype=torch.long), torch.zeros(5).long())


def test_deepercluster_loss_weights():
    generator = torch.Generator().manual_seed(1)
    super_logits, sub_logits = torch.randn(5, 8, generator=generator), torch.randn(5, 3, generator=generator)
    super_target, sub_target = torch.tensor([0, 7, 3, 3, 1]), torch.tensor([2, 0, 1, 1, 0])
    plain = deepercluster_loss(super_logits, sub_logits, super_target, sub_target)

    ones = deepercluster_loss(super_logits, sub_logits, super_target, sub_target, torch.full((5,), 2.0))
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)  # a constant weight changes nothing
    # weight 0 drops a sample exactly
    dropped = deepercluster_loss(super_logits, sub_logits, super_target, sub_target, torch.tensor([1.0, 1, 0, 1, 1]))
    keep = [0, 1, 3, 4]
    expected = deepercluster_loss(super_logits[keep], sub_logits[keep], super_target[keep], sub_target[keep])
    assert dropped.item() == pytest.approx(expected.item(), rel=1e-6)
    # weight 3 on a sample counts it three times
    tripled = deepercluster_loss(super_logits, sub_logits, super_target, sub_target, torch.tensor([3.0, 1, 1, 1, 1]))
    rows = [0, 0, 0, 1, 2, 3, 4]
    expected = deepercluster_loss(super_logits[rows], sub_logits[rows], super_target[rows], sub_target[rows])
    assert tripled.item() == pytest.approx(expected.item(), rel=1e-6)
    # a batch without any weighted sample: 0 and finite gradients, not NaN
    logits = super_logits.clone().requires_grad_()
    nothing = deepercluster_loss(logits, sub_logits, super_target, sub_target, torch.zeros(5))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------------------
# assignment_stats


def test_assignment_stats():
    previous = np.array([0, 0, 1, 1, 2, 2])
    current = np.array([1, 1, 0, 0, 2, 2])  # the same partition, renamed
    labels = np.array([0, 0, 0, 1, 1, 1])

    stats = assignment_stats(previous, current, labels=labels, num_clusters=4)

    assert stats["cluster_size_min"] == 0.0 and stats["cluster_size_max"] == 2.0
    assert stats["cluster_size_mean"] == 1.5 and stats["num_empty_clusters"] == 1.0
    assert stats["nmi_previous"] == pytest.approx(1.0)
    assert stats["fraction_changed"] == 0.0  # renamed clusters are matched, not counted as moves
    assert stats["nmi_labels"] == pytest.approx(normalized_mutual_info_score(labels, current))

    first_epoch = assignment_stats(None, current)
    assert "nmi_previous" not in first_epoch and "nmi_labels" not in first_epoch
    assert first_epoch["num_empty_clusters"] == 0.0



def test_fraction_changed_matches_clusters_by_majority():
    previous = np.array([0, 0, 0, 1, 1, 1])
    # current cluster 0 = two of previous 0; current 1 = previous 0's third image + all of previous 1
    current = np.array([5, 5, 1, 1, 1, 1])
    assert fraction_changed(previous, current) == pytest.approx(1 / 6)
    assert fraction_changed(previous, previous + 10) == 0.0
    # a split keeps each half with its majority: nothing counted as changed
    assert fraction_changed(np.zeros(4, dtype=int), np.array([0, 0, 1, 1])) == 0.0
    # everything scattered: each current cluster keeps 1 of its 2 members
    assert fraction_changed(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        fraction_changed(previous, current[:5])


def test_faiss_runs_on_the_cpu_for_cpu_workers():
    import faiss

    assert use_faiss_gpu(worker_on_gpu=False) is False
    has_gpu_faiss = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    assert use_faiss_gpu(worker_on_gpu=True) is has_gpu_faiss
