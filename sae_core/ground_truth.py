"""Ground truth for neuron atlases on the embedded world: purity of top images, simulated users, ranks.

Definitions (all on a neuron's top images, T = 16 by default, empty slots -1 ignored):

- An image *has* a factor value when some object in it has that value (shape, family, colour,
  colour group, size, position) or its background has it (texture). A two-object image has two
  values of each object factor.
- share_f(k): the largest fraction of neuron k's top images that have one common value of factor
  type f (e.g. 14 of 16 show something red: share_colour = 0.875).
- purity(k) = mean over the factor types of share_f(k): the ground-truth purity, in (0, 1].
- shared_count(k) = number of factor types with share_f(k) >= min_share (default 15/16: all but one
  of 16 images): how many factors the top images share. The simulated user prefers, of two neurons,
  the one with the larger shared_count and has no preference on equal counts.
- dominant factor: the factor type with the largest share; among equal shares the type with more
  distinct values wins (the more specific concept: colour "red" over colour group "warm").

Everything is a pure function of arrays (plus a factor lookup), so an atlas can call it on any bundle.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .alignment import DEFAULT_EDGES, AlignmentResult, alignment_score, json_number

OBJECT_FACTORS = ("shape", "colour", "family", "colour_group", "size", "position")  # specific first
FACTOR_TYPES = OBJECT_FACTORS + ("texture",)
DEFAULT_MIN_SHARE = 15 / 16


def world_factor_sets(factors: dict) -> dict:
    """{factor type: set of values} of one world image, from `WorldDataset.factors(i)`."""
    sets = {t: {str(o[t]) for o in factors["objects"]} for t in OBJECT_FACTORS}
    sets["texture"] = {str(factors["background"]["texture"])}
    return sets


class FactorTable(NamedTuple):
    """Which factor values each listed image has: member[f][row, v] for image ids[row], value values[f][v]."""
    ids: np.ndarray
    types: tuple
    values: tuple
    member: tuple

    def rows(self, image_ids: np.ndarray) -> np.ndarray:
        """Row of each image id in the table; -1 for -1 (an empty slot)."""
        image_ids = np.asarray(image_ids, np.int64)
        pos = np.searchsorted(self.ids, image_ids)
        pos = np.clip(pos, 0, max(len(self.ids) - 1, 0))
        found = (image_ids >= 0) & (len(self.ids) > 0) & (self.ids[pos] == image_ids)
        if np.any((image_ids >= 0) & ~found):
            missing = image_ids[(image_ids >= 0) & ~found][0]
            raise KeyError(f"image {missing} is not in the factor table")
        return np.where(found, pos, -1)


def factor_table(factors_of, image_ids) -> FactorTable:
    """Build a FactorTable for the given image ids (duplicates and -1 are ignored).

    factors_of: a callable or an indexable (list, dict) giving, for an image id, either a world
    factor dict (with "objects", as `WorldDataset.factors`) or {factor type: value or set of values}.
    """
    ids = np.unique(np.asarray(image_ids, np.int64))
    ids = ids[ids >= 0]
    get = factors_of if callable(factors_of) else factors_of.__getitem__
    per_image = []
    for i in ids:
        f = get(int(i))
        f = world_factor_sets(f) if "objects" in f else {t: ({v} if isinstance(v, (str, int)) else set(v))
                                                           for t, v in f.items()}
        per_image.append({t: {str(v) for v in vs} for t, vs in f.items()})
    types = tuple(t for t in FACTOR_TYPES if any(t in f for f in per_image))
    types += tuple(sorted({t for f in per_image for t in f} - set(types)))
    values, member = [], []
    for t in types:
        vals = tuple(sorted({v for f in per_image for v in f.get(t, ())}))
        col = {v: j for j, v in enumerate(vals)}
        m = np.zeros((len(ids), len(vals)), bool)
        for r, f in enumerate(per_image):
            for v in f.get(t, ()):
                m[r, col[v]] = True
        values.append(vals)
        member.append(m)
    return FactorTable(ids=ids, types=types, values=tuple(values), member=tuple(member))


def factor_embedding(table: FactorTable, image_ids) -> np.ndarray:
    """float32 (n, sum of value counts): the ground-truth embedding of each image, one block per factor
    type in which the image's values share unit mass (a two-object image with two colours puts 0.5 on
    each). The cosine of two such embeddings is the agreement of their factors, so MS under it is the
    MS a perfect embedder would give."""
    rows = table.rows(np.asarray(image_ids, np.int64))
    if np.any(rows < 0):
        raise ValueError("factor_embedding needs image ids, not empty slots (-1)")
    blocks = [m[rows] / np.maximum(m[rows].sum(1, keepdims=True), 1) for m in table.member]
    return np.concatenate(blocks, 1).astype(np.float32)


def ideal_neurons(table: FactorTable, n_neurons: int = 400, seed: int = 0, min_images: int = 16,
                  max_factors: int = 3) -> np.ndarray:
    """float32 (len(table.ids), n): perfectly monosemantic neurons for calibration. Neuron j fires on
    exactly the images holding a conjunction of 1..max_factors values of distinct factor types (drawn
    at random, so two neurons may share one; a conjunction held by fewer than min_images images is
    redrawn up to 50 times, then kept, so on a very small table a neuron may fire on fewer images or
    none, and then has no MS and drops out of the figures), with an activation from U(0.5, 1]; 0
    elsewhere."""
    rng = np.random.default_rng(seed)
    n = len(table.ids)
    out = np.zeros((n, n_neurons), np.float32)
    F = len(table.types)
    for j in range(n_neurons):
        for _ in range(50):
            sel = np.ones(n, bool)
            for f in rng.choice(F, rng.integers(1, min(max_factors, F) + 1), replace=False):
                sel &= table.member[f][:, rng.integers(table.member[f].shape[1])]
            if sel.sum() >= min(min_images, n):
                break
        out[sel, j] = 1.0 - 0.5 * rng.random(int(sel.sum()))
    return out


def ideal_neuron_report(table: FactorTable, embeddings, n_neurons: int = 400, seed: int = 0,
                        n_pairs: int | None = 20000) -> dict:
    """Calibration of the ground-truth figures: Spearman(MS, purity) and agreement with the simulated
    users for `ideal_neurons`, with MS under `embeddings` (one row per image of the table, in table
    order). What the figures reach when every neuron is perfectly monosemantic, with this embedder."""
    from .monosemanticity import monosemanticity_score
    from .ontology import top_images

    emb = np.asarray(embeddings, np.float32)
    if emb.shape[0] != len(table.ids):
        raise ValueError(f"one embedding per table image is needed: {emb.shape[0]} rows for {len(table.ids)} images")
    acts = ideal_neurons(table, n_neurons, seed)
    ms = monosemanticity_score(acts, emb).ms
    rows = top_images(acts)
    top = np.where(rows >= 0, table.ids[np.maximum(rows, 0)], -1)
    p = purity(top, table=table)
    agree = simulated_user_agreement(ms, p.shared_count, n_pairs=n_pairs, seed=seed)
    return {"n_neurons": n_neurons, "ms_ground_truth_spearman": json_number(spearman(ms, p.purity)),
            "ms_agreement": json_number(agree.agreement), "agreement": agree.to_dict()}


class PurityResult(NamedTuple):
    """Ground-truth purity of each neuron's top images (arrays indexed by neuron)."""
    purity: np.ndarray
    share: np.ndarray
    shared_count: np.ndarray
    dominant_type: list
    dominant_value: list
    dominant_share: np.ndarray
    n_valid: np.ndarray
    types: tuple
    min_share: float


