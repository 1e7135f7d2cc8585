"""Matryoshka hierarchy: parents by decoder cosine and co-activation against brute force, LCA depth
against hand-made paths, the tree's JSON."""
import itertools
import json

import numpy as np
import pytest
import torch

from sae_core.hierarchy import (CoactivationCounter, build_tree, decoder_parents, lca_depth, level_bounds,
                                level_of, parent_agreement, taxonomy_depth, tree_parents)
from sae_core.sparse_ops import codes_from_mask

GROUPS = (3, 5, 9)  # K = 17: levels [0,3), [3,8), [8,17)


def test_levels():
    assert level_bounds(GROUPS, 17).tolist() == [0, 3, 8, 17]
    assert level_of(GROUPS, 17).tolist() == [0] * 3 + [1] * 5 + [2] * 9
    assert level_of((), 4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        level_bounds((3, 5), 17)


def test_decoder_parent_is_the_planted_one():
    # Children are their planted parent plus a smaller orthogonal-ish perturbation, rows rescaled
    # (cosine must not care about norms).
    rng = np.random.default_rng(0)
    d = 32
    planted = {}
    W = np.zeros((17, d))
    W[:3] = np.linalg.qr(rng.standard_normal((d, 3)))[0].T  # orthonormal level 0
    for j in range(3, 8):
        planted[j] = int(rng.integers(0, 3))
        W[j] = W[planted[j]] + 0.4 * rng.standard_normal(d) / np.sqrt(d)
    for j in range(8, 17):
        planted[j] = int(rng.integers(3, 8))
        W[j] = W[planted[j]] + 0.2 * rng.standard_normal(d) / np.sqrt(d)
    W *= rng.uniform(0.5, 3.0, size=(17, 1))
    parent, cos = decoder_parents(torch.tensor(W, dtype=torch.float32), GROUPS, chunk=2)
    assert parent[:3].tolist() == [-1, -1, -1] and np.isnan(cos[:3]).all()
    # brute force: every pair written out
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    for j in range(3, 17):
        lo, hi = (0, 3) if j < 8 else (3, 8)
        sims = [float(Wn[i] @ Wn[j]) for i in range(lo, hi)]
        assert parent[j] == lo + int(np.argmax(sims))
        assert cos[j] == pytest.approx(max(sims), abs=1e-5)
        assert parent[j] == planted[j]
    # Ties and signs: level-0 rows 0 and 1 are the same direction, so child 3 is equally close to both and the
    # lowest index must win (a tie went to the highest index); child 4 is anti-parallel to rows 0 and 1 and
    # nearly orthogonal to row 2: the parent is the largest SIGNED cosine, row 2 (|cos| would pick row 0).
    W2 = np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0.9, 0.1, 0], [-1.0, 0.1, 0]])
    parent2, cos2 = decoder_parents(torch.tensor(W2, dtype=torch.float32), (3, 2))
    Wn2 = W2 / np.linalg.norm(W2, axis=1, keepdims=True)
    ref2 = [int(np.argmax(Wn2[:3] @ Wn2[j])) for j in (3, 4)]  # np.argmax: the first maximum
    assert parent2[3:].tolist() == ref2 == [0, 2], parent2
    np.testing.assert_allclose(cos2[3:], [max(Wn2[:3] @ Wn2[j]) for j in (3, 4)], atol=1e-6)


def brute_force_coact_parents(F, bounds):
    """parent(j) = argmax_i P(i|j) - P(i) over i in the level above, from the 0/1 matrix F (N, K)."""
    N, K = F.shape
    parent = np.full(K, -1)
    score = np.full(K, np.nan)
    for g in range(len(bounds) - 2):
        for j in range(bounds[g + 1], bounds[g + 2]):
            best, best_i = -np.inf, -1
            for i in range(bounds[g], bounds[g + 1]):
                both = int(sum(F[n, i] and F[n, j] for n in range(N)))
                if both == 0:
                    continue
                s = both / F[:, j].sum() - F[:, i].sum() / N
                if s > best:
                    best, best_i = s, i
            if best_i >= 0:
                parent[j], score[j] = best_i, best
    return parent, score


