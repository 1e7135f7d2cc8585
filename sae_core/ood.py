"""Out-of-distribution detection from SAE features and from raw activations, with AUROC and FPR@95.

Every detector is fitted on features of in-distribution *training* images only (never on the
evaluated ID or OOD images) and returns a score per image, higher = more likely OOD.

SAE detectors (`sae_*`, on the per-image pooled SAE codes of sae_core.image_features):
    sae_recon        mean over the image's tokens of the SAE's relative reconstruction error
    sae_recon_max    the same, max over the patch tokens (an unseen object lives in a few patches)
    sae_resid_max    max over the patch tokens of the residual norm ||x - x_hat|| (what the dictionary
                     cannot express, not divided by ||x||)
    sae_knn          cosine distance to the k-th nearest training image in latent space
    sae_mahalanobis  Mahalanobis distance to the training codes (one Gaussian, shrunk covariance)
    sae_mahalanobis_class  min over classes of it, with class means and a shared covariance
    sae_set_novelty  1 - the largest Jaccard similarity between the image's set of active latents
                     and that of any training image (no training image fired this set of concepts)
    sae_rare         mean surprise -log p_j of the image's active latents, p_j = the latent's firing
                     rate on training images (add-one smoothed)
    sae_msp          1 - max softmax of a linear probe on the codes trained on the ID training labels
Raw baselines (`raw_*`, on the pooled raw activations, the same pooling): raw_knn, raw_mahalanobis,
raw_mahalanobis_class, raw_msp.
Combined (with held-out ID calibration images, `cal`): sae_combined / raw_combined = the mean over every
single detector of the family of its calibrated surprise -log p, p = the fraction of calibration images
scoring at least as high (add-one smoothed); a fixed rule, no weights, no choice of detectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .roc import auroc, fpr_at_tpr, roc_curve, thin_curve

SHRINK = 1e-3
"""Covariance shrinkage: Sigma + SHRINK * trace(Sigma)/d * I (SAE codes have latents that never fire)."""


# ----------------------------------------------------------------------------------------------
# Detectors
# ----------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(t, dim=1)


def knn_distance(bank: np.ndarray, queries: np.ndarray, k: int = 10, chunk: int = 2048) -> np.ndarray:
    """Cosine distance (1 - cos) of each query to its k-th nearest bank row (Sun et al. 2022's rule on
    unit-normalised features; an all-zero row has distance 1 to everything)."""
    B = _unit(bank)
    k = min(k, B.shape[0])
    out = []
    for a in range(0, len(queries), chunk):
        sim = _unit(queries[a:a + chunk]) @ B.T
        out.append((1.0 - sim.topk(k, dim=1).values[:, -1]).numpy())
    return np.concatenate(out).astype(np.float64)


def _precision(centered: np.ndarray) -> np.ndarray:
    x = np.asarray(centered, np.float64)
    cov = x.T @ x / max(len(x) - 1, 1)
    d = cov.shape[0]
    cov += SHRINK * max(np.trace(cov) / d, 1e-12) * np.eye(d)
    return np.linalg.inv(cov)


def mahalanobis_fit(train: np.ndarray, labels: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Squared Mahalanobis distance to the training rows: to their mean (labels None) or the smallest over
    class means with the shared within-class covariance (Lee et al. 2018)."""
    x = np.asarray(train, np.float64)
    if labels is None:
        means = x.mean(0, keepdims=True)
        prec = _precision(x - means)
    else:
        labels = np.asarray(labels)
        classes, inv = np.unique(labels, return_inverse=True)
        means = np.stack([x[inv == c].mean(0) for c in range(len(classes))])
        prec = _precision(x - means[inv])

    # whiten once: d(q, m)^2 = ||L^T q - L^T m||^2 with prec = L L^T
    L = np.linalg.cholesky(prec)
    mw = means @ L

    def score(q: np.ndarray) -> np.ndarray:
        qw = np.asarray(q, np.float64) @ L
        d2 = (qw * qw).sum(1)[:, None] - 2 * qw @ mw.T + (mw * mw).sum(1)[None, :]
        return np.maximum(d2.min(1), 0.0)

    return score