PurityResult.purity.__doc__ = "float32 (K,): mean over factor types of share; NaN with fewer than 2 top images"
PurityResult.share.__doc__ = "float32 (K, F): largest fraction of the top images having one value of factor type f"
PurityResult.shared_count.__doc__ = "int64 (K,): factor types with share >= min_share; -1 with fewer than 2 top images"
PurityResult.dominant_type.__doc__ = "list of K str|None: factor type with the largest share (more specific type on ties)"
PurityResult.dominant_value.__doc__ = "list of K str|None: the value most top images have for dominant_type"
PurityResult.dominant_share.__doc__ = "float32 (K,): the share of that value (NaN where no dominant)"
PurityResult.n_valid.__doc__ = "int64 (K,): top images that are not empty slots (-1)"
PurityResult.types.__doc__ = "names of the F factor types, the column order of share"
PurityResult.min_share.__doc__ = "the share a factor needs to count as shared"


def purity(top_images, factors_of=None, min_share: float = DEFAULT_MIN_SHARE, table: FactorTable | None = None) -> PurityResult:
    """top_images: (K, T) image ids, -1 = empty slot. factors_of: see `factor_table`; or pass a
    prebuilt `table` covering every id in top_images."""
    top = np.asarray(top_images, np.int64)
    if top.ndim != 2:
        raise ValueError(f"top_images must be (K, T), got shape {top.shape}")
    if table is None:
        if factors_of is None:
            raise ValueError("give factors_of or a factor table")
        table = factor_table(factors_of, top.ravel())
    rows = table.rows(top)                                  # (K, T), -1 for empty slots
    valid = rows >= 0
    n_valid = valid.sum(1)
    K, F = top.shape[0], len(table.types)
    share = np.full((K, F), np.nan, np.float32)
    best = np.full((K, F), -1, np.int64)
    ok = n_valid >= 2
    for j, m in enumerate(table.member):
        padded = np.concatenate([m, np.zeros((1, m.shape[1]), bool)])  # row -1 = an empty slot: no value
        has = padded[rows]                                      # (K, T, V)
        frac = has.sum(1) / np.maximum(n_valid, 1)[:, None]     # (K, V)
        share[ok, j] = frac[ok].max(1)
        best[:, j] = frac.argmax(1)
    purity_ = np.where(ok, share.mean(1), np.nan).astype(np.float32)
    counts = np.where(ok, (share >= min_share - 1e-9).sum(1), -1).astype(np.int64)
    # dominant: largest share, then more distinct values (more specific), then factor order
    n_vals = np.array([len(v) for v in table.values])
    order = np.lexsort((np.arange(F), -n_vals))             # specificity order of the types
    dom_type, dom_value = [], []
    dom_share = np.full(K, np.nan, np.float32)
    for k in range(K):
        if not ok[k]:
            dom_type.append(None)
            dom_value.append(None)
            continue
        j = max(order, key=lambda f: share[k, f])           # first maximum in specificity order
        dom_type.append(table.types[j])
        dom_value.append(table.values[j][best[k, j]])
        dom_share[k] = share[k, j]
    return PurityResult(purity=purity_, share=share, shared_count=counts, dominant_type=dom_type,
                        dominant_value=dom_value, dominant_share=dom_share, n_valid=n_valid.astype(np.int64),
                        types=table.types, min_share=float(min_share))


