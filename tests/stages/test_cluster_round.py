"""A DeeperCluster clustering round: pseudo-label table, and identical labels on 2 real gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gloo_ranks import run_on_two_ranks  # tests/ is on sys.path under pytest
from raytrain_ssl.config import DeeperClusterSection
from raytrain_ssl.stages.cluster_round import PseudoLabels, assign_pseudo_labels, cluster_features

NUM_SUPER, NUM_SUB = 4, 5


def _blobs(seed: int = 0, per_sub: int = 30, dim: int = 24):
    """Two-level Gaussian blobs (far super centres, sub centres around them) with their true flat labels."""
    rng = np.random.default_rng(seed)
    super_centres = rng.normal(scale=10.0, size=(NUM_SUPER, 1, dim))
    sub_centres = super_centres + rng.normal(scale=2.5, size=(NUM_SUPER, NUM_SUB, dim))
    points = sub_centres[:, :, None, :] + rng.normal(scale=0.3, size=(NUM_SUPER, NUM_SUB, per_sub, dim))
    truth = np.repeat(np.arange(NUM_SUPER * NUM_SUB), per_sub)
    keys = rng.permutation(10**6)[: len(truth)].astype(np.int64) * 7 + 3  # arbitrary, unique, unordered
    return points.reshape(-1, dim).astype(np.float32), keys, truth


SETTINGS = DeeperClusterSection(
    num_super_clusters=NUM_SUPER, num_sub_clusters=NUM_SUB, pca_dim=16, kmeans_init="kmeans++", kmeans_restarts=5
)


def test_pseudo_labels_lookup_weights_and_round_trip():
    rows = torch.tensor([[50, 1, 0], [10, 0, 0], [30, 0, 1], [20, 0, 1], [40, 1, 0]])
    pseudo = PseudoLabels.from_rows(rows, num_super=2, num_sub=2, round_index=3, epoch=6)

    assert pseudo.keys.tolist() == [10, 20, 30, 40, 50]
    super_labels, sub_labels, weights, found = pseudo.lookup(torch.tensor([30, 99, 50, 10, 5]))
    assert found.tolist() == [True, False, True, True, False]
    assert super_labels.tolist() == [0, 0, 1, 0, 0] and sub_labels.tolist() == [1, 0, 0, 0, 0]
    # uniform over the 2 super-clusters, then over their sub-clusters: (0,0) 1 image, (0,1) 2, (1,0) 2
    # -> weights N/(m n_s |c|) = 5/(2*2*1), 5/(2*2*2), 5/(2*1*2); they average to 1.
    assert pseudo.weights.tolist() == pytest.approx([1.25, 0.625, 0.625, 1.25, 1.25])
    assert float(pseudo.weights.mean()) == pytest.approx(1.0)
    assert weights.tolist() == pytest.approx([0.625, 0.0, 1.25, 1.25, 0.0])

    again = PseudoLabels.from_state_dict(pseudo.state_dict())
    assert again.digest() == pseudo.digest() and (again.round_index, again.epoch) == (3, 6)
    assert torch.equal(again.weights, pseudo.weights)
    moved = PseudoLabels.from_rows(rows[[1, 0, 2, 3, 4]], 2, 2, 3, 6)  # row order does not matter
    assert moved.digest() == pseudo.digest()
    changed = rows.clone()
    changed[0, 2] = 1
    assert PseudoLabels.from_rows(changed, 2, 2, 3, 6).digest() != pseudo.digest()


def test_cluster_features_recovers_blobs_and_reports_statistics():
    from sklearn.metrics import normalized_mutual_info_score  # here: spawned ranks import this module too

    features, keys, truth = _blobs()
    rows, stats, sizes = cluster_features(features, keys, truth, SETTINGS, seed=0, previous=None, use_gpu=False)

    assert rows[:, 0].tolist() == keys.tolist()
    flat = rows[:, 1] * NUM_SUB + rows[:, 2]
    assert normalized_mutual_info_score(truth, flat) >= 0.95
    assert stats["sub_nmi_labels"] >= 0.95 and stats["super_num_empty_clusters"] == 0
    assert sizes.sum() == len(keys) and len(sizes) == NUM_SUPER * NUM_SUB
    assert "sub_fraction_changed" not in stats  # first round: nothing to compare with

    previous = PseudoLabels.from_rows(torch.from_numpy(rows), NUM_SUPER, NUM_SUB, 0, 0)
    # the same features and seed give the same clusters again: nothing moved
    _, again, _ = cluster_features(features, keys, -np.ones_like(truth), SETTINGS, 0, previous, use_gpu=False)
    assert again["sub_fraction_changed"] == 0.0 and again["sub_nmi_previous"] == pytest.approx(1.0)
    assert "sub_nmi_labels" not in again  # unlabeled images: no NMI against labels


def test_cluster_features_refuses_duplicate_keys_and_too_few_images():
    features, keys, truth = _blobs()
    keys[1] = keys[0]
    with pytest.raises(ValueError, match="1 images share a key"):
        cluster_features(features, keys, truth, SETTINGS, 0, None, use_gpu=False)
    with pytest.raises(ValueError, match="cannot fill 4 x 5 clusters"):
        cluster_features(features[:10], keys[2:12], truth[:10], SETTINGS, 0, None, use_gpu=False)


def _two_rank_round(rank: int, out_dir: str) -> None:
    """Each rank holds a different, uneven part of the blobs; both must end with the same table."""
    features, keys, truth = _blobs()
    part = slice(0, 250) if rank == 0 else slice(250, None)  # 250 / 350 rows: sizes differ across ranks
    pseudo, stats, sizes = assign_pseudo_labels(
        torch.from_numpy(features[part]), torch.from_numpy(keys[part]), torch.from_numpy(truth[part]),
        SETTINGS, round_index=0, epoch=0, seed=0, previous=None, use_gpu=False,
    )  # fmt: skip
    assert (stats != {}) == (rank == 0) and (sizes is not None) == (rank == 0)
    torch.save(pseudo.state_dict(), f"{out_dir}/rank{rank}.pt")


def test_pseudo_labels_are_identical_on_every_rank(tmp_path):
    from sklearn.metrics import normalized_mutual_info_score

    run_on_two_ranks(_two_rank_round, str(tmp_path))
    tables = [PseudoLabels.from_state_dict(torch.load(tmp_path / f"rank{r}.pt")) for r in (0, 1)]
    assert tables[0].digest() == tables[1].digest()
    for name in ("keys", "super_labels", "sub_labels", "weights"):
        assert torch.equal(getattr(tables[0], name), getattr(tables[1], name)), name

    features, keys, truth = _blobs()
    assert tables[0].keys.tolist() == sorted(keys.tolist())  # every image of both ranks was clustered
    super_labels, sub_labels, _, found = tables[0].lookup(torch.from_numpy(keys))
    assert bool(found.all())
    assert normalized_mutual_info_score(truth, (super_labels * NUM_SUB + sub_labels).numpy()) >= 0.95
