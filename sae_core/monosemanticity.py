"""Monosemanticity Score (MS, Pach et al. 2025) in closed form, streamed over images in one pass.

The paper scores neuron k by the activation-weighted mean cosine similarity of image pairs:

    a_kn = (x_kn - min_n x_kn) / (max_n x_kn - min_n x_kn)                (min-max over ALL images)
    MS_k = sum_{n<m} a_kn a_km <e_n, e_m> / sum_{n<m} a_kn a_km          (e_n unit-norm embeddings)
         = (||sum_n a_kn e_n||^2 - sum_n a_kn^2) / ((sum_n a_kn)^2 - sum_n a_kn^2)

The min and max are only known after the last image, but every sum above is affine in raw sums.
With lo = min, r = max - min and a = (x - lo) / r (r^2 cancels between numerator and denominator):

    numerator   = ||sum_n x_n e_n - lo * sum_n e_n||^2 - sum_n (x_n - lo)^2
    denominator = (sum_n x_n - N lo)^2                  - sum_n (x_n - lo)^2
    sum_n (x_n - lo)^2 = sum x^2 - 2 lo sum x + N lo^2

so one pass accumulates sum x e (d, K), sum e (d,), sum x, sum x^2, N and a running min/max, and
`result()` finishes. Each chunk costs one (d, n) @ (n, K) product: O(N d K) instead of O(N^2 K).
x is accumulated relative to a per-neuron shift (its minimum over the first chunk), which keeps
the sum-of-squares expansion free of cancellation for neurons far from zero (raw neurons).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .errors import UserError, is_count, not_utf8
from .precision import resolve_device

# neuron columns per block inside one update, so a float64 copy of the chunk stays near 64 MiB
_BLOCK_ELEMENTS = 8 << 20


class MSResult(NamedTuple):
    """Per-neuron Monosemanticity Scores and what they rest on (arrays indexed by neuron)."""
    ms: np.ndarray
    support: np.ndarray
    n_images: int
    n_nan: int
    min_support: int
    ms_supported: np.ndarray
    n_below_min_support: int

    def summary(self) -> dict:
        """JSON-ready figures: counts, and mean/median MS over neurons with a score."""
        def stats(v):
            v = v[np.isfinite(v)]
            return (float(v.mean()), float(np.median(v))) if v.size else (None, None)
        mean, median = stats(self.ms)
        mean_s, median_s = stats(self.ms_supported)
        return {"n_neurons": int(self.ms.shape[0]), "n_images": int(self.n_images), "n_nan": int(self.n_nan),
                "ms_mean": mean, "ms_median": median, "min_support": int(self.min_support),
                "n_below_min_support": int(self.n_below_min_support),
                "ms_mean_supported": mean_s, "ms_median_supported": median_s}


MSResult.ms.__doc__ = "float32 (K,): MS per neuron; NaN where the neuron fires (normalised activation > 0) on < 2 images"
MSResult.support.__doc__ = "int64 (K,): images whose min-max normalised activation is > 0 (activation above the neuron's minimum)"
MSResult.n_images.__doc__ = "N, the number of images scored"
MSResult.n_nan.__doc__ = "number of neurons without a score (support < 2: dead, constant, or firing on one image)"
MSResult.min_support.__doc__ = "the minimum support of the filtered score `ms_supported` (2 = no extra filter)"
MSResult.ms_supported.__doc__ = "float32 (K,): `ms` where support >= min_support, NaN elsewhere (few-image scores are noisy)"
MSResult.n_below_min_support.__doc__ = "neurons that have a score but fall below min_support (NaN in ms_supported only)"


def _as_tensor(x, device, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64)
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise UserError(f"{name} must hold numbers, got dtype {x.dtype}; pass a float array.")
    # one float64 copy (also makes read-only memory maps writable, which torch.from_numpy wants)
    return torch.from_numpy(np.array(x, dtype=np.float64)).to(device)


def _raise_non_finite(bad, name: str, first_image: int, first_column: int = 0) -> None:
    """bad: (n, k) bool array or tensor, True where a value is NaN or inf."""
    if bool(bad.any()):
        row, col = (int(v) for v in np.argwhere(np.asarray(bad.cpu() if isinstance(bad, torch.Tensor) else bad))[0])
        raise UserError(f"{name} contain a non-finite value (NaN or inf) at image {first_image + row}, "
                        f"column {first_column + col}; clean or drop those images before scoring.")


class _BlockStats(NamedTuple):
    """One block of neurons of one chunk: column min/max, images on the min, shifted values y = x - c."""
    cmin: torch.Tensor
    cmax: torch.Tensor
    at_min: torch.Tensor
    y: torch.Tensor
    sy: torch.Tensor
    syy: torch.Tensor


def _block_stats_numpy(x: np.ndarray, shift) -> _BlockStats:
    """CPU path in numpy: its column reductions over a row-major (n, k) block measured 3-10x faster
    than torch's on this project's CPUs (torch.min(0) also computes indices)."""
    if x.dtype.kind not in "fiub":
        raise UserError(f"activations must hold numbers, got dtype {x.dtype}; pass a float array.")
    cmin, cmax = x.min(0), x.max(0)
    at = np.count_nonzero(x == cmin, axis=0)
    c = cmin.astype(np.float64) if shift is None else shift.numpy()
    y = np.subtract(x, c, dtype=np.float64)
    t = torch.from_numpy
    return _BlockStats(t(cmin.astype(np.float64)), t(cmax.astype(np.float64)), t(at.astype(np.int64)), t(y),
                       t(y.sum(0)), t(np.einsum("nk,nk->k", y, y)))


def _block_stats_torch(x: torch.Tensor, shift) -> _BlockStats:
    cmin, cmax = torch.amin(x, 0), torch.amax(x, 0)
    at = (x == cmin).sum(0)
    y = x - (cmin if shift is None else shift)
    return _BlockStats(cmin, cmax, at, y, y.sum(0), (y * y).sum(0))


FLOAT32_MIN_SPREAD = 1e-2
"""A float32 product scores a neuron to about 2e-8 / ((sum a)^2 - sum a^2) * (sum a)^2: below this share, 2e-6 off
(1e-3: 9e-6 measured; 1e-9: 7.4), the neuron is scored again in float64 (`rescore_in_float64`)."""


class MSAccumulator:
    """Streams (activations, embeddings) chunks of images; `result()` gives MS for all K neurons.

    Sums are float64 on `device` ("cpu" or "cuda"). `matmul_dtype=torch.float32` runs the one
    O(n d K) product per chunk in float32 (about 2x faster on CPU; the result moves by ~1e-6) and
    still accumulates in float64, except for a neuron whose weight one image holds nearly alone: its MS is a
    small difference of two large sums, which float32 cannot resolve (7.3 for a true -0.17 where the second
    image's activation was 1e-9 of the first's; until 2026-12-05). `float32_unresolved()` names such neurons,
    which `rescore_in_float64` scores again from the arrays. Embedding rows are normalised to unit length here
    (the paper's code takes cosine similarities, which normalise too), so callers need not; a zero row is an error.
    Memory: a (d, K) float64 accumulator, e.g. 400 MB for d 768 and K 65,536.
    """

    STATE = ("n", "shift", "xe", "e_sum", "sy", "syy", "lo", "hi", "n_at_lo")  # a killed pass resumes (sae_core.resume)

    def __init__(self, n_neurons: int, d_embed: int, device="cpu", matmul_dtype: torch.dtype = torch.float64):
        self.n_neurons, self.d_embed = int(n_neurons), int(d_embed)
        if self.n_neurons < 1 or self.d_embed < 1:
            raise UserError(f"activations need at least one neuron and embeddings at least one dimension, got "
                            f"{self.n_neurons} neurons and {self.d_embed} dimensions; pass non-empty arrays.")
        self.device = torch.device(resolve_device(device, "device"))  # "cuda" without a GPU was torch's RuntimeError
        self.matmul_dtype = matmul_dtype
        self.numpy_path = self.device.type == "cpu"                # elementwise work in numpy on CPU (faster)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.n = 0
        self.shift = None                                         # (K,) per-neuron offset c; x is summed as x - c
        self.xe = torch.zeros(self.d_embed, self.n_neurons, **f64)  # sum_n (x_n - c) e_n
        self.e_sum = torch.zeros(self.d_embed, **f64)              # sum_n e_n
        self.sy = torch.zeros(self.n_neurons, **f64)               # sum_n (x_n - c)
        self.syy = torch.zeros(self.n_neurons, **f64)              # sum_n (x_n - c)^2
        self.lo = torch.full((self.n_neurons,), float("inf"), **f64)
        self.hi = torch.full((self.n_neurons,), float("-inf"), **f64)
        self.n_at_lo = torch.zeros(self.n_neurons, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def update(self, acts, embeddings) -> None:
        """acts: (n, K) activations of n images (tensor or ndarray, any float dtype);
        embeddings: (n, d) embeddings of the same images, in the same order."""
        emb = _as_tensor(embeddings, self.device, "embeddings")
        if emb.ndim != 2 or emb.shape[1] != self.d_embed:
            raise UserError(f"embeddings must have shape (n, {self.d_embed}), got {tuple(emb.shape)}; "
                            f"pass one embedding row per image.")
        n = emb.shape[0]
        if not (isinstance(acts, torch.Tensor) or isinstance(acts, np.ndarray)):
            acts = np.asarray(acts)
        if len(acts.shape) != 2 or tuple(acts.shape) != (n, self.n_neurons):
            raise UserError(f"activations must have shape ({n}, {self.n_neurons}) to match {n} embedding rows "
                            f"and {self.n_neurons} neurons, got {tuple(acts.shape)}.")
        if n == 0:
            return
        _raise_non_finite(~torch.isfinite(emb), "embeddings", self.n)
        norms = emb.norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            raise UserError(f"embedding of image {self.n + int((norms[:, 0] == 0).nonzero()[0])} is all zeros, so it "
                            f"has no direction for a cosine similarity; drop that image or fix the embedder.")
        emb = emb / norms
        emb_mm = emb.to(self.matmul_dtype)
        block = max(1, _BLOCK_ELEMENTS // n)
        on_cpu = self.numpy_path
        # every block checked before any is added: a NaN in a later block was refused after the earlier blocks'
        # sums had moved (a caller who went on had MS off by up to 6e-4; until 2026-12-05). One pass over the
        # values, next to the O(n d K) product below.
        for k0 in range(0, self.n_neurons, block):
            x = acts[:, k0:k0 + block]
            if not isinstance(x, torch.Tensor):
                x = np.asarray(x)
                if x.dtype.kind not in "fiub":
                    raise UserError(f"activations must hold numbers, got dtype {x.dtype}; pass a float array.")
            _raise_non_finite(~torch.isfinite(x) if isinstance(x, torch.Tensor) else ~np.isfinite(x),
                              "activations", self.n, k0)
        for k0 in range(0, self.n_neurons, block):
            k1 = min(self.n_neurons, k0 + block)
            shift = None if self.n == 0 else self.shift[k0:k1]
            if on_cpu:
                x = acts[:, k0:k1]
                if isinstance(x, torch.Tensor):
                    x = x.detach().cpu()
                    x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
                st = _block_stats_numpy(np.asarray(x), shift)
            else:
                x = _as_tensor(acts[:, k0:k1], self.device, "activations")
                st = _block_stats_torch(x, shift)
            if self.n == 0:
                if self.shift is None:
                    self.shift = torch.empty(self.n_neurons, dtype=torch.float64, device=self.device)
                self.shift[k0:k1] = st.cmin
            self.xe[:, k0:k1] += (emb_mm.T @ st.y.to(self.matmul_dtype)).double()
            self.sy[k0:k1] += st.sy
            self.syy[k0:k1] += st.syy
            # running minimum and how many images sit exactly on it (they get a = 0: no support)
            lo = self.lo[k0:k1]
            self.n_at_lo[k0:k1] = torch.where(st.cmin < lo, st.at_min,
                                              self.n_at_lo[k0:k1] + torch.where(st.cmin == lo, st.at_min, 0))
            self.lo[k0:k1] = torch.minimum(lo, st.cmin)
            self.hi[k0:k1] = torch.maximum(self.hi[k0:k1], st.cmax)
        self.e_sum += emb.sum(0)
        self.n += n

    def _sums(self):
        """(sum_n (x_n - lo), sum_n (x_n - lo)^2, lo in shifted units), all (K,) float64."""
        n = float(self.n)
        c = self.lo - self.shift                                   # the minimum in shifted units
        return self.sy - n * c, self.syy - 2 * c * self.sy + n * c * c, c

    @torch.no_grad()
    def float32_unresolved(self) -> np.ndarray:
        """Ids of the neurons a float32 product cannot score to 1e-5: their MS's denominator, (sum a)^2 - sum a^2,
        is under FLOAT32_MIN_SPREAD of (sum a)^2 (the MS error grows as 2e-8 over that share). None in float64."""
        if self.matmul_dtype == torch.float64 or self.n == 0:
            return np.zeros(0, np.int64)
        s1, sq, _ = self._sums()
        spread = (s1 * s1 - sq) / torch.where(s1 > 0, s1 * s1, 1.0)
        return torch.nonzero((self.n - self.n_at_lo >= 2) & (spread < FLOAT32_MIN_SPREAD))[:, 0].cpu().numpy()

    @torch.no_grad()
    def result(self, min_support: int = 2) -> MSResult:
        """Finish the pass: MS for every neuron (NaN where support < 2) and the min-support filter."""
        if self.n == 0:
            raise UserError("no images were given, so there is nothing to score; pass at least two images.")
        s1, sq, c = self._sums()
        norm2 = torch.empty_like(s1)
        block = max(1, _BLOCK_ELEMENTS // self.d_embed)
        for k0 in range(0, self.n_neurons, block):                 # ||sum_n (x_n - lo) e_n||^2, blockwise
            v = self.xe[:, k0:k0 + block] - self.e_sum[:, None] * c[None, k0:k0 + block]
            norm2[k0:k0 + block] = (v * v).sum(0)
        support = self.n - self.n_at_lo
        scored = support >= 2
        ms = torch.where(scored, (norm2 - sq) / torch.where(scored, s1 * s1 - sq, 1.0), float("nan"))
        ms = ms.float().cpu().numpy()
        support = support.cpu().numpy().astype(np.int64)
        return finish_result(ms, support, self.n, min_support)


def rescore_in_float64(result: MSResult, acc: MSAccumulator, acts, embeddings, chunk: int = 4096) -> MSResult:
    """`result` of a float32 pass with the neurons it could not resolve (`acc.float32_unresolved()`) scored again
    in float64, from the same (N, K) `acts` and (N, d) `embeddings`; the others as they were."""
    ids = acc.float32_unresolved()
    if ids.size == 0:
        return result
    exact = MSAccumulator(ids.size, acc.d_embed, device=acc.device)
    for a in range(0, acts.shape[0], chunk):
        x = acts[a:a + chunk]
        x = x[:, torch.as_tensor(ids, device=x.device)] if isinstance(x, torch.Tensor) else np.asarray(x)[:, ids]
        exact.update(x, embeddings[a:a + chunk])
    ms = result.ms.copy()
    ms[ids] = exact.result(2).ms
    return finish_result(ms, result.support, result.n_images, result.min_support)


def finish_result(ms: np.ndarray, support: np.ndarray, n_images: int, min_support: int = 2) -> MSResult:
    """Wrap per-neuron scores and supports into an MSResult with the minimum-support filter applied."""
    if min_support < 2:
        raise UserError(f"--min-support must be at least 2 (a score needs two images), got {min_support}.")
    ms = np.asarray(ms, np.float32)
    supported = np.where(support >= min_support, ms, np.float32(np.nan)).astype(np.float32)
    n_nan = int(np.isnan(ms).sum())
    return MSResult(ms=ms, support=np.asarray(support, np.int64), n_images=int(n_images), n_nan=n_nan,
                    min_support=int(min_support), ms_supported=supported,
                    n_below_min_support=int(np.isnan(supported).sum()) - n_nan)


def monosemanticity_score(acts, embeddings, chunk: int = 4096, device="cpu", min_support: int = 2,
                          matmul_dtype: torch.dtype = torch.float64) -> MSResult:
    """MS of every neuron from in-memory (or memory-mapped) arrays.

    acts: (N, K) activations of N images on K neurons; embeddings: (N, d), one row per image.
    Streams `chunk` images at a time through an MSAccumulator.
    """
    acts, embeddings = (x if isinstance(x, (np.ndarray, torch.Tensor)) else np.asarray(x) for x in (acts, embeddings))
    if not is_count(chunk):  # 0 was range()'s ValueError
        raise UserError(f"chunk must be a whole number of images, at least 1, got {chunk!r}.")
    if len(acts.shape) != 2 or len(embeddings.shape) != 2:
        raise UserError(f"activations must be (N images, K neurons) and embeddings (N, d); got shapes "
                        f"{tuple(acts.shape)} and {tuple(embeddings.shape)}.")
    if acts.shape[0] != embeddings.shape[0]:
        raise UserError(f"activations cover {acts.shape[0]} images but embeddings {embeddings.shape[0]}; "
                        f"both must have one row per image, in the same order.")
    acc = MSAccumulator(acts.shape[1], embeddings.shape[1], device=device, matmul_dtype=matmul_dtype)
    for a in range(0, acts.shape[0], chunk):
        acc.update(acts[a:a + chunk], embeddings[a:a + chunk])
    return rescore_in_float64(acc.result(min_support), acc, acts, embeddings, chunk)


MAX_NEURON_ID = 2**24 - 1
"""The largest neuron id an activations.csv may name (the scores are written as an array indexed by id)."""


def read_activations_csv(path) -> tuple[np.ndarray, np.ndarray]:
    """The paper's released `activations.csv`: one row per neuron, `k, a_1, ..., a_N`.

    A header row (first field not a number, fields separated by commas), blank lines, a UTF-8 BOM and
    one trailing comma per row (no value after it) are skipped. Returns (neuron ids int64
    (K,), activations float64 (N, K)), columns in file order: float64 as the text is read, since float32
    moved activations of 1e4 + small offsets enough to change their MS and turn one into NaN (a .npy keeps
    its own dtype; a large file is better converted to one once, which is memory-mapped). Rows are parsed
    one at a time into the result: a 100 x 50,000 file peaked at 24 MB (20 MB result, in float32) against
    81 MB for a whole-file float64 parse and its transpose, at the same speed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"activations file {path} does not exist; give the path of activations.csv.")

    def lines():
        """(line number, the line without its end and one trailing comma) of every non-blank line."""
        try:
            with open(path, encoding="utf-8-sig") as f:  # -sig: Excel starts its UTF-8 with a BOM
                for n, line in enumerate(f, 1):
                    line = line.rstrip()
                    if line:
                        yield n, line[:-1] if line.endswith(",") else line
        except UnicodeDecodeError:
            raise not_utf8(path) from None

    first = next(lines(), (0, ""))[1]
    try:
        float(first.split(",", 1)[0])
        header = False
    except ValueError:
        header = "," in first  # a line with no comma at all is a row in another format, not a header
    K = max(sum(1 for _ in lines()) - header, 0)
    ids = np.zeros(K, np.float64)
    acts = None
    for r, (lineno, line) in enumerate(lines(), -int(header)):
        if r < 0:
            continue
        try:  # numpy's C parser: no Python object per value
            # it reads a trailing comma as -1, so one left after lines() took one off is refused too
            row = np.fromstring(line, dtype=np.float64, sep=",") if not line.endswith(",") else None
        except ValueError:
            row = None
        if row is None:
            raise UserError(f"{path} line {lineno} is not numeric; the file must hold comma-separated rows "
                            f"`k,a_1,...,a_N`.")
        if acts is None:
            if len(row) < 2:
                break
            acts = np.empty((len(row) - 1, K), np.float64)
        elif len(row) != acts.shape[0] + 1:
            raise UserError(f"{path} line {lineno} has {len(row) - 1} activations but the first row {acts.shape[0]}; "
                            "every row must cover the same images.")
        ids[r], acts[:, r] = row[0], row[1:]
    if acts is None:
        raise UserError(f"{path} holds no activations; expected rows `k,a_1,...,a_N`.")
    if not np.all(ids == np.round(ids)) or ids.min() < 0:
        raise UserError(f"the first column of {path} must be non-negative integer neuron ids.")
    if ids.max() > MAX_NEURON_ID:  # the scores are written indexed by id: 1e14 asked for 364 TiB
        raise UserError(f"{path} names neuron {ids.max():.0f}, above {MAX_NEURON_ID:,}, more neurons than an SAE "
                        "has; the first column must be the neuron ids (0, 1, ...).")
    ids = ids.astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise UserError(f"{path} lists some neuron id more than once; keep one row per neuron.")
    return ids, acts
