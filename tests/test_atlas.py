"""The atlas scan: streaming accumulators against full sorts and brute force, the tiny demo bundle
against a dense recomputation, its ground-truth figures, and resuming/refusing on the command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.atlas import (BinReservoirs, LogHistogram, NeuronMoments, QuantileGrid, StreamingTopK, band_samples,
                            decoder_neighbors, pool_tokens)

REPO = Path(__file__).resolve().parents[1]


def _sparse_scores(rng, n, k, density=0.3):
    vals = rng.lognormal(0.0, 1.5, size=(n, k)).astype(np.float32)
    return np.where(rng.random((n, k)) < density, vals, 0.0).astype(np.float32)


def _batches(rng, n):
    cuts = np.sort(rng.choice(np.arange(1, n), size=7, replace=False))
    return list(zip(np.r_[0, cuts], np.r_[cuts, n]))


def _reference_bands(images, values, keys, n_bands, size, bins, decades):
    """One neuron's activation bands written out from all its firing images at once (no streaming, no
    merging): each score's index on the finest grid (256 bins a decade); the coarsest grid needed is the
    finest one whose `bins` bins hold the lowest and the highest index, doubling the width up to the one
    whose bins span `decades` (where the grid ends at the highest and lower scores go to its first bin);
    a bin's quantile group is the quarter (for 4 bands) of the firing images, counted from the lowest,
    that its middle falls in; band 0 is the highest non-empty group, and holds the `size` images of that
    group with the smallest keys. Returns the bands' image ids (highest band first), the bins' counts and
    the bands' sizes (firing images in each)."""
    g = [int(np.floor(np.log10(float(v)) * 256)) for v in values]
    lo, hi = min(g), max(g)
    level = 0
    while (hi >> level) - (lo >> level) + 1 > bins and bins * 2 ** level < decades * 256:
        level += 1
    start = lo >> level if (hi >> level) - (lo >> level) + 1 <= bins else (hi >> level) - bins + 1
    b = [min(max((x >> level) - start, 0), bins - 1) for x in g]
    counts = [b.count(i) for i in range(bins)]
    below, group = 0, []
    for c in counts:
        group.append(min(int((below + c / 2) / len(values) * n_bands), n_bands - 1))
        below += c
    bands, sizes = [], []
    for q in range(n_bands - 1, -1, -1):
        members = [i for i in range(len(values)) if counts[b[i]] and group[b[i]] == q]
        if members:
            sizes.append(len(members))
            members.sort(key=lambda i: keys[i])
            bands.append(sorted(int(images[i]) for i in members[:size]))
    return bands, counts, sizes


def test_histogram_edges_and_bands_do_not_depend_on_the_batches():
    """ActivationBands: the edges come from the images with id below hist_edge_images (the rule written
    out: 10 x their highest score rounded up to a power of 10, hist_decades below it), whatever the
    batching, and so do the counts and the band samples."""
    from sae_core.atlas import ActivationBands, AtlasConfig

    rng = np.random.default_rng(4)
    N, K = 300, 9
    s = _sparse_scores(rng, N, K)
    s[100:, 2] *= 1e3  # neuron 2's largest scores come after the edge images: clipped into the top bin
    cfg = AtlasConfig(layer="-2", hist_bins=12, hist_decades=5.0, hist_edge_images=70, band_samples=3)
    best = rng.integers(-1, 17, (N, K))  # each (image, neuron)'s best patch, carried beside its sample
    results = []
    for cuts in ([(0, N)], [(a, a + 1) for a in range(N)], _batches(rng, N), [(0, 69), (69, 71), (71, N)]):
        bands = ActivationBands(K, cfg)
        for a, b in cuts:
            img, neu = np.nonzero(s[a:b] > 0)
            bands.update(img + a, neu, s[a:b][img, neu], best[a:b][img, neu])
        results.append(bands.result())
    top = np.ceil(np.log10(s[:70].max())) + 1
    np.testing.assert_allclose(results[0]["hist_edges"], np.linspace(top - 5, top, 13), rtol=1e-6)
    fires = s > 0
    for k in range(K):
        logs = np.clip(np.log10(s[fires[:, k], k].astype(np.float64)), top - 5, top - 1e-9)
        np.testing.assert_array_equal(results[0]["hist_counts"][k], np.histogram(logs, bins=12, range=(top - 5, top))[0])
    assert results[0]["hist_counts"][2, -1] > 0
    ids = results[0]["band_images"]
    assert (ids >= 0).sum() > 50 and (results[0]["band_patch"] == np.where(ids >= 0, best[ids, np.arange(K)[:, None, None]], -1)).all()
    for other in results[1:]:
        for name, arr in results[0].items():
            np.testing.assert_array_equal(other[name], arr, err_msg=name)
    # fewer images than hist_edge_images: the edges come from all of them
    few = ActivationBands(K, cfg)
    img, neu = np.nonzero(s[:20] > 0)
    few.update(img, neu, s[:20][img, neu], best[:20][img, neu])
    top20 = np.ceil(np.log10(s[:20].max())) + 1
    assert few.result()["hist_edges"][-1] == pytest.approx(top20) and few.hist.counts.sum() == (s[:20] > 0).sum()
    # the last edge image (id 69) holds the largest score, one image a batch: the edges wait for it
    last = ActivationBands(1, cfg)
    t = np.full(100, 2.0, np.float32)
    t[69] = 500.0
    for i in range(100):
        last.update(np.array([i]), np.array([0]), t[i:i + 1], np.array([-1]))
    assert last.result()["hist_edges"][-1] == np.ceil(np.log10(500.0)) + 1


def test_band_samples_do_not_depend_on_the_batches_when_two_images_draw_one_key():
    """Reservoir keys have 24 bits, so two images of one neuron share a key a few times in a million entries;
    the tie went to whichever came first in a concatenation, which a merge of two bins orders by bin, not by
    arrival: one batch kept image 11841 and two batches 11911 (a helper's case, until 2026-12-05). Reference:
    the sample of one batch, and the tie rule written out (the lower image id)."""
    from sae_core.atlas import ActivationBands, AtlasConfig

    cfg = AtlasConfig(layer="0")
    images = np.arange(20000)
    key = BinReservoirs(1, cfg.band_samples, cfg.seed).keys_for(images, np.zeros_like(images))
    order = np.argsort(key, kind="stable")
    j = next(j for j in np.flatnonzero(key[order][1:] == key[order][:-1]) if j >= cfg.band_samples - 1)
    low, high = sorted(order[j:j + 2].tolist())  # two images with one key, behind 7 with smaller keys
    # the pair in different fine bins (1.2 and 1.0), the 7 between them; a last image at 1e4 coarsens the grid
    scores = {**{int(i): 1.1 for i in order[:cfg.band_samples - 1]}, low: 1.2, high: 1.0}
    last = max(scores) + 1
    scores[last] = 1e4
    img = np.array(sorted(scores))
    val = np.array([scores[i] for i in img], np.float32)
    samples = []
    for batches in ([img >= 0], [img != last, img == last]):
        bands = ActivationBands(1, cfg)
        for sel in batches:
            bands.update(img[sel], np.zeros(sel.sum(), np.int64), val[sel], np.full(sel.sum(), -1))
        samples.append(set(bands.result()["band_images"][0].ravel().tolist()) - {-1})
    assert samples[0] == samples[1] and low in samples[0] and high not in samples[0]


def test_streaming_topk_matches_a_full_sort():
    rng = np.random.default_rng(1)
    N, K, T, P = 300, 25, 16, 5
    patch_codes = np.where(rng.random((N, P, K)) < 0.3, rng.random((N, P, K)), 0).astype(np.float32)
    patch_codes[:, :, 0] = 0  # a dead neuron
    patch_codes[:5, :, 1] = np.where(patch_codes[:5, :, 1] > 0, patch_codes[:5, :, 1], 0.5)
    patch_codes[5:, :, 1] = 0  # a neuron that fires on 5 images only (fewer than T)
    scores, best, heat = pool_tokens(torch.from_numpy(np.concatenate(
        [np.zeros((N, 1, K), np.float32), patch_codes], 1)), 1, "max")
    top = StreamingTopK(K, T, P)
    for a, b in _batches(rng, N):
        top.update(scores[a:b], torch.arange(a, b), best[a:b], heat[a:b])
    r = top.result()
    s = scores.numpy()
    for k in range(K):
        firing = np.flatnonzero(s[:, k] > 0)
        order = firing[np.argsort(-s[firing, k], kind="stable")][:T]  # full sort, ties by image id
        m = len(order)
        np.testing.assert_array_equal(r["top_images"][k, :m], order)
        assert (r["top_images"][k, m:] == -1).all()
        np.testing.assert_allclose(r["top_acts"][k, :m], s[order, k])
        # best patch = argmax over patches (+1 for the CLS prefix); heat = the image's patch values
        np.testing.assert_array_equal(r["top_patch"][k, :m], patch_codes[order, :, k].argmax(1) + 1)
        np.testing.assert_allclose(r["top_heat"][k, :m].astype(np.float32), patch_codes[order, :, k], rtol=1e-3)
    assert (r["top_images"][0] == -1).all() and (r["top_images"][1] >= 0).sum() == 5


def test_pooling_cls_and_mean():
    codes = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    s, best, heat = pool_tokens(codes, 1, "cls")
    torch.testing.assert_close(s, codes[:, 0])
    s, _, _ = pool_tokens(codes, 1, "mean")
    torch.testing.assert_close(s, codes[:, 1:].mean(1))
    assert (best == 4).all() and heat.shape == (2, 4, 3)
    codes[1, 1:, 2] = 0  # image 1 fires neuron 2 on its CLS token only: no best patch
    s, best, _ = pool_tokens(codes, 1, "cls")
    assert best[1, 2] == -1 and s[1, 2] > 0 and (best[0] == 4).all() and (best[1, :2] == 4).all()


def test_histogram_moments_and_band_samples_against_brute_force():
    rng = np.random.default_rng(2)
    N, K, B, S, NB = 500, 12, 16, 4, 3
    s = _sparse_scores(rng, N, K)
    s[:, 3] = 0  # dead
    s[:, 5] = np.where(s[:, 5] > 0, 1 + s[:, 5] / s[:, 5].max(), 0)  # narrow: between 1 and 2
    s[:, 6] = np.where(s[:, 6] > 0, s[:, 6] ** 3, 0)  # wide: more than the grid's 4 decades
    hist, mom = LogHistogram(K, B, 4.0), NeuronMoments(K)
    grid = QuantileGrid(K, B, 4.0, S, seed=5)
    hist.set_edges_from(s[:50])  # not from every score: some fall beyond the top edge's decade too
    best = np.random.default_rng(9).integers(-1, 50, (N, K))  # best patch positions, carried along
    for a, b in _batches(rng, N):
        sb = s[a:b]
        mom.update(sb)
        img, neu = np.nonzero(sb > 0)
        vals = sb[img, neu]
        hist.update(neu, vals)
        grid.update(img + a, neu, vals, best[a:b][img, neu])
    m = mom.result()
    fires = s > 0
    np.testing.assert_array_equal(m["support"], fires.sum(0))
    np.testing.assert_allclose(m["frequency"], fires.mean(0), rtol=1e-6)
    np.testing.assert_allclose(m["max_act"], s.max(0), rtol=1e-6)
    mean = np.array([s[fires[:, k], k].mean() if fires[:, k].any() else 0 for k in range(K)])
    np.testing.assert_allclose(m["mean_act"], mean, rtol=1e-5)
    # Histogram: np.histogram of log10 scores, values beyond the edges clipped into the end bins.
    edges = hist.edges.astype(np.float64)
    for k in range(K):
        logs = np.clip(np.log10(s[fires[:, k], k].astype(np.float64)), edges[0], edges[-1] - 1e-9)
        np.testing.assert_array_equal(hist.counts[k], np.histogram(logs, bins=edges)[0])
    # a score exactly on an edge goes up, as np.histogram's [e_i, e_i+1) bins put it (powers of ten are edges here)
    on_edges = LogHistogram(1, 48, 6.0)
    on_edges.set_edges_from(np.array([5.0], np.float32))  # top edge 2: edges every 0.125 decade from -4
    tens = np.array([1.0, 10.0, 0.1], np.float32)
    on_edges.update(np.zeros(3, np.int64), tens)
    np.testing.assert_array_equal(on_edges.counts[0], np.histogram(np.log10(tens.astype(np.float64)),
                                                                   bins=on_edges.edges.astype(np.float64))[0])
    # Bands: the quantile groups of the grid written out (_reference_bands), S images each by the smallest
    # keys, band 0 the highest; every band filled where the neuron fires on enough images.
    ids, acts, patch, sizes = band_samples(grid.res, grid.counts, NB, S)
    assert np.log10(s[fires[:, 6], 6].max() / s[fires[:, 6], 6].min()) > 4  # its lowest scores share bin 0
    for k in range(K):
        if not fires[:, k].any():
            assert (ids[k] == -1).all() and grid.counts[k].sum() == 0
            continue
        firing = np.flatnonzero(fires[:, k])
        keys = grid.res.keys_for(firing, np.full(len(firing), k))
        want, counts, want_sizes = _reference_bands(firing, s[firing, k], keys, NB, S, B, 4.0)
        np.testing.assert_array_equal(grid.counts[k], counts)
        assert sizes[k].tolist() == want_sizes + [0] * (NB - len(want)) and sizes[k].sum() == len(firing)
        # all bands filled, but where one bin holds over half the images: the narrow neuron's lowest, and the
        # wide one's first bin, which takes every score more than 4 decades below its highest
        assert len(want) == NB or k in (5, 6), k
        for band in range(NB):
            got = ids[k, band][ids[k, band] >= 0]
            assert sorted(got.tolist()) == (want[band] if band < len(want) else []), (k, band)
            np.testing.assert_allclose(np.sort(acts[k, band][: len(got)]), np.sort(s[got, k]))
            np.testing.assert_array_equal(patch[k, band][: len(got)], best[got, k])
            assert (patch[k, band][len(got):] == -1).all()
            assert (np.diff(acts[k, band][: len(got)]) <= 0).all()  # sorted high to low
        lowest_above = [acts[k, band][ids[k, band] >= 0].min() for band in range(len(want) - 1)]
        highest_below = [acts[k, band + 1][ids[k, band + 1] >= 0].max() for band in range(len(want) - 1)]
        assert all(a >= b for a, b in zip(lowest_above, highest_below))  # bands do not overlap