def simulated_user_agreement(ms, shared_count, n_pairs: int | None = 20000, seed: int = 0,
                             edges=DEFAULT_EDGES) -> AlignmentResult:
    """Alignment Score of MS with simulated users over random pairs of neurons.

    The simulated user prefers the neuron whose top images share more factors (`shared_count`);
    pairs with equal counts (no preference), equal MS, or a neuron without a score (NaN MS or
    count -1) are skipped. n_pairs None, or at least the number of distinct pairs, uses every pair.
    """
    ms = np.asarray(ms, np.float64)
    counts = np.asarray(shared_count, np.int64)
    if ms.shape != counts.shape:
        raise ValueError(f"ms and shared_count must have one value per neuron: {ms.shape} vs {counts.shape}")
    idx = np.flatnonzero(np.isfinite(ms) & (counts >= 0))
    m = idx.size
    if m < 2:
        return alignment_score([], [], [], edges)
    total = m * (m - 1) // 2
    if n_pairs is None or n_pairs >= total:
        i, j = np.triu_indices(m, 1)
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(m, size=n_pairs)
        j = (i + rng.integers(1, m, size=n_pairs)) % m      # uniform over j != i
    i, j = idx[i], idx[j]
    return alignment_score(ms[i], ms[j], counts[i] - counts[j], edges)


def _ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
    ends = np.r_[starts[1:], len(v)]
    avg = (starts + ends + 1) / 2.0                       # mean of ranks start+1 .. end
    ranks = np.empty(len(v))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation over the entries where both are finite (ties: average ranks);
    NaN with fewer than 3 such entries or when either side is constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two arrays of one length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return math.nan
    ra, rb = _ranks(a[keep]), _ranks(b[keep])
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def ground_truth_report(ms, top_images, factors_of=None, table: FactorTable | None = None,
                        min_share: float = DEFAULT_MIN_SHARE, n_pairs: int | None = 20000, seed: int = 0) -> dict:
    """Everything world.json needs for one set of neurons: Spearman(MS, purity), agreement with the
    simulated users, and per-neuron purity and dominant factor (JSON-ready lists)."""
    ms = np.asarray(ms, np.float64)
    p = purity(top_images, factors_of, min_share=min_share, table=table)
    agree = simulated_user_agreement(ms, p.shared_count, n_pairs=n_pairs, seed=seed)
    ok = np.isfinite(ms) & np.isfinite(p.purity)
    return {"ms_ground_truth_spearman": json_number(spearman(ms, p.purity)),
            "ms_agreement": json_number(agree.agreement),
            "agreement": agree.to_dict(),
            "n_neurons_scored": int(ok.sum()),
            "purity_mean": json_number(float(np.nanmean(p.purity)) if np.isfinite(p.purity).any() else math.nan),
            "min_share": p.min_share, "factor_types": list(p.types),
            "purity": [json_number(v) for v in p.purity.tolist()],
            "shared_count": p.shared_count.tolist(),
            "dominant_type": p.dominant_type, "dominant_value": p.dominant_value,
            "dominant_share": [json_number(v) for v in p.dominant_share.tolist()]}

