"""Ontology recovery: does a hierarchical clustering of units (SAE latents or raw neurons) follow the
dataset's taxonomy?

1. Each unit is placed at a taxonomy node from its top images (`assign_nodes`): the deepest path
   prefix shared by at least `min_share` of its top images (of two such nodes at one depth, on an
   exact half-half split, the one of the higher-ranked top image) (a
   "red" latent whose top images are red objects of many shapes stops at the root of a shape-first
   taxonomy and lands on "warm > red" of the colour view). Units at the root carry no taxonomy
   information and are left out.
2. Taxonomy distance of two units = the tree path length between their nodes (depth a + depth b -
   2 * depth of their lowest common ancestor).
3. The units are clustered hierarchically (average linkage, UPGMA) on a distance of their own:
   1 - cosine of decoder directions, or 1 - Pearson correlation of their image scores (co-activation);
   the cophenetic distance of two units is the height at which the tree joins them.
4. Tree agreement = Spearman correlation, over unit pairs, between cophenetic and taxonomy distance
   (1: the tree orders every pair as the taxonomy does; 0: unrelated). A permutation null (nodes
   shuffled among units, same tree) gives its mean and spread, and a z-score.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .ground_truth import spearman  # one definition (average ranks over finite pairs) for every figure
from .hierarchy import lca_depth


def top_images(scores: np.ndarray, n_top: int = 16, positive_only: bool = True) -> np.ndarray:
    """(K, n_top) row ids of the highest scores per column of scores (N, K); -1 where a unit has fewer
    positive scores (positive_only) than n_top. Ties keep the lower row id first."""
    scores = np.asarray(scores)
    n_top = min(n_top, scores.shape[0])
    order = np.argsort(-scores, axis=0, kind="stable")[:n_top].T  # (K, n_top)
    if positive_only:
        vals = np.take_along_axis(scores.T, order, axis=1)
        order = np.where(vals > 0, order, -1)
    return order


MIN_IMAGES = 4
"""Top images with a taxonomy path a unit needs to be placed (`assign_nodes`)."""


def assign_nodes(top: np.ndarray, path_of: Callable[[int], Sequence[str] | None], min_share: float = 0.5,
                 min_images: int = MIN_IMAGES) -> list[tuple | None]:
    """Taxonomy node (a path prefix tuple; () = root) of each unit from its top image ids (K, T), -1 = empty:
    the deepest prefix (no longer than the shortest path) shared by at least `min_share` of its top images
    that have a path; of several nodes at that depth (below a min_share of 1/2), the one most of them share, and of
    tied ones the one the best-ranked image lies under. None for
    units with fewer than `min_images` images that have a path."""
    cache: dict[int, tuple | None] = {}

    def path(i: int):
        if i not in cache:
            p = path_of(i)
            cache[i] = tuple(p) if p is not None else None
        return cache[i]

    nodes: list[tuple | None] = []
    for row in np.asarray(top):
        paths = [p for p in (path(int(i)) for i in row if i >= 0) if p is not None]
        if len(paths) < min_images:
            nodes.append(None)
            continue
        node: tuple = ()
        depth = min(len(p) for p in paths)
        # the prefixes holding min_share form a subtree from the root (a prefix holds all its children
        # hold), so the deepest of them is found level by level; a greedy walk into one child of an exact
        # half-half split could stop above the other child's deeper shared node
        for level in range(1, depth + 1):
            counts = Counter(p[:level] for p in paths)  # in order of first appearance: best-ranked first
            held = [prefix for prefix, c in counts.items() if c >= min_share * len(paths)]
            if not held:
                break
            # below a min_share of 1/2 two nodes can hold it untied: the one holding more (the best-ranked of
            # tied ones); until 2026-12-05 the best-ranked, 3 of 10 images over another's 5
            node = max(held, key=counts.__getitem__)
        nodes.append(node)
    return nodes


def taxonomy_distances(nodes: Sequence[tuple]) -> np.ndarray:
    """Condensed (scipy order: pairs i < j, row by row) tree path lengths between nodes."""
    n = len(nodes)
    out = np.empty(n * (n - 1) // 2)
    t = 0
    for i in range(n):
        for j in range(i + 1, n):
            out[t] = len(nodes[i]) + len(nodes[j]) - 2 * lca_depth(nodes[i], nodes[j])
            t += 1
    return out


def cosine_distance_matrix(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return np.clip(1.0 - v @ v.T, 0.0, 2.0)


def correlation_distance_matrix(scores: np.ndarray) -> np.ndarray:
    """1 - Pearson correlation between columns of scores (N, K) (constant columns: distance 1)."""
    x = np.asarray(scores, np.float64)
    x = x - x.mean(0)
    sd = np.sqrt((x * x).sum(0))
    x = x / np.where(sd > 0, sd, 1.0)
    return np.clip(1.0 - x.T @ x, 0.0, 2.0)


def cophenetic_distances(dist: np.ndarray, method: str = "average") -> np.ndarray:
    """Condensed cophenetic distances of the hierarchical clustering of a square distance matrix."""
    from scipy.cluster.hierarchy import cophenet, linkage
    from scipy.spatial.distance import squareform

    d = np.asarray(dist, np.float64)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return cophenet(linkage(squareform(d, checks=False), method=method))


@dataclass
class TreeAgreement:
    score: float
    """Spearman(cophenetic distance, taxonomy distance) over unit pairs."""
    pearson: float
    null_mean: float
    null_std: float
    z: float
    n_units: int
    distance_score: float
    """Spearman of the clustering distance itself (before the tree) with taxonomy distance."""

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in self.__dict__.items()}


def tree_agreement(dist: np.ndarray, nodes: Sequence[tuple], n_perm: int = 100, seed: int = 0,
                   method: str = "average") -> TreeAgreement:
    """Agreement of the clustering tree of `dist` (square, units x units) with the units' taxonomy nodes."""
    from scipy.spatial.distance import squareform

    n = len(nodes)
    if n < 3:
        nan = float("nan")
        return TreeAgreement(nan, nan, nan, nan, nan, n, nan)
    coph = cophenetic_distances(dist, method)
    tax = taxonomy_distances(nodes)
    score = spearman(coph, tax)
    rng = np.random.default_rng(seed)
    null = [spearman(coph, taxonomy_distances([nodes[i] for i in rng.permutation(n)])) for _ in range(n_perm)]
    null = np.asarray([v for v in null if np.isfinite(v)])
    mean, std = (float(null.mean()), float(null.std())) if len(null) else (float("nan"), float("nan"))
    d = np.asarray(dist, np.float64)
    flat = squareform((d + d.T) / 2 - np.diag(np.diag(d)), checks=False)
    pearson = float(np.corrcoef(coph, tax)[0, 1]) if np.ptp(tax) > 0 else float("nan")
    return TreeAgreement(score, pearson, mean, std, (score - mean) / std if std > 0 else float("nan"), n,
                         spearman(flat, tax))
