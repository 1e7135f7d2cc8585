"""Activation bands: each neuron's own grid (QuantileGrid) against the plot's shared log-histogram bins.

    python -m benchmarks bands [--latents 16384] [--images 4096] [--batch 128] [--density 0.02] [--spread 0.2,1.5]

Images fire a `density` share of the latents at random, with scores log-normal of sigma `spread` (0.2: most
of a neuron's scores within a factor of 2, as the world's latents; 1.5: over 3 decades). Baseline: what the
atlas did until 2026-12-04, a reservoir per (neuron, bin) of the shared histogram (48 bins over 6 decades
below 10x the first images' highest score); the bands are then drawn by the same quantile rule from either
(`band_samples`). Columns: seconds to stream the entries in, seconds to draw the bands at the end, and of
the neurons that fire on at least 32 images, how many get 4 bands and how many 4 full ones (8 images each).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from precompute.args import positive_int, share
from sae_core.atlas import BinReservoirs, LogHistogram, QuantileGrid, band_samples

from . import argument_parser

BINS, DECADES, S, NB = 48, 6.0, 8, 4


def shared_bins(K, batches):
    hist, res = LogHistogram(K, BINS, DECADES), BinReservoirs(K * BINS, S)
    t = time.perf_counter()
    hist.set_edges_from(batches[0][2])
    for image, neuron, value, patch in batches:
        b = hist.update(neuron, value)
        res.update(neuron * BINS + b, image, neuron, value, patch)
    return time.perf_counter() - t, res, hist.counts


def own_grid(K, batches):
    grid = QuantileGrid(K, BINS, DECADES, S)
    t = time.perf_counter()
    for entries in batches:
        grid.update(*entries)
    return time.perf_counter() - t, grid.res, grid.counts


def spreads(text: str) -> list[float]:
    """Comma-separated positive sigmas."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < v < 100 for v in values):
        raise argparse.ArgumentTypeError(f"must be positive numbers separated by commas, not {text!r}")
    return values


def main(argv) -> int:
    p = argument_parser("bands", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", type=positive_int, default=16384)
    p.add_argument("--images", type=positive_int, default=4096)
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--density", type=share, default=0.02)
    p.add_argument("--spread", type=spreads, default=[0.2, 1.5])
    args = p.parse_args(argv)
    K = args.latents
    print(f"K {K}, {args.images} images in batches of {args.batch}, {args.density:.1%} firing; {BINS} bins, S {S}")
    print("| spread (sigma) | entries | baseline in s | now in s | now / baseline | baseline draw s | now draw s | "
          "4 bands: baseline / now | 4 full: baseline / now | of |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for sigma in args.spread:
        rng = np.random.default_rng(0)
        batches = []
        for a in range(0, args.images, args.batch):
            n = min(args.batch, args.images - a)
            image, neuron = np.nonzero(rng.random((n, K)) < args.density)
            value = rng.lognormal(0.0, sigma, image.size).astype(np.float32)
            batches.append((image + a, neuron, value, np.full(image.size, -1, np.int16)))
        row = []
        for build in (shared_bins, own_grid):
            stream_s, res, counts = build(K, batches)
            t = time.perf_counter()
            ids = band_samples(res, counts, NB, S)[0]
            draw_s = time.perf_counter() - t
            busy = counts.sum(1) >= 32
            four = int((ids >= 0).any(2).all(1)[busy].sum())
            row.append((stream_s, draw_s, four, int(((ids >= 0).sum(2) == S).all(1)[busy].sum()), int(busy.sum())))
        (old_s, old_draw, old_four, old_full, busy), (new_s, new_draw, new_four, new_full, _) = row
        print(f"| {sigma} | {sum(b[0].size for b in batches):,} | {old_s:.3g} | {new_s:.3g} | {new_s / old_s:.3g}x | "
              f"{old_draw:.3g} | {new_draw:.3g} | {old_four:,} / {new_four:,} | {old_full:,} / {new_full:,} | {busy:,} |")
    return 0
