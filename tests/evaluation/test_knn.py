import numpy as np

from raytrain_ssl.evaluation.knn import knn_accuracy, knn_class_scores


def naive_scores(bank, bank_labels, queries, k, temperature, num_classes):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = np.zeros((len(queries), num_classes))
    for q, query in enumerate(queries):
        sims = bank @ query
        for j in np.argsort(-sims)[:k]:
            scores[q, bank_labels[j]] += np.exp(sims[j] / temperature)
    return scores


def test_scores_match_naive_loop():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    labels = rng.integers(0, 3, size=50)
    got = knn_class_scores(bank, labels, queries, k=5, temperature=0.5, num_classes=3)
    np.testing.assert_allclose(got, naive_scores(bank, labels, queries, 5, 0.5, 3), rtol=1e-4)


def test_separable_clusters_are_classified_and_random_labels_are_not():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 5
    labels = np.repeat(np.arange(4), 30)
    bank = centres[labels] + rng.normal(size=(120, 16))
    queries = centres[labels[:40]] + rng.normal(size=(40, 16))
    assert knn_accuracy(bank, labels, queries, labels[:40], k=10)["knn_top1"] == 1.0
    shuffled = rng.permutation(labels)
    assert knn_accuracy(bank, shuffled, queries, labels[:40], k=10)["knn_top1"] < 0.6
