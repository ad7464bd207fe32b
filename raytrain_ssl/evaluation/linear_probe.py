"""Offline linear probe: multinomial logistic regression on frozen features.

scikit-learn's L-BFGS logistic regression on standardised features is the usual offline protocol (as in
CLIP's and many SSL papers' linear-probe evaluations); nothing is hand-written here.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    c: float = 1.0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Top-1/top-5 on the test features of a probe fitted on the train features."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(train_features, train_labels)
    scores = probe.predict_proba(test_features)
    classes = probe.classes_
    order = np.argsort(-scores, axis=1)
    ranked = classes[order]
    top1 = float(np.mean(ranked[:, 0] == test_labels))
    top5 = float(np.mean((ranked[:, :5] == test_labels[:, None]).any(axis=1)))
    return {"linear_probe_top1": top1, "linear_probe_top5": top5}
