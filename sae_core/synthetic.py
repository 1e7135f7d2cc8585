"""Planted-dictionary activations: x = s @ D + noise with known unit-norm atoms D, for tests and benchmarks."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PlantedData(NamedTuple):
    x: np.ndarray
    """(N, d) float32 activations."""
    atoms: np.ndarray
    """(n_atoms, d) float64 unit-norm ground-truth directions."""
    support: np.ndarray
    """(N, active) int64: which atoms make up each row."""


def planted_dictionary(
    n_rows: int, d: int = 64, n_atoms: int = 256, active: int = 4, noise: float = 0.05, offset: float = 2.0,
    coef_range: tuple[float, float] = (1.0, 3.0), seed: int = 0,
) -> PlantedData:
    """Each row sums `active` distinct random atoms with coefficients uniform in `coef_range`, plus
    Gaussian noise and a constant offset (so that the decoder bias has something to learn)."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    x = np.empty((n_rows, d), dtype=np.float32)
    support = np.empty((n_rows, active), dtype=np.int64)
    for a in range(0, n_rows, 1024):  # in chunks: the random (rows, n_atoms) draw is large at CLIP sizes
        m = min(1024, n_rows - a)
        support[a : a + m] = np.argpartition(rng.random((m, n_atoms)), active - 1, axis=1)[:, :active]
        coef = rng.uniform(*coef_range, (m, active))
        x[a : a + m] = np.einsum("na,nad->nd", coef, atoms[support[a : a + m]]) + noise * rng.standard_normal((m, d)) + offset
    return PlantedData(x, atoms, support)


def recovered_fraction(atoms: np.ndarray, W_dec: np.ndarray, min_cosine: float = 0.9) -> float:
    """Share of ground-truth atoms that some decoder row matches with cosine >= min_cosine."""
    W = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    return float(((atoms @ W.T).max(1) >= min_cosine).mean())