def test_narrow_neurons_get_every_band():
    """Scores within a factor of 2 (most of the world's latents): the shared log histogram's bins are 1.33x
    wide, so its bins gave such a neuron 2-3 bands, the top one often a single image (59 of the tiny bundle's
    250 live neurons); the neuron's own grid gives it 4 quarters of its firing images, 8 samples each."""
    rng = np.random.default_rng(3)
    B, S, NB, n = 48, 8, 4, 400
    grid = QuantileGrid(3, B, 6.0, S, seed=0)
    values = {0: 1 + rng.random(n), 1: 1.5 + 0.01 * rng.random(n), 2: np.r_[1 + rng.random(n - 1), 50.0]}
    for k, v in values.items():
        for a in range(0, n, 37):  # in batches, so the grid refines as the range grows
            grid.update(np.arange(a, min(a + 37, n)), np.full(min(37, n - a), k), v[a:a + 37].astype(np.float32),
                        np.full(min(37, n - a), -1))
    ids, acts, _, sizes = band_samples(grid.res, grid.counts, NB, S)
    for k, v in values.items():
        keys = grid.res.keys_for(np.arange(n), np.full(n, k))
        want, counts, want_sizes = _reference_bands(np.arange(n), v.astype(np.float32), keys, NB, S, B, 6.0)
        np.testing.assert_array_equal(grid.counts[k], counts)
        assert sizes[k][: len(want)].tolist() == want_sizes and sizes[k].sum() == n
        assert [sorted(row[row >= 0].tolist()) for row in ids[k][: len(want)]] == want
        assert (ids[k][len(want):] == -1).all()
        if k == 1:
            continue
        assert (ids[k] >= 0).sum(1).tolist() == [S] * NB and (abs(sizes[k] - n / NB) <= n / 16).all(), (k, sizes[k])
        # each band's images lie in its quarter of the neuron's scores, up to one bin of its grid: 1.8% for
        # neuron 0; 15% for neuron 2, whose one score of 50 widens its grid to span 1.7 decades
        level = grid._layout(grid.lo[k:k + 1], grid.hi[k:k + 1])[0][0]  # of the grid its scores fitted
        step = 10 ** (2.0 ** level / 256)
        assert step < 1.02 if k == 0 else 1.1 < step < 1.2
        q = np.quantile(v.astype(np.float32), [0.25, 0.5, 0.75])
        for band in range(NB):
            lo, hi = ([0, *q][NB - 1 - band], [*q, np.inf][NB - 1 - band])
            a = acts[k, band]
            assert (a >= lo / step).all() and (a <= hi * step).all(), (k, band, a, lo, hi)
    # the neuron between 1.5 and 1.51 fits in 1 or 2 of the finest bins (0.9% each): a bin's images stay in
    # one band, so it gets 1 or 2
    assert np.count_nonzero(grid.counts[1]) <= 2 and 1 <= (ids[1] >= 0).any(1).sum() <= 2


