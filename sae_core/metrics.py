"""Reconstruction and sparsity metrics, pooled over a whole evaluation set (never averaged per batch)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

DENSE_FREQUENCY = 0.10


class MetricsAccumulator:
    """Streams (x, x_hat, z) batches and reports pooled metrics; sums are kept in float64.

    - FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2, the mean taken over the whole
      set (explained variance = 1 - FVU is measured about the mean, not about zero);
    - L0 = mean over inputs of the number of latents with z > 0;
    - dead fraction = share of latents that never fire on the set;
    - dense fraction = share of latents firing on more than 10% of the inputs;
    - mean cosine = mean over inputs of cos(x_n, x_hat_n);
    - relative reconstruction bias gamma = sum ||x_hat||^2 / sum <x_hat, x> (Gao et al. 2024):
      the gamma minimising E||x_hat / gamma - x||^2; below 1 means the SAE shrinks its outputs.
    """

    STATE = ("n", "sum_x", "sum_sq_x", "sum_sq_err", "sum_l0", "sum_cos", "sum_xhat_sq", "sum_xhat_x", "fire_counts")

    def __init__(self, d_sae: int):
        self.n = 0
        self.sum_x = None
        self.sum_sq_x = 0.0
        self.sum_sq_err = 0.0
        self.sum_l0 = 0.0
        self.sum_cos = 0.0
        self.sum_xhat_sq = 0.0
        self.sum_xhat_x = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, z: Tensor) -> None:
        """Add one batch: x and x_hat (..., d_in), z (..., d_sae); leading dimensions (tokens of images, or none
        for one vector) are rows. Shapes are checked before anything is added: a (B, T, d) batch, which the SAE
        encodes, was torch's broadcast error after half the sums had moved (until 2026-12-05)."""
        d_sae = self.fire_counts.shape[0]
        if x.ndim == 0 or x_hat.shape != x.shape or z.ndim == 0 or z.shape[-1] != d_sae or \
                z.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"x {tuple(x.shape)}, x_hat {tuple(x_hat.shape)} and z {tuple(z.shape)} are not one batch: "
                             f"give x and x_hat of one shape (..., d_in) and z of (..., {d_sae}) with the same rows.")
        x, x_hat, z = x.reshape(-1, x.shape[-1]).double(), x_hat.reshape(-1, x.shape[-1]).double(), z.reshape(-1, d_sae)
        self.n += x.shape[0]
        sx = x.sum(0).cpu()  # the running state stays on the CPU whatever device the batch is on
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_sq_x += x.pow(2).sum().item()
        self.sum_sq_err += (x - x_hat).pow(2).sum().item()
        fires = (z > 0).sum(0)  # one pass over the codes: L0 is its sum
        self.sum_l0 += fires.sum().item()
        self.fire_counts += fires.double().cpu()
        self.sum_cos += torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=1e-12).sum().item()
        self.sum_xhat_sq += x_hat.pow(2).sum().item()
        self.sum_xhat_x += (x_hat * x).sum().item()

    def compute(self) -> dict:
        if self.n == 0:
            raise ValueError("no evaluation rows were seen")
        mean = self.sum_x / self.n
        total_var = self.sum_sq_x - self.n * mean.pow(2).sum().item()
        freq = self.fire_counts / self.n
        return {
            "fvu": self.sum_sq_err / total_var if total_var > 0 else float("nan"),
            "mse": self.sum_sq_err / self.n,
            "l0": self.sum_l0 / self.n,
            "dead_fraction": (freq == 0).double().mean().item(),
            "dense_fraction": (freq > DENSE_FREQUENCY).double().mean().item(),
            "mean_cosine": self.sum_cos / self.n,
            "relative_reconstruction_bias": self.sum_xhat_sq / self.sum_xhat_x if self.sum_xhat_x else float("nan"),
            "rows": self.n,
        }


@torch.no_grad()
def evaluate(
    encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor], batches: Iterable[Tensor], d_sae: int
) -> dict:
    """Pooled metrics of an SAE given as encode/decode over an iterable of (B, d_in) batches ((B, T, d_in) too:
    each token a row)."""
    acc = MetricsAccumulator(d_sae)
    for x in batches:
        z = encode(x)
        acc.update(x, decode(z), z)
    return acc.compute()
