"""Co-activation counting for Matryoshka parents: dense products against listing the pairs.

    python -m benchmarks coact [--latents 16384] [--images 512] [--batch 32] [--density 0.005,0.02,0.1]

Images fire a `density` share of every level's latents at random (pooled by the max over patches, a
demo image fires 69 of its 512 latents, 13%; by its CLS token 28, 5%). Baseline: what the atlas did until 2026-12-03: every pair listed and counted, dense
int64 counts while they fit 256 MiB (so at K 16,384 the 4,096 x 8,192 pair is counted sparse), sparse
counts for the rest however many pairs they hold. Now: int32 counts (all four pairs dense at K 16,384
in 172 MiB), a sparse count that turns dense once it outweighs the matrix, and rows gathered (1,024)
for one 0/1 matrix product once their pairs number a tenth of the matrix per 256 rows (4/10 at 1,024). Both must pick the same
parents (checked).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from precompute.args import positive_int, share
import sae_core.hierarchy as H
from sae_core.sae import matryoshka_group_sizes

from . import argument_parser


def run_counter(groups, K, batches, budget, old: bool):
    """`old`: listing only, counts never switch to dense, no rows wait for a product (the counter until
    2026-12-03, except that its dense counts are int32 here, at half the budget for the same matrices)."""
    names = ("_PAIRS_PER_OUTPUT", "_SPARSE_PAIR_BYTES", "_PRODUCT_ROWS")
    saved = {n: getattr(H, n) for n in names}
    if old:
        H._PAIRS_PER_OUTPUT, H._SPARSE_PAIR_BYTES, H._PRODUCT_ROWS = 0, 0, 1
    try:
        t = time.perf_counter()
        counter = H.CoactivationCounter(groups, K, dense_budget_bytes=budget)
        for rows, cols, n in batches:
            counter.update((rows, cols, n))
        parents = counter.parents()
        return time.perf_counter() - t, parents, counter.memory_bytes, counter.modes
    finally:
        for n, v in saved.items():
            setattr(H, n, v)


def densities(text: str) -> list[float]:
    """Comma-separated shares in (0, 1] (2 fired every latent and ran for minutes before a line)."""
    try:
        return [share(x) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be shares in (0, 1] separated by commas, not {text!r}") from None


def main(argv) -> int:
    p = argument_parser("coact", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", type=positive_int, default=16384)
    p.add_argument("--images", type=positive_int, default=512)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--density", type=densities, default=[0.005, 0.02, 0.1],
                   help="shares of the latents firing on an image, comma-separated (default 0.005,0.02,0.1)")
    p.add_argument("--threads", type=positive_int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    K = args.latents
    groups = matryoshka_group_sizes(None, K)
    print(f"K {K}, levels {list(groups)}, {args.images} images in batches of {args.batch}, {args.threads} threads")
    # held: the counts each counter keeps (memory_bytes); the merges' temporaries come on top (README)
    print("| fired per image | pairs per image | baseline s | now s | ratio | baseline MiB held | now MiB held | same parents |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    agree = True
    for density in args.density:
        rng = np.random.default_rng(0)
        batches, pairs = [], 0
        bounds = H.level_bounds(groups, K)
        for a in range(0, args.images, args.batch):
            n = min(args.batch, args.images - a)
            fired = rng.random((n, K)) < density
            rows, cols = np.nonzero(fired)
            batches.append((rows, cols, n))
            per_level = np.add.reduceat(fired, bounds[:-1], axis=1)
            pairs += int((per_level[:, :-1] * per_level[:, 1:]).sum())
        old_s, old_p, old_mem, _ = run_counter(groups, K, batches, H.DENSE_BUDGET_BYTES // 2, old=True)
        new_s, new_p, new_mem, _ = run_counter(groups, K, batches, H.DENSE_BUDGET_BYTES, old=False)
        same = np.array_equal(old_p[0], new_p[0]) and np.allclose(old_p[1], new_p[1], equal_nan=True)
        print(f"| {density * K:,.0f} | {pairs / args.images:,.0f} | {old_s:.3g} | {new_s:.3g} | {old_s / new_s:.3g}x | "
              f"{old_mem / 2**20:.0f} | {new_mem / 2**20:.0f} | {same} |")
        agree = agree and same
    if not agree:
        print("coact: the two counters chose different parents", file=sys.stderr)
    return 0 if agree else 1