def planted_codes(n_rows, seed=0):
    """Codes where child j fires only when its planted parent fires; level-0 latent 0 fires almost
    everywhere (the dense latent that P(i|j) alone would pick for every child)."""
    rng = np.random.default_rng(seed)
    K = 17
    F = np.zeros((n_rows, K), bool)
    F[:, 0] = rng.random(n_rows) < 0.95
    planted = {j: 1 + (j % 2) for j in range(3, 8)}  # level 1 children of latents 1 and 2
    planted.update({j: 3 + (j % 5) for j in range(8, 17)})
    F[:, 1] = rng.random(n_rows) < 0.3
    F[:, 2] = rng.random(n_rows) < 0.3
    for j in range(3, 17):  # mostly inside the parent's rows, with a little noise outside them
        F[:, j] = (F[:, planted[j]] & (rng.random(n_rows) < 0.5)) | (rng.random(n_rows) < 0.04)
    F[:, 16] = False  # a dead latent: no parent
    vals = np.where(F, rng.uniform(0.1, 2.0, F.shape), 0.0).astype(np.float32)
    return vals, planted


@pytest.mark.parametrize("budget,pairs_per_output,sparse_pair_bytes,final",
                         [(1 << 30, 10, 16, "dense"), (1 << 30, 0, 16, "dense"), (0, 10, 0, "sparse"),
                          (0, 0, 16, "dense")])
def test_coactivation_parents_against_brute_force(budget, pairs_per_output, sparse_pair_bytes, final, monkeypatch):
    """Dense counts added by 0/1 matrix products (these rows' pairs fill their small matrices), dense
    counts added by listing the pairs (products disabled), the sparse count of the pairs seen (the
    switch to dense disabled), and a sparse count that switches to dense once it outweighs it."""
    import sae_core.hierarchy as H

    monkeypatch.setattr(H, "_PAIRS_PER_OUTPUT", pairs_per_output)
    monkeypatch.setattr(H, "_SPARSE_PAIR_BYTES", sparse_pair_bytes)
    monkeypatch.setattr(H, "_SPARSE_FLUSH", 1)  # merge every batch: a switch happens mid-stream, rows follow
    product: list[bool] = []  # what each call of the product path did (True: it added the batch)
    real = H.CoactivationCounter._add_by_product
    monkeypatch.setattr(H.CoactivationCounter, "_add_by_product",
                        lambda self, *a: product.append(real(self, *a)) or product[-1])
    vals, planted = planted_codes(300)
    F = vals > 0
    bounds = level_bounds(GROUPS, 17)
    ref_parent, ref_score = brute_force_coact_parents(F, bounds)
    counter = CoactivationCounter(GROUPS, 17, dense_budget_bytes=budget)
    assert counter.modes == (["dense", "dense"] if budget else ["sparse", "sparse"])
    # stream in uneven batches, in all three input forms
    for s, e in [(0, 7), (7, 100), (100, 101), (101, 300)]:
        batch = vals[s:e]
        if s == 0:
            counter.update(torch.from_numpy(batch))
        elif s == 7:  # index lists may repeat a (row, latent) pair: each counts once (a repeat counted twice)
            rows, cols = np.nonzero(batch)
            counter.update((np.r_[rows, rows[::4]], np.r_[cols, cols[::4]], e - s))
        elif s == 100:
            counter.update(batch)
        else:
            t = torch.from_numpy(batch)
            rows, cols = (t > 0).nonzero(as_tuple=True)
            counter.update(codes_from_mask(rows, cols, e - s, 17))
    assert counter.n_rows == 300
    np.testing.assert_array_equal(counter.fire_counts, F.sum(0))
    np.testing.assert_array_equal(counter.pair_counts(0), F[:, 0:3].T.astype(int) @ F[:, 3:8].astype(int))
    np.testing.assert_array_equal(counter.pair_counts(1), F[:, 3:8].T.astype(int) @ F[:, 8:17].astype(int))
    assert counter.modes == [final, final] and any(product) == bool(budget and pairs_per_output)
    parent, score = counter.parents()
    np.testing.assert_array_equal(parent, ref_parent)
    np.testing.assert_allclose(score, ref_score, rtol=1e-6)
    # and the planted hierarchy is what it finds (not the dense latent 0), the dead latent has none
    assert all(parent[j] == planted[j] for j in range(3, 16)), parent
    # P(i | j) alone would have picked the dense latent 0 for some level-1 children
    cond = [int(np.argmax([(F[:, i] & F[:, j]).sum() for i in range(3)])) for j in range(3, 8)]
    assert 0 in cond
    assert parent[16] == -1 and np.isnan(score[16])
    # ties: level-0 latents 1 and 2 fire on the same rows, and so do level-1 latents 3 and 4, so their children
    # score the same on both; the lowest index wins, as the brute force's strict > keeps the first (a tie went to
    # the highest index)
    F2 = F.copy()
    F2[:, 2], F2[:, 4] = F2[:, 1], F2[:, 3]
    tied = CoactivationCounter(GROUPS, 17, dense_budget_bytes=budget)
    tied.update(F2.astype(np.float32))
    ref_tied, _ = brute_force_coact_parents(F2, bounds)
    assert tied.modes == [final, final] and 1 in ref_tied[3:8] and 3 in ref_tied[8:17], ref_tied
    np.testing.assert_array_equal(tied.parents()[0], ref_tied)


