"""Binary ranking metrics: AUROC (ties count one half), FPR at a fixed TPR, and the ROC curve.

Convention everywhere: `pos` are the scores of the positive class (out-of-distribution images, tokens
that carry a concept), `neg` those of the negative class, and a higher score means "more positive".
"""
from __future__ import annotations

import numpy as np


def _clean(pos, neg) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(pos, np.float64).ravel()
    neg = np.asarray(neg, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUROC needs scores of both classes (got {pos.size} positive, {neg.size} negative)")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("scores must be finite")
    return pos, neg


def midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n along axis 0, tied values sharing the mean of their ranks (float64)."""
    from scipy.stats import rankdata

    return rankdata(np.asarray(x), axis=0, method="average").astype(np.float64)


def auroc(pos, neg) -> float:
    """P(pos > neg) + P(pos == neg) / 2 over all (pos, neg) pairs (the Mann-Whitney U statistic / n_pos n_neg)."""
    pos, neg = _clean(pos, neg)
    r = midranks(np.concatenate([pos, neg]))
    n1, n0 = pos.size, neg.size
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def auroc_columns(scores: np.ndarray, positive: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """AUROC of every score column for every label column at once.

    scores (N, K); positive (N, C) bool; valid (N,) bool rows to use (default all). Returns (K, C)
    float64, NaN where a label column has no positive or no negative row. One ranking per score
    column, then rank sums per label by a matrix product.
    """
    scores = np.asarray(scores)
    positive = np.asarray(positive, bool)
    if valid is not None:
        scores, positive = scores[valid], positive[valid]
    r = midranks(scores)  # (N, K)
    n1 = positive.sum(0).astype(np.float64)  # (C,)
    n0 = positive.shape[0] - n1
    rank_sum = r.T @ positive.astype(np.float64)  # (K, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (rank_sum - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    out[:, (n1 == 0) | (n0 == 0)] = np.nan
    return out


def roc_curve(pos, neg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, predicting positive when score >= threshold,
    from (0, 0) (threshold +inf) to (1, 1)."""
    pos, neg = _clean(pos, neg)
    s = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_value = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_value]
    fp = np.cumsum(1 - y)[last_of_value]
    tpr = np.r_[0.0, tp / pos.size]
    fpr = np.r_[0.0, fp / neg.size]
    thr = np.r_[np.inf, s[last_of_value]]
    return fpr, tpr, thr


def fpr_at_tpr(pos, neg, tpr_target: float = 0.95) -> float:
    """The lowest FPR of a threshold rule (score >= t) whose TPR is at least `tpr_target`."""
    fpr, tpr, _ = roc_curve(pos, neg)
    return float(fpr[np.flatnonzero(tpr >= tpr_target - 1e-12)[0]])


def thin_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 200) -> tuple[list, list]:
    """At most `max_points` points of a ROC curve for plotting (ends kept, evenly spaced in between)."""
    n = len(fpr)
    idx = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
    return [round(float(v), 5) for v in fpr[idx]], [round(float(v), 5) for v in tpr[idx]]
