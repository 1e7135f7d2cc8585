"""The atlas scan: every per-neuron statistic of the bundle in one streaming pass over a dataset.

For each batch of images: the model runs once to the layer (all tokens), the SAE encodes every token,
tokens are pooled into one score per (image, neuron) -- the CLS token's activation, or the max or
mean over the patch tokens -- and the streaming accumulators below take the batch: top-k images per
neuron (with the best patch and the per-patch heat), firing counts, sums and maxima, a histogram of
log10(score), reservoir samples per histogram bin (for galleries of lower activation bands), the
Monosemanticity Score (MS) of the SAE neurons and of the layer's raw units, and the reconstruction
metrics. Nothing is sorted over the dataset and nothing dense of size (images x neurons) is kept.
With a `ScanCheckpoint` the running state is saved as the scan goes, and a killed scan resumes.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .resume import load_state, read_info, save_state

SCORES = ("cls", "max", "mean")


def default_score(training_tokens: str | None) -> str:
    """The image score that matches how the SAE was trained: CLS rows -> cls, mean rows -> mean,
    patch or all-token rows (patches, all, random:K) -> max over the patches."""
    t = (training_tokens or "").strip()
    if t == "cls":
        return "cls"
    if t == "mean":
        return "mean"
    return "max"


@dataclass(frozen=True)
class AtlasConfig:
    """Settings of one scan (the command line's flags)."""

    layer: str
    score: str = "max"
    topk: int = 16
    hist_bins: int = 48
    hist_decades: float = 6.0
    """The histogram spans this many decades of log10(score) below the top edge (the first
    `hist_edge_images` images' highest score, times 10 and rounded up to a power of 10); scores outside
    fall into the end bins."""
    hist_edge_images: int = 128
    """The images whose scores set the histogram's edges (ids below this), whatever the batch size."""
    n_bands: int = 4
    band_samples: int = 8
    batch_size: int = 128
    memory_gib: float = 4.0
    """Memory one batch's dense codes may take (images_per_batch): caps the image batch at real sizes."""
    seed: int = 0
    metric_tokens: str = "all"
    """Rows the reconstruction metrics (FVU, L0) are pooled over: cls | mean | patches | all."""

    def __post_init__(self):
        if self.score not in SCORES:
            raise UserError(f"--score {self.score!r} is not one of {', '.join(SCORES)}.")
        if self.topk < 1:
            raise UserError(f"--topk {self.topk} must be at least 1.")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1.")
        if not (self.memory_gib > 0 and math.isfinite(self.memory_gib)):
            raise UserError(f"--memory-gib {self.memory_gib} must be a positive number of GiB.")


SCAN_BYTES_PER_CODE = 6 * 4
"""Peak bytes the scan holds per (image, token, latent) of a batch: the dense float32 codes about five
times over (pre-activations, codes, metric rows, pooled heat, the top-k gather; 5.2 measured with K
32,768 on the world model, batches of 32 and 128), rounded up to 6."""


def images_per_batch(batch_size: int, n_tokens: int, n_latents: int, memory_gib: float) -> int:
    """The scan's image batch: at most `batch_size`, and few enough that one batch's codes stay within
    `memory_gib` (K 65,536 on ViT-L/14's 257 tokens: about 400 MiB per image, so 10 images in 4 GiB)."""
    per_image = SCAN_BYTES_PER_CODE * n_tokens * n_latents
    return max(1, min(batch_size, int(memory_gib * 2**30 // per_image)))


# ----------------------------------------------------------------------------------------------
# Pooling tokens into image scores
# ----------------------------------------------------------------------------------------------
def pool_tokens(codes: Tensor, n_prefix: int, score: str) -> tuple[Tensor, Tensor, Tensor]:
    """codes (n, T, K) per-token activations -> (scores (n, K), best patch position (n, K), heat (n, P, K)).

    `score`: "cls" = token 0, "max"/"mean" = over the patch tokens (positions n_prefix..T-1). The best
    patch is the argmax over the patch tokens, as a token position, or -1 where the neuron fires on no
    patch of the image (a CLS-scored neuron may fire on the CLS token only); heat is the patch tokens' values.
    """
    heat = codes[:, n_prefix:]
    if heat.shape[1] == 0:
        raise UserError("the layer has no patch tokens to pool; use --score cls.")
    pmax, parg = heat.max(dim=1)
    if score == "cls":
        if n_prefix == 0:
            raise UserError("this model has no CLS token; use --score max or --score mean.")
        scores = codes[:, 0]
    elif score == "max":
        scores = pmax
    else:
        scores = heat.mean(dim=1)
    return scores, torch.where(pmax > 0, parg + n_prefix, -1), heat


# ----------------------------------------------------------------------------------------------
# Streaming accumulators
# ----------------------------------------------------------------------------------------------
class StreamingTopK:
    """The T largest positive scores per neuron over a stream of image batches, best first.

    Merging keeps only T candidates per neuron between batches, so memory is O(K T P) whatever the
    number of images. Non-positive scores never enter (a neuron that fires on fewer than T images
    keeps -1 ids in its empty slots). Ties at equal score prefer the image seen first.
    """

    STATE = ("acts", "ids", "patch", "heat")  # what a resumed scan restores (sae_core.resume)

    def __init__(self, n_neurons: int, k: int, n_patches: int = 0, positive_only: bool = True):
        self.K, self.T, self.P = n_neurons, k, n_patches
        self.positive_only = positive_only  # raw units (any sign) keep their highest scores whatever the sign
        self.acts = torch.full((n_neurons, k), -math.inf)
        self.ids = torch.full((n_neurons, k), -1, dtype=torch.int64)
        self.patch = torch.full((n_neurons, k), -1, dtype=torch.int32)
        self.heat = torch.zeros((n_neurons, k, n_patches), dtype=torch.float16)

    @torch.no_grad()
    def update(self, scores: Tensor, image_ids: Tensor, best: Tensor | None = None, heat: Tensor | None = None) -> None:
        """scores (n, K); image_ids (n,) int64; best (n, K) token positions; heat (n, P, K)."""
        n = scores.shape[0]
        if n == 0:
            return
        new = scores.t().float()  # (K, n)
        if self.positive_only:
            new = new.masked_fill(new <= 0, -math.inf)
        cand = torch.cat([self.acts, new], dim=1)  # (K, T + n): the kept ones first, so ties keep them
        # Stable descending order by (score, arrival): topk's tie order is unspecified, a stable sort is not.
        order = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, : self.T]
        vals = torch.gather(cand, 1, order)
        from_old = order < self.T
        j = (order - self.T).clamp(min=0)  # batch row of a new entry
        ids = torch.where(from_old, torch.gather(self.ids, 1, order.clamp(max=self.T - 1)), image_ids[j])
        ids = torch.where(torch.isfinite(vals), ids, torch.full_like(ids, -1))
        if best is not None:
            newp = torch.gather(best.t().to(torch.int32), 1, j)
            self.patch = torch.where(from_old, torch.gather(self.patch, 1, order.clamp(max=self.T - 1)), newp)
            self.patch = torch.where(ids >= 0, self.patch, torch.full_like(self.patch, -1))
        if heat is not None and self.P:
            old_h = torch.gather(self.heat, 1, order.clamp(max=self.T - 1)[..., None].expand(-1, -1, self.P))
            k_idx = torch.arange(self.K)[:, None].expand(-1, self.T)
            new_h = heat[j, :, k_idx].to(torch.float16)  # (K, T, P): heat[j[k,t], :, k]
            self.heat = torch.where(from_old[..., None], old_h, new_h)
            self.heat[ids < 0] = 0
        self.acts, self.ids = vals, ids

    def result(self) -> dict[str, np.ndarray]:
        acts = self.acts.numpy().copy()
        acts[~np.isfinite(acts)] = 0.0
        return {"top_images": self.ids.numpy().copy(), "top_acts": acts.astype(np.float32),
                "top_patch": self.patch.numpy().copy(), "top_heat": self.heat.numpy().copy()}


class LogHistogram:
    """Counts of log10(score) over firing images per neuron, on edges shared by all neurons."""

    STATE = ("edges", "counts")

    def __init__(self, n_neurons: int, bins: int, decades: float):
        self.K, self.B, self.decades = n_neurons, bins, decades
        self.edges: np.ndarray | None = None
        self.counts = np.zeros((n_neurons, bins), np.int64)

    def set_edges_from(self, scores: np.ndarray) -> None:
        pos = scores[scores > 0]
        top = math.ceil(math.log10(float(pos.max()))) + 1 if pos.size else 1.0
        self.edges = np.linspace(top - self.decades, top, self.B + 1).astype(np.float32)

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """Bin of positive scores; below the first edge -> bin 0, above the last -> the last bin."""
        b = np.searchsorted(self.edges, np.log10(values).astype(np.float32), side="right") - 1
        return np.clip(b, 0, self.B - 1)

    def update(self, neuron: np.ndarray, value: np.ndarray) -> np.ndarray:
        """Firing entries (neuron ids, scores > 0), after `set_edges_from`; returns their bins."""
        b = self.bin_of(value)
        self.counts += np.bincount(neuron * self.B + b, minlength=self.K * self.B).reshape(self.K, self.B)
        return b


class BinReservoirs:
    """A uniform sample without replacement of S firing images per (neuron, histogram bin), each with
    its activation and best patch (token position, -1 for none).

    Each entry draws a random key (a pure function of the seed and the image index); a slot keeps the
    S smallest keys seen. The smallest S keys of a union of bins are then a uniform sample of that
    union, which is how activation bands (groups of bins) get their galleries.
    """

    STATE = ("key", "ids", "acts", "patch")

    def __init__(self, n_slots: int, size: int, seed: int = 0):
        self.S, self.seed = size, seed
        self.key = np.full((n_slots, size), np.inf, np.float32)
        self.ids = np.full((n_slots, size), -1, np.int64)
        self.acts = np.zeros((n_slots, size), np.float32)
        self.patch = np.full((n_slots, size), -1, np.int16)

    def keys_for(self, image: np.ndarray, neuron: np.ndarray) -> np.ndarray:
        # A hash of (seed, image, neuron) in [0, 1): the same sample whatever the batching.
        h = (image.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (neuron.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
        h ^= np.uint64(self.seed) * np.uint64(0x165667B19E3779F9)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
        return (h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)

    def update(self, slot: np.ndarray, image: np.ndarray, neuron: np.ndarray, act: np.ndarray,
               patch: np.ndarray | None = None) -> None:
        if slot.size == 0:
            return
        patch = np.full(slot.shape, -1, np.int16) if patch is None else patch.astype(np.int16)
        key = self.keys_for(image, neuron)
        touched = np.unique(slot)
        S = self.S
        all_slot = np.concatenate([np.repeat(touched, S), slot])
        all_key = np.concatenate([self.key[touched].ravel(), key])
        all_id = np.concatenate([self.ids[touched].ravel(), image])
        all_act = np.concatenate([self.acts[touched].ravel(), act.astype(np.float32)])
        all_patch = np.concatenate([self.patch[touched].ravel(), patch])
        # equal keys (24 bits: a few per million entries) go to the lower image id, not to the first in this
        # concatenation, which a merge of bins orders otherwise than arrival (until 2026-12-05 a band's sample
        # then depended on the batching)
        order = np.lexsort((all_id, all_key, all_slot))
        s_sorted = all_slot[order]
        first = np.searchsorted(s_sorted, s_sorted, side="left")
        rank = np.arange(len(order)) - first
        keep = rank < S
        o, r, s = order[keep], rank[keep], s_sorted[keep]
        self.key[s, r] = all_key[o]
        self.ids[s, r] = all_id[o]
        self.acts[s, r] = all_act[o]
        self.patch[s, r] = all_patch[o]


class QuantileGrid:
    """Per neuron, counts of log10(score) on a grid fitted to the neuron's own range, and a BinReservoirs sample
    per grid bin: what its activation bands (quantile groups) are drawn from.

    Neuron k's grid is B bins of 2**level / FINEST decades each, aligned on multiples of that width and
    starting at bin `start` (`_layout`, from the finest-grid indices `lo[k]` to `hi[k]` of the scores seen): the
    finest level whose B bins hold every score seen, up to the level whose B bins span `decades`; at that level
    the grid ends at the highest score and lower ones fall into bin 0. A wider range doubles the width, merging pairs of bins: their counts add,
    and the S smallest keys of two reservoirs are the sample the merged bin would have drawn. So the grid,
    the counts and the samples depend only on the scores seen, never on the batches. A neuron firing between
    1.0 and 2.0 gets 39 bins of 1.8% (the shared log histogram's 48 bins over 6 decades gave it 3 or 4).
    Memory: that of the reservoirs (K x B x S entries of 18 bytes) and K x B counts of 8 bytes."""

    FINEST = 256  # bins a decade at level 0
    STATE = ("lo", "hi", "counts", "res")  # checkpoints of 2026-12-04 also hold level and start: set, unused

    def __init__(self, n_neurons: int, bins: int, decades: float, size: int, seed: int = 0):
        self.K, self.B = n_neurons, bins
        self.max_level = next(j for j in range(63) if bins * 2 ** j >= decades * self.FINEST)
        self.lo = np.full(n_neurons, np.iinfo(np.int64).max, np.int64)  # lo > hi: has not fired
        self.hi = np.full(n_neurons, np.iinfo(np.int64).min, np.int64)
        self.counts = np.zeros((n_neurons, bins), np.int64)
        self.res = BinReservoirs(n_neurons * bins, size, seed)

    def _layout(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(level, start) of the grids that hold finest-grid indices lo..hi (any, for a neuron that has not
        fired: it has no counts to place)."""
        level = np.zeros_like(lo)
        for _ in range(self.max_level):
            level += ((hi >> level) - (lo >> level) >= self.B)
        too_wide = (hi >> level) - (lo >> level) >= self.B  # only at max_level: the grid ends at the top
        return level, np.where(too_wide, (hi >> level) - self.B + 1, lo >> level)

    def update(self, image: np.ndarray, neuron: np.ndarray, value: np.ndarray, patch: np.ndarray) -> None:
        """Firing entries: image ids, neuron ids, scores > 0 and best patch positions (-1 for none)."""
        if neuron.size == 0:
            return
        g = np.floor(np.log10(value.astype(np.float64)) * self.FINEST).astype(np.int64)
        touched, at = np.unique(neuron, return_inverse=True)
        was_level, was_start = self._layout(self.lo[touched], self.hi[touched])
        np.minimum.at(self.lo, neuron, g)
        np.maximum.at(self.hi, neuron, g)
        level, start = self._layout(self.lo[touched], self.hi[touched])
        moved = (level != was_level) | (start != was_start)
        self._regrid(touched[moved], was_level[moved], was_start[moved], level[moved], start[moved])
        b = np.clip((g >> level[at]) - start[at], 0, self.B - 1)
        np.add.at(self.counts, (neuron, b), 1)
        self.res.update(neuron * self.B + b, image, neuron, value, patch)

    def _regrid(self, ks: np.ndarray, was_level: np.ndarray, was_start: np.ndarray, level: np.ndarray,
                start: np.ndarray) -> None:
        """Move neurons `ks` from their grids to coarser or shifted ones: each old bin lands whole in one new bin."""
        if not len(ks):
            return
        B, S, res = self.B, self.res.S, self.res
        old_counts = self.counts[ks]
        i, b = np.nonzero(old_counts)  # the occupied bins: (row of ks, bin)
        new = np.clip(((was_start[i] + b) >> (level[i] - was_level[i])) - start[i], 0, B - 1)
        counts = np.zeros_like(old_counts)
        np.add.at(counts, (i, new), old_counts[i, b])
        self.counts[ks] = counts
        slots, to = ks[i] * B + b, ks[i] * B + new
        key, ids, acts, patch = res.key[slots], res.ids[slots], res.acts[slots], res.patch[slots]
        res.key[slots], res.ids[slots], res.acts[slots], res.patch[slots] = np.inf, -1, 0, -1
        _, inverse, sources = np.unique(to, return_inverse=True, return_counts=True)
        alone = sources[inverse] == 1  # a bin that only moves (a new lowest score shifts the grid) keeps its sample
        res.key[to[alone]], res.ids[to[alone]], res.acts[to[alone]], res.patch[to[alone]] = (
            key[alone], ids[alone], acts[alone], patch[alone])
        merged = ~alone
        kept = ids[merged] >= 0  # merged bins keep the S smallest keys of their union: a hash, the same again
        res.update(np.repeat(to[merged], S).reshape(-1, S)[kept], ids[merged][kept],
                   np.repeat(ks[i][merged], S).reshape(-1, S)[kept], acts[merged][kept], patch[merged][kept])


class ActivationBands:
    """The log histogram of a score (edges shared by all neurons, for the page's plot) and its activation
    bands (quantile groups drawn from a QuantileGrid). The edges are set by the images with id below
    `cfg.hist_edge_images` (the first ones scanned), so that no statistic depends on the batch size: the
    histogram's entries wait until those images have been seen (the firing entries of at most
    `hist_edge_images` images and one batch)."""

    STATE = ("hist", "grid", "waiting")

    def __init__(self, n_neurons: int, cfg: "AtlasConfig"):
        self.hist = LogHistogram(n_neurons, cfg.hist_bins, cfg.hist_decades)
        self.grid = QuantileGrid(n_neurons, cfg.hist_bins, cfg.hist_decades, cfg.band_samples, cfg.seed)
        self.cfg = cfg
        self.waiting: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # the histogram's (image, neuron, value)

    def update(self, image: np.ndarray, neuron: np.ndarray, value: np.ndarray, patch: np.ndarray) -> None:
        """Firing entries: image ids, neuron ids, scores > 0 and best patch positions (-1 for none), in
        increasing image id across calls."""
        self.grid.update(image, neuron, value, patch)
        if self.hist.edges is not None:
            self.hist.update(neuron, value)
            return
        self.waiting.append((image, neuron, value))
        if image.size and image.max() >= self.cfg.hist_edge_images - 1:
            self._set_edges()

    def _set_edges(self) -> None:
        image, value = (np.concatenate([w[i] for w in self.waiting]) for i in (0, 2))
        self.hist.set_edges_from(value[image < self.cfg.hist_edge_images])
        for _, neuron, value in self.waiting:
            self.hist.update(neuron, value)
        self.waiting = []

    def result(self) -> dict[str, np.ndarray]:
        """hist_counts (K, B), hist_edges (B + 1,), band_images / band_acts / band_patch (K, n_bands, S),
        band_counts (K, n_bands)."""
        if self.hist.edges is None:  # fewer images than edge_images, or none fired there
            if self.waiting:
                self._set_edges()
            else:
                self.hist.set_edges_from(np.zeros(0, np.float32))
        c = self.cfg
        images, acts, patch, counts = band_samples(self.grid.res, self.grid.counts, c.n_bands, c.band_samples)
        return {"hist_counts": self.hist.counts, "hist_edges": self.hist.edges,
                "band_images": images, "band_acts": acts, "band_patch": patch, "band_counts": counts}


def quantile_groups(counts: np.ndarray, n_bands: int) -> np.ndarray:
    """The quantile group (0 = the lowest scores) of each bin of neurons' counts (..., B): the group whose
    share of the firing images holds the bin's middle, so that each group has about 1 / n_bands of them.
    Groups never decrease along the bins: each is a run of bins."""
    total = np.maximum(counts.sum(-1, keepdims=True), 1)
    middle = (np.cumsum(counts, -1) - counts / 2) / total
    return np.minimum((middle * n_bands).astype(np.int64), n_bands - 1)


def band_samples(res: BinReservoirs, counts: np.ndarray, n_bands: int, size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per neuron, its `n_bands` quantile groups of firing images (SAEDashboard's, by `quantile_groups` of its
    bins, highest first) and `size` images drawn uniformly from each: the smallest keys of the group's bins.
    A group that no bin falls in (a bin holding more than one quantile) is left out, so the filled bands are
    always 0, 1, ... and only the last ones can be empty.

    Returns band_images (K, n_bands, size) int64 (-1 empty), band_acts (K, n_bands, size) float32,
    band_patch (K, n_bands, size) int16 (best patch position, -1 for none), each band sorted by
    activation, highest first, and band_counts (K, n_bands) int64: the firing images each band holds."""
    K, B = counts.shape
    sizes = np.zeros((K, n_bands), np.int64)
    ids = np.full((K, n_bands, size), -1, np.int64)
    acts = np.zeros((K, n_bands, size), np.float32)
    patch = np.full((K, n_bands, size), -1, np.int16)
    key = res.key.reshape(K, B, res.S)
    rid = res.ids.reshape(K, B, res.S)
    ract = res.acts.reshape(K, B, res.S)
    rpatch = res.patch.reshape(K, B, res.S)
    group = quantile_groups(counts, n_bands)
    ends = np.stack([(group <= g).sum(1) for g in range(n_bands)], 1)  # group g = bins ends[g-1] .. ends[g]-1
    for k in np.flatnonzero(counts.sum(1)):
        out = 0
        for g in range(n_bands - 1, -1, -1):
            a, b = (ends[k, g - 1] if g else 0), ends[k, g]
            kk = key[k, a:b].ravel()
            take = np.lexsort((rid[k, a:b].ravel(), kk))[:size]  # ties to the lower image id, as the reservoirs
            take = take[np.isfinite(kk[take])]
            if not len(take):
                continue
            aa = ract[k, a:b].ravel()
            take = take[np.argsort(-aa[take], kind="stable")]
            sizes[k, out] = counts[k, a:b].sum()
            ids[k, out, : len(take)] = rid[k, a:b].ravel()[take]
            acts[k, out, : len(take)] = aa[take]
            patch[k, out, : len(take)] = rpatch[k, a:b].ravel()[take]
            out += 1
    return ids, acts, patch, sizes


class NeuronMoments:
    """Firing count, sum and max of the image scores per neuron (float64 sums)."""

    STATE = ("n_images", "support", "sum", "max")

    def __init__(self, n_neurons: int):
        self.n_images = 0
        self.support = np.zeros(n_neurons, np.int64)
        self.sum = np.zeros(n_neurons, np.float64)
        self.max = np.zeros(n_neurons, np.float64)

    def update(self, scores: np.ndarray) -> None:
        self.n_images += scores.shape[0]
        fires = scores > 0
        self.support += fires.sum(0)
        self.sum += np.where(fires, scores, 0).sum(0, dtype=np.float64)
        if scores.shape[0]:
            self.max = np.maximum(self.max, scores.max(0))

    def result(self) -> dict[str, np.ndarray]:
        n = max(self.n_images, 1)
        mean = np.divide(self.sum, self.support, out=np.zeros_like(self.sum), where=self.support > 0)
        return {"support": self.support.copy(), "frequency": (self.support / n).astype(np.float32),
                "mean_act": mean.astype(np.float32), "max_act": self.max.astype(np.float32)}


class TokenMax:
    """Each neuron's largest activation on any one token (CLS or patch) of the scanned images: the unit of
    the explorer's steering strengths, since a clamp sets tokens, not image scores."""

    STATE = ("max",)

    def __init__(self, n_neurons: int):
        self.max = np.zeros(n_neurons, np.float32)

    def update(self, codes: Tensor) -> None:
        """codes: (..., K) dense SAE codes of any tokens, on any device (only K values leave it)."""
        if codes.numel():
            self.max = np.maximum(self.max, codes.reshape(-1, codes.shape[-1]).amax(0).float().cpu().numpy())

    def result(self) -> dict[str, np.ndarray]:
        return {"token_max": self.max.copy()}


def _ms_accumulator(n_neurons: int, d_embed: int):
    """The closed-form MS accumulator of sae_core.monosemanticity."""
    from .monosemanticity import MSAccumulator

    return MSAccumulator(n_neurons, d_embed)


# ----------------------------------------------------------------------------------------------
# The scan
# ----------------------------------------------------------------------------------------------
@dataclass
class ScanResult:
    neurons: dict[str, np.ndarray]
    """Per-neuron arrays named as in the bundle (ms, support, ..., top_heat, band_*, hist_*)."""
    raw_ms: np.ndarray
    """(d,) MS of the layer's own units, scored the same way."""
    ms_reference: np.ndarray | None
    """(K,) MS of the SAE neurons under `reference_embed` (None without one)."""
    raw_top: dict
    """top_images / top_acts (d, T) of the raw units (highest scores, any sign)."""
    parent_coact: np.ndarray | None
    """(K,) parent of each Matryoshka latent in the level above by co-activation over images (-1 none)."""
    parent_coact_score: np.ndarray | None
    embeddings: np.ndarray
    """(N, E) float16 unit-norm image embeddings."""
    metrics: dict
    n_images: int
    skipped: list
    batch_size: int
    """The image batch the scan used (images_per_batch)."""
    resumed_from: int = 0
    """Images a killed scan had done, restored from its checkpoint (0: scanned from the start)."""


@dataclass(frozen=True)
class ScanCheckpoint:
    """Where and how often a scan saves its running state (every accumulator, one safetensors file), so
    that a killed scan resumes after its last saved batch instead of starting over."""

    path: Path
    every_s: float = 300.0
    every_images: int | None = None
    """Save after at least this many images since the last save (None: by time only)."""
    key: dict = field(default_factory=dict)
    """What else the saved state must match to be reused (e.g. the SAE file and the model); the scan adds
    its own settings and shapes."""
    log: Callable[[str], None] | None = None


class _PassState:
    """The scan's own running state beside its accumulators."""

    STATE = ("done", "embeddings", "seen", "skipped")

    def __init__(self, n_images: int, d_embed: int):
        self.done = 0
        self.embeddings = np.zeros((n_images, d_embed), np.float16)
        self.seen = np.zeros(n_images, bool)
        self.skipped: list = []


def iter_batches(dataset, n_images: int, batch_size: int, first: int = 0) -> Iterator[tuple[np.ndarray, list]]:
    """(image ids, PIL images) per batch from image `first` on; unreadable images are dropped (and
    reported by id)."""
    from .datasets import ImageReadError

    for start in range(first, n_images, batch_size):
        ids, images, bad = [], [], []
        for i in range(start, min(start + batch_size, n_images)):
            try:
                images.append(dataset[i])
                ids.append(i)
            except ImageReadError as e:
                bad.append((i, str(e)))
        yield np.array(ids, np.int64), images, bad


@torch.no_grad()
def scan(adapter, sae, dataset, cfg: AtlasConfig, embedder=None, n_images: int | None = None,
         progress: Callable[[int], None] | None = None,
         reference_embed: Callable[[np.ndarray], np.ndarray] | None = None,
         checkpoint: ScanCheckpoint | None = None) -> ScanResult:
    """One pass over the first `n_images` of `dataset`: model -> layer (all tokens) -> SAE -> statistics.

    `embedder` (an Adapter) gives the unit-norm image embeddings for MS; None = `adapter`'s own
    embedding. `progress(n)` is called with the number of images done after each batch.
    `reference_embed(image ids) -> (n, R)` gives a second embedding (e.g. the world's ground-truth
    factors, `ground_truth.factor_embedding`) under which the SAE neurons' MS is also computed.
    `checkpoint`: save the running state there as the scan goes, and resume from it when it matches
    (no statistic depends on the batching, so a resumed scan gives what an uninterrupted one gives).
    """
    from .metrics import DENSE_FREQUENCY, MetricsAccumulator

    layer = adapter.resolve_layer(cfg.layer)
    if layer.kind == "embed":
        raise UserError("the atlas reads a block layer with its tokens; pass a block number, not embed.")
    if sae.cfg.d_in != adapter.width:
        raise UserError(f"the SAE expects width {sae.cfg.d_in} but {adapter.spec} layer {cfg.layer} has width "
                        f"{adapter.width}; use the SAE trained on this model and layer.")
    layout = adapter.layout
    N = len(dataset) if n_images is None else min(n_images, len(dataset))
    if N < 2:
        raise UserError(f"the scan would cover {N} image{'' if N == 1 else 's'} of the dataset's {len(dataset)}; the atlas "
                        "needs at least 2.")
    K, d, P = sae.cfg.d_sae, adapter.width, layout.n_patches
    same_model = embedder is None or embedder is adapter
    embedder = adapter if embedder is None else embedder
    E = embedder.embed_dim

    _check_gallery_memory(K, cfg.topk, P, 2 if cfg.score == "cls" else 1)
    if cfg.topk > max(N, 16):  # every gallery padded past the images; the hierarchy's image pairs (T x T) then ran
        # out of memory after the whole scan (--topk 100000 on 16 images: 37 GiB, until 2026-12-05)
        raise UserError(f"--topk {cfg.topk} asks for more top images than the {N} the scan covers; give --topk "
                        f"{max(N, 16)} or less.")
    top = StreamingTopK(K, cfg.topk, P)
    # Scored by CLS, a latent that fires on patches only would have no gallery at all (most of the demo's
    # finest level): a second gallery ranks the images by the max over patches, with its own support.
    patch_top = StreamingTopK(K, cfg.topk, P) if cfg.score == "cls" else None
    ms_patch = _ms_accumulator(K, E) if patch_top is not None else None  # the MS of that ranking
    patch_bands = ActivationBands(K, cfg) if patch_top is not None else None  # and its histogram and bands
    raw_top = StreamingTopK(d, cfg.topk, 0, positive_only=False)
    bands = ActivationBands(K, cfg)
    moments = NeuronMoments(K)
    token_max = TokenMax(K)
    coact = None
    if sae.cfg.group_sizes:
        from .hierarchy import CoactivationCounter

        coact = CoactivationCounter(sae.cfg.group_sizes, K)
    ms_sae = _ms_accumulator(K, E)
    ms_raw = _ms_accumulator(d, E)
    # built before the pass (its width from one image) so that a checkpoint can restore it
    ms_ref = None if reference_embed is None else _ms_accumulator(K, np.shape(reference_embed(np.zeros(1, np.int64)))[1])
    metrics = MetricsAccumulator(K)
    state = _PassState(N, E)
    sae_dev = next(sae.parameters()).device
    running = {"pass": state, "top": top, "patch_top": patch_top, "ms_patch": ms_patch, "patch_bands": patch_bands,
               "raw_top": raw_top, "bands": bands, "moments": moments, "token_max": token_max, "coact": coact,
               "ms_sae": ms_sae, "ms_raw": ms_raw, "ms_ref": ms_ref, "metrics": metrics}
    resumed_from = _resume_scan(checkpoint, running, cfg, N, K, d, E)
    saved_at, saved_done = time.monotonic(), state.done

    batch_size = images_per_batch(cfg.batch_size, layout.n_tokens, K, cfg.memory_gib)
    for ids, images, bad in iter_batches(dataset, N, batch_size, first=state.done):
        state.skipped += bad
        state.done += len(ids) + len(bad)
        if len(ids) == 0:
            if progress:
                progress(state.done)
            continue
        pixels = adapter.preprocess(images)
        wanted = [layer, adapter.resolve_layer("embed")] if same_model else [layer]
        out = adapter.capture(pixels, wanted)
        h = out[layer.name].float()  # (n, T, d)
        emb = out["embed"] if same_model else embedder.embed(embedder.preprocess(images))
        emb = torch.nn.functional.normalize(emb.float().cpu(), dim=-1)
        n, T = h.shape[:2]
        x = h.reshape(n * T, d).to(sae_dev)
        z = sae.encode(x)
        # Reconstruction metrics on the rows the SAE was trained on.
        rows = _metric_rows(n, T, layout.n_prefix, cfg.metric_tokens).to(sae_dev)
        if cfg.metric_tokens == "mean":
            xm = h[:, layout.n_prefix:].mean(1).to(sae_dev)
            zm = sae.encode(xm)
            metrics.update(xm, sae.decode(zm), zm)
        else:
            zr, xr = (z, x) if cfg.metric_tokens == "all" else (z[rows], x[rows])  # "all": no copy of the codes
            metrics.update(xr, _decode_sparse(sae, zr), zr)  # on the SAE's device: the codes never cross
        token_max.update(z)  # every token, CLS included, before the codes leave the SAE's device
        codes = z.reshape(n, T, K).cpu()
        scores, best, heat = pool_tokens(codes, layout.n_prefix, cfg.score)
        raw_scores, _, _ = pool_tokens(h.cpu(), layout.n_prefix, cfg.score)
        ids_t = torch.from_numpy(ids)
        best_np = best.numpy()
        top.update(scores, ids_t, best, heat)
        if patch_top is not None:  # `best` is already the argmax over patches, whatever the score
            pmax = heat.amax(dim=1)
            patch_top.update(pmax, ids_t, best, heat)
            ms_patch.update(pmax, emb)
            p_np = pmax.numpy()
            p_img, p_neuron = np.nonzero(p_np > 0)
            patch_bands.update(ids[p_img], p_neuron, p_np[p_img, p_neuron], best_np[p_img, p_neuron])
        raw_top.update(raw_scores, ids_t)
        s_np = scores.numpy()
        moments.update(s_np)
        if coact is not None:  # co-activation over images (an image fires a latent when its score > 0)
            coact.update(s_np > 0)
        img_idx, neuron = np.nonzero(s_np > 0)
        bands.update(ids[img_idx], neuron, s_np[img_idx, neuron], best_np[img_idx, neuron])
        ms_sae.update(scores, emb)
        ms_raw.update(raw_scores, emb)
        if ms_ref is not None:
            ms_ref.update(scores, np.asarray(reference_embed(ids), np.float64))
        state.embeddings[ids] = emb.numpy().astype(np.float16)
        state.seen[ids] = True
        if checkpoint is not None and state.done < N and (
                time.monotonic() - saved_at >= checkpoint.every_s
                or (checkpoint.every_images is not None and state.done - saved_done >= checkpoint.every_images)):
            try:
                save_state(checkpoint.path, running, _scan_key(checkpoint, running, cfg, N, K, d, E))
            except OSError as e:  # a full disk must not end hours of scanning: go on without checkpoints
                if checkpoint.log:
                    checkpoint.log(f"could not save the scan's checkpoint ({e}); the scan goes on without one.")
                checkpoint = None
            saved_at, saved_done = time.monotonic(), state.done
        if progress:
            progress(state.done)

    neurons = {**moments.result(), **token_max.result(), **top.result(), **bands.result(),
               "ms": _as_np(ms_sae.result()).astype(np.float32)}
    if patch_top is not None:
        neurons.update({f"patch_{name}": arr for name, arr in patch_top.result().items()})
        neurons["patch_ms"] = _as_np(ms_patch.result()).astype(np.float32)
        neurons.update({f"patch_{name}": arr for name, arr in patch_bands.result().items()})
        neurons["patch_support"] = neurons["patch_hist_counts"].sum(1)  # every firing image has one bin
    m = metrics.compute()
    # dead/dense at token level on the metric rows (as in training); the *_images figures count images
    # by their score, which for --score cls leaves out latents that fire on patches only.
    summary = {"fvu": m["fvu"], "l0": m["l0"], "dead_frac": m["dead_fraction"], "dense_frac": m["dense_fraction"],
               "dead_frac_images": float((neurons["support"] == 0).mean()),
               "dense_frac_images": float((neurons["frequency"] > DENSE_FREQUENCY).mean()), "mean_cosine": m["mean_cosine"],
               "metric_rows": m["rows"], "metric_tokens": cfg.metric_tokens}
    rt = raw_top.result()
    pc, pc_score = coact.parents() if coact is not None else (None, None)
    return ScanResult(neurons=neurons, raw_ms=_as_np(ms_raw.result()).astype(np.float32),
                      ms_reference=None if ms_ref is None else _as_np(ms_ref.result()).astype(np.float32),
                      raw_top={"top_images": rt["top_images"], "top_acts": rt["top_acts"]}, embeddings=state.embeddings,
                      parent_coact=pc, parent_coact_score=pc_score, metrics=summary, n_images=int(state.seen.sum()),
                      skipped=state.skipped, batch_size=batch_size, resumed_from=resumed_from)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): not checked
        return None


def _check_gallery_memory(K: int, topk: int, P: int, galleries: int) -> None:
    """Refuse a --topk whose galleries' patch heat (K x topk x P float16, per gallery) cannot fit: it is held
    for the whole scan, and past the machine's memory the allocation was a traceback before any image."""
    need = K * topk * max(P, 1) * 2 * galleries
    total = _physical_memory()
    if total is not None and need > total // 2:
        raise UserError(f"--topk {topk} would hold {need / 2**30:,.1f} GiB of patch heat ({K} latents x {topk} images x "
                        f"{P} patches x 2 bytes{' x 2 galleries' if galleries > 1 else ''}), more than half of this "
                        f"machine's {total / 2**30:,.0f} GiB; lower --topk.")


SCAN_STATE_FORMAT = 2
"""Version of the accumulators a scan checkpoint holds; 2 (2026-12-04): the bands' QuantileGrid. A checkpoint of
another version is not restored: the scan starts over, and says so."""


def _scan_key(checkpoint: ScanCheckpoint, running: dict, cfg: AtlasConfig, N: int, K: int, d: int, E: int) -> dict:
    """What a saved scan state must match to be reused: the caller's key, the settings that shape the
    statistics (not the batch, which none depends on), the sizes and which accumulators run (the
    reference MS and the co-activation counts are optional)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "memory_gib")}
    return json.loads(json.dumps({"format": SCAN_STATE_FORMAT, "key": checkpoint.key, "settings": settings,
                                  "n_images": N, "n_latents": K, "width": d, "embed_dim": E,
                                  "accumulators": sorted(k for k, v in running.items() if v is not None)}))


def _resume_scan(checkpoint: ScanCheckpoint | None, running: dict, cfg: AtlasConfig, N: int, K: int, d: int,
                 E: int) -> int:
    """Restore `running` from the checkpoint when one matches; returns the images it had done (0: none)."""
    if checkpoint is None:
        return 0
    saved = read_info(checkpoint.path)
    if saved is None:
        return 0
    want = _scan_key(checkpoint, running, cfg, N, K, d, E)
    if saved != want:
        if checkpoint.log:
            diff = next((k for k in want if saved.get(k) != want[k]), "format")
            why = "by another version of the atlas" if diff == "format" else f"with other settings ({diff})"
            checkpoint.log(f"the scan's checkpoint {checkpoint.path} was made {why}; scanning from the start.")
        return 0
    load_state(checkpoint.path, running)
    done = running["pass"].done
    if checkpoint.log:
        checkpoint.log(f"resuming the scan after {done} of {N} images (from {checkpoint.path}).")
    return done


def _decode_sparse(sae, z: Tensor) -> Tensor:
    """sae.decode(z) from z's nonzero entries only: O(L0 d) a row instead of the dense O(K d), which at
    the paper's size costs as much as the encoder."""
    from .sparse_ops import sorted_codes, sparse_decode

    r, c = z.nonzero(as_tuple=True)  # row-major: already in CSR order
    return sparse_decode(z[r, c], sae.W_dec, sorted_codes(r, c, z.shape[0])) + sae.b_dec


def _as_np(x) -> np.ndarray:
    if isinstance(x, dict):
        x = x["ms"]
    if isinstance(x, tuple):
        x = x[0]
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _metric_rows(n: int, T: int, n_prefix: int, which: str) -> Tensor:
    pos = torch.arange(T)
    if which == "cls":
        keep = pos == 0
    elif which == "patches":
        keep = pos >= n_prefix
    else:
        keep = torch.ones(T, dtype=torch.bool)
    return keep.repeat(n)


def metric_tokens_for(training_tokens: str | None) -> str:
    """Which rows FVU/L0 are measured on: those the SAE was trained on (random:K -> all)."""
    t = (training_tokens or "all").strip()
    return t if t in ("cls", "mean", "patches") else "all"


# ----------------------------------------------------------------------------------------------
# Decoder geometry
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def decoder_neighbors(W_dec: Tensor, n: int = 8, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """For each latent, the `n` other latents with the highest decoder cosine: (K, n) ids and cosines."""
    W = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    K = W.shape[0]
    m = min(n, K - 1)
    ids = np.full((K, n), -1, np.int64)
    cos = np.zeros((K, n), np.float32)
    for a in range(0, K, chunk):
        c = W[a:a + chunk] @ W.t()
        c[torch.arange(c.shape[0]), torch.arange(a, a + c.shape[0])] = -math.inf
        v, i = c.topk(m, dim=1)
        ids[a:a + chunk, :m] = i.numpy()
        cos[a:a + chunk, :m] = v.numpy()
    return ids, cos