def test_dense_counts_widen_before_they_could_overflow():
    F = np.random.default_rng(3).random((40, 17)) < 0.5
    counter = CoactivationCounter(GROUPS, 17)
    counter.update(F[:20])
    assert counter._dense[0].dtype == np.int32
    counter.n_rows = np.iinfo(np.int32).max - 15  # as if 2^31 rows had been counted: the next batch widens
    counter.update(F[20:])
    assert counter._dense[0].dtype == np.int64
    np.testing.assert_array_equal(counter.pair_counts(1), F[:, 3:8].T.astype(int) @ F[:, 8:17].astype(int))


def test_codes_of_the_wrong_width_are_refused_before_anything_is_counted():
    """A torch batch's width was never checked: 16 columns for 17 latents were counted on the wrong latents, and 18
    failed in numpy's words after the row count had moved (until 2026-12-05); arrays were already refused."""
    F = np.random.default_rng(4).random((10, 17)) < 0.5
    counter = CoactivationCounter(GROUPS, 17)
    counter.update(torch.from_numpy(F))
    for bad in (F[:, :16], F[:, :16].astype(np.float32), np.c_[F, F[:, :1]], F.reshape(2, 5, 17)):
        for form in (bad, torch.from_numpy(np.ascontiguousarray(bad))):
            with pytest.raises(ValueError, match=r"^codes of shape .* do not have 17 columns$"):
                counter.update(form)
    assert counter.n_rows == 10
    np.testing.assert_array_equal(counter.pair_counts(1), F[:, 3:8].T.astype(int) @ F[:, 8:17].astype(int))


def test_sparse_memory_stays_below_dense():
    # 64 + 2048 + 4096 latents, 8 active per row: the dense 2048 x 4096 count would be 64 MiB.
    groups = (64, 2048, 4096)
    K = sum(groups)
    rng = np.random.default_rng(1)
    counter = CoactivationCounter(groups, K, dense_budget_bytes=1 << 20)
    assert counter.modes == ["dense", "sparse"]
    for _ in range(5):
        rows = np.repeat(np.arange(512), 8)
        cols = np.concatenate([rng.choice(K, 8, replace=False) for _ in range(512)])
        counter.update((rows, cols, 512))
    parent, _ = counter.parents()
    assert counter.memory_bytes < 8 << 20
    assert (parent[:64] == -1).all() and ((parent[64:2112] == -1) | (parent[64:2112] < 64)).all()


def test_lca_depth_on_hand_made_paths():
    a = ["Animalia", "Chordata", "Aves", "Passeriformes"]
    assert lca_depth(a, a) == 4
    assert lca_depth(a, ["Animalia", "Chordata", "Mammalia", "Carnivora"]) == 2
    assert lca_depth(a, ["Plantae", "Chordata", "Aves", "Passeriformes"]) == 0  # same names lower down do not count
    assert lca_depth(a, a[:3]) == 3


