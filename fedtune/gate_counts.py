"""What a site's release-gate score is made of, and how the coordinator reads the total.

A site scores the candidate (the device model, on the device runtime) and the PyTorch
model of the final round on its own validation split and sends one vector of fractions
of its n examples, never an example: for a classifier, per class the true positives,
false positives and false negatives of each model, then the share where the two models
agree; for a causal LM, each model's exact match and their agreement. Under SecAgg+
the vectors travel masked and the coordinator only sees their n-weighted mean, which is
the federation's own fractions: accuracy is the sum of the true positives, and each
class's F1 = 2TP / (2TP + FP + FN) does not depend on the common scale."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

GATE_KEY = "fedtune-gate"  # the fit-config key of a gate round: {"model": NAME, "version": NAME}
GATE_FILE = "gate.json"  # in the run folder: the gate's result, which `fedtune gate` promotes on
PARTS = ("tp_torch", "fp_torch", "fn_torch", "tp_device", "fp_device", "fn_device")


def vector_length(num_labels: int) -> int:
    """A classifier's vector (num_labels > 0), or a causal LM's (num_labels = 0: 3 values)."""
    return len(PARTS) * num_labels + 1 if num_labels > 0 else 3


def completion_vector(torch_hits: np.ndarray, device_hits: np.ndarray, agree: np.ndarray) -> np.ndarray:
    """A causal LM site's vector: exact match of each model and their agreement, as fractions."""
    n = max(len(torch_hits), 1)
    return np.array([np.sum(torch_hits) / n, np.sum(device_hits) / n, np.sum(agree) / n], dtype=np.float32)


def score_vector(gold: np.ndarray, torch_pred: np.ndarray, device_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """One site's vector (fractions of its examples), float32."""
    n = max(len(gold), 1)
    out = np.zeros(vector_length(num_labels), dtype=np.float64)
    for k, pred in enumerate((torch_pred, device_pred)):
        tp = np.bincount(gold[pred == gold], minlength=num_labels)[:num_labels]
        fp = np.bincount(pred[pred != gold], minlength=num_labels)[:num_labels]
        fn = np.bincount(gold[pred != gold], minlength=num_labels)[:num_labels]
        for j, part in enumerate((tp, fp, fn)):
            start = (3 * k + j) * num_labels
            out[start : start + num_labels] = part / n
    out[-1] = float(np.mean(torch_pred == device_pred)) if len(gold) else 0.0
    return out.astype(np.float32)


@dataclass(frozen=True)
class GateScore:
    """The two models on some examples (a site's, or the federation's)."""

    accuracy_torch: float  # a causal LM's: exact match
    accuracy_device: float
    agreement: float
    macro_f1_torch: float | None = None  # classifiers only
    macro_f1_device: float | None = None

    @property
    def drop_pt(self) -> float:
        """Accuracy points the device model loses against the PyTorch model."""
        return 100.0 * (self.accuracy_torch - self.accuracy_device)

    def to_json(self) -> dict[str, float]:
        values = {k: round(v, 6) for k, v in asdict(self).items() if v is not None}
        return {**values, "drop_pt": round(self.drop_pt, 4)}


def read_vector(vector: np.ndarray, num_labels: int) -> GateScore:
    """The scores a (mean) vector stands for."""
    v = np.asarray(vector, dtype=np.float64).ravel()
    if v.size != vector_length(num_labels):
        raise ValueError(f"a gate vector for {num_labels} labels has {vector_length(num_labels)} values, got {v.size}")
    if num_labels == 0:
        return GateScore(accuracy_torch=float(v[0]), accuracy_device=float(v[1]), agreement=float(v[2]))
    parts = v[:-1].reshape(len(PARTS), num_labels)

    def macro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
        denom = 2 * tp + fp + fn
        present = denom > 1e-9
        return float(np.mean(2 * tp[present] / denom[present])) if present.any() else 0.0

    return GateScore(
        accuracy_torch=float(parts[0].sum()),
        accuracy_device=float(parts[3].sum()),
        macro_f1_torch=macro_f1(parts[0], parts[1], parts[2]),
        macro_f1_device=macro_f1(parts[3], parts[4], parts[5]),
        agreement=float(v[-1]),
    )