def test_the_bands_benchmark_prints_its_table(capsys):
    """`python -m benchmarks bands` at a small size: its table, and the gain it measures (every latent of
    scores within ~2x gets 4 full bands on its own grid, fewer on the shared bins)."""
    from benchmarks.bands import main

    assert main(["--latents", "64", "--images", "512", "--density", "0.2", "--spread", "0.2"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].strip("|").split("|")
    old_full, new_full = (int(x) for x in row[8].split("/"))
    assert row[0].strip() == "0.2" and int(row[9]) == 64 and new_full == 64 and old_full < 64


def test_decoder_neighbors_against_dense_cosines():
    W = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    ids, cos = decoder_neighbors(W, n=5, chunk=7)
    Wn = torch.nn.functional.normalize(W, dim=1)
    C = (Wn @ Wn.t()).numpy()
    np.fill_diagonal(C, -np.inf)
    np.testing.assert_array_equal(ids, np.argsort(-C, axis=1)[:, :5])
    np.testing.assert_allclose(cos, np.sort(C, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-6)


def _pairwise_ms(x, e):
    """The paper's definition written out: min-max normalise, weighted mean cosine over pairs n < m."""
    out = np.full(x.shape[1], np.nan)
    sim = e @ e.T
    iu = np.triu_indices(len(e), 1)
    for k in range(x.shape[1]):
        lo, hi = x[:, k].min(), x[:, k].max()
        if hi <= lo:
            continue
        a = (x[:, k] - lo) / (hi - lo)
        w = np.outer(a, a)[iu]
        if w.sum() > 0:
            out[k] = (w * sim[iu]).sum() / w.sum()
    return out


def test_tiny_bundle_matches_a_dense_recomputation(tiny_bundle):
    """Recompute every image score of the scanned split densely and check the streamed statistics."""
    from sae_core.adapters import load_adapter
    from sae_core.bundle import open_bundle

    torch.set_num_threads(1)
    b = open_bundle(tiny_bundle)
    m = b.manifest
    ds = b.dataset()
    model = load_adapter(m["model"]["spec"])
    clip = load_adapter(m["embedder"]["spec"])
    sae = b.load_sae()
    n_pre = m["model"]["n_prefix"]
    scores, raw, emb, err, tokens, l0, cos, token_max = [], [], [], 0.0, [], 0, 0.0, []
    with torch.no_grad():
        for a in range(0, b.n_images, 200):
            ims = [ds[i] for i in range(a, min(a + 200, b.n_images))]
            h = model.capture(model.preprocess(ims), [m["model"]["layer"]])[m["model"]["layer"]].float()
            z = sae.encode(h.reshape(-1, h.shape[-1])).reshape(h.shape[0], h.shape[1], -1)
            # reconstruction of every token by the dense decoder, in float64 (the scan decodes sparsely)
            x = h.reshape(-1, h.shape[-1]).double().numpy()
            zz = z.reshape(x.shape[0], -1).double().numpy()
            xhat = zz @ sae.W_dec.double().numpy() + sae.b_dec.double().numpy()
            err += ((x - xhat) ** 2).sum()
            tokens.append(x)
            l0 += (zz > 0).sum()
            cos += ((x * xhat).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(xhat, axis=1)).sum()
            scores.append(z[:, n_pre:].amax(1).numpy())
            token_max.append(z.amax((0, 1)).numpy())  # every token, the CLS included
            raw.append(h[:, n_pre:].amax(1).numpy())
            emb.append(clip.embed(clip.preprocess(ims), normalize=True).numpy())
    s, r, e = np.concatenate(scores), np.concatenate(raw), np.concatenate(emb)
    X = np.concatenate(tokens)
    got = m["metrics"]
    assert got["metric_tokens"] == "all" and got["metric_rows"] == len(X)
    assert got["fvu"] == pytest.approx(err / ((X - X.mean(0)) ** 2).sum(), rel=1e-5)
    assert got["l0"] == pytest.approx(l0 / len(X), rel=1e-9) and got["mean_cosine"] == pytest.approx(cos / len(X), rel=1e-6)
    fires = s > 0
    np.testing.assert_array_equal(np.asarray(b.array("support")), fires.sum(0))
    np.testing.assert_allclose(np.asarray(b.array("max_act")), s.max(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.array("token_max")), np.max(token_max, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.array("images/embeddings"), np.float32), e, atol=2e-3)
    top_ids, top_acts = np.asarray(b.array("top_images")), np.asarray(b.array("top_acts"))
    T = top_ids.shape[1]
    for k in range(b.n_neurons):
        n = min(T, int(fires[:, k].sum()))
        np.testing.assert_allclose(top_acts[k, :n], np.sort(s[:, k])[::-1][:n], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s[top_ids[k, :n], k], top_acts[k, :n], rtol=1e-4, atol=1e-5)
    assert np.asarray(b.array("hist_counts")).sum(1).tolist() == fires.sum(0).tolist()
    # MS of SAE and raw neurons against the pairwise definition (float16 embeddings in the bundle:
    # the closed form used float32 ones, hence the tolerance). The loop is O(N^2) per neuron, so it
    # checks every 4th SAE neuron and the ones without a score.
    ms = np.asarray(b.array("ms"))
    sel = np.union1d(np.arange(0, len(ms), 4), np.flatnonzero(np.isnan(ms)))
    s_sel = s[:, sel].astype(np.float64)
    np.testing.assert_allclose(ms[sel], _pairwise_ms(s_sel, e.astype(np.float64)), atol=1e-4, equal_nan=True)
    np.testing.assert_allclose(np.asarray(b.array("raw/ms")), _pairwise_ms(r.astype(np.float64), e.astype(np.float64)),
                               atol=1e-4, equal_nan=True)
    np.testing.assert_array_equal(np.asarray(b.array("raw/top_images"))[:, 0], r.argmax(0))
    # MS under the world's ground-truth factors (the calibration of world.json), pairwise as well
    from sae_core.ground_truth import factor_embedding, factor_table

    table = factor_table(ds.factors, np.arange(b.n_images))
    f = factor_embedding(table, table.ids).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(tiny_bundle / "neurons/ms_factors.npy")[sel], _pairwise_ms(s_sel, f),
                               atol=1e-5, equal_nan=True)


def test_tiny_bundle_ground_truth(tiny_bundle):
    """MS tracks the world's ground truth on the tiny preset. Thresholds: SAE seeds 0-3 on one tiny world
    gave Spearman(MS, purity) 0.27-0.37 and agreement with simulated users 0.60-0.67 over its 2,000 val
    images (with 400 val images, as the preset had before: 0.10-0.32 and 0.55-0.64; the tiny CLIP is
    near chance on shape, so the figures are far below the demo preset's); the thresholds sit below the
    lowest seed, and well above 0 and 0.5, which an MS unrelated to the ground truth would give (the
    null's standard deviation over ~200 neurons is about 0.07)."""
    w = json.loads((tiny_bundle / "world.json").read_text())
    assert w["ms_ground_truth_spearman"] >= 0.15
    assert w["ms_agreement"] >= 0.55
    # the calibration: same users, a perfect embedder for the SAE's neurons, perfect neurons for the embedder
    cal = w["calibration"]
    assert set(cal) == {"factor_embedder", "ideal_neurons"}
    assert w["ms_agreement_factor_embedder"] == cal["factor_embedder"]["ms_agreement"]
    assert w["ms_agreement_ideal_neurons"] == cal["ideal_neurons"]["ms_agreement"]
    assert cal["ideal_neurons"]["agreement"]["n_pairs"] > 1000
    man = json.loads((tiny_bundle / "manifest.json").read_text())
    assert man["metrics"]["ms_mean"] > man["metrics"]["ms_mean_raw"]


def test_atlas_command_resumes_and_refuses_other_settings(tiny_bundle, tmp_path, capfd):
    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.bundle import open_bundle
    from sae_core.errors import UserError

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    opts = dict(sae=str(tiny_bundle / "sae"), dataset=m["dataset"]["spec"], model=m["model"]["spec"], layer="-2",
                embedder=m["embedder"]["spec"], out=str(tmp_path / "b"), limit=60, topk=4, batch_size=16)
    build_atlas(AtlasJob(**opts))
    first = open_bundle(tmp_path / "b")
    first.validate()
    assert first.n_images == 60 and first.array("top_images").shape[1] == 4
    top = np.asarray(first.array("top_images")).copy()
    # A run killed after the scan: later stages and the manifest are gone; the rerun (through the
    # command line) redoes only those and leaves the scan's files alone.
    for stage in ("index", "world", "thumbs"):
        (tmp_path / "b" / ".stages" / f"{stage}.json").unlink()
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(UserError, match="unfinished"):
        open_bundle(tmp_path / "b")
    scan_mtime = (tmp_path / "b" / "neurons" / "top_images.npy").stat().st_mtime_ns
    # `inspect` says how far it got and the command that resumes it (it said "unfinished" only), and that command
    # is what resumes it here
    import shlex

    from precompute.__main__ import main

    assert main(["inspect", opts["out"], "--json"]) == 0
    s = json.loads(capfd.readouterr().out)
    assert (s["kind"], s["built_by"]) == ("unfinished_bundle", "atlas")
    assert s["stages_done"] == ["atlas: scan", "atlas: geometry", "atlas: labels", "atlas: hierarchy"]
    assert s["stages_left"] == ["atlas: index", "atlas: world", "atlas: thumbs"]
    resume = shlex.split(s["resume"])
    assert resume[:4] == ["python", "-m", "precompute", "atlas"]
    given = dict(zip(resume[4::2], resume[5::2]))
    assert given == {"--sae": opts["sae"], "--dataset": opts["dataset"], "--model": opts["model"], "--layer": "-2",
                     "--embedder": opts["embedder"], "--topk": "4", "--limit": "60", "--seed": "0", "--out": opts["out"],
                     "--score": "max"}  # the score the atlas chose: the max over patches, for an SAE of random:4 tokens
    args = [sys.executable, *resume[1:], "--batch-size", "16"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "b" / "neurons" / "top_images.npy").stat().st_mtime_ns == scan_mtime
    again = open_bundle(tmp_path / "b")
    again.validate()
    np.testing.assert_array_equal(np.asarray(again.array("top_images")), top)
    # Only the labels' marker deleted (by hand): the labels and every stage after them run again (the
    # tree and the world figures read the labels), the stages before them do not.
    stages = tmp_path / "b" / ".stages"
    before = {p.stem: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    (stages / "labels.json").unlink()
    build_atlas(AtlasJob(**opts))
    after = {p.stem: p.stat().st_mtime_ns for p in stages.glob("*.json")}
    assert after.keys() == before.keys()
    assert {s for s in before if after[s] != before[s]} == {"labels", "hierarchy", "index", "world", "thumbs"}
    with pytest.raises(UserError, match="other settings"):
        build_atlas(AtlasJob(**{**opts, "topk": 8}))
    # A rerun of the finished bundle does nothing: the manifest (its `created`, which keys the explorer's
    # cached pictures) stays as it was.
    manifest = (tmp_path / "b" / "manifest.json").read_bytes()
    build_atlas(AtlasJob(**opts))
    assert (tmp_path / "b" / "manifest.json").read_bytes() == manifest
    # A run that fails before building anything (a typo in --model) does not lock its --out to the typo.
    typo = {**opts, "out": str(tmp_path / "t"), "model": opts["model"].replace("world", "wrld", 1)}
    with pytest.raises(UserError):
        build_atlas(AtlasJob(**typo))
    build_atlas(AtlasJob(**{**opts, "out": str(tmp_path / "t")}))
    np.testing.assert_array_equal(np.asarray(open_bundle(tmp_path / "t").array("top_images")), top)
    # A run killed inside the scan resumes from the scan's checkpoint, whatever --checkpoint-every now,
    # builds the same bundle, and drops the checkpoint once the scan's files are written.
    import contextlib

    class KilledInTheScan:
        def stage(self, name):
            def advance(fraction):
                if name == "atlas: scan" and fraction >= 0.5:
                    raise _Killed
            return contextlib.nullcontext(advance)

        def skip(self, name):
            pass

        def note(self, line):
            pass

    killed = {**opts, "out": str(tmp_path / "c"), "checkpoint_every": 16}
    with pytest.raises(_Killed):
        build_atlas(AtlasJob(**killed), KilledInTheScan())
    state = tmp_path / "c" / ".stages" / "scan.state.safetensors"
    assert state.is_file() and not (tmp_path / "c" / ".stages" / "scan.json").exists()
    from precompute.atlas import STAGE_WEIGHTS
    from precompute.progress import PipelineProgress

    capfd.readouterr()
    progress = PipelineProgress(STAGE_WEIGHTS, desc="atlas", log=tmp_path / "log.txt")
    build_atlas(AtlasJob(**{**killed, "checkpoint_every": None}), progress)
    progress.close()
    assert json.loads((tmp_path / "c" / ".stages" / "scan.json").read_text())["scan_resumed_from"] == 32
    said = "atlas: resuming the scan after 32 of 60 images"  # on the terminal above the bar, and in the log
    assert said in capfd.readouterr().err and said in (tmp_path / "log.txt").read_text()
    assert not state.exists()
    for path in sorted((tmp_path / "b" / "neurons").glob("*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "c" / "neurons" / path.name), np.load(path), err_msg=path.name)
    # killed between the scan's mark and the checkpoint's removal (one system call wide): the next run of the
    # finished bundle removes it (it stayed for good until 2026-12-05, ~4 GB at the paper's size)
    state.write_bytes(b"a scan checkpoint")
    manifest = (tmp_path / "c" / "manifest.json").read_bytes()
    build_atlas(AtlasJob(**{**killed, "checkpoint_every": None}))
    assert not state.exists() and (tmp_path / "c" / "manifest.json").read_bytes() == manifest


def test_library_logging_in_a_stage_goes_to_the_log_and_keeps_working(tmp_path, capfd, monkeypatch):
    """A library's first logging.warning() inside a quiet stage (open_clip's "no pretrained weights")
    configured the root logger on that stage's log file, and the next warning, a stage later, failed
    on the closed file with a "--- Logging error ---" traceback in the log."""
    import logging

    from precompute.progress import PipelineProgress

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a command's process (pytest adds its own)
    progress = PipelineProgress({"a": 1, "b": 1}, desc="t", log=tmp_path / "log.txt", enabled=False)
    with progress.stage("a"):
        logging.warning("first, in stage a")
    with progress.stage("b"):
        logging.warning("second, in stage b")
    progress.close()
    log = (tmp_path / "log.txt").read_text()
    assert "WARNING:root:first, in stage a" in log and "WARNING:root:second, in stage b" in log
    assert "Logging error" not in log + capfd.readouterr().err and logging.root.handlers == []


class _Killed(Exception):
    pass


def _scan_outputs(r) -> dict:
    out = {f"neurons/{k}": v for k, v in r.neurons.items()}
    out.update(raw_ms=r.raw_ms, ms_reference=r.ms_reference, embeddings=r.embeddings, parent_coact=r.parent_coact,
               parent_coact_score=r.parent_coact_score, **{f"raw/{k}": v for k, v in r.raw_top.items()})
    return out


def test_a_killed_scan_resumes_from_its_checkpoint(tiny_bundle, tmp_path):
    """Every accumulator of a CLS-scored scan (both galleries, bands, histograms, moments, co-activation,
    the four MS sums, the metrics, embeddings, skipped images) is saved as the scan goes; a scan killed
    after 64 of 100 images resumes there and gives bit for bit what an uninterrupted scan gives; with
    another batch size the same up to float rounding; a state saved under other settings is not used."""
    from functools import partial

    from sae_core.adapters import load_adapter
    from sae_core.atlas import AtlasConfig, ScanCheckpoint, scan
    from sae_core.bundle import open_bundle
    from sae_core.ground_truth import factor_embedding, factor_table

    torch.set_num_threads(1)
    b = open_bundle(tiny_bundle)
    model, sae, ds = load_adapter(b.manifest["model"]["spec"]), b.load_sae(), b.dataset()
    ref = partial(factor_embedding, factor_table(ds.factors, np.arange(100)))
    cfg = AtlasConfig(layer="-2", score="cls", topk=4, batch_size=16, hist_edge_images=40)
    uninterrupted = scan(model, sae, ds, cfg, n_images=100, reference_embed=ref)
    whole = _scan_outputs(uninterrupted)

    log: list[str] = []
    ck = ScanCheckpoint(tmp_path / "scan.safetensors", every_s=float("inf"), every_images=16, key={"run": 1},
                        log=log.append)

    def kill_at(n):
        def progress(done):
            if done >= n:
                raise _Killed
        return progress

    with pytest.raises(_Killed):
        scan(model, sae, ds, cfg, n_images=100, reference_embed=ref, checkpoint=ck, progress=kill_at(64))
    assert ck.path.is_file() and not log
    resumed = scan(model, sae, ds, cfg, n_images=100, reference_embed=ref, checkpoint=ck)
    assert resumed.resumed_from == 64 and log == [f"resuming the scan after 64 of 100 images (from {ck.path})."]
    got = _scan_outputs(resumed)
    assert got.keys() == whole.keys() and resumed.metrics == uninterrupted.metrics
    for name, arr in whole.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    assert (whole["neurons/patch_band_images"] >= 0).sum() > 50 and np.isfinite(whole["ms_reference"]).sum() > 10

    # killed before the histogram edges are set (entries still waiting), resumed with batches of 24
    (tmp_path / "scan.safetensors").unlink()
    with pytest.raises(_Killed):
        scan(model, sae, ds, cfg, n_images=100, reference_embed=ref, checkpoint=ck, progress=kill_at(32))
    other = AtlasConfig(**{**cfg.__dict__, "batch_size": 24})
    mixed = scan(model, sae, ds, other, n_images=100, reference_embed=ref, checkpoint=ck)
    assert mixed.resumed_from == 32
    for name, arr in _scan_outputs(mixed).items():
        if arr.dtype.kind in "iub":
            np.testing.assert_array_equal(arr, whole[name], err_msg=name)
        else:
            np.testing.assert_allclose(arr, whole[name], rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)

    # a checkpoint that cannot be written (here: its folder is a file) is said once; the scan goes on
    (tmp_path / "blocked").write_text("")
    log.clear()
    r = scan(model, sae, ds, cfg, n_images=100, reference_embed=ref,
             checkpoint=ScanCheckpoint(tmp_path / "blocked" / "s.safetensors", every_s=0.0, log=log.append))
    assert len(log) == 1 and "could not save the scan's checkpoint" in log[0] and r.n_images == 100
    np.testing.assert_array_equal(r.neurons["top_images"], whole["neurons/top_images"])

    # other settings or another caller's key: the saved state is left alone and the scan starts over
    for changed, key, reference in ((AtlasConfig(**{**cfg.__dict__, "topk": 3}), {"run": 1}, ref),
                                    (cfg, {"run": 2}, ref), (cfg, {"run": 1}, None)):  # None: no reference MS
        log.clear()
        r = scan(model, sae, ds, changed, n_images=100, reference_embed=reference,
                 checkpoint=ScanCheckpoint(ck.path, every_s=float("inf"), key=key, log=log.append))
        assert r.resumed_from == 0 and len(log) == 1 and "other settings" in log[0], log


def test_cls_scored_atlas_keeps_a_gallery_by_the_max_over_patches(tiny_bundle, tmp_path):
    """--score cls: the galleries, support and MS follow the CLS token, and a second gallery ranks the
    images by the max over patches (latents that fire on patches only would have none), against a dense
    recomputation; its images get thumbnails, and the reader serves it."""
    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.adapters import load_adapter
    from sae_core.bundle import open_bundle

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    build_atlas(AtlasJob(sae=str(tiny_bundle / "sae"), dataset=m["dataset"]["spec"], model=m["model"]["spec"],
                         layer="-2", embedder=m["embedder"]["spec"], out=str(tmp_path / "b"), limit=60, topk=4,
                         batch_size=16, score="cls"))
    b = open_bundle(tmp_path / "b")
    b.validate()
    model, sae, ds = load_adapter(m["model"]["spec"]), b.load_sae(), b.dataset()
    n_pre = m["model"]["n_prefix"]
    with torch.no_grad():
        h = model.capture(model.preprocess([ds[i] for i in range(60)]), ["-2"])["-2"].float()
        z = sae.encode(h.reshape(-1, h.shape[-1])).reshape(h.shape[0], h.shape[1], -1).numpy()
    cls, pmax = z[:, 0], z[:, n_pre:].max(1)
    np.testing.assert_array_equal(np.asarray(b.array("support")), (cls > 0).sum(0))
    np.testing.assert_array_equal(np.asarray(b.array("patch_support")), (pmax > 0).sum(0))
    assert ((pmax > 0).sum(0) > (cls > 0).sum(0)).any()  # some latents fire on more images' patches
    for name, s in (("top", cls), ("patch_top", pmax)):
        ids, acts = np.asarray(b.array(f"{name}_images")), np.asarray(b.array(f"{name}_acts"))
        for k in range(b.n_neurons):
            n = min(4, int((s[:, k] > 0).sum()))
            np.testing.assert_allclose(acts[k, :n], np.sort(s[:, k])[::-1][:n], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(s[ids[k, :n], k], acts[k, :n], rtol=1e-4, atol=1e-5)
            assert (ids[k, n:] == -1).all()
    # the largest activation on one token (the steering unit) is the larger of the CLS's and the patches',
    # well above the image score's maximum for some latents; a bundle from before token_max gets the same
    # unit in the explorer from those two arrays
    token_max = np.asarray(b.array("token_max"))
    np.testing.assert_allclose(token_max, z.max((0, 1)), rtol=1e-5, atol=1e-6)
    assert (token_max > 2 * np.asarray(b.array("max_act"))).any()
    from app.explorer import Explorer

    (tmp_path / "b" / "neurons" / "token_max.npy").unlink()
    older = open_bundle(tmp_path / "b")
    np.testing.assert_allclose(Explorer(older, tmp_path / "cache").columns["strength_unit"],
                               np.where(token_max > 0, token_max, 1.0), rtol=1e-5)
    # the paper's steering score reads a latent's top images; one that fires on patches only has none by
    # CLS, and its gallery by patches stands in (it scored 0 against every word before)
    from sae_core.steering_eval import ClipScorer

    only = next(k for k in range(b.n_neurons) if (cls[:, k] <= 0).all() and (pmax[:, k] > 0).any())
    ids = [i for i in np.asarray(b.array("patch_top_images"))[only] if i >= 0]
    mean = np.asarray(b.array("images/embeddings.npy"), np.float64)[ids].mean(0)
    np.testing.assert_allclose(ClipScorer(b).latent_image(only), mean / np.linalg.norm(mean), atol=1e-5)
    # the MS of the second ranking: the pairwise definition on the max over patches (float16 embeddings
    # in the bundle, float32 in the scan: hence the tolerance)
    emb = np.asarray(b.array("images/embeddings.npy"), np.float64)
    pairwise_patch_ms = _pairwise_ms(pmax.astype(np.float64), emb)
    np.testing.assert_allclose(np.asarray(b.array("patch_ms")), pairwise_patch_ms, atol=2e-3, equal_nan=True)
    figures = b.manifest["metrics"]  # and it is scored against the world's ground truth like the CLS MS
    assert figures["ms_mean_patch"] == pytest.approx(np.nanmean(pairwise_patch_ms), abs=1e-3)
    assert figures["ms_nan_patch"] == int(((pmax > 0).sum(0) < 2).sum()) == int(np.isnan(pairwise_patch_ms).sum())
    assert all(-1 <= figures[f"{name}_patch_only"] <= 1 for name in ("ms_ground_truth_spearman", "ms_agreement"))
    # the best patch of the second gallery is the argmax over patches; every image shown has a thumbnail
    k = int(np.argmax((pmax > 0).sum(0)))
    page = b.neuron(k)
    assert [(i, p) for i, _, p in page["patch_top"]] == [(int(i), int(z[i, n_pre:, k].argmax()) + n_pre)
                                                        for i in np.asarray(b.array("patch_top_images"))[k] if i >= 0]
    thumbs = {int(p.stem) for p in (tmp_path / "b" / "images" / "thumbs").glob("*.png")}
    assert set(np.asarray(b.array("patch_top_images")).ravel().tolist()) - {-1} <= thumbs
    # the explorer shows it as a second gallery, says so in the header, and exports it
    from app.explorer import Explorer

    ex = Explorer(b, tmp_path / "cache")
    want = [i for i in np.asarray(b.array("patch_top_images"))[k] if i >= 0]
    assert [c.split()[0] for _, c in ex.gallery(k, by_patch=True)] == [f"#{i}" for i in want]
    assert f"fires on patches of {int((pmax[:, k] > 0).sum())} images" in ex.neuron_summary(k, page)
    # the histogram in words: the header's bounds hold the median and the 90th percentile of the scores of the
    # images where the neuron fires (np.quantile's own definition, for every neuron the line is shown for), within
    # one bin's width and the rounding up to 3 figures of the order statistic above it (or the max, in the last
    # bin). Until 2026-12-05 6 of the tiny bundle's 256 neurons got a bound below their own figure (rounded to the
    # nearest: 1.3138 "at most 1.31"; and a median of an even count above the bin edge where exactly half the
    # scores lay below)
    import re

    edges = np.asarray(b.array("hist_edges"), np.float64)
    shown = 0
    for n in range(cls.shape[1]):
        fired = cls[:, n][cls[:, n] > 0]
        spread = re.search(r"over the images where it fires, the median is at most (\S+) and the 90th percentile at "
                           r"most (\S+) ", ex.neuron_summary(n, b.neuron(n)))
        assert (spread is not None) == (fired.size >= 5), n
        shown += spread is not None
        for q, bound in zip((0.5, 0.9), map(float, spread.groups() if spread else ())):
            x, above = np.quantile(fired, q), np.quantile(fired, q, method="higher")  # x lies below `above`
            assert x <= bound * (1 + 1e-5) and (bound <= above * 10 ** (edges[1] - edges[0]) * 1.01 or
                                   bound == pytest.approx(fired.max(), rel=1e-2)), (n, q, x, bound)
    assert shown >= 20
    rec = ex.neuron_record(k)
    assert [t["image"] for t in rec["top_by_patch"]] == want and rec["patch_support"] == int((pmax[:, k] > 0).sum())
    # latents without a CLS image are labelled from the patch gallery: the label's definition written out
    # (argmax over concepts of cos(mean of the gallery's unit embeddings, text) - cos(mean image, text))
    from app.search import NeuronSearch
    from sae_core.labels import world_concepts
    from sae_core.text_encoders import load_text_embedder

    top_ids, patch_ids = np.asarray(b.array("top_images")), np.asarray(b.array("patch_top_images"))
    only_patch = ~(top_ids >= 0).any(1) & (patch_ids >= 0).any(1)
    assert only_patch.sum() >= 3 and b.labels["from_patch_gallery"] == np.flatnonzero(only_patch).tolist()
    concepts = world_concepts(m["world"])
    text = load_text_embedder(m["embedder"]["spec"])([c.prompt for c in concepts]).numpy().astype(np.float64)
    base = emb.sum(0) / np.linalg.norm(emb.sum(0))
    # every latent is also labelled from its patch gallery by the same definition (labels_by_patch)
    for labels, scores, gallery in ((b.labels["labels"], np.asarray(b.array("label_score")), np.where(only_patch[:, None], patch_ids, top_ids)),
                                    (b.labels["labels_by_patch"], np.asarray(b.array("patch_label_score")), patch_ids)):
        for k in range(b.n_neurons):
            ids = gallery[k]
            if not (ids >= 0).any():
                assert labels[k] == "" and np.isnan(scores[k])
                continue
            mean = emb[ids[ids >= 0]].mean(0)
            cos = text @ (mean / np.linalg.norm(mean)) - text @ base
            assert labels[k] == concepts[int(cos.argmax())].name
            assert scores[k] == pytest.approx(cos.max(), abs=1e-3)
    by_patch = b.labels["labels_by_patch"]
    assert all(by_patch[k] == b.labels["labels"][k] for k in np.flatnonzero(only_patch))
    differ = [k for k in range(b.n_neurons) if (top_ids[k] >= 0).any() and by_patch[k] and by_patch[k] != b.labels["labels"][k]]
    assert differ  # latents whose two galleries read differently: the header shows the second label
    head = ex.neuron_summary(differ[0], b.neuron(differ[0]))

    def read_from(ids):  # a label read from fewer images than a full gallery says how many
        n = int((ids >= 0).sum())
        return f", read from {n} image{'s' if n != 1 else ''}" if n < ids.size else ""

    assert (f'its label: guess "{by_patch[differ[0]]}" (score {float(np.asarray(b.array("patch_label_score"))[differ[0]]):.2f}'
            f'{read_from(patch_ids[differ[0]])})') in head
    for j in range(b.n_neurons):
        if b.labels["labels"][j] and not b.neuron(j)["label_from_patch"]:
            score = float(np.asarray(b.array("label_score"))[j])
            assert f'"{b.labels["labels"][j]}" (score {score:.2f}{read_from(top_ids[j])}, method' in ex.label_text(b.neuron(j))
    assert any(read_from(top_ids[j]) for j in range(b.n_neurons) if b.labels["labels"][j])  # some thin guesses were seen
    rec = ex.neuron_record(differ[0])
    assert rec["label_by_patch"] == by_patch[differ[0]] and rec["label"] == b.labels["labels"][differ[0]]
    # the world figure: labels by patches against the value most of the patch gallery's images share
    vocab = set(b.labels["vocabulary"])
    hits = []
    for k in range(b.n_neurons):
        ids = patch_ids[k][patch_ids[k] >= 0]
        if not by_patch[k] or not len(ids):
            continue
        count = {}
        for i in ids:
            f = ds.factors(int(i))
            for v in ({o[key] for o in f["objects"] for key in ("colour", "shape")} | {f["background"]["texture"]}) & vocab:
                count[v] = count.get(v, 0) + 1
        if count:
            hits.append(count.get(by_patch[k], 0) == max(count.values()))
    assert b.manifest["metrics"]["label_accuracy_by_patch"] == pytest.approx(np.mean(hits), abs=1e-9)
    k = int(np.flatnonzero(only_patch & ((pmax > 0).sum(0) >= 2))[0])
    page = b.neuron(k)
    assert page["label_from_patch"] and not b.neuron(int(np.flatnonzero((top_ids >= 0).any(1))[0]))["label_from_patch"]
    assert "from the gallery by the max over patches" in ex.label_text(page)
    assert f"{read_from(patch_ids[k])}, method" in ex.label_text(page)  # counted in the gallery it was read from
    assert "its label: guess" not in ex.neuron_summary(k, page)  # its label is the one by patches
    # its header and histogram say that it fires on patches only, not leave zeros and empty axes unexplained
    from app.figures import activation_histogram

    head = ex.neuron_summary(k, page)
    assert f"fires on patches of {int((pmax[:, k] > 0).sum())} images (max {pmax[:, k].max():.3g})" in head
    assert "**max activation** 0 (image score: CLS token)" in head
    assert f"by the max over patches {float(np.asarray(b.array('patch_ms'))[k]):.3f} over" in head
    fig = activation_histogram(*page["hist"], k, ex.score_name)
    assert [a["text"] for a in fig["layout"]["annotations"]] == ["fires on no image by its CLS token"]
    busy = int(np.argmax((cls > 0).sum(0)))
    fig = activation_histogram(*b.neuron(busy)["hist"], busy, ex.score_name)
    assert "annotations" not in fig["layout"] and fig["layout"]["xaxis"]["title"]["text"] == "activation (CLS token)"
    assert sum(fig["data"][0]["y"]) == int((cls[:, busy] > 0).sum())
    c, e = b.neuron(busy)["hist"]  # the axis zooms on the occupied bins, a quarter decade each side
    # each bar's hover gives its edges (the header's spread line quotes edges; the hover gave centres)
    np.testing.assert_allclose(fig["data"][0]["customdata"], 10 ** np.stack([e[:-1], e[1:]], 1), rtol=1e-6)
    assert "%{customdata[0]:.3g} to %{customdata[1]:.3g}" in fig["data"][0]["hovertemplate"]
    occ = np.flatnonzero(c)
    assert fig["layout"]["xaxis"]["range"] == pytest.approx([e[occ[0]] - 0.25, e[occ[-1] + 1] + 0.25])
    ticks = np.log10(fig["layout"]["xaxis"]["tickvals"])  # labelled in full (figures.log_ticks), on the axis
    assert len(ticks) >= 2 and e[occ[0]] - 0.25 <= ticks.min() and ticks.max() <= e[occ[-1] + 1] + 0.25
    # the histogram of the max over patches, against np.histogram on the rule's edges (the 60 images are
    # fewer than hist_edge_images: the top edge is 10 x the highest max over patches, rounded up to a
    # power of 10), drawn over the CLS one: the patch-only latent's page shows its patch activations
    top = np.ceil(np.log10(pmax.max())) + 1
    edges = np.asarray(b.array("patch_hist_edges"), np.float64)
    np.testing.assert_allclose(edges, np.linspace(top - 6, top, 49), atol=1e-6)
    counts = np.asarray(b.array("patch_hist_counts"))
    for j in range(b.n_neurons):
        logs = np.clip(np.log10(pmax[pmax[:, j] > 0, j].astype(np.float64)), top - 6, top - 1e-9)
        np.testing.assert_array_equal(counts[j], np.histogram(logs, bins=48, range=(top - 6, top))[0])
    fig = activation_histogram(*page["hist"], k, ex.score_name, page["patch_hist"])
    assert "annotations" not in fig["layout"] and [d["name"] for d in fig["data"]] == ["CLS token", "max over patches"]
    assert [sum(d["y"]) for d in fig["data"]] == [0, int((pmax[:, k] > 0).sum())]
    assert ex.neuron_record(k)["histogram_by_patch"]["counts"] == counts[k].tolist()
    # its activation bands: per band, the S images with the smallest keys among those of its quantile group
    # of the max over patches (_reference_bands, as in the brute-force test of the CLS bands)
    band_ids, band_acts = (np.asarray(b.array(f"patch_band_{name}")) for name in ("images", "acts"))
    NB, S = band_ids.shape[1:]
    hash_keys = BinReservoirs(1, S, seed=0).keys_for
    for j in range(b.n_neurons):
        firing = np.flatnonzero(pmax[:, j] > 0)
        if not len(firing):
            assert (band_ids[j] == -1).all()
            continue
        want, _, want_sizes = _reference_bands(firing, pmax[firing, j], hash_keys(firing, np.full(len(firing), j)),
                                               NB, S, 48, 6.0)
        assert np.asarray(b.array("patch_band_counts"))[j].tolist() == want_sizes + [0] * (NB - len(want))
        for band in range(NB):
            got = band_ids[j, band][band_ids[j, band] >= 0]
            assert sorted(got.tolist()) == (want[band] if band < len(want) else []), (j, band)
            np.testing.assert_allclose(band_acts[j, band][: len(got)], pmax[got, j], rtol=1e-4, atol=1e-5)
            assert (np.diff(band_acts[j, band][: len(got)]) <= 0).all()
    # each band sample's best patch: the argmax over patches (-1 where a CLS sample fires on no patch)
    argmax = z[:, n_pre:].argmax(1) + n_pre  # (N, K)
    for prefix in ("", "patch_"):
        ids, pos = (np.asarray(b.array(f"{prefix}band_{name}")) for name in ("images", "patch"))
        kk = np.broadcast_to(np.arange(b.n_neurons)[:, None, None], ids.shape)
        want = np.where((ids >= 0) & (pmax[np.maximum(ids, 0), kk] > 0), argmax[np.maximum(ids, 0), kk], -1)
        assert (ids >= 0).sum() > 100 and np.array_equal(pos, want), prefix
    assert set(band_ids.ravel().tolist()) - {-1} <= thumbs
    # the page of a latent without CLS images shows them (it has no CLS bands), says so, and exports them
    strips = ex.band_gallery(k, page)
    want = [row[row >= 0].tolist() for row in band_ids[k] if (row >= 0).any()]
    assert strips and len(strips) == len(want)
    assert [c.split("(#")[1].rstrip(")").replace("#", "").split(", ") for _, c in strips] == [[str(i) for i in w] for w in want]
    assert all(c.startswith(f"band {n} by the max over patches: ") for n, (_, c) in
               zip([i + 1 for i, row in enumerate(band_ids[k]) if (row >= 0).any()], strips))
    assert "and so do the activation bands below it" in ex.neuron_summary(k, page)
    assert [[t["image"] for t in band] for band in ex.neuron_record(k)["bands_by_patch"]] == [row[row >= 0].tolist() for row in band_ids[k]]
    # a latent with CLS images keeps its CLS bands
    cls_strips = ex.band_gallery(busy)
    cls_bands = np.asarray(b.array("band_images"))[busy]
    assert len(cls_strips) == int((cls_bands >= 0).any(1).sum()) and not any("by the max" in c for _, c in cls_strips)
    assert "bands below it" not in ex.neuron_summary(busy, b.neuron(busy))
    silent = int(np.flatnonzero((pmax <= 0).all(0) & (cls <= 0).all(0))[0])
    fig = activation_histogram(*b.neuron(silent)["hist"], silent, ex.score_name, b.neuron(silent)["patch_hist"])
    assert [a["text"] for a in fig["layout"]["annotations"]] == ["fires on no image by its CLS token or the max over patches"]
    assert ex.neuron_record(k)["label_from_patch_gallery"] is True
    assert f"the {int(only_patch.sum())} neurons without a top image" in b.labels["method"]
    # the table's minimum support counts their patch gallery, so a label filter finds them (a latent
    # with CLS images is still filtered by its CLS support); the patch support is a column
    assert {"patch_support", "patch_ms"} <= set(ex.table_columns) & set(ex.table_sorts)
    gallery_n = np.where((cls > 0).sum(0) > 0, (cls > 0).sum(0), (pmax > 0).sum(0))
    lab = b.labels["labels"][k]
    t = ex.table(min_ms=0, min_support=2, label_contains=lab, limit=500)  # min MS 0: the page's default
    assert sorted(t["neuron"]) == [j for j in range(b.n_neurons) if lab in b.labels["labels"][j] + "|" + by_patch[j]
                                   and gallery_n[j] >= 2]  # either label
    assert ex.table_columns[:3] == ["neuron", "label", "patch_label"] and list(t.columns) == ex.table_columns
    assert [t.set_index("neuron").loc[j, "patch_label"] for j in t["neuron"]] == [by_patch[j] for j in t["neuron"]]
    row = t.set_index("neuron").loc[k]
    assert (row["support"], row["patch_support"]) == (0, int((pmax[:, k] > 0).sum()))
    assert row["patch_ms"] == pytest.approx(float(np.asarray(b.array("patch_ms"))[k]), abs=1e-3)
    # the related table carries each relative's MS by patches beside its MS
    rows = dict(ex.metrics_rows())  # the Overview names the MS by patches and draws its distribution
    assert float(rows["mean MS by the max over patches, SAE latents"]) == pytest.approx(np.nanmean(pairwise_patch_ms), abs=1e-3)
    assert rows["SAE latents without an MS by the max over patches"] == f"{int(np.isnan(pairwise_patch_ms).sum())} of {b.n_neurons}"
    from app.figures import ms_histogram

    fig = ms_histogram(ex.columns["ms"], None, ex.columns["patch_ms"])
    assert fig.data[1].name == "SAE latents, by the max over patches" and sum(fig.data[1].y) == pytest.approx(100)
    from app.figures import ms_frequency_scatter  # and the scatter adds the latents with an MS by patches only

    fig = ms_frequency_scatter(ex.columns)
    cls_ms = np.asarray(b.array("ms"))
    only = np.flatnonzero(np.isnan(cls_ms) & np.isfinite(pairwise_patch_ms))
    assert fig.data[-1].name == "by patches (no MS by CLS)" and list(fig.data[-1].customdata) == only.tolist()
    np.testing.assert_allclose(fig.data[-1].x, (pmax[:, only] > 0).sum(0) / b.n_images)
    np.testing.assert_allclose(fig.data[-1].y, pairwise_patch_ms[only], atol=2e-3)
    assert sorted(j for t in fig.data[:-1] for j in t.customdata) == np.flatnonzero(np.isfinite(cls_ms)).tolist()
    assert ex.related_columns == ["relation", "neuron", "label", "ms", "patch_ms", "decoder_cos"]
    related = ex.related(k, page)
    assert related and all(len(r) == 6 for r in related)
    pms = np.asarray(b.array("patch_ms"), np.float64)
    for r in related:
        assert r[4] == (pytest.approx(pms[r[1]], abs=1e-3) if np.isfinite(pms[r[1]]) else None)
    # text search describes them by the same gallery, so they can be found
    search = NeuronSearch.for_bundle(ex)
    search._ready()
    full = (patch_ids >= 0).sum(1) == 4
    assert (only_patch & full).any() and search._alive[only_patch & full].all()
    # the Images page: the neurons whose galleries (by CLS and by patches) hold an image
    from tests.test_app_units import check_image_neurons

    assert len(patch_ids) and (patch_ids >= 0).any()
    check_image_neurons(ex, b.root / "neurons")


def test_scan_batch_follows_the_memory_budget(tiny_bundle, tmp_path, capsys):
    """--memory-gib caps the image batch (images_per_batch), says so, and the statistics do not depend on it."""
    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.adapters import load_adapter
    from sae_core.atlas import SCAN_BYTES_PER_CODE, AtlasConfig, images_per_batch, scan
    from sae_core.bundle import open_bundle

    # K 65,536 latents on ViT-L/14's 257 tokens: 24 B x 257 x 65,536 = 404 MB per image, 10 in 4 GiB
    assert images_per_batch(128, 257, 65536, 4.0) == 10
    assert images_per_batch(128, 17, 512, 4.0) == 128 and images_per_batch(128, 257, 65536, 0.01) == 1
    torch.set_num_threads(1)
    b = open_bundle(tiny_bundle)
    m = b.manifest
    model, sae, ds = load_adapter(m["model"]["spec"]), b.load_sae(), b.dataset()
    per_image = SCAN_BYTES_PER_CODE * model.layout.n_tokens * sae.cfg.d_sae
    # the histogram's edges from the first 12 images: batches of 5 reach them mid-batch
    cfgs = [AtlasConfig(layer="-2", topk=4, batch_size=40, memory_gib=g, hist_edge_images=12)
            for g in (4.0, 5.5 * per_image / 2**30)]
    runs = [scan(model, sae, ds, cfg, n_images=40) for cfg in cfgs]
    assert [r.batch_size for r in runs] == [40, 5]
    for name in ("top_images", "top_acts", "top_patch", "support", "frequency", "max_act", "mean_act", "ms",
                 "hist_edges", "hist_counts", "band_images", "band_acts"):
        np.testing.assert_allclose(runs[0].neurons[name], runs[1].neurons[name], rtol=1e-5, atol=1e-6,
                                   equal_nan=True, err_msg=name)
    np.testing.assert_allclose(runs[0].raw_ms, runs[1].raw_ms, rtol=1e-5, atol=1e-6, equal_nan=True)
    # the command says when it lowers the batch, and the scan stage records the batch it used
    build_atlas(AtlasJob(sae=str(tiny_bundle / "sae"), dataset=m["dataset"]["spec"], model=m["model"]["spec"],
                         layer="-2", embedder=m["embedder"]["spec"], out=str(tmp_path / "b"), limit=20, topk=4,
                         batch_size=16, memory_gib=3.5 * per_image / 2**30))
    assert "atlas: 3 images per batch, not 16" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / ".stages" / "scan.json").read_text())["batch_size"] == 3
    from sae_core.errors import UserError

    for bad in (0, -1.0, float("nan"), float("inf")):  # refused when the job is made, before any model loads
        with pytest.raises(UserError, match="must be a positive number of GiB"):
            AtlasJob(sae="s", dataset="d", model="m", out=str(tmp_path / "c"), memory_gib=bad)
    for bad in (0, -3):
        with pytest.raises(UserError, match=f"--checkpoint-every {bad} must be at least 1 image"):
            AtlasJob(sae="s", dataset="d", model="m", out=str(tmp_path / "c"), checkpoint_every=bad)


def test_an_saelens_sae_builds_the_same_bundle_as_ours(tiny_bundle, tmp_path):
    """The tiny bundle's SAE exported to SAELens's layout (BatchTopK -> JumpReLU) without our metadata, as
    an SAE SAELens made, and given to the atlas builds the bundle ours builds: same galleries,
    activations and MS; the bundle keeps it in our layout, says where it came from, and the explorer's
    Overview names it. With our metadata the export needs no --layer and comes back as our Matryoshka SAE."""
    from app.explorer import Explorer
    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.bundle import open_bundle
    from sae_core.checkpoint import export_saelens
    from sae_core.errors import UserError

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    ours_exported = export_saelens(tiny_bundle / "sae", tmp_path / "exported")
    saelens = export_saelens(tiny_bundle / "sae", tmp_path / "saelens")
    cfg = json.loads((saelens / "cfg.json").read_text())
    cfg["metadata"] = {"model_name": "tiny-llava", "hook_name": "vision_tower.layers.-2"}
    (saelens / "cfg.json").write_text(json.dumps(cfg))
    common = dict(dataset=m["dataset"]["spec"], model=m["model"]["spec"], embedder=m["embedder"]["spec"],
                  limit=40, topk=4, batch_size=20, score="max")
    with pytest.raises(UserError, match="reads 'vision_tower.layers.-2', which names no block output .*; pass --layer L"):
        build_atlas(AtlasJob(sae=str(saelens), out=str(tmp_path / "no_layer"), **common))
    # a hook of a deeper model: the refusal says the layer is the SAE's (it said only that layer 9 did not exist)
    cfg["metadata"]["hook_name"] = "blocks.9.hook_resid_post"
    (saelens / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"^the SAE's own layer 9 does not exist in world:.*; the SAE \(hook "
                                        r"blocks.9.hook_resid_post\) was trained on another model: pass that one as "
                                        "--model, or one of these as --layer.$"):
        build_atlas(AtlasJob(sae=str(saelens), out=str(tmp_path / "deeper"), **common))
    # refused before anything was built, they leave no folder (their settings and log kept it, which `inspect`
    # called an unfinished bundle with a resume command refused again)
    assert not (tmp_path / "no_layer").exists() and not (tmp_path / "deeper").exists()
    cfg["metadata"]["hook_name"] = "vision_tower.layers.-2"
    (saelens / "cfg.json").write_text(json.dumps(cfg))
    build_atlas(AtlasJob(sae=str(tiny_bundle / "sae"), out=str(tmp_path / "ours"), layer="-2", **common))
    build_atlas(AtlasJob(sae=str(saelens), out=str(tmp_path / "theirs"), layer="-2", **common))
    build_atlas(AtlasJob(sae=str(ours_exported), out=str(tmp_path / "back"), **common))
    ours, theirs, back = open_bundle(tmp_path / "ours"), open_bundle(tmp_path / "theirs"), open_bundle(tmp_path / "back")
    theirs.validate()
    for other in (theirs, back):
        np.testing.assert_array_equal(np.asarray(other.array("top_images")), np.asarray(ours.array("top_images")))
        np.testing.assert_allclose(np.asarray(other.array("top_acts")), np.asarray(ours.array("top_acts")), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(other.array("ms")), np.asarray(ours.array("ms")), rtol=1e-6,
                                   equal_nan=True)
    assert back.manifest["model"]["layer"] == "-2" and back.manifest["sae"]["group_sizes"] == m["sae"]["group_sizes"]
    assert json.loads((tmp_path / "back" / "hierarchy.json").read_text())["levels"] == \
        json.loads((tmp_path / "ours" / "hierarchy.json").read_text())["levels"]
    sae = theirs.load_sae()
    assert sae.cfg.arch == "jumprelu" and sae.training_info["imported"]["format"] == "saelens"
    assert theirs.manifest["sae"]["training"]["imported"]["from"] == str(saelens.resolve())
    facts = Explorer(theirs, tmp_path / "cache").facts()
    assert "jumprelu" in facts["SAE"] and "imported from saelens (jumprelu" in facts["SAE"]
    assert ", k " not in facts["SAE"]           # a JumpReLU SAE has thresholds, not a k
    from precompute.inspect import sae_summary, summary

    assert summary(tmp_path / "theirs")["sae"]["imported"]["format"] == "saelens"
    assert summary(tmp_path / "ours")["sae"]["imported"] is None
    seen = sae_summary(str(saelens))  # `inspect` of the SAELens folder itself: the SAE the atlas made of it
    assert (seen["format"], seen["architecture"], seen["k"], seen["d_sae"]) == ("saelens", "jumprelu", None, sae.cfg.d_sae)
    assert seen["imported"]["model"] == "tiny-llava" and seen["imported"]["hook"] == "vision_tower.layers.-2"
    assert seen["trained_on"]["layer"] is None and seen["metrics"] is None  # no layer we read; no metrics.json
    # It has one level (JumpReLU, not Matryoshka): the Hierarchy page says so instead of drawing one ring of
    # unrelated wedges, and hides the drawing and its controls.
    from gradio_client import Client

    from app.server import start

    demo, url = start(tmp_path / "theirs", cache=tmp_path / "cache")
    try:
        figure, depth, note = Client(url, verbose=False).predict("sunburst", api_name="/hierarchy")
        assert figure is None and "This SAE (jumprelu) has one level, so there is no tree to draw" in note
        assert [r[:2] for r in depth["data"]] == [[0, theirs.n_neurons]]
        plot = next(c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "tree-plot")
        assert plot["props"]["visible"] is False
    finally:
        demo.close()
    # and it steers: the latents it finds on an image, through the tiny LLaVA's tower, are ours
    from sae_core.steering import SteeringSession

    image = ours.image(int(np.asarray(ours.array("top_images")).max()))  # an image some latent fires on
    found = [SteeringSession.from_bundle(b, device="cpu", precision="fp32").latents_on_image(image)
             for b in (ours, theirs)]
    assert found[0]["top"] and [r[0] for r in found[1]["top"]] == [r[0] for r in found[0]["top"]]
    np.testing.assert_allclose([r[1] for r in found[1]["top"]], [r[1] for r in found[0]["top"]], rtol=1e-5)


def test_the_atlas_says_when_the_sae_fits_the_activations_poorly(tiny_bundle, tmp_path, capsys, monkeypatch):
    """An SAE that reconstructs the scanned activations worse than POOR_FVU (here the tiny SAE with its
    decoder doubled: most often it is another model's or layer's SAE) is named with its FVU; the SAE
    itself builds without the line. An SAE that records another model or layer than --model and --layer is
    said before the scan."""
    from precompute.atlas import POOR_FVU, AtlasJob, build_atlas
    from sae_core.bundle import open_bundle
    from sae_core.checkpoint import load_sae, save_sae

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    sae = load_sae(tiny_bundle / "sae")
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    save_sae(sae, tmp_path / "doubled", training=sae.training_info)
    common = dict(dataset=m["dataset"]["spec"], model=m["model"]["spec"], layer="-2", embedder=m["embedder"]["spec"],
                  limit=12, topk=2, batch_size=12)
    for name in ("doubled", "own"):
        sae_dir = tmp_path / "doubled" if name == "doubled" else tiny_bundle / "sae"
        build_atlas(AtlasJob(sae=str(sae_dir), out=str(tmp_path / f"b_{name}"), **common))
        fvu = open_bundle(tmp_path / f"b_{name}").manifest["metrics"]["fvu"]
        err = capsys.readouterr().err
        assert (fvu > POOR_FVU) == (name == "doubled")
        assert (f"atlas: FVU {fvu:.3g}: the SAE reconstructs these activations poorly" in err) == (name == "doubled")
        assert ("check that --model and --layer -2 are what it was trained on" in err) == (name == "doubled")
        assert "the SAE was trained on activations of" not in err
    training = json.loads(json.dumps(sae.training_info))
    training["activations"]["model"]["name"] = "/elsewhere/llava"
    save_sae(load_sae(tiny_bundle / "sae"), tmp_path / "moved", training=training)

    def no_scan(*args, **kwargs):
        raise KeyboardInterrupt  # as a user would on reading the warning: it must come before the scan

    monkeypatch.setattr("sae_core.atlas.scan", no_scan)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(AtlasJob(sae=str(tmp_path / "moved"), out=str(tmp_path / "b_moved"), **common))
    assert (f"atlas: warning: the SAE was trained on activations of /elsewhere/llava ({m['model']['spec']}), and "
            f"--model {m['model']['spec']} is ") in capsys.readouterr().err
    # the same folder spelt another way (relative to the working directory) is the same model
    training["activations"]["model"]["name"] = os.path.relpath(m["model"]["spec"][6:].rsplit(":", 1)[0] + "/llava")
    save_sae(load_sae(tiny_bundle / "sae"), tmp_path / "relative", training=training)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(AtlasJob(sae=str(tmp_path / "relative"), out=str(tmp_path / "b_relative"), **common))
    assert "trained on activations of" not in capsys.readouterr().err
    # its own SAE at another layer: warned; at its layer -2 typed as block 2 (of 4): the same place, no warning
    for layer, warned in (("0", True), ("2", False)):
        with pytest.raises(KeyboardInterrupt):
            build_atlas(AtlasJob(sae=str(tiny_bundle / "sae"), out=str(tmp_path / f"b_layer{layer}"),
                                 **{**common, "layer": layer}))
        err = capsys.readouterr().err
        assert (f"atlas: warning: the SAE was trained on layer -2, and --layer is {layer};" in err) == warned, err
        assert "trained on activations of" not in err


def test_an_approximate_atlas_index_is_tuned_for_the_vocabulary_prompts(tiny_bundle, tmp_path, monkeypatch):
    """At IVF-PQ sizes the index stage tunes nprobe/rerank for the labels' prompts too (README, Search),
    and reports their recall; the figure equals a recount: the prompts embedded by transformers' own CLIP,
    exact top-100 by numpy, the saved index's top-10 (it tuned for images only before)."""
    import shutil

    from transformers import AutoTokenizer, CLIPModel

    from precompute import atlas as A
    from sae_core import search_index
    from sae_core.labels import world_concepts

    world = json.loads((Path(tiny_bundle) / "manifest.json").read_text())["world"]
    out = tmp_path / "b"
    (out / "images").mkdir(parents=True)
    shutil.copy(Path(tiny_bundle) / "images/embeddings.npy", out / "images/embeddings.npy")
    monkeypatch.setattr(search_index, "EXACT_THRESHOLD", 1000)  # the tiny bundle's 2,000 images take IVF-PQ
    job = A.AtlasJob(sae=str(Path(tiny_bundle) / "sae"), dataset=f"world:{world}:val", model=f"world:{world}:llava",
                     out=str(out), layer="-2", embedder=f"world:{world}")
    info = A._stage_index(job, None, out, None, A._world_root(job.dataset))["index"]
    assert info["kind"] == "ivfpq" and info["recall"]["n_text_queries"] == 27

    prompts = [c.prompt for c in world_concepts(world)]
    clip, tok = CLIPModel.from_pretrained(f"{world}/clip").eval(), AutoTokenizer.from_pretrained(f"{world}/clip")
    with torch.no_grad():
        t = clip.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
    t = (t if isinstance(t, torch.Tensor) else t.pooler_output).numpy().astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    emb = np.load(out / "images/embeddings.npy")
    exact = np.argsort(-(t @ emb.astype(np.float64).T), axis=1, kind="stable")[:, :100]
    got, _ = search_index.load_index(out / "images/index.faiss", embeddings=emb).search(t.astype(np.float32), 10)
    recall = np.mean([len(set(g.tolist()) & set(e.tolist())) / 10 for g, e in zip(got, exact)])
    assert info["recall"]["value_text"] == pytest.approx(recall, abs=0.02)
    assert recall >= 0.95 or info["rerank"] == 64


def test_a_rerun_repairs_damaged_files_and_refuses_unreadable_settings(tiny_bundle, tmp_path):
    """Files of a finished stage gone or damaged, a damaged stage marker or manifest: the rerun redoes that
    stage and those after it and writes what the undamaged bundle held (tracebacks before); a damaged
    settings file is refused in one sentence and nothing is removed."""
    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.bundle import open_bundle
    from sae_core.errors import UserError

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    opts = dict(sae=str(tiny_bundle / "sae"), dataset=m["dataset"]["spec"], model=m["model"]["spec"], layer="-2",
                embedder=m["embedder"]["spec"], out=str(tmp_path / "b"), limit=40, topk=4, batch_size=16)

    class Notes:
        lines: list = []

        def stage(self, name):
            import contextlib

            return contextlib.nullcontext(lambda f: None)

        def skip(self, name):
            pass

        def note(self, line):
            self.lines.append(line)

    build_atlas(AtlasJob(**opts))
    b = tmp_path / "b"
    files = ("neurons/top_images.npy", "neurons/top_heat.npy", "neurons/labels.json", "hierarchy.json", "world.json")
    want = {f: (b / f).read_bytes() for f in files}
    for damage, stage in (("neurons/top_images.npy", "scan"), ("neurons/labels.json", "labels"),
                          (".stages/labels.json", None), ("manifest.json", None)):
        (b / damage).write_bytes((b / damage).read_bytes()[:40])  # truncated
        notes = Notes()
        notes.lines = []
        build_atlas(AtlasJob(**opts), notes)
        if stage:
            assert notes.lines == [f"atlas: {b / damage} is missing or damaged; the {stage} stage and those after it run "
                                   "again."]
        open_bundle(b).validate()
        for f in files:
            assert (b / f).read_bytes() == want[f], (damage, f)
    (b / "neurons/labels.json").unlink()
    build_atlas(AtlasJob(**opts))
    assert (b / "neurons/labels.json").read_bytes() == want["neurons/labels.json"]
    (b / ".stages/settings.json").write_text("{")
    with pytest.raises(UserError, match=r"settings.json cannot be read, so the settings .* are unknown; pass a new --out"):
        build_atlas(AtlasJob(**opts))
    assert all((b / f).read_bytes() == want[f] for f in files) and (b / "manifest.json").is_file()


def test_a_limit_below_two_images_and_a_missing_vocabulary_are_refused_before_anything_loads(tmp_path):
    """--limit 1 was refused only after the models loaded, as "the dataset has 1 images" (it has 2,000)."""
    args = [sys.executable, "-m", "precompute", "atlas", "--sae", str(tmp_path / "sae"), "--dataset", "world:W:val",
            "--model", "world:W:llava", "--layer=-2", "--out", str(tmp_path / "b"), "--limit", "1"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --limit 1 must be at least 2: the atlas compares images (MS needs two)."]
    assert not (tmp_path / "b").exists()
    # a --vocabulary typo, found before the scan: found after it, the folder was locked to the typo and the
    # corrected command refused, so the scan was lost
    proc = subprocess.run(args[:-2] + ["--vocabulary", str(tmp_path / "typo.txt")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: vocabulary file {tmp_path / 'typo.txt'} does not exist; pass a text file with one concept per line."]
    assert not (tmp_path / "b").exists()


def test_a_topk_whose_galleries_cannot_fit_is_refused_and_does_not_lock_the_folder(tiny_bundle, tmp_path, capsys):
    """--topk 10^8 on the tiny SAE asks 763 GiB of patch heat (256 x 10^8 x 16 x 2 bytes, figured here): one
    sentence before any image (a DefaultCPUAllocator traceback before), and the same --out then takes a
    --topk that fits (in this process: a refusal that kept --out's lock would refuse it)."""
    from precompute.__main__ import main

    m = json.loads((Path(tiny_bundle) / "manifest.json").read_text())
    args = ["atlas", "--sae", str(Path(tiny_bundle) / "sae"), "--dataset", m["dataset"]["spec"], "--model",
            m["model"]["spec"], "--layer=-2", "--embedder", m["embedder"]["spec"], "--out", str(tmp_path / "b"),
            "--limit", "3", "--device", "cpu"]
    gib = 256 * 10**8 * 16 * 2 / 2**30
    assert main(args + ["--topk", str(10**8)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: --topk 100000000 would hold {gib:,.1f} GiB of patch heat (256 latents x 100000000 images x 16 patches")
    # one that fits but asks more top images than the scan covers (and than the default 16): refused before the
    # scan, where the hierarchy's image pairs ran out of memory after it (--topk 100000 on 16 images: 37 GiB)
    assert main(args + ["--topk", "17"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --topk 17 asks for more top images than the 3 the scan covers; give --topk 16 or less.")
    assert main(args + ["--topk", "4"]) == 0, capsys.readouterr().err[-2000:]
    assert np.load(tmp_path / "b/neurons/top_images.npy").shape == (256, 4)


def test_taxonomy_depth_is_measured_when_the_first_gallery_image_has_no_path(tmp_path):
    """An iNaturalist folder with loose images (no class, no path): the tree stage measured depth only if
    the very first top image had a path, so one loose image there left every latent without a depth."""
    from itertools import combinations, takewhile

    from PIL import Image

    from precompute import atlas as A
    from sae_core import bundle as B
    from sae_core.checkpoint import save_sae
    from sae_core.sae import SAEConfig, SparseAutoencoder

    folder = tmp_path / "inat"
    classes = {"00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax": "Corvus corax",
               "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Pica_pica": "Pica pica",
               "00002_Animalia_Chordata_Mammalia_Carnivora_Canidae_Canis_lupus": "Canis lupus"}
    for c in classes:
        (folder / c).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (4, 4)).save(folder / c / f"{j}.png")
    for j in range(2):
        Image.new("RGB", (4, 4)).save(folder / f"loose{j}.png")
    from sae_core.datasets import open_dataset

    ds = open_dataset(f"imagefolder:{folder}")
    loose = [i for i in range(len(ds)) if ds.taxonomy_path(i) is None]
    named = [i for i in range(len(ds)) if ds.taxonomy_path(i) is not None]
    assert len(loose) == 2 and len(named) == 6
    K = 6
    sae = SparseAutoencoder(SAEConfig("matryoshka", 8, K, k=2, group_sizes=(2, 4)))
    save_sae(sae, tmp_path / "sae")
    out = tmp_path / "b"
    top = np.array([[loose[0], named[0], named[1]], [named[2], named[4], -1], [named[0], named[2], loose[1]],
                    [named[5], -1, -1], [-1, -1, -1], [named[3], named[4], named[5]]])
    for name, arr in (("top_images", top), ("ms", np.zeros(K, np.float32)), ("label_score", np.zeros(K, np.float32)),
                      ("support", np.ones(K, np.int64))):
        B.write_array(out, f"neurons/{name}.npy", arr)
    B.write_json(out, B.LABELS, {"method": "test", "vocabulary": [], "labels": [""] * K})
    job = A.AtlasJob(sae=str(tmp_path / "sae"), dataset=f"imagefolder:{folder}", model="x", out=str(out), layer="0",
                     topk=3)
    info = A._stage_hierarchy(job, sae, out, None, None)

    def path(i):  # the folder name read directly: kingdom ... genus, then the binomial
        c = Path(ds.item(i)).parts[0]
        return c.split("_")[1:7] + [classes[c]] if c in classes else None

    want = []
    for row in top:
        paths = [path(i) for i in row if i >= 0 and path(i) is not None]
        depths = [len(list(takewhile(lambda xy: xy[0] == xy[1], zip(a, b)))) for a, b in combinations(paths, 2)]
        want.append(np.mean(depths) if depths else np.nan)
    np.testing.assert_allclose(np.load(out / "neurons/taxonomy_depth.npy"), want, rtol=1e-6)
    assert info["depth_per_level"] == pytest.approx([np.nanmean(want[:2]), np.nanmean(want[2:])])


def test_a_rerun_rebuilds_a_damaged_search_index(tiny_bundle, tmp_path):
    """A truncated images/index.faiss (or a damaged index.faiss.json) was taken as finished because it exists,
    and the explorer's first search ended in faiss's error: the rerun now reads the index back, rebuilds that
    stage (one line names the file), and searches as the undamaged index did (numpy brute force too)."""
    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.bundle import open_bundle

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    opts = dict(sae=str(tiny_bundle / "sae"), dataset=m["dataset"]["spec"], model=m["model"]["spec"], layer="-2",
                embedder=m["embedder"]["spec"], out=str(tmp_path / "b"), limit=40, topk=4, batch_size=16)
    lines = []
    note = type("Notes", (), {"stage": lambda self, name: __import__("contextlib").nullcontext(lambda f: None),
                              "skip": lambda self, name: None, "note": lambda self, line: lines.append(line)})()
    build_atlas(AtlasJob(**opts))
    b = tmp_path / "b"
    emb = np.load(b / "images/embeddings.npy")
    queries = emb[::7] + 0.01
    want_ids, want_scores = open_bundle(b).search_index().search(queries, 5)
    brute = np.argsort(-(queries.astype(np.float64) @ emb.astype(np.float64).T), axis=1, kind="stable")[:, :5]
    assert (want_ids == brute).all()
    for damage, keep in (("images/index.faiss", 1000), ("images/index.faiss", 0), ("images/index.faiss.json", 3)):
        (b / damage).write_bytes((b / damage).read_bytes()[:keep])
        lines.clear()
        build_atlas(AtlasJob(**opts), note)
        assert lines == [f"atlas: {b / damage} is missing or damaged; the index stage and those after it run again."]
        ids, scores = open_bundle(b).search_index().search(queries, 5)
        assert (ids == want_ids).all() and np.allclose(scores, want_scores), damage
    lines.clear()
    build_atlas(AtlasJob(**opts), note)  # an intact index is read back, not rebuilt
    assert lines == []


def test_a_limit_that_covers_the_dataset_is_the_same_build_as_none(tiny_bundle, tmp_path):
    """--limit 5000 on the tiny world's 2,000 images scans what no --limit scans, but was recorded as given, so
    the one spelling refused to resume the other's bundle as "other settings"; a bundle built before the
    change (its settings.json holding limit 5000) still resumes with its own command, and with no --limit."""
    import shutil

    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.bundle import open_bundle
    from sae_core.errors import UserError

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b, symlinks=True)
    m = open_bundle(b).manifest
    settings = json.loads((b / ".stages/settings.json").read_text())
    assert settings["limit"] is None and m["dataset"]["n_images"] == 2000
    # as this code records it (a tiny bundle built before the evening of 2026-12-05 lacks it): another limit is
    # reported as that, not as "other images" though it covers other images
    settings["items_sha256"] = m["dataset"]["items_sha256"]
    (b / ".stages/settings.json").write_text(json.dumps(settings))
    opts = dict(sae=settings["sae"], dataset=m["dataset"]["spec"], model=m["model"]["spec"], layer="-2",
                embedder=m["embedder"]["spec"], out=str(b), topk=settings["topk"], score=settings["score"])
    build_atlas(AtlasJob(**opts))  # adds the files' digests, once (this code's record; 2026-12-05)
    settings = json.loads((b / ".stages/settings.json").read_text())
    before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}

    def resumes(**more):
        assert build_atlas(AtlasJob(**opts, **more)) == m  # finished: nothing runs again, nothing is rewritten
        assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == before

    for limit in (2000, 5000, None):
        resumes(limit=limit)
    with pytest.raises(UserError, match=r"other settings \(limit: None there, 1999 now\)"):
        build_atlas(AtlasJob(**opts, limit=1999))
    # as the old code recorded `--limit 5000`: that command and the bare one both resume
    (b / ".stages/settings.json").write_text(json.dumps({**settings, "limit": 5000}))
    before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    for limit in (5000, 2000, None):
        resumes(limit=limit)
    with pytest.raises(UserError, match=r"other settings \(limit: None there, 1999 now\)"):
        build_atlas(AtlasJob(**opts, limit=1999))


def test_a_bundle_refuses_its_image_folder_once_its_ids_name_other_files(tiny_bundle, tmp_path):
    """An image added before the last scanned one shifted every id after it in silence: the thumbnails showed
    one image and steering read another. The manifest keeps a digest of the scanned images' names; a folder
    that lists them otherwise is one sentence, and one that only grew after them is still the bundle's."""
    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.bundle import open_bundle
    from sae_core.datasets import open_dataset
    from sae_core.errors import UserError

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    world = open_dataset(m["dataset"]["spec"])
    folder = tmp_path / "photos"
    for j, cls in enumerate(["b", "b", "c", "c", "c"]):
        (folder / cls).mkdir(parents=True, exist_ok=True)
        world[j].save(folder / cls / f"{j}.png")
    build_atlas(AtlasJob(sae=str(tiny_bundle / "sae"), dataset=f"imagefolder:{folder}", model=m["model"]["spec"],
                         layer="-2", embedder=m["embedder"]["spec"], out=str(tmp_path / "b"), topk=2, batch_size=8))
    names = [open_bundle(tmp_path / "b").dataset().item(i) for i in range(5)]
    assert names == ["b/0.png", "b/1.png", "c/2.png", "c/3.png", "c/4.png"]
    world[7].save(folder / "b" / "00.png")   # sorts first in b/: ids 0..4 now name other files
    with pytest.raises(UserError, match=r"^the dataset imagefolder:.* no longer lists the 5 images this bundle was "
                                        r"built on in the same order \(it has 6 now"):
        open_bundle(tmp_path / "b").dataset()
    (folder / "b" / "00.png").unlink()
    (folder / "c" / "4.png").rename(folder / "c" / "4b.png")   # renamed: the same count, another name
    with pytest.raises(UserError, match="no longer lists the 5 images"):
        open_bundle(tmp_path / "b").dataset()
    (folder / "c" / "4b.png").rename(folder / "c" / "4.png")
    (folder / "d").mkdir()
    world[7].save(folder / "d" / "7.png")   # a class after the others: ids 0..4 still name the same files
    ds = open_bundle(tmp_path / "b").dataset()
    assert len(ds) == 6 and [ds.item(i) for i in range(5)] == names


def test_a_rerun_on_another_list_of_images_is_refused(tiny_bundle, tmp_path):
    """A killed scan resumed after its image list changed (same length) mixed the two lists, and the bundle recorded
    the new list's digest, so its reader passed it (a reviewer's run: 806 of 4,096 gallery entries and MS up to 0.33
    off; until 2026-12-05). The settings a rerun must match now hold the digest of the images' names: checked
    before any stage, a finished bundle as a killed one; the folder it was built on still resumes."""
    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.bundle import open_bundle
    from sae_core.datasets import open_dataset
    from sae_core.errors import UserError

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    world = open_dataset(m["dataset"]["spec"])
    folder = tmp_path / "photos"
    folder.mkdir()
    for j in range(5):
        world[j].save(folder / f"{j}.png")
    job = dict(sae=str(tiny_bundle / "sae"), dataset=f"imagefolder:{folder}", model=m["model"]["spec"], layer="-2",
               embedder=m["embedder"]["spec"], out=str(tmp_path / "b"), topk=2, batch_size=8)
    built = build_atlas(AtlasJob(**job))
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    (folder / "4.png").rename(folder / "4b.png")  # the same count, another image
    with pytest.raises(UserError) as e:
        build_atlas(AtlasJob(**job))
    assert str(e.value) == (f"{tmp_path / 'b'} was started on other images: the names of the first 5 images of "
                            f"imagefolder:{folder} have changed since (files added, removed or renamed); pass a new "
                            f"--out, or delete {tmp_path / 'b'} to build there from the start.")
    (folder / "4b.png").rename(folder / "4.png")
    assert build_atlas(AtlasJob(**job)) == built
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before


def test_a_rerun_after_the_sae_the_vocabulary_or_an_image_was_rewritten_is_refused(tiny_bundle, tmp_path):
    """An SAE retrained into its own folder, a --vocabulary file rewritten, or an image saved again under its own
    name, and the rerun kept the finished bundle (MS up to 0.62 off, 230 of 256 labels words no longer in the file),
    or finished a killed one with the new SAE's decoder figures beside the old SAE's galleries, each in silence
    (until 2026-12-05). A rerun is held to the SAE file's and the images' size and modification time, and to the
    vocabulary's concepts (the same concepts, written again, still resume)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from precompute.atlas import AtlasJob, build_atlas
    from sae_core.bundle import open_bundle
    from sae_core.datasets import open_dataset
    from sae_core.errors import UserError

    torch.set_num_threads(1)
    m = open_bundle(tiny_bundle).manifest
    world = open_dataset(m["dataset"]["spec"])
    folder, sae, words = tmp_path / "photos", tmp_path / "sae", tmp_path / "words.txt"
    folder.mkdir()
    for j in range(5):
        world[j].save(folder / f"{j}.png")
    shutil.copytree(tiny_bundle / "sae", sae)
    words.write_text("red\nblue\nstar\n")
    out = tmp_path / "b"
    job = dict(sae=str(sae), dataset=f"imagefolder:{folder}", model=m["model"]["spec"], layer="-2",
               embedder=m["embedder"]["spec"], out=str(out), topk=2, batch_size=8, vocabulary=str(words))
    built = build_atlas(AtlasJob(**job))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def refused(what):
        with pytest.raises(UserError) as e:
            build_atlas(AtlasJob(**job))
        assert str(e.value) == (f"{out} was made from other files: {what} changed since (a file's size or modification "
                                f"time); pass a new --out, or delete {out} to build there from the start.")
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    words.write_text("  red\nblue\n\nstar\n")  # the same concepts: resumes
    assert build_atlas(AtlasJob(**job)) == built
    words.write_text("green\nsquare\n")
    refused(f"the concepts of {words}")
    words.write_text("red\nblue\nstar\n")
    weights_path = sae / "sae.safetensors"
    weights = load_file(weights_path)
    mtime = weights_path.stat().st_mtime_ns
    save_file({k: v * 1.5 if k == "W_enc" else v for k, v in weights.items()}, weights_path)
    os.utime(weights_path, ns=(mtime + 10**9, mtime + 10**9))  # (a file system that keeps whole seconds)
    refused(f"the SAE's weights in {sae}")
    shutil.rmtree(sae)
    shutil.copytree(tiny_bundle / "sae", sae)  # copytree keeps the files' times: its own SAE again
    stat = (folder / "2.png").stat()
    world[7].save(folder / "2.png")
    os.utime(folder / "2.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    refused(f"the first 5 images of imagefolder:{folder}")
    world[2].save(folder / "2.png")
    os.utime(folder / "2.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build_atlas(AtlasJob(**job)) == built
    # a bundle of before these digests resumes as made from today's files, and records them from then on
    path = out / ".stages" / "settings.json"
    settings = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in settings.items() if k not in ("sae_file", "images_files")}))
    assert build_atlas(AtlasJob(**job)) == built
    assert json.loads(path.read_text()) == settings


def test_relative_paths_in_specs_are_recorded_absolute_and_resume(tiny_bundle, tiny_world, tmp_path, monkeypatch):
    """`atlas --model hf:clip --dataset imagefolder:data` recorded both (and the embedder) as typed, and the
    explorer, started in a folder holding another ./clip, ranked text searches by that model in silence (elsewhere
    every search failed as a hub download). The manifest records the absolute paths, so the bundle opens its
    images and embedder from any folder, and the same command from the same folder resumes (also over settings
    recorded as typed, and a build killed before its manifest whose scan recorded them so)."""
    import shutil

    from precompute.__main__ import main
    from sae_core.bundle import open_bundle
    from sae_core.datasets import open_dataset
    from sae_core.text_encoders import load_text_embedder

    torch.set_num_threads(1)
    here = tmp_path.resolve() / "work"
    world = open_dataset(f"world:{tiny_world}:val")
    for j, cls in enumerate("bbccc"):
        (here / "photos" / cls).mkdir(parents=True, exist_ok=True)
        world[j].save(here / "photos" / cls / f"{j}.png")
    for name in ("llava", "clip"):  # models/llava: a local folder shaped like a hub id
        shutil.copytree(Path(tiny_world) / name, here / "models" / name)
    monkeypatch.chdir(here)
    argv = ["atlas", "--sae", str(Path(tiny_bundle) / "sae"), "--dataset", "imagefolder:photos", "--model",
            "hf:models/llava", "--layer=-2", "--embedder", "hf:models/clip", "--out", "b", "--topk", "2",
            "--batch-size", "8"]
    assert main(argv) == 0
    m = json.loads((here / "b/manifest.json").read_text())
    assert (m["model"]["spec"], m["dataset"]["spec"], m["embedder"]["spec"]) == (
        f"hf:{here}/models/llava", f"imagefolder:{here}/photos", f"hf:{here}/models/clip")
    settings = json.loads((here / "b/.stages/settings.json").read_text())
    before = {p: p.read_bytes() for p in (here / "b").rglob("*") if p.is_file() and p.name != "log.txt"}

    def resumes():  # finished: nothing runs again, nothing is rewritten
        assert main(argv) == 0
        assert {p: p.read_bytes() for p in (here / "b").rglob("*") if p.is_file() and p.name != "log.txt"} == before

    resumes()
    (here / "b/.stages/settings.json").write_text(json.dumps(
        {**settings, "model": "hf:models/llava", "dataset": "imagefolder:photos", "embedder": "hf:models/clip"}))
    before[here / "b/.stages/settings.json"] = (here / "b/.stages/settings.json").read_bytes()
    resumes()
    # a build killed before its manifest, its scan recorded as typed: the manifest it finishes with is absolute
    scan = json.loads((here / "b/.stages/scan.json").read_text())
    for key, typed in (("model", "hf:models/llava"), ("dataset", "imagefolder:photos"), ("embedder", "hf:models/clip")):
        scan[key]["spec"] = typed
    (here / "b/.stages/scan.json").write_text(json.dumps(scan))
    (here / "b/.stages/thumbs.json").unlink()
    (here / "b/manifest.json").unlink()
    assert main(argv) == 0
    again = json.loads((here / "b/manifest.json").read_text())
    assert [again[k]["spec"] for k in ("model", "dataset", "embedder")] == [m[k]["spec"] for k in ("model", "dataset", "embedder")]
    (here / "elsewhere").mkdir()
    monkeypatch.chdir(here / "elsewhere")
    b = open_bundle(here / "b")
    assert [b.dataset().item(i) for i in range(5)] == ["b/0.png", "b/1.png", "c/2.png", "c/3.png", "c/4.png"]
    assert load_text_embedder(b.local_spec(m["embedder"]["spec"]))(["a red circle"]).shape == (1, m["embedder"]["d"])


def test_an_sae_trained_on_embed_is_refused_in_one_sentence_that_says_what_to_train(tmp_path, capsys):
    """An SAE trained on `--layer embed` (which extract offers) has no patch tokens to atlas: the atlas said "pass
    --layer L", and with --layer -2 that "the SAE expects width 16 but ... layer -2 has width 32; use the SAE
    trained on this model and layer" (it is that SAE), or, where the widths agree (a CLIPVisionModel's embedding
    is its pooled block output), built a bundle of it read on the block's tokens in silence. One sentence now,
    whatever --layer, before anything is written."""
    from precompute.__main__ import main
    from tests import extract_helpers as H

    for folder in (H.world_dir() / "clip", H.clip_vision_dir()):
        model, images, out = f"hf:{folder}", f"imagefolder:{H.image_dir(10)}", tmp_path / folder.name
        assert main(["extract", "--model", model, "--dataset", images, "--out", str(out / "acts"), "--layer",
                     "embed"]) == 0
        assert main(["train", "--activations", str(out / "acts/layer_embed"), "--arch", "topk", "--k", "2",
                     "--expansion", "2", "--steps", "2", "--batch-size", "4", "--out", str(out / "sae")]) == 0
        capsys.readouterr()
        want = (f"error: the SAE in {out / 'sae'} was trained on layer embed (one image embedding, no patch tokens "
                "for galleries or heat maps), and the atlas needs an SAE trained on a block layer's tokens; extract "
                "and train one on a block layer (e.g. --layer -2) and pass that.")
        for layer in ([], ["--layer=-2"], ["--layer", "embed"]):
            assert main(["atlas", "--sae", str(out / "sae"), "--dataset", images, "--model", model, *layer,
                         "--out", str(out / "b"), "--topk", "2"]) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1] == want, (folder, layer)
            assert not (out / "b").exists()