def test_taxonomy_depth_per_neuron_and_level():
    paths = {
        0: ["round", "circle", "warm", "red"],
        1: ["round", "circle", "warm", "red"],
        2: ["round", "circle", "cool", "blue"],
        3: ["round", "oval", "warm", "red"],
        4: ["symbol", "star", "warm", "red"],
        5: None,  # an image without a path is skipped
        6: ["polygon", "square", "cool", "blue", "extra"],  # a longer path
    }
    top = np.array([
        [0, 1, -1, -1],   # one pair, depth 4
        [0, 2, 3, 4],     # pairs: 0-2:2, 0-3:1, 0-4:0, 2-3:1, 2-4:0, 3-4:0 -> 4/6
        [5, 0, -1, -1],   # only one image with a path: no score
        [6, 2, 5, 6],     # 6-2:0, 6-6:5, 2-6:0 -> 5/3
    ])
    level = np.array([0, 0, 1, 1])
    per_level, per_neuron = taxonomy_depth(top, level, paths, n_top=4)
    # brute force with the definition written out
    ref = []
    for row in top:
        ps = [paths[i] for i in row if i >= 0 and paths[i]]
        pairs = list(itertools.combinations(ps, 2))
        ref.append(np.mean([lca_depth(x, y) for x, y in pairs]) if pairs else np.nan)
    np.testing.assert_allclose(per_neuron, ref)
    np.testing.assert_allclose(per_neuron[:2], [4.0, 4 / 6])
    assert per_level[0] == pytest.approx((4 + 4 / 6) / 2) and per_level[1] == pytest.approx(5 / 3)
    # n_top cuts the gallery; a callable works like a mapping
    per_level2, per_neuron2 = taxonomy_depth(top, level, lambda i: paths[i], n_top=2)
    assert per_neuron2[1] == 2.0 and np.isnan(per_neuron2[2])
    # an image listed twice whose path is shorter than the longest: its pair with itself is its own depth (4),
    # where its padding codes matched each other and scored the longest path's 5
    twice = np.array([[3, 3, 6, -1]])
    _, depth = taxonomy_depth(twice, np.array([0]), paths, n_top=4)
    want = np.mean([lca_depth(paths[3], paths[3]), lca_depth(paths[3], paths[6]), lca_depth(paths[3], paths[6])])
    assert depth[0] == pytest.approx(want) == 4 / 3


def test_index_lists_outside_the_counters_latents_or_rows_are_refused():
    """(rows, cols, n_rows) with a latent past K, or -1, was counted on the next (or last) latent in silence: a
    pair is keyed row * K + col."""
    for rows, cols, n_rows in (([0], [4], 1), ([0], [-1], 1), ([1], [0], 1)):
        c = CoactivationCounter((2, 2), 4)
        with pytest.raises(ValueError, match="outside"):
            c.update((np.array(rows), np.array(cols), n_rows))
        assert c.fire_counts.tolist() == [0, 0, 0, 0]
    c = CoactivationCounter((2, 2), 4)
    c.update((np.array([0, 0]), np.array([1, 3]), 1))
    assert c.fire_counts.tolist() == [0, 1, 0, 1]


def test_tree_is_json_and_consistent():
    level = level_of(GROUPS, 17)
    parent = np.array([-1, -1, -1, 0, 0, 1, 2, 2] + [3, 4, 5, 6, 7, 3, 4, 5, 6])
    coact = parent.copy()
    coact[9] = 3
    ms = np.linspace(0, 1, 17)
    ms[5] = np.nan
    tree = build_tree(level, parent, labels=[f"c{k}" for k in range(17)], ms=ms, parent_coact=coact,
                      depth_per_level=[1.5, 2.0, float("nan")])
    tree = json.loads(json.dumps(tree, allow_nan=False))  # strict JSON: NaN became null
    assert tree["roots"] == [0, 1, 2] and tree["n_levels"] == 3
    assert [lv["size"] for lv in tree["levels"]] == [3, 5, 9]
    assert tree["depth_per_level"] == [1.5, 2.0, None]
    assert tree["nodes"][5]["ms"] is None and tree["nodes"][9]["parent"] == 4 and tree["nodes"][9]["parent_coact"] == 3
    assert tree["parent_agreement"] == pytest.approx(13 / 14)
    for n in tree["nodes"]:  # every parent sits one level up
        if n["parent"] >= 0:
            assert tree["nodes"][n["parent"]]["level"] == n["level"] - 1
    assert parent_agreement(parent, coact) == pytest.approx(13 / 14)


def test_tree_parents_prefer_coactivation():
    coact = np.array([-1, -1, 0, -1, 1])
    cos = np.array([-1, -1, 1, 0, 0])
    parent, from_coact = tree_parents(coact, cos)
    assert parent.tolist() == [-1, -1, 0, 0, 1] and from_coact.tolist() == [False, False, True, False, True]
