"""Matryoshka hierarchy: parents by decoder cosine and by co-activation, taxonomy depth, a drawable tree.

A Matryoshka SAE's latents are laid out level by level: level g holds latents
[bounds[g], bounds[g+1]) with bounds = [0, cumsum(group_sizes)]. Every latent of level g+1 gets a
parent in level g (level 0 has none: -1), by two linkages that are both stored:

- decoder cosine: parent(j) = argmax_i cos(W_dec[i], W_dec[j]) over i in level g. A property of the
  SAE alone: defined for every latent, dead ones included, reproducible without data.
- co-activation: parent(j) = argmax_i P(i fires | j fires) - P(i fires) over i in level g, counted
  over the rows (images or tokens) the caller streams in. P(i | j) alone is what "j's images are a
  subset of i's" means, but it is won by whichever parent fires on nearly everything; subtracting
  the base rate P(i) keeps the subset reading and removes that bias (a parent that fires on every
  row scores 0). A latent that never fired together with any latent of level g has no parent (-1).

The tree uses the co-activation parent, and the decoder-cosine parent only for latents that never
co-fired with the level above (dead or silent on the scanned images): `tree_parents`. Measured on the
world's demo bundle (README, "Labels, hierarchy and search"), a child's top images and its
co-activation parent's top images share a deeper taxonomy ancestor (mean LCA depth 0.586) than with
its decoder-cosine parent (0.526) or a random latent of the level above (0.491), at every level;
decoder cosine (also |cos| or the most negative cosine) was close to random. Both parents are stored.

API
    level_bounds(group_sizes, n_latents) -> np.ndarray int64 (G+1,)      [0, cumsum]; one level if ()
    level_of(group_sizes, n_latents) -> np.ndarray int32 (K,)            level of each latent
    decoder_parents(W_dec (K, d), group_sizes, chunk=4096) -> (parent int64 (K,), cos float32 (K,))
    CoactivationCounter(group_sizes, n_latents, dense_budget_bytes=256 MiB)
        .update(fired)   fired: (B, K) numpy/torch array (nonzero = fires), or a SparseCodes of the
                         active entries, or (rows, cols, n_rows) index arrays
        .parents() -> (parent int64 (K,), score float32 (K,))   score NaN where parent is -1
        .fire_counts (K,) int64, .n_rows int, .memory_bytes int, .modes list["dense"|"sparse"]
    lca_depth(a, b) -> int                number of leading names two root-to-leaf paths share
    taxonomy_depth(top_images (K, T), level (K,), path_of, n_top=16)
        -> (per_level list[float | None], per_neuron float64 (K,) NaN where < 2 images have a path)
        path_of: callable image_id -> list[str] | None, or a mapping / sequence of such paths
    parent_agreement(parent_a, parent_b) -> float    fraction of linked latents with the same parent
    tree_parents(parent_coact, parent_cos) -> (parent int64 (K,), from_coact bool (K,))
        the tree's linkage: co-activation parent where there is one, else the decoder-cosine parent
    build_tree(level, parent, labels=None, ms=None, label_score=None, support=None,
               parent_coact=None, parent_cos=None, depth_per_level=None, linkage=TREE_LINKAGE,
               parent_decoder=None) -> dict
        {"linkage", "n_levels", "levels": [{level, size, depth}], "depth_per_level", "roots",
         "nodes": [{id, level, parent, label, ms, ...}]} with NaN written as null (JSON-able)

Memory of the co-activation counter
    Only consecutive levels are counted. For the pair (g, g+1) it keeps a dense int32 matrix of
    n_g x n_{g+1} counts (int64 once 2^31 rows are passed) when that fits in `dense_budget_bytes`
    (default 256 MiB, spent level pair by level pair from the coarsest: all four pairs of K 16,384,
    the first two of K 65,536); rows wait until 1,024 have gathered and go in as one 0/1 matrix
    product when their pairs number at least a tenth of the matrix per 256 rows (4/10 at 1,024; pooled by the max over patches,
    a demo image fires 69 of its 512 latents), else by listing them. Otherwise a sparse count of the
    pairs that were actually seen (16 bytes a distinct pair, plus a merge buffer of 8 bytes a pair
    seen since the last merge: at most max(4 M, half the distinct pairs)), which becomes the dense
    matrix once it outweighs it (a quarter of the pairs seen). All give identical counts. Never the
    full K x K matrix. The budget bounds the counts held, not the temporaries of the merges and products on
    top of them: at K 65,536 with 5% of the latents firing, 2.8 GB held and a peak 10.2 GB above the start
    (README, Labels, hierarchy and search).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

DENSE_BUDGET_BYTES = 256 * 2 ** 20
TREE_LINKAGE = "coactivation (decoder cosine where a latent never co-fired with the level above)"
_SPARSE_FLUSH = 4_000_000
_PAIRS_PER_OUTPUT = 10
"""Pending rows' pairs are counted by a dense product once they number at least a tenth of the matrix per 256 rows
(the product's cost grows with the rows past a few hundred)."""
_SPARSE_PAIR_BYTES = 16
"""A sparse count keeps 16 bytes a distinct pair: past a quarter of the pairs, the int32 matrix is smaller."""
_PRODUCT_ROWS = 1024
"""Rows gathered for a dense pair before they are counted: a product costs about its output matrix
whatever the rows up to a few hundred, so batches of 10 images (K 65,536 on 257 tokens) wait for more."""


def level_bounds(group_sizes: Sequence[int], n_latents: int) -> np.ndarray:
    """[0, g0, g0+g1, ..., K]; a non-Matryoshka SAE (no groups) is one level of all K latents."""
    sizes = [int(g) for g in group_sizes] or [int(n_latents)]
    if sum(sizes) != n_latents or min(sizes) < 1:
        raise ValueError(f"group sizes {sizes} do not sum to the {n_latents} latents")
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def level_of(group_sizes: Sequence[int], n_latents: int) -> np.ndarray:
    """(K,) int32: the Matryoshka level of each latent (0 everywhere without groups)."""
    b = level_bounds(group_sizes, n_latents)
    return (np.searchsorted(b, np.arange(n_latents), side="right") - 1).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Decoder cosine
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def decoder_parents(W_dec, group_sizes: Sequence[int], chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Parent of each latent of level g+1: the latent of level g whose decoder row is most cosine-similar.

    W_dec: (K, d) decoder rows (tensor or array). Returns parent int64 (K,) (-1 in level 0) and that
    cosine float32 (K,) (NaN in level 0). Ties go to the lowest index. Memory: one chunk x n_g block.
    """
    W = torch.as_tensor(np.asarray(W_dec) if not isinstance(W_dec, torch.Tensor) else W_dec).detach().float().cpu()
    K = W.shape[0]
    W = torch.nn.functional.normalize(W, dim=1)
    b = level_bounds(group_sizes, K)
    parent = np.full(K, -1, np.int64)
    cos = np.full(K, np.nan, np.float32)
    for g in range(len(b) - 2):
        parents_w = W[b[g]:b[g + 1]]  # (n_g, d)
        for s in range(b[g + 1], b[g + 2], chunk):
            e = min(s + chunk, b[g + 2])
            sim = W[s:e] @ parents_w.T  # (chunk, n_g)
            best, idx = sim.max(dim=1)  # torch.max returns the first maximum
            parent[s:e] = idx.numpy() + b[g]
            cos[s:e] = best.numpy()
    return parent, cos


# ----------------------------------------------------------------------------------------------
# Co-activation
# ----------------------------------------------------------------------------------------------
def _active_entries(fired, n_latents: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, cols, n_rows) of the firing entries of one batch, whatever form it came in."""
    from .sparse_ops import SparseCodes

    if isinstance(fired, SparseCodes):
        return fired.row.cpu().numpy(), fired.col.cpu().numpy(), int(fired.n_rows)
    if isinstance(fired, tuple) and len(fired) == 3:
        rows, cols, n_rows = fired
        rows, cols, n_rows = np.asarray(rows, np.int64), np.asarray(cols, np.int64), int(n_rows)
        # the counter keys a pair as row * K + col: a column past K (or -1) was counted on the next (or last) latent
        if (cols.size and (cols.min() < 0 or cols.max() >= n_latents)) or (rows.size and (rows.min() < 0 or
                                                                                     rows.max() >= n_rows)):
            raise ValueError(f"index lists name latents outside 0..{n_latents - 1} or rows outside 0..{n_rows - 1}")
        return rows, cols, n_rows
    # a tensor's shape is checked as an array's: one of 31 columns for 32 latents was counted on the wrong ones,
    # and one of 33 failed after the row count had moved (until 2026-12-05)
    shape = tuple(fired.shape) if isinstance(fired, torch.Tensor) else np.shape(fired)
    if len(shape) != 2 or shape[1] != n_latents:
        raise ValueError(f"codes of shape {shape} do not have {n_latents} columns")
    if isinstance(fired, torch.Tensor):
        rows, cols = (fired != 0).nonzero(as_tuple=True)
        return rows.cpu().numpy(), cols.cpu().numpy(), int(fired.shape[0])
    arr = np.asarray(fired)
    rows, cols = np.nonzero(arr)
    return rows.astype(np.int64), cols.astype(np.int64), int(arr.shape[0])


class CoactivationCounter:
    """Streaming counts of how often latents of consecutive levels fire on the same row."""

    STATE = ("n_rows", "fire_counts", "modes", "_dense", "_keys", "_vals", "_buf", "_pend", "_pend_rows")

    def __init__(self, group_sizes: Sequence[int], n_latents: int, dense_budget_bytes: int = DENSE_BUDGET_BYTES):
        self.bounds = level_bounds(group_sizes, n_latents)
        self.n_latents = int(n_latents)
        self.n_rows = 0
        self.fire_counts = np.zeros(n_latents, np.int64)
        sizes = np.diff(self.bounds)
        self.modes: list[str] = []
        self._dense: list[np.ndarray | None] = []
        self._keys: list[np.ndarray] = []  # sparse: sorted distinct pair keys i_local * n_{g+1} + j_local
        self._vals: list[np.ndarray] = []
        self._buf: list[list[np.ndarray]] = []
        # dense: entries of the rows since the last product, (rows, level-g cols, rows, level-g+1 cols)
        self._pend: list[list[tuple[np.ndarray, ...]]] = []
        self._pend_rows: list[int] = []
        budget = dense_budget_bytes
        for g in range(len(sizes) - 1):
            need = int(sizes[g]) * int(sizes[g + 1]) * 4  # int32 counts (int64 past 2^31 - 1 rows)
            dense = need <= budget
            if dense:
                budget -= need
            self.modes.append("dense" if dense else "sparse")
            self._dense.append(np.zeros((sizes[g], sizes[g + 1]), np.int32) if dense else None)
            self._keys.append(np.zeros(0, np.int64))
            self._vals.append(np.zeros(0, np.int64))
            self._buf.append([])
            self._pend.append([])
            self._pend_rows.append(0)

    @property
    def memory_bytes(self) -> int:
        total = self.fire_counts.nbytes
        for g in range(len(self.modes)):
            if self._dense[g] is not None:
                total += self._dense[g].nbytes
            total += self._keys[g].nbytes + self._vals[g].nbytes + sum(b.nbytes for b in self._buf[g])
            total += sum(a.nbytes for p in self._pend[g] for a in p)
        return total

    def update(self, fired) -> None:
        """Add one batch: (B, K) codes (nonzero = fires), SparseCodes, or (rows, cols, n_rows)."""
        rows, cols, n_rows = _active_entries(fired, self.n_latents)
        if isinstance(fired, tuple):  # only index lists can repeat a (row, latent) pair; it counts once
            keep = np.unique(rows * self.n_latents + cols)
            rows, cols = keep // self.n_latents, keep % self.n_latents
        if self.n_rows + n_rows > np.iinfo(np.int32).max:  # a count could pass int32: widen (never in practice)
            self._dense = [None if c is None else c.astype(np.int64) for c in self._dense]
        offset = self.n_rows  # pending rows of several batches stay distinct
        self.n_rows += n_rows
        self.fire_counts += np.bincount(cols, minlength=self.n_latents)
        lev = np.searchsorted(self.bounds, cols, side="right") - 1
        for g in range(len(self.modes)):
            a, b = lev == g, lev == g + 1
            if not a.any() or not b.any():
                continue
            ra, ca = rows[a], cols[a] - self.bounds[g]
            rb, cb = rows[b], cols[b] - self.bounds[g + 1]
            if self._dense[g] is not None:
                self._pend[g].append((ra + offset, ca, rb + offset, cb))
                self._pend_rows[g] += n_rows
                if self._pend_rows[g] >= _PRODUCT_ROWS:
                    self._add_pending(g)
                continue
            keys = self._pair_keys(g, ra, ca, rb, cb)
            if len(keys):
                self._buf[g].append(keys)
                # merge when the buffer reaches half the stored pairs (at least 4 M keys): each key
                # is then merged O(log) times in all, not once per flush
                if sum(len(k) for k in self._buf[g]) >= max(_SPARSE_FLUSH, len(self._keys[g]) // 2):
                    self._flush(g)

    def _add_pending(self, g) -> None:
        """Count the pending rows' pairs into the dense matrix, by one product or by listing them."""
        if not self._pend[g]:
            return
        ra, ca, rb, cb = (np.concatenate(parts) for parts in zip(*self._pend[g]))
        self._pend[g], self._pend_rows[g] = [], 0
        if self._add_by_product(g, ra, ca, rb, cb):
            return
        keys = self._pair_keys(g, ra, ca, rb, cb)
        if len(keys):
            uk, cnt = np.unique(keys, return_counts=True)
            self._dense[g].reshape(-1)[uk] += cnt

    def _settle(self, g) -> None:
        """Everything counted so far into the stored counts of pair g (pending rows, merge buffer)."""
        if self._dense[g] is not None:
            self._add_pending(g)
        else:
            self._flush(g)

    def _add_by_product(self, g, ra, ca, rb, cb) -> bool:
        """Add the batch's pair counts to the dense matrix as one product A^T B of 0/1 matrices (rows
        where both levels fire x latents) when that costs less than listing the pairs: images pooled
        by the max over patches fire a sizeable share of the latents (the demo's: 13%). Returns False
        (nothing added) when listing is cheaper."""
        both = np.intersect1d(ra, rb)
        if len(both) == 0:
            return True
        na, nb = self._dense[g].shape
        keep_a, keep_b = np.isin(ra, both), np.isin(rb, both)
        ia, ib = np.searchsorted(both, ra[keep_a]), np.searchsorted(both, rb[keep_b])
        pairs = int(np.bincount(ia, minlength=len(both)) @ np.bincount(ib, minlength=len(both)))
        # measured on 2 cores: 50-80 ns a listed pair; the product 6 ns an output count (128 rows)
        if pairs * _PAIRS_PER_OUTPUT < na * nb * max(1, len(both) // 256) or len(both) >= 1 << 24:
            return False
        A, B = torch.zeros(len(both), na), torch.zeros(len(both), nb)
        A[ia, ca[keep_a]] = 1.0
        B[ib, cb[keep_b]] = 1.0
        self._dense[g] += (A.t() @ B).numpy().astype(self._dense[g].dtype)  # exact: each count <= rows < 2^24
        return True

    def _pair_keys(self, g, ra, ca, rb, cb) -> np.ndarray:
        """i_local * n_{g+1} + j_local for every (level-g entry, level-g+1 entry) pair on one row."""
        nb = int(self.bounds[g + 2] - self.bounds[g + 1])
        # Sort both by row, then repeat each level-g entry once per level-g+1 entry of its row.
        oa, ob = np.argsort(ra, kind="stable"), np.argsort(rb, kind="stable")
        ra, ca, rb, cb = ra[oa], ca[oa], rb[ob], cb[ob]
        start_b = np.searchsorted(rb, ra, side="left")
        count_b = np.searchsorted(rb, ra, side="right") - start_b
        total = int(count_b.sum())
        first = np.repeat(np.cumsum(count_b) - count_b, count_b)
        jb = np.repeat(start_b, count_b) + (np.arange(total) - first)
        return np.repeat(ca, count_b) * nb + cb[jb]

    def _flush(self, g) -> None:
        if not self._buf[g]:
            return
        new_keys, new_counts = np.unique(np.concatenate(self._buf[g]), return_counts=True)
        self._buf[g] = []
        keys = np.concatenate([self._keys[g], new_keys])
        vals = np.concatenate([self._vals[g], new_counts])
        order = np.argsort(keys, kind="stable")  # two sorted runs: a merge, linear time
        keys, vals = keys[order], vals[order]
        start = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        self._keys[g], self._vals[g] = keys[start], np.add.reduceat(vals, start)
        na, nb = (int(s) for s in np.diff(self.bounds)[g:g + 2])
        if len(self._keys[g]) * _SPARSE_PAIR_BYTES > na * nb * 4:  # the pairs seen outweigh the dense matrix
            dense = np.zeros(na * nb, np.int64 if self.n_rows > np.iinfo(np.int32).max else np.int32)
            dense[self._keys[g]] = self._vals[g]
            self._dense[g], self.modes[g] = dense.reshape(na, nb), "dense"
            self._keys[g], self._vals[g] = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def pair_counts(self, g: int) -> np.ndarray:
        """Dense (n_g, n_{g+1}) co-firing counts of levels g and g+1 (for tests and small SAEs)."""
        self._settle(g)
        if self._dense[g] is not None:
            return self._dense[g].copy()
        na, nb = int(np.diff(self.bounds)[g]), int(np.diff(self.bounds)[g + 1])
        out = np.zeros(na * nb, np.int64)
        out[self._keys[g]] = self._vals[g]
        return out.reshape(na, nb)

    def parents(self) -> tuple[np.ndarray, np.ndarray]:
        """parent int64 (K,) and score float32 (K,) = P(parent fires | j fires) - P(parent fires)."""
        K, N = self.n_latents, max(self.n_rows, 1)
        parent = np.full(K, -1, np.int64)
        score = np.full(K, np.nan, np.float32)
        for g in range(len(self.modes)):
            lo, mid, hi = self.bounds[g], self.bounds[g + 1], self.bounds[g + 2]
            base = self.fire_counts[lo:mid] / N  # P(i fires), (n_g,)
            n_child = self.fire_counts[mid:hi]  # (n_{g+1},)
            self._settle(g)
            if self._dense[g] is not None:
                C = self._dense[g]
                for s in range(0, hi - mid, 4096):  # column blocks bound the float64 temporary
                    e = min(s + 4096, hi - mid)
                    c = C[:, s:e]
                    sc = c / np.maximum(n_child[s:e], 1)[None, :] - base[:, None]
                    sc = np.where(c > 0, sc, -np.inf)
                    best = sc.argmax(axis=0)
                    ok = np.isfinite(sc[best, np.arange(e - s)])
                    parent[mid + s:mid + e] = np.where(ok, best + lo, -1)
                    score[mid + s:mid + e] = np.where(ok, sc[best, np.arange(e - s)], np.nan)
            else:
                nb = hi - mid
                keys, vals = self._keys[g], self._vals[g]
                if len(keys) == 0:
                    continue
                i, j = keys // nb, keys % nb
                sc = vals / np.maximum(n_child[j], 1) - base[i]
                order = np.lexsort((i, -sc, j))  # by child, best score first, lowest parent on ties
                j_sorted = j[order]
                first = np.flatnonzero(np.r_[True, j_sorted[1:] != j_sorted[:-1]])
                pick = order[first]
                parent[mid + j[pick]] = i[pick] + lo
                score[mid + j[pick]] = sc[pick]
        return parent, score


# ----------------------------------------------------------------------------------------------
# Taxonomy depth
# ----------------------------------------------------------------------------------------------
def lca_depth(a: Sequence[str], b: Sequence[str]) -> int:
    """Depth of the lowest common ancestor of two root-to-leaf paths (root = depth 0)."""
    depth = 0
    for x, y in zip(a, b):
        if x != y:
            break
        depth += 1
    return depth


def _path_lookup(path_of) -> Callable[[int], Sequence[str] | None]:
    if callable(path_of):
        return path_of
    if isinstance(path_of, Mapping):
        return lambda i: path_of.get(int(i))
    return lambda i: path_of[int(i)]


def taxonomy_depth(top_images: np.ndarray, level: np.ndarray, path_of, n_top: int = 16) -> tuple[list, np.ndarray]:
    """The paper's taxonomy depth: for each latent, the mean LCA depth over all pairs of its top
    `n_top` images (ids < 0 and images without a path are skipped); per level, the mean over the
    latents of that level that have at least two such images (None for a level with none).

    Each distinct image's path is looked up once; paths become prefix-node codes so that a pair's
    LCA depth is the number of levels whose prefix nodes agree, computed for many latents at once.
    """
    top = np.asarray(top_images)[:, :n_top].astype(np.int64)
    level = np.asarray(level)
    K = top.shape[0]
    lookup = _path_lookup(path_of)
    ids = np.unique(top[top >= 0])
    paths = [lookup(int(i)) for i in ids]
    L = max((len(p) for p in paths if p), default=0)
    codes = np.full((len(ids) + 1, max(L, 1)), 0, np.int64)  # row len(ids): "no image"
    has_path = np.zeros(len(ids) + 1, bool)
    depth = np.zeros(len(ids) + 1, np.int64)  # each path's length
    node_id: dict[tuple, int] = {}
    for r, p in enumerate(paths):
        if not p:
            continue
        has_path[r], depth[r] = True, len(p)
        for d in range(L):
            # a prefix node gets a positive id; a path shorter than L gets a negative code unique to
            # the image, which matches nothing
            codes[r, d] = node_id.setdefault(tuple(p[:d + 1]), len(node_id) + 1) if d < len(p) else -(r + 1)
    row = np.where(top >= 0, np.searchsorted(ids, np.where(top >= 0, top, 0)), len(ids))
    per_neuron = np.full(K, np.nan)
    T = top.shape[1]
    iu = np.triu_indices(T, 1)
    for s in range(0, K, 2048):
        r = row[s:s + 2048]  # (k, T)
        c = codes[r]  # (k, T, L)
        ok = has_path[r]  # (k, T)
        same = (c[:, :, None, :] == c[:, None, :, :]).sum(-1)  # (k, T, T): shared prefix levels
        # at most the shorter path: an image listed twice matched its own padding codes too (L, not its depth)
        same = np.minimum(same, np.minimum(depth[r][:, :, None], depth[r][:, None, :]))
        pair_ok = ok[:, :, None] & ok[:, None, :]
        num = np.where(pair_ok, same, 0)[:, iu[0], iu[1]].sum(1)
        n_pairs = pair_ok[:, iu[0], iu[1]].sum(1)
        per_neuron[s:s + 2048] = np.where(n_pairs > 0, num / np.maximum(n_pairs, 1), np.nan)
    per_level = []
    for g in range(int(level.max()) + 1 if len(level) else 0):
        v = per_neuron[(level == g) & np.isfinite(per_neuron)]
        per_level.append(float(v.mean()) if len(v) else None)
    return per_level, per_neuron


# ----------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------
def parent_agreement(parent_a: np.ndarray, parent_b: np.ndarray) -> float:
    """Fraction of latents linked by both (parent >= 0 in each) whose two parents are the same."""
    a, b = np.asarray(parent_a), np.asarray(parent_b)
    both = (a >= 0) & (b >= 0)
    return float((a[both] == b[both]).mean()) if both.any() else float("nan")


def tree_parents(parent_coact: np.ndarray, parent_cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tree's parent of each latent: by co-activation where it has one, else by decoder cosine."""
    pa, pc = np.asarray(parent_coact, np.int64), np.asarray(parent_cos, np.int64)
    from_coact = pa >= 0
    return np.where(from_coact, pa, pc), from_coact


def _json_num(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)


def build_tree(level: np.ndarray, parent: np.ndarray, labels: Sequence[str] | None = None,
               ms: np.ndarray | None = None, label_score: np.ndarray | None = None,
               support: np.ndarray | None = None, parent_coact: np.ndarray | None = None,
               parent_cos: np.ndarray | None = None, depth_per_level: Sequence | None = None,
               linkage: str = TREE_LINKAGE, parent_decoder: np.ndarray | None = None) -> dict:
    """The hierarchy as JSON-able data: one node per latent, `parent` being the tree's linkage."""
    level = np.asarray(level)
    parent = np.asarray(parent)
    K = len(level)
    n_levels = int(level.max()) + 1 if K else 0
    nodes = []
    for k in range(K):
        node = {"id": k, "level": int(level[k]), "parent": int(parent[k]),
                "label": labels[k] if labels is not None else None,
                "ms": _json_num(ms[k]) if ms is not None else None}
        if label_score is not None:
            node["label_score"] = _json_num(label_score[k])
        if support is not None:
            node["support"] = int(support[k])
        if parent_coact is not None:
            node["parent_coact"] = int(parent_coact[k])
        if parent_decoder is not None:
            node["parent_decoder"] = int(parent_decoder[k])
        if parent_cos is not None:
            node["parent_cos"] = _json_num(parent_cos[k])
        nodes.append(node)
    depth = list(depth_per_level) if depth_per_level is not None else [None] * n_levels
    tree = {
        "linkage": linkage,
        "n_levels": n_levels,
        "levels": [{"level": g, "size": int((level == g).sum()), "depth": _json_num(depth[g]) if g < len(depth) else None}
                   for g in range(n_levels)],
        "depth_per_level": [_json_num(d) for d in depth],
        "roots": [k for k in range(K) if parent[k] < 0],
        "nodes": nodes,
    }
    if parent_coact is not None:
        # How often the two linkages pick the same parent (the decoder's, when given, else the tree's).
        other = parent_decoder if parent_decoder is not None else parent
        tree["parent_agreement"] = _json_num(parent_agreement(other, parent_coact))
    return tree
