"""Linear probes: softmax regression on image features, factor classification and held-out combinations.

A probe standardises its inputs with the training rows' mean and standard deviation, then fits a
multinomial logistic regression (full-batch L-BFGS, L2 penalty chosen on a 10% split of the training
rows among `L2_GRID`, then refitted on all of them). It is used to classify the embedded world's
factors (colour, shape, ...) from SAE codes or raw activations, and its maximum softmax probability
is an OOD baseline (sae_core.ood).

Held-out combinations: (shape, colour) pairs of the training images are split into seen and unseen
combinations so that every shape and every colour still occurs in some seen pair; shape and colour
probes are trained on images of seen pairs only and tested on images of unseen pairs (and, for
reference, on test images of seen pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import UserError

L2_GRID = (1e-4, 1e-3, 1e-2)
FACTORS = ("colour", "shape", "family", "colour_group", "size", "position", "texture")


@dataclass
class LinearProbe:
    """A fitted softmax probe: classes, standardisation and weights (W (d, C), b (C,))."""

    classes: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    W: np.ndarray
    b: np.ndarray
    l2: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.W + self.b

    def proba(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[self.logits(x).argmax(1)]

    def accuracy(self, x: np.ndarray, y: Sequence) -> float:
        return float(np.mean(self.predict(x) == np.asarray(y)))


def _fit_softmax(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[1]
    W = torch.zeros(d, n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # a caller inside torch.no_grad() (an evaluation loop) would stop the fit
        opt.step(closure)
    return W.detach(), b.detach()


def fit_probe(x: np.ndarray, y: Sequence, l2: float | None = None, max_iter: int = 200, seed: int = 0) -> LinearProbe:
    """Fit a softmax probe on features x (N, d) and labels y (N,); l2=None picks it among L2_GRID."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) != len(y):
        raise UserError(f"probe features must be (N, d) with one label per row; got {x.shape} and {len(y)} labels.")
    classes, yi = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise UserError("a probe needs at least two classes in its training labels.")
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    xs = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(yi.astype(np.int64))
    if l2 is None:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(x))
        n_val = max(1, len(x) // 10)
        va, tr = perm[:n_val], perm[n_val:]
        best = (-1.0, L2_GRID[0])
        for lam in L2_GRID:
            W, b = _fit_softmax(xs[tr], yt[tr], len(classes), lam, max_iter)
            acc = float(((xs[va] @ W + b).argmax(1) == yt[va]).float().mean())
            if acc > best[0] + 1e-9:
                best = (acc, lam)
        l2 = best[1]
    W, b = _fit_softmax(xs, yt, len(classes), l2, max_iter)
    return LinearProbe(classes, mean.astype(np.float32), std, W.numpy(), b.numpy(), float(l2))


# ----------------------------------------------------------------------------------------------
# Labels of the embedded world
# ----------------------------------------------------------------------------------------------
def world_factor_labels(factors_of, ids: Sequence[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per factor type, the value of the image's only object (texture: the background), and a mask of
    single-object images; object factors of two-object images are "" (ambiguous, not used)."""
    out = {f: [] for f in FACTORS}
    single = []
    for i in ids:
        fac = factors_of(int(i))
        objs = fac["objects"]
        single.append(len(objs) == 1)
        for f in FACTORS:
            if f == "texture":
                out[f].append(fac["background"]["texture"])
            else:
                out[f].append(objs[0][f] if len(objs) == 1 else "")
    return {f: np.asarray(v) for f, v in out.items()}, np.asarray(single)


def split_combinations(shapes: Sequence[str], colours: Sequence[str], n_unseen_per_shape: int = 3,
                       seed: int = 0) -> set[tuple[str, str]]:
    """Unseen (shape, colour) pairs: for shape i, the colours at positions (i + s*step + offset) mod n_colours
    for s < n_unseen_per_shape (a Latin-square pattern), so every shape keeps n_colours - n_unseen
    seen colours and every colour stays seen with most shapes."""
    shapes, colours = sorted(shapes), sorted(colours)
    nc = len(colours)
    if not 0 < n_unseen_per_shape < nc:
        raise UserError(f"cannot hold out {n_unseen_per_shape} of {nc} colours per shape.")
    offset = int(np.random.default_rng(seed).integers(nc))
    step = max(1, nc // n_unseen_per_shape)
    unseen = set()
    for i, s in enumerate(shapes):
        for j in range(n_unseen_per_shape):
            unseen.add((s, colours[(i + j * step + offset) % nc]))
    return unseen


@dataclass
class ProbeReport:
    accuracy: float
    chance: float
    n_train: int
    n_test: int
    l2: float


def probe_accuracy(x_train, y_train, x_test, y_test, l2: float | None = None) -> ProbeReport:
    """Fit on (x_train, y_train), accuracy on (x_test, y_test); chance = the majority training class's share of the test set."""
    probe = fit_probe(x_train, y_train, l2=l2)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    vals, counts = np.unique(y_train, return_counts=True)
    majority = vals[counts.argmax()]
    return ProbeReport(probe.accuracy(x_test, y_test), float(np.mean(y_test == majority)), len(y_train),
                       len(y_test), probe.l2)