def set_novelty(train_codes: np.ndarray, codes: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """1 - max over training images of the Jaccard similarity of active-latent sets (codes > 0).
    An image with no active latent has novelty 1 unless some training image had none either."""
    A = torch.from_numpy(np.ascontiguousarray(train_codes > 0, dtype=np.float32))
    na = A.sum(1)
    out = []
    for a in range(0, len(codes), chunk):
        Q = torch.from_numpy(np.ascontiguousarray(codes[a:a + chunk] > 0, dtype=np.float32))
        inter = Q @ A.T
        union = Q.sum(1, keepdim=True) + na[None, :] - inter
        jac = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
        out.append((1.0 - jac.max(1).values).numpy())
    return np.concatenate(out).astype(np.float64)


def rarity(train_codes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Mean of -log p_j over the image's active latents j, p_j = (fires_j + 1) / (N + 2) on training
    images; 0 for an image without active latents."""
    p = ((train_codes > 0).sum(0) + 1.0) / (len(train_codes) + 2.0)
    surprise = -np.log(p)
    act = codes > 0
    n = act.sum(1)
    return np.where(n > 0, (act * surprise).sum(1) / np.maximum(n, 1), 0.0)


def calibrated_surprise(cal: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """-log p of each score, p = (#{calibration scores >= it} + 1) / (n_cal + 1): the upper-tail empirical
    p-value of a held-out ID image scoring as high (a conformal p-value), on one scale for every detector."""
    c = np.sort(np.asarray(cal, np.float64))
    at_least = len(c) - np.searchsorted(c, np.asarray(scores, np.float64), side="left")
    return -np.log((at_least + 1.0) / (len(c) + 1.0))


def combine_calibrated(scores: dict[str, np.ndarray], cal_scores: dict[str, np.ndarray], names) -> np.ndarray:
    """Mean over `names` of calibrated_surprise(cal_scores[name], scores[name]) (Fisher's combination / 2n)."""
    return np.mean([calibrated_surprise(cal_scores[n], scores[n]) for n in names], axis=0)


def msp_fit(train: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """1 - max softmax probability of a linear probe trained on the training labels (Hendrycks & Gimpel)."""
    from .probes import fit_probe

    probe = fit_probe(train, labels)
    return lambda q: 1.0 - probe.proba(q).max(1).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@dataclass
class OODResult:
    methods: dict = field(default_factory=dict)
    """name -> {"auroc", "fpr95", "family": "sae"|"raw", "description"}."""
    curves: dict = field(default_factory=dict)
    """name -> {"fpr": [...], "tpr": [...]} (at most 200 points)."""

    def best(self, family: str) -> tuple[str | None, float | None]:
        # the highest AUROC, and on a tie the first name, as the explorer's table orders them (it took the last)
        items = [(-m["auroc"], n) for n, m in self.methods.items() if m["family"] == family]
        if not items:
            return None, None
        a, n = min(items)
        return n, -a


DESCRIPTIONS = {
    "sae_recon": "SAE relative reconstruction error, mean over tokens",
    "sae_recon_max": "SAE relative reconstruction error, max over patch tokens",
    "sae_resid_max": "SAE residual norm ||x - x_hat||, max over patch tokens",
    "sae_combined": "mean calibrated surprise -log p over every single SAE detector (p against held-out ID images)",
    "raw_combined": "mean calibrated surprise -log p over every single raw detector (p against held-out ID images)",
    "sae_knn": "cosine distance to the k-th nearest training image, pooled SAE codes",
    "sae_mahalanobis": "Mahalanobis distance to the training codes",
    "sae_mahalanobis_class": "min over classes of the Mahalanobis distance (shared covariance), SAE codes",
    "sae_set_novelty": "1 - max Jaccard similarity of the set of active latents to a training image's",
    "sae_rare": "mean surprise -log p of the active latents (firing rates on training images)",
    "sae_msp": "1 - max softmax of a linear probe on SAE codes (ID training labels)",
    "raw_knn": "cosine distance to the k-th nearest training image, pooled raw activations",
    "raw_mahalanobis": "Mahalanobis distance to the training activations",
    "raw_mahalanobis_class": "min over classes of the Mahalanobis distance (shared covariance), raw activations",
    "raw_msp": "1 - max softmax of a linear probe on raw activations (ID training labels)",
}


def ood_scores(fit, test, fit_labels: np.ndarray | None = None, k: int = 10,
               progress: Callable[[str], None] | None = None, cal=None) -> dict[str, np.ndarray]:
    """Scores of every detector on `test` (ImageFeatures), fitted on `fit` (ImageFeatures of ID training
    images). Label-based detectors (msp, mahalanobis_class) run only when `fit_labels` is given. With
    `cal` (ImageFeatures of held-out ID images, disjoint from fit and test), every detector also scores
    them and `sae_combined` / `raw_combined` are added."""
    out: dict[str, np.ndarray] = {}
    rows = test if cal is None else type(test).concat([test, cal])

    def put(name, fn):
        if progress:
            progress(name)
        out[name] = np.asarray(fn(), np.float64)

    put("sae_recon", lambda: rows.recon_mean)
    put("sae_recon_max", lambda: rows.recon_max)
    put("sae_resid_max", lambda: rows.resid_max)
    for fam, tr, te in (("sae", fit.codes, rows.codes), ("raw", fit.raw, rows.raw)):
        put(f"{fam}_knn", lambda: knn_distance(tr, te, k))
        put(f"{fam}_mahalanobis", lambda: mahalanobis_fit(tr)(te))
        if fit_labels is not None:
            put(f"{fam}_mahalanobis_class", lambda: mahalanobis_fit(tr, fit_labels)(te))
            put(f"{fam}_msp", lambda: msp_fit(tr, fit_labels)(te))
    put("sae_set_novelty", lambda: set_novelty(fit.codes, rows.codes))
    put("sae_rare", lambda: rarity(fit.codes, rows.codes))
    if cal is None:
        return out
    n = len(test)
    cal_scores = {name: s[n:] for name, s in out.items()}
    out = {name: s[:n] for name, s in out.items()}
    for fam in ("sae", "raw"):
        names = [name for name in out if name.startswith(fam + "_")]
        put(f"{fam}_combined", lambda: combine_calibrated(out, cal_scores, names))
    return out


def evaluate(scores: dict[str, np.ndarray], is_ood: np.ndarray, ood_groups: np.ndarray | None = None) -> OODResult:
    """AUROC and FPR at 95% TPR (OOD = positive) per detector, and thinned ROC curves; with `ood_groups`
    (a group name per OOD row), also the AUROC of each group of OOD images against all ID images."""
    is_ood = np.asarray(is_ood, bool)
    res = OODResult()
    for name, s in scores.items():
        pos, neg = s[is_ood], s[~is_ood]
        fpr, tpr, _ = roc_curve(pos, neg)
        fx, ty = thin_curve(fpr, tpr)
        res.methods[name] = {"auroc": auroc(pos, neg), "fpr95": fpr_at_tpr(pos, neg, 0.95),
                             "family": name.split("_", 1)[0], "description": DESCRIPTIONS.get(name, name)}
        res.curves[name] = {"fpr": fx, "tpr": ty}
        if ood_groups is not None:
            res.methods[name]["auroc_by_group"] = {str(g): auroc(pos[ood_groups == g], neg)
                                                   for g in np.unique(ood_groups)}
    return res


def world_ood_groups(factors_of, ids, ood_shape: str, ood_colour: str) -> np.ndarray:
    """Which held-out factor each OOD image of the world shows: "shape", "colour" or "both"."""
    out = []
    for i in ids:
        objs = factors_of(int(i))["objects"]
        shape = any(o["shape"] == ood_shape for o in objs)
        colour = any(o["colour"] == ood_colour for o in objs)
        out.append("both" if shape and colour else "shape" if shape else "colour" if colour else "none")
    return np.asarray(out)


def roc_figure(result: OODResult, title: str = "OOD detection (ROC)"):
    """A plotly figure: one ROC line per detector, SAE solid, raw dashed, AUROC in the legend."""
    import plotly.graph_objects as go

    fig = go.Figure()
    order = sorted(result.methods, key=lambda n: (result.methods[n]["family"] != "sae", -result.methods[n]["auroc"]))
    for name in order:
        m, c = result.methods[name], result.curves[name]
        fig.add_trace(go.Scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=f"{name} ({m['auroc']:.3f})",
                                 line=dict(dash="solid" if m["family"] == "sae" else "dash")))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(color="grey", dash="dot")))
    fig.update_layout(title=title, xaxis_title="false positive rate (ID flagged)", yaxis_title="true positive rate (OOD caught)",
                      template="plotly_white", legend_title="detector (AUROC)", xaxis_range=[0, 1], yaxis_range=[0, 1.02])
    return fig
