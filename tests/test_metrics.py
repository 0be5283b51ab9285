"""fedtune's classification metrics agree with scikit-learn's."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from fedtune.metrics import classification_metrics


def test_matches_sklearn_macro_averages() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 7, size=500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, 7, size=500))
    ours = classification_metrics(y_true, y_pred, num_labels=10)  # 3 labels never occur
    assert np.isclose(ours["accuracy"], accuracy_score(y_true, y_pred))
    assert np.isclose(ours["macro_f1"], f1_score(y_true, y_pred, average="macro"))
    assert np.isclose(ours["precision"], precision_score(y_true, y_pred, average="macro", zero_division=0))
    assert np.isclose(ours["recall"], recall_score(y_true, y_pred, average="macro", zero_division=0))
