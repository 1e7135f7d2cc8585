"""Sparse encode/decode kernels: autograd that touches only the k active latents per token.

A TopK-style SAE activates k of n latents per token, yet a dense backward pass costs as much as the
dense forward (2*d*n FLOP per token for each of encoder and decoder). These functions keep the codes
in CSR form so that, besides the one dense encoder matmul, every step costs O(k*d) per token.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor


# CSR support is labelled beta, but the four ops used here are covered by this project's tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SparseCodes(NamedTuple):
    """Active latents of a batch in CSR order (rows ascending, columns ascending within a row)."""

    crow: Tensor
    """(B + 1,) int64: entries of row b are crow[b]:crow[b+1]."""
    col: Tensor
    """(nnz,) int64: latent index of each entry."""
    row: Tensor
    """(nnz,) int64: batch row of each entry."""
    n_rows: int
    """B, the number of tokens in the batch."""


def codes_from_mask(rows: Tensor, cols: Tensor, n_rows: int, n_latents: int) -> SparseCodes:
    """Sort (row, col) pairs into CSR order."""
    order = torch.argsort(rows * n_latents + cols)
    return sorted_codes(rows[order], cols[order], n_rows)


def sorted_codes(rows: Tensor, cols: Tensor, n_rows: int) -> SparseCodes:
    """CSR codes from pairs already in CSR order (e.g. a subset of another SparseCodes' entries)."""
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    return SparseCodes(crow, cols, rows, n_rows)


class _SelectedPreacts(torch.autograd.Function):
    """values = (x_c @ W_enc + b_enc) at the selected entries; the forward values are passed in
    (already computed by the dense selection pass), the backward is sparse."""

    @staticmethod
    def forward(ctx, values, x_c, W_enc, b_enc, crow, col, row):
        ctx.save_for_backward(x_c, W_enc, crow, col, row)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x_c, W_enc, crow, col, row = ctx.saved_tensors
        n_rows, n_latents = x_c.shape[0], W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        G = torch.sparse_csr_tensor(crow, col, grad_values, size=(n_rows, n_latents), check_invariants=False)
        if ctx.needs_input_grad[1]:
            grad_x = G @ W_enc.t()  # (B, d)
        if ctx.needs_input_grad[2]:
            grad_W = _transposed_mm(G, row, col, grad_values, x_c, n_latents).t()  # (d, n)
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(n_latents, dtype=grad_values.dtype, device=grad_values.device)
            grad_b.index_add_(0, col, grad_values)
        return None, grad_x, grad_W, grad_b, None, None, None


def selected_preacts(pre: Tensor, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, codes: SparseCodes) -> Tensor:
    """Pre-activations at the active entries, differentiable w.r.t. x_c, W_enc and b_enc.

    `pre` (B, n) is the dense pre-activation computed without gradient; its values are reused.
    """
    values = pre[codes.row, codes.col].to(W_enc.dtype)
    return _SelectedPreacts.apply(values, x_c, W_enc, b_enc, codes.crow, codes.col, codes.row)


class _SparseDecode(torch.autograd.Function):
    """out = Z @ W_dec for CSR codes Z with differentiable values."""

    @staticmethod
    def forward(ctx, values, W_dec, crow, col, row):
        n_rows = crow.numel() - 1
        Z = torch.sparse_csr_tensor(crow, col, values, size=(n_rows, W_dec.shape[0]), check_invariants=False)
        ctx.save_for_backward(values, W_dec, crow, col, row)
        return Z @ W_dec

    @staticmethod
    def backward(ctx, grad_out):
        values, W_dec, crow, col, row = ctx.saved_tensors
        n_rows = crow.numel() - 1
        grad_values = grad_W = None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            # <grad_out[b], W_dec[j]> only at the active (b, j): a sampled matmul.
            mask = torch.sparse_csr_tensor(
                crow, col, torch.zeros_like(values), size=(n_rows, W_dec.shape[0]), check_invariants=False
            )
            grad_values = torch.sparse.sampled_addmm(mask, grad_out, W_dec.t(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            Z = torch.sparse_csr_tensor(crow, col, values, size=(n_rows, W_dec.shape[0]), check_invariants=False)
            grad_W = _transposed_mm(Z, row, col, values, grad_out, W_dec.shape[0])  # (n, d)
        return grad_values, grad_W, None, None, None


def _transposed_mm(Z: Tensor, row: Tensor, col: Tensor, values: Tensor, dense: Tensor, n_latents: int) -> Tensor:
    """Z^T @ dense for CSR Z: (n_latents, d).

    On CPU the transposed (CSC) sparse matmul is fastest (measured 7x faster than index_add at
    B 4096, k 32, d 1024); elsewhere a scatter-add, which every backend supports.
    """
    if dense.device.type == "cpu":
        return Z.t() @ dense
    return scatter_transposed_mm(row, col, values, dense, n_latents)


def scatter_transposed_mm(row: Tensor, col: Tensor, values: Tensor, dense: Tensor, n_latents: int) -> Tensor:
    """Z^T @ dense as a scatter-add over the active entries (the path for CUDA and other devices)."""
    out = torch.zeros(n_latents, dense.shape[1], dtype=dense.dtype, device=dense.device)
    return out.index_add_(0, col, values[:, None] * dense[row])


def sparse_decode(values: Tensor, W_dec: Tensor, codes: SparseCodes) -> Tensor:
    """sum_j z_bj W_dec[j] for the active entries: (B, d), differentiable w.r.t. values and W_dec."""
    return _SparseDecode.apply(values, W_dec, codes.crow, codes.col, codes.row)


def dense_codes(values: Tensor, codes: SparseCodes, n_latents: int) -> Tensor:
    """The (B, n) dense matrix of the codes (for metrics and inference outputs)."""
    out = torch.zeros(codes.n_rows, n_latents, dtype=values.dtype, device=values.device)
    out[codes.row, codes.col] = values
    return out
