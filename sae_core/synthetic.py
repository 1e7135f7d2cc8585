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
    support = np.argsort(rng.random((n_rows, n_atoms)), axis=1)[:, :active]
    coef = rng.uniform(*coef_range, (n_rows, active))
    x = np.einsum("na,nad->nd", coef, atoms[support]) + noise * rng.standard_normal((n_rows, d)) + offset
    return PlantedData(x.astype(np.float32), atoms, support)


def recovered_fraction(atoms: np.ndarray, W_dec: np.ndarray, min_cosine: float = 0.9) -> float:
    """Share of ground-truth atoms that some decoder row matches with cosine >= min_cosine."""
    W = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    return float(((atoms @ W.T).max(1) >= min_cosine).mean())
