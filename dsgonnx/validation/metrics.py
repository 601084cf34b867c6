"""Accuracy and fidelity metrics from the two models' outputs (plain numpy, no ORT).

Definitions (the report's documented keys use them as they are):

* top-k: a sample counts when its label is among the k highest scores. Ties are broken
  towards the lower class index, exactly as ``numpy.argmax`` does for top-1, so top-1 is
  ``argmax == label``. Accuracies are in percent; top-5 is undefined (None) below 5 classes.
* drop: FP accuracy minus quantized accuracy, in percentage points, computed from the
  integer counts so that e.g. 1.1 points compares equal to a threshold of 1.1.
* agreement: fraction (0–1) of samples whose top-1 class is the same for both models.
* SQNR: ``10·log10(Σ fp² / Σ (fp − q)²)`` over all outputs, in dB; +inf for identical
  outputs, None when an output holds NaN/inf.
* KL: mean over samples of ``KL(softmax(fp) ‖ softmax(q))`` in nats. When the FP outputs
  already are probabilities (every row non-negative and summing to 1 ± 0.01, e.g. a
  Softmax at the end of the graph) they are used as they are instead of being softmaxed
  again: exact zeros (a quantized softmax outputs them) become the smallest normal float32
  (~1.2e-38) and each row is renormalised to sum to 1.

Non-finite scores (NaN, ±inf: a broken quantized model) rank below every finite score.

A one-output (binary) head is scored as two classes: a logit ``z`` as the scores ``[0, z]``
(class 1 when z > 0; softmax gives the sigmoid, so KL is the Bernoulli one), a probability
``p`` (every output in [0, 1]) as ``[1 − p, p]`` (class 1 when p > 0.5). Agreement is then
agreement of the decision, accuracy binary accuracy with labels 0/1; SQNR is computed on
the one output itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROBABILITY_TOLERANCE = 1e-2
PROBABILITY_FLOOR = float(np.finfo(np.float32).tiny)  # replaces exact zeros only


@dataclass(frozen=True)
class Metrics:
    num_samples: int
    num_classes: int
    output_kind: str  # "logits" or "probabilities"
    labelled: bool
    fp_top1: float | None
    fp_top5: float | None
    q_top1: float | None
    q_top5: float | None
    drop_top1: float | None
    drop_top5: float | None
    agreement: float
    sqnr_db: float | None
    kl: float | None
    nonfinite_fp: int
    nonfinite_q: int


def binary_head(outputs: np.ndarray) -> str | None:
    """"binary logit" or "binary probability" for an N×1 output, else None."""
    if outputs.ndim != 2 or outputs.shape[1] != 1:
        return None
    finite = outputs[np.isfinite(outputs)]
    return "binary probability" if finite.size and finite.min() >= 0 and finite.max() <= 1 else "binary logit"


def class_scores(outputs: np.ndarray, head: str | None) -> np.ndarray:
    """N×C scores; a binary head's one output as two classes (see the module docstring)."""
    if head == "binary probability":
        return np.concatenate([1 - outputs, outputs], axis=1)
    if head == "binary logit":
        return np.concatenate([np.zeros_like(outputs), outputs], axis=1)
    return outputs


def num_classes(outputs: np.ndarray) -> int:
    """The classes an N×C output scores: 2 for a binary (one-output) head."""
    return 2 if outputs.shape[1] == 1 else outputs.shape[1]


def compare_outputs(fp: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> Metrics:
    """All metrics for FP outputs ``fp`` and quantized outputs ``q`` (both N×C)."""
    if fp.shape != q.shape or fp.ndim != 2:
        raise ValueError(f"outputs must both be N×C, got {fp.shape} and {q.shape}")
    head = binary_head(fp)
    sqnr = sqnr_db(fp, q)
    fp, q = class_scores(fp, head), class_scores(q, head)
    n, classes = fp.shape
    probabilities = looks_like_probabilities(fp)
    fp_correct = {k: _correct_count(fp, labels, k) for k in (1, 5)} if labels is not None else {}
    q_correct = {k: _correct_count(q, labels, k) for k in (1, 5)} if labels is not None else {}
    return Metrics(
        num_samples=n,
        num_classes=classes,
        output_kind=head or ("probabilities" if probabilities else "logits"),
        labelled=labels is not None,
        fp_top1=_percent(fp_correct.get(1), n),
        fp_top5=_percent(fp_correct.get(5), n),
        q_top1=_percent(q_correct.get(1), n),
        q_top5=_percent(q_correct.get(5), n),
        drop_top1=_drop(fp_correct.get(1), q_correct.get(1), n),
        drop_top5=_drop(fp_correct.get(5), q_correct.get(5), n),
        agreement=top1_agreement(fp, q),
        sqnr_db=sqnr,
        kl=mean_kl(fp, q, probabilities),
        nonfinite_fp=int((~np.isfinite(fp)).any(axis=1).sum()),
        nonfinite_q=int((~np.isfinite(q)).any(axis=1).sum()),
    )


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best classes per row, best first, ties to the lower index."""
    ranked = np.where(np.isfinite(scores), scores.astype(np.float64), -np.inf)
    return np.argsort(-ranked, axis=1, kind="stable")[:, :k]


def top1_agreement(fp: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(top_k(fp, 1)[:, 0] == top_k(q, 1)[:, 0]))


def sqnr_db(fp: np.ndarray, q: np.ndarray) -> float | None:
    fp64, q64 = fp.astype(np.float64), q.astype(np.float64)
    return sqnr_from_sums(float(np.sum(fp64 * fp64)), float(np.sum((fp64 - q64) ** 2)))


def sqnr_from_sums(signal: float, noise: float) -> float | None:
    """``10·log10(signal / noise)`` from the two sums (Σ fp², Σ (fp − q)²): +inf where the noise
    is 0, −inf where the signal is, None where either is not finite."""
    if not (np.isfinite(noise) and np.isfinite(signal)):
        return None
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def finite_or_none(value: float | None, digits: int | None = None) -> float | None:
    """``value`` (rounded to ``digits`` where given) where it is a finite number, else None (JSON
    has no inf or NaN: identical outputs give an SQNR of +inf)."""
    if value is None or not math.isfinite(value):
        return None
    return value if digits is None else round(value, digits)


def mean_kl(fp: np.ndarray, q: np.ndarray, probabilities: bool) -> float | None:
    log_p = _log_probabilities(fp, probabilities)
    log_q = _log_probabilities(q, probabilities)
    per_sample = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    value = float(np.mean(per_sample))
    return value if np.isfinite(value) else None


def looks_like_probabilities(scores: np.ndarray) -> bool:
    """True when every row is non-negative and sums to 1 (within 0.01)."""
    if not np.isfinite(scores).all() or (scores < 0).any():
        return False
    return bool(np.all(np.abs(scores.astype(np.float64).sum(axis=1) - 1.0) <= PROBABILITY_TOLERANCE))


def _log_probabilities(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    x = scores.astype(np.float64)
    if probabilities:
        x = np.clip(x, PROBABILITY_FLOOR, None)
        return np.log(x / x.sum(axis=1, keepdims=True))
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _correct_count(scores: np.ndarray, labels: np.ndarray, k: int) -> int | None:
    if k > scores.shape[1]:
        return None
    return int(np.sum(np.any(top_k(scores, k) == labels[:, None], axis=1)))


def _percent(count: int | None, n: int) -> float | None:
    return None if count is None else 100.0 * count / n


def _drop(fp_count: int | None, q_count: int | None, n: int) -> float | None:
    if fp_count is None or q_count is None:
        return None
    return 100.0 * (fp_count - q_count) / n
