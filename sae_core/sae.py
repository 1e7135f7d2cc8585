"""Sparse autoencoders: one base module, four trainable architectures and one imported, selected by name.

All share z = act((x - b_dec) @ W_enc + b_enc) and x_hat = z @ W_dec + b_dec; the trained ones keep unit-norm
decoder rows (an imported SAE keeps its own). They differ in the activation `act` and the sparsity pressure:

- `relu`:       z = ReLU(pre); loss adds l1_coeff * sum_j z_j * ||W_dec[j]||.
- `topk`:       z keeps the k largest ReLU(pre) of each token (Gao et al. 2024).
- `batchtopk`:  training keeps the k*B largest ReLU(pre) of the whole batch (Bussmann et al. 2024);
                inference uses a learned per-latent threshold: z_j = pre_j if pre_j > threshold_j.
- `matryoshka`: BatchTopK whose loss is the mean over nested prefixes of the dictionary of each
                prefix's reconstruction error (Bussmann et al. 2025; Pach et al. 2025).
- `jumprelu`:   inference only, for SAEs imported from SAELens (sae_core.checkpoint):
                z_j = pre_j if pre_j > threshold_j, the same computation as BatchTopK's inference.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError, is_count
from .sparse_ops import SparseCodes, codes_from_mask, selected_preacts, sorted_codes, sparse_decode, stable_argsort

TRAINABLE_ARCHS = ("relu", "topk", "batchtopk", "matryoshka")
ARCHS = (*TRAINABLE_ARCHS, "jumprelu")
THRESHOLD_ARCHS = ("batchtopk", "matryoshka", "jumprelu")
K_ARCHS = ("topk", "batchtopk", "matryoshka")  # the architectures whose sparsity is set by k


@dataclass(frozen=True)
class SAEConfig:
    """Shape and sparsity settings of one SAE; saved as config.json beside the weights."""

    arch: str
    d_in: int
    d_sae: int
    k: int = 32
    """Active latents per token (topk, and batchtopk/matryoshka on average over the batch)."""
    l1_coeff: float = 0.2
    """relu only: weight of the decoder-norm-weighted L1 penalty (inputs scaled to E||x||^2 = d_in)."""
    group_sizes: tuple[int, ...] = ()
    """matryoshka only: sizes of the nested groups, summing to d_sae (prefix g = groups 0..g)."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss per token; None means d_in // 2."""
    aux_coeff: float = 1 / 32
    threshold_decay: float = 0.99
    """Exponential moving average factor of the learned inference thresholds."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"unknown SAE architecture {self.arch!r}; choose one of {', '.join(ARCHS)}.")
        # whole numbers, checked before any use: 2.5 or "8" failed later inside torch, and a numpy int64 was
        # kept and made config.json unwritable after the weights were saved; kept as Python ints
        names = ("d_in", "d_sae") + (("k",) if self.arch in K_ARCHS else ())
        for name in names + (("aux_k",) if self.aux_k is not None else ()):
            if not is_count(getattr(self, name)):
                raise UserError(f"SAE setting {name}={getattr(self, name)!r} must be a whole number from 1.")
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.arch in K_ARCHS and not 1 <= self.k <= self.d_sae:
            raise UserError(f"SAE setting k={self.k} must be between 1 and the SAE width {self.d_sae}; give a k "
                            f"(train's --k) from 1 to {self.d_sae}.")
        groups = list(self.group_sizes)  # a numpy array's truth value is ambiguous
        if self.arch == "matryoshka":
            # each a whole number: (4.5, 11.5) summed to 16 and became (4, 11), which training could not split
            if not groups or not all(is_count(g) for g in groups) or sum(groups) != self.d_sae:
                raise UserError(
                    f"matryoshka group sizes {groups} must be whole numbers from 1 that sum to the width {self.d_sae}."
                )
        object.__setattr__(self, "group_sizes", tuple(int(g) for g in groups))

    @property
    def effective_aux_k(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["group_sizes"] = list(self.group_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        """From a saved config.json; TypeError where a size is not a whole number (JSON allows 12.0, or
        null, which would fail later in tensor allocation or a comparison, not here with the field's name)."""
        keys = {f for f in cls.__dataclass_fields__}
        for key in ("d_in", "d_sae", "k", "aux_k"):
            value = d.get(key, 0)
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (key == "aux_k" and value is None):
                raise TypeError(f"{key} is {value!r}, not a whole number")
        groups = d.get("group_sizes", [])
        if not (isinstance(groups, list) and all(isinstance(g, int) and not isinstance(g, bool) for g in groups)):
            raise TypeError(f"group_sizes is {groups!r}, not a list of whole numbers")
        return cls(**{k: (tuple(v) if k == "group_sizes" else v) for k, v in d.items() if k in keys})


def matryoshka_group_sizes(spec: str | None, d_sae: int) -> tuple[int, ...]:
    """Group sizes from "512,1024,..." (sizes) or "0.0625,0.0625,0.125,0.25,0.5" (fractions of the width).

    The default doubles the prefix each time: prefixes of 1/16, 1/8, 1/4, 1/2 and all of the width.
    Fractions must sum to 1, and the last group absorbs their rounding; sizes must sum to d_sae (a
    list that does not, such as prefix widths, is refused rather than silently rewritten).
    """
    if not spec:
        spec = "0.0625,0.0625,0.125,0.25,0.5"
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--groups {spec!r} is not a comma-separated list of sizes or fractions.") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"--groups {spec!r} needs positive sizes or fractions.")
    if all(v < 1 for v in values):
        if abs(sum(values) - 1) > 1e-3:
            raise UserError(f"--groups {spec!r}: fractions of the width must sum to 1, not {sum(values):g}.")
        sizes = [max(1, round(v * d_sae)) for v in values]
        sizes[-1] += d_sae - sum(sizes)
    else:
        if not all(v.is_integer() for v in values):
            raise UserError(f"--groups {spec!r} mixes sizes and fractions; give whole sizes or fractions below 1.")
        sizes = [int(v) for v in values]
        if sum(sizes) != d_sae:
            prefix = sizes == sorted(sizes) and sizes[-1] == d_sae and len(set(sizes)) == len(sizes)
            hint = (f" (as prefix widths, {spec} are the groups "
                    f"{','.join(str(b - a) for a, b in zip([0] + sizes, sizes))})" if prefix else "")
            raise UserError(f"--groups {spec!r} sums to {sum(sizes)}, not the width {d_sae}; give group sizes that "
                            f"add up to the width{hint}.")
    if min(sizes) < 1:
        raise UserError(f"--groups {spec!r} does not fit an SAE of width {d_sae}; the groups must sum to the width.")
    return tuple(sizes)


class TrainOutput(NamedTuple):
    """What one training forward pass returns."""

    loss: Tensor
    """Scalar to minimise: reconstruction + sparsity + auxiliary terms."""
    recon_loss: Tensor
    """Mean over tokens of ||x - x_hat||^2 (for matryoshka: the mean of that over prefixes)."""
    aux_loss: Tensor
    """AuxK loss (already multiplied by its coefficient); 0 without dead latents."""
    sparsity_loss: Tensor
    """relu: the weighted L1 penalty; 0 for the TopK family."""
    x_hat: Tensor
    """(B, d_in) full reconstruction, detached."""
    fired: Tensor
    """(d_sae,) bool: latents active on at least one token of this batch."""
    l0: float
    """Mean number of active latents per token."""


def _all_reduce(t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def topk_codes(acts: Tensor, k: int) -> SparseCodes:
    """Per-token top-k of non-negative activations (zeros are never selected)."""
    vals, idx = acts.topk(k, dim=1)
    rows, pos = (vals > 0).nonzero(as_tuple=True)
    return codes_from_mask(rows, idx[rows, pos], acts.shape[0], acts.shape[1])


def batchtopk_codes(acts: Tensor, k: int, distributed: bool = True) -> tuple[SparseCodes, Tensor]:
    """Exactly the k*B largest activations of the global batch (all processes together), and the cut.

    The cut is the (k*B)-th largest activation of the batch. Entries above it are kept; entries equal
    to it (common with bf16 compute) are kept in (process, row, column) order until k*B are chosen, so
    one process and N processes agree. With `distributed=False` the batch is this process's alone.
    """
    if (_world_size() if distributed else 1) > 1:
        return _batchtopk_codes_distributed(acts, k)
    n_rows, n_lat = acts.shape
    total = k * n_rows
    flat = acts.reshape(-1)
    # Only positive entries at or above a guess can be kept: a strided sample guesses the value that
    # twice k*B entries reach, and the count checks it (too high a guess is lowered until enough
    # entries reach it, or all positive entries are taken). Selecting from those few is about 2.5x
    # faster than a per-token top-k of candidates at demo size (1,024 x 512: 4.3 ms against 10-12 ms).
    stride = max(1, flat.numel() // 8192)
    while math.gcd(stride, n_lat) != 1:  # a stride sharing a factor with the width would skip latents
        stride += 1
    sample = flat[::stride]
    margin = 2
    while True:
        reach = math.ceil(margin * total * sample.numel() / flat.numel())
        guess = sample.kthvalue(sample.numel() - reach + 1).values if reach < sample.numel() else None
        every_positive = guess is None or bool(guess <= 0)
        idx = ((flat > 0) if every_positive else (flat >= guess)).nonzero().squeeze(1)
        if idx.numel() >= total or every_positive:
            break
        margin *= 4
    values = flat[idx]
    if idx.numel() >= total:
        cut = values.kthvalue(values.numel() - total + 1).values
    elif idx.numel() == flat.numel():  # k*B is at least the entry count, all positive: keep every entry
        cut = values.min()
    else:  # fewer positive entries than k*B: the (k*B)-th largest is a zero
        cut = flat.new_zeros(())
    # idx is in (row, column) order, so keeping a subset of it gives CSR order directly; every value
    # is positive and the cut is not negative, so "above the cut" already means positive
    keep = values > cut
    tied = values == cut
    n_tied_kept = max(0, total - int(keep.sum()))
    if n_tied_kept and bool(tied.any()):
        keep |= tied & (tied.cumsum(0) <= n_tied_kept)
    idx = idx[keep]
    return sorted_codes(idx // n_lat, idx % n_lat, n_rows), cut


def _batchtopk_codes_distributed(acts: Tensor, k: int) -> tuple[SparseCodes, Tensor]:
    """`batchtopk_codes` over processes: each token offers its top m candidates (m = 4k, doubled while
    any token could hold more winners than it offered), and the cut is the (k*B)-th largest candidate
    of all processes."""
    n_rows, n_lat = acts.shape
    world = _world_size()
    total = k * n_rows * world
    m = min(n_lat, 4 * k)
    while True:
        cand, idx = acts.topk(m, dim=1)
        flat = cand.flatten()
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        flat = torch.cat(gathered)
        cut = flat.kthvalue(max(1, flat.numel() - total + 1)).values
        # on the activations' device: NCCL (torchrun on CUDA) reduces CUDA tensors only
        saturated = torch.tensor(float(m < n_lat and bool((cand[:, -1] >= cut).any())), device=acts.device)
        _all_reduce(saturated, dist.ReduceOp.MAX)
        if saturated.item() == 0:
            break
        m = min(n_lat, 2 * m)
    positive = cand > 0
    above, tied = (cand > cut) & positive, (cand == cut) & positive
    counts = torch.stack([above.sum(), tied.sum()]).to(torch.int64)
    every = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    every = torch.stack(every)
    n_above, ties_before = int(every[:, 0].sum()), int(every[: dist.get_rank(), 1].sum())
    keep_ties = max(0, min(int(counts[1]), total - n_above - ties_before))
    # ties in (row, column) order, as the single-process path keeps them
    tied_rows, tied_pos = tied.nonzero(as_tuple=True)
    tie_order = stable_argsort(tied_rows * n_lat + idx[tied_rows, tied_pos])
    tied_rows, tied_pos = tied_rows[tie_order], tied_pos[tie_order]
    rows, pos = above.nonzero(as_tuple=True)
    rows = torch.cat([rows, tied_rows[:keep_ties]])
    pos = torch.cat([pos, tied_pos[:keep_ties]])
    return codes_from_mask(rows, idx[rows, pos], n_rows, n_lat), cut


def _check_width(x, width: int, method: str, what: str) -> None:
    """UserError (one sentence) unless x is a tensor of at least one dimension whose last one is `width`."""
    if not isinstance(x, Tensor):
        raise UserError(f"SAE.{method} takes a torch tensor, not a {type(x).__name__}; wrap an array with "
                        "torch.from_numpy.")
    if x.ndim == 0 or x.shape[-1] != width:
        raise UserError(f"SAE.{method} reads vectors of width {width}, but the input has shape {tuple(x.shape)}; "
                        f"pass {what}, the width last.")


class SparseAutoencoder(nn.Module):
    """SAE with SAELens tensor names: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        # Inference thresholds (batchtopk, matryoshka): per latent, with a global fallback for
        # latents that never fired during training. `fired_ever` marks which thresholds are learned.
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        self.register_buffer("global_threshold", torch.zeros(()))
        self.register_buffer("fired_ever", torch.zeros(cfg.d_sae, dtype=torch.bool))
        if cfg.arch == "matryoshka":
            bounds = torch.tensor([0, *torch.tensor(cfg.group_sizes).cumsum(0).tolist()])
            self.register_buffer("group_bounds", bounds, persistent=False)

    # ---------------------------------------------------------------- inference
    def pre_acts(self, x: Tensor) -> Tensor:
        """(B, d_in) -> (B, d_sae): (x - b_dec) @ W_enc + b_enc."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """(..., d_in) -> dense codes (..., d_sae) as used at inference: any leading dimensions (tokens of a
        batch of images, (B, T, d_in), as well as rows), in the SAE's dtype."""
        _check_width(x, self.cfg.d_in, "encode", "activations of the layer it was trained on")
        lead = x.shape[:-1]
        # rows, so TopK picks among each token's latents (topk(dim=1) of a (B, T, d_sae) picked among tokens)
        pre = self.pre_acts(x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype))
        arch = self.cfg.arch
        if arch == "relu":
            z = F.relu(pre)
        elif arch == "topk":
            vals, idx = F.relu(pre).topk(self.cfg.k, dim=1)
            z = torch.zeros_like(pre).scatter_(1, idx, vals)
        else:
            z = pre * (pre > self.threshold.clamp(min=0))  # = (pre > threshold) & (pre > 0), one pass fewer
        return z.reshape(*lead, self.cfg.d_sae)

    def decode(self, z: Tensor) -> Tensor:
        """(..., d_sae) -> (..., d_in): z @ W_dec + b_dec, in the SAE's dtype."""
        _check_width(z, self.cfg.d_sae, "decode", "codes of its latents")
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ---------------------------------------------------------------- training
    def training_forward(
        self, x: Tensor, dead_mask: Tensor | None = None, compute_dtype: torch.dtype = torch.float32
    ) -> TrainOutput:
        """Loss terms for one batch. `dead_mask` (d_sae,) bool selects latents for the AuxK loss.

        The dense encoder matmul runs in `compute_dtype` (bf16 is an explicit option; the master
        weights stay fp32); everything after it touches only active latents.
        """
        cfg = self.cfg
        if cfg.arch not in TRAINABLE_ARCHS:
            raise UserError(f"a {cfg.arch} SAE is imported for inference and cannot be trained here; train one of "
                            f"{', '.join(TRAINABLE_ARCHS)} (batchtopk and matryoshka infer with thresholds too).")
        if x.dim() != 2 or x.shape[1] != cfg.d_in:  # relu's loss summed (B, T, d) over tokens, silently
            raise UserError(f"training takes rows (N, {cfg.d_in}), not a tensor of shape {tuple(x.shape)}; reshape "
                            f"tokens to rows first (x.reshape(-1, {cfg.d_in})).")
        x_c = x - self.b_dec
        if cfg.arch == "relu":
            return self._relu_forward(x, x_c)
        with torch.no_grad():
            # One (B, n) buffer, bias and ReLU in place: at B 4096, n 16,384 every extra copy of
            # it costs a quarter of a GiB of memory traffic. Only positive entries are read later.
            if compute_dtype == torch.float32:
                pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            else:
                pre = (x_c.to(compute_dtype) @ self.W_enc.to(compute_dtype)).float().add_(self.b_enc)
            acts = pre.clamp_min_(0)
            if cfg.arch == "topk":
                codes, cut = topk_codes(acts, cfg.k), None
            else:
                codes, cut = batchtopk_codes(acts, cfg.k)
        vals = selected_preacts(pre, x_c, self.W_enc, self.b_enc, self.b_dec, codes)
        if cfg.arch == "matryoshka":
            recon_loss, x_hat = self._matryoshka_recon(x, vals, codes)
        else:
            x_hat = sparse_decode(vals, self.W_dec, codes) + self.b_dec
            recon_loss = (x - x_hat).pow(2).sum(1).mean()
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[codes.col] = True
        if self.training and cut is not None:
            self._update_thresholds(cut, fired)
        aux_loss = self._aux_loss(x, x_hat, pre, x_c, dead_mask)
        zero = recon_loss.new_zeros(())
        return TrainOutput(
            loss=recon_loss + aux_loss,
            recon_loss=recon_loss.detach(),
            aux_loss=aux_loss.detach(),
            sparsity_loss=zero,
            x_hat=x_hat.detach(),
            fired=fired,
            l0=codes.col.numel() / x.shape[0],
        )

    def _relu_forward(self, x: Tensor, x_c: Tensor) -> TrainOutput:
        z = F.relu(x_c @ self.W_enc + self.b_enc)
        x_hat = z @ self.W_dec + self.b_dec
        recon_loss = (x - x_hat).pow(2).sum(1).mean()
        l1 = self.cfg.l1_coeff * (z * self.W_dec.norm(dim=1)).sum(1).mean()
        active = z.detach() > 0
        return TrainOutput(
            loss=recon_loss + l1,
            recon_loss=recon_loss.detach(),
            aux_loss=recon_loss.new_zeros(()),
            sparsity_loss=l1.detach(),
            x_hat=x_hat.detach(),
            fired=active.any(0),
            l0=active.sum().item() / x.shape[0],
        )

    def _matryoshka_recon(self, x: Tensor, vals: Tensor, codes: SparseCodes) -> tuple[Tensor, Tensor]:
        """Mean over prefixes g of E||x - x_hat_{<=g}||^2, with one sparse decode per group.

        Each active latent is decoded once, inside its own group; prefix reconstructions are the
        cumulative sum of the group parts, so the cost is that of one decode, not G.
        Prefix losses are averaged, not summed, so that the loss scale (and the learning rate that
        suits it) does not change with the number of groups; the full reconstruction keeps the
        same weight as every smaller prefix, as in Bussmann et al.'s Matryoshka SAE.
        """
        group = torch.searchsorted(self.group_bounds, codes.col, right=True) - 1
        # Each group decodes with its own rows of W_dec (one split, so the backward writes each
        # group's gradient into its slice once instead of G full-width (d_sae, d_in) gradients).
        partial = []
        for g, W_g in enumerate(self.W_dec.split(list(self.cfg.group_sizes))):
            sel = group == g
            sub = sorted_codes(codes.row[sel], codes.col[sel] - self.group_bounds[g], codes.n_rows)
            partial.append(sparse_decode(vals[sel], W_g, sub))
        prefixes = torch.stack(partial).cumsum(0) + self.b_dec  # (G, B, d)
        losses = (x - prefixes).pow(2).sum(2).mean(1)  # (G,)
        return losses.mean(), prefixes[-1]

    def _aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, x_c: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK (Gao et al. 2024): dead latents reconstruct the residual e = x - x_hat.

        aux = coeff * sum ||e - e_hat||^2 / sum ||e - mean(e)||^2, with e_hat decoded from the top
        aux_k dead latents per token and *no* decoder bias (the bias is already inside x_hat).
        """
        zero = x.new_zeros(())
        if dead_mask is None or not bool(dead_mask.any()):
            return zero
        dead_idx = dead_mask.nonzero().squeeze(1)
        ka = min(self.cfg.effective_aux_k, dead_idx.numel())
        with torch.no_grad():
            vals, idx = F.relu(pre[:, dead_idx]).topk(ka, dim=1)
            rows, pos = (vals > 0).nonzero(as_tuple=True)
            codes = codes_from_mask(rows, dead_idx[idx[rows, pos]], x.shape[0], self.cfg.d_sae)
        residual = (x - x_hat).detach()
        with torch.no_grad():
            stats = torch.cat([residual.sum(0), residual.pow(2).sum().reshape(1), x.new_tensor([x.shape[0]])])
            _all_reduce(stats)
            n = stats[-1]
            mean = stats[:-2] / n
            variance_sum = stats[-2] - n * mean.pow(2).sum()  # sum ||e - mean(e)||^2 over all processes
        if codes.col.numel() == 0 or variance_sum <= 0:
            return zero
        aux_vals = selected_preacts(pre, x_c, self.W_enc, self.b_enc, self.b_dec, codes)
        e_hat = sparse_decode(aux_vals, self.W_dec, codes)
        # Each process returns its share scaled by the process count, because DDP averages gradients.
        share = (residual - e_hat).pow(2).sum() / variance_sum * _world_size()
        return self.cfg.aux_coeff * share

    @torch.no_grad()
    def _update_thresholds(self, cut: Tensor, fired: Tensor) -> None:
        """Per latent: moving average of the batch cut over the batches in which the latent fired.

        BatchTopK keeps every activation >= the batch's cut (the (k*B)-th largest), so the cut is
        the threshold a latent was trained under; a latent that fired only in some phase of
        training keeps the cuts of that phase. (The smallest *selected* value of a latent would sit
        above the cut, more so for rare latents, and make inference sparser than training.) A
        latent's first firing sets its threshold directly, so an SAE trained for one step already
        has meaningful thresholds; latents that never fired use the moving average of all cuts.
        """
        fired = _all_reduce(fired.float(), dist.ReduceOp.MAX) > 0
        cut = cut.to(self.threshold.dtype)
        decay = self.cfg.threshold_decay
        first_ever = not bool(self.fired_ever.any())
        self.global_threshold.copy_(cut if first_ever else decay * self.global_threshold + (1 - decay) * cut)
        new, old = fired & ~self.fired_ever, fired & self.fired_ever
        self.threshold[new] = cut
        self.threshold[old] = decay * self.threshold[old] + (1 - decay) * cut
        self.fired_ever |= fired
        self.threshold[~self.fired_ever] = self.global_threshold

    @torch.no_grad()
    def calibrate_thresholds(self, batches: Iterable[Tensor]) -> None:
        """Set the inference thresholds from the final weights (batchtopk, matryoshka).

        Threshold j = mean of the batch cuts over the calibration batches in which latent j is
        selected; latents never selected get the mean cut of all batches. The moving averages kept
        during training lag behind weights that are still changing (most in short runs, where they
        gave inference L0 well below k); this pass makes inference match training for any run length.
        Per-latent values stay close to one another: BatchTopK selects with a single cut per batch.
        """
        sums = torch.zeros(self.cfg.d_sae, dtype=torch.float64, device=self.threshold.device)
        counts = torch.zeros_like(sums)
        cuts = []
        for x in batches:
            codes, cut = batchtopk_codes(F.relu(self.pre_acts(x)), self.cfg.k, distributed=False)
            fired = torch.zeros_like(sums, dtype=torch.bool)
            fired[codes.col] = True
            sums[fired] += cut.double()
            counts[fired] += 1
            cuts.append(cut.double())
        if not cuts:
            return
        overall = torch.stack(cuts).mean()
        self.threshold.copy_(torch.where(counts > 0, sums / counts.clamp_min(1), overall).float())
        self.global_threshold.copy_(overall.float())
        self.fired_ever.copy_(counts > 0)

    # ---------------------------------------------------------------- constraints
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the part of each decoder row's gradient that would change the row's norm."""
        if self.W_dec.grad is None:
            return
        W = self.W_dec
        W.grad -= (W.grad * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on inputs `scale * x` work on raw x (latents come out divided by scale).

        pre(raw) = pre(scaled) / scale holds with W_enc unchanged and b_enc, b_dec, thresholds
        divided by the scale; ReLU, TopK and thresholding commute with a positive scale, and the
        decoder rows stay unit-norm.
        """
        self.b_enc /= scale
        self.b_dec /= scale
        self.threshold /= scale
        self.global_threshold /= scale


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: argmin_c sum_i ||p_i - c||, the robust centre used to start b_dec."""
    points = points.double()
    c = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - c).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * points).sum(0) / w.sum()
        if (new - c).norm() <= tol * max(1.0, c.norm().item()):
            c = new
            break
        c = new
    return c.float()


def default_lr(d_sae: int) -> float:
    """2e-4 / sqrt(width / 2^14), the scaling law of Gao et al. 2024."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
