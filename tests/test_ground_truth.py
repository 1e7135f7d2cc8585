"""World ground truth: purity of top images, simulated users, Spearman, on hand-made cases."""
import math

import numpy as np
import pytest

from sae_core.ground_truth import (FACTOR_TYPES, factor_embedding, factor_table, ground_truth_report,
                                   ideal_neuron_report, ideal_neurons, purity, simulated_user_agreement, spearman,
                                   world_factor_sets)
from sae_core.ontology import top_images
from sae_core.world.generator import WorldSpec, sample_factors


def obj(shape, colour, size="small", position="centre"):
    family = {"circle": "round", "ring": "round", "star": "symbol", "square": "polygon"}[shape]
    group = {"red": "warm", "pink": "warm", "blue": "cool", "grey": "neutral"}[colour]
    return {"shape": shape, "family": family, "colour": colour, "colour_group": group, "size": size,
            "position": position}


def image(*objects, texture="plain"):
    return {"objects": list(objects), "background": {"texture": texture}}


# image id -> world-style factors
IMAGES = {
    0: image(obj("circle", "red", "small", "left"), texture="plain"),
    1: image(obj("circle", "red", "large", "right"), texture="striped"),
    2: image(obj("circle", "red", "small", "top"), texture="dotted"),
    3: image(obj("circle", "red", "large", "centre"), texture="plain"),
    4: image(obj("ring", "pink", "small", "left"), texture="plain"),
    5: image(obj("star", "blue", "small", "left"), obj("circle", "grey", "small", "right"), texture="checked"),
    6: image(obj("square", "blue", "large", "centre"), texture="noisy"),
    7: image(obj("star", "grey", "large", "bottom"), texture="plain"),
}


def test_world_factor_sets_of_real_world_images():
    spec = WorldSpec(seed=3)
    for i in range(40):
        f = sample_factors(spec, "val", i)
        sets = world_factor_sets(f)
        assert set(sets) == set(FACTOR_TYPES)
        assert sets["shape"] == {o["shape"] for o in f["objects"]}
        assert sets["colour_group"] == {o["colour_group"] for o in f["objects"]}
        assert sets["texture"] == {f["background"]["texture"]}


def test_purity_by_hand():
    top = np.array([[0, 1, 2, 3],        # four red circles: sizes 2/2, positions all different, textures 2 plain
                    [0, 4, 5, -1],       # left/left/left+right, plain/plain/checked; 5 has a circle too
                    [6, -1, -1, -1],     # one image: no score
                    [7, 5, 6, 4]])
    r = purity(top, IMAGES.__getitem__)
    s = dict(zip(r.types, r.share.T))
    # neuron 0: shape 1, family 1, colour 1, group 1, size 2/4, position 1/4, texture 2/4
    expect0 = {"shape": 1, "family": 1, "colour": 1, "colour_group": 1, "size": .5, "position": .25, "texture": .5}
    for t, v in expect0.items():
        assert s[t][0] == pytest.approx(v), t
    assert r.purity[0] == pytest.approx(np.mean(list(expect0.values())))
    assert r.shared_count[0] == 4
    # neuron 1 (3 images): circle in 0 and 5 (2/3), round family in all three (ring, circle, circle),
    # size small in all, position left in all, warm in 0 and 4 (2/3), plain 2/3
    expect1 = {"shape": 2 / 3, "family": 1, "colour": 1 / 3, "colour_group": 2 / 3, "size": 1, "position": 1,
               "texture": 2 / 3}
    for t, v in expect1.items():
        assert s[t][1] == pytest.approx(v), t
    assert r.n_valid.tolist() == [4, 3, 1, 4]
    assert r.shared_count[1] == 3
    # neuron 2 has one top image: no purity
    assert math.isnan(r.purity[2]) and r.shared_count[2] == -1 and r.dominant_type[2] is None
    # dominant: several shares of 1 for neuron 0; colour/shape (12-ish values) beat family/group
    assert r.dominant_type[0] in ("shape", "colour") and r.dominant_share[0] == 1
    assert r.dominant_value[0] == {"shape": "circle", "colour": "red"}[r.dominant_type[0]]
    # neuron 1: family, size and position are all shared; position has the most values here
    assert (r.dominant_type[1], r.dominant_value[1]) == ("position", "left")


def test_dominant_prefers_specific_factor():
    imgs = {0: {"colour": "red", "colour_group": "warm"}, 1: {"colour": "red", "colour_group": "warm"},
            2: {"colour": "blue", "colour_group": "cool"}}
    r = purity(np.array([[0, 1], [0, 2]]), imgs)
    assert (r.dominant_type[0], r.dominant_value[0]) == ("colour", "red")
    assert r.shared_count.tolist() == [2, 0]
    assert r.purity.tolist() == [1.0, 0.5]


def test_min_share_threshold():
    # 15 images share red, one is blue: shared at 15/16, not at 1.0
    imgs = {i: {"colour": "red"} for i in range(15)} | {15: {"colour": "blue"}}
    top = np.arange(16)[None]
    assert purity(top, imgs).shared_count[0] == 1
    assert purity(top, imgs, min_share=1.0).shared_count[0] == 0


def test_simulated_user_agreement_by_hand():
    ms = np.array([0.9, 0.5, 0.1, np.nan, 0.7])
    counts = np.array([3, 1, 1, 2, -1])       # neuron 3 has no MS, neuron 4 no ground truth
    r = simulated_user_agreement(ms, counts, n_pairs=None)
    # pairs among 0,1,2: (0,1) agree, (0,2) agree, (1,2) equal counts -> skipped
    assert (r.agreement, r.n_pairs, r.n_preference_ties) == (1.0, 2, 1)
    r = simulated_user_agreement(np.array([0.1, 0.5, 0.9]), np.array([3, 2, 1]), n_pairs=None)
    assert (r.agreement, r.n_pairs) == (0.0, 3)


def test_sampled_pairs_estimate_all_pairs():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, 300)
    ms = counts + rng.normal(0, 1.5, 300)
    exact = simulated_user_agreement(ms, counts, n_pairs=None)
    sampled = simulated_user_agreement(ms, counts, n_pairs=20000, seed=1)
    assert exact.n_pairs + exact.n_preference_ties == 300 * 299 // 2
    assert abs(sampled.agreement - exact.agreement) < 0.02
    assert sampled.n_pairs + sampled.n_preference_ties == 20000
    # sampled pairs are of two different neurons: with every count distinct none lacks a preference (a neuron
    # drawn against itself was a preference tie)
    distinct = simulated_user_agreement(np.linspace(0, 1, 50), np.arange(50), n_pairs=500, seed=0)
    assert (distinct.n_pairs, distinct.n_preference_ties, distinct.n_ms_ties) == (500, 0, 0)


def test_spearman_by_hand():
    a = [1, 2, 3, 4, 5]
    b = [2, 1, 4, 3, 5]
    d2 = sum((x - y) ** 2 for x, y in zip(a, b))              # ranks equal the values here
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))
    # ties: a ranks (1, 2.5, 2.5, 4), b ranks (1, 2, 3, 4); Pearson of those ranks
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert spearman([10, 20, 20, 30], [1, 2, 3, 4]) == pytest.approx((ra @ rb) / math.sqrt((ra @ ra) * (rb @ rb)))
    # NaN entries are dropped pairwise; monotone transforms do not matter
    assert spearman([1, np.nan, 3, 4, 5], [1, 100, 9, 16, 25]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1.0, 2.0, np.nan], [2.0, 1.0, 5.0]))  # two finite pairs: NaN, as documented


def test_ground_truth_report_and_table():
    top = np.array([[0, 1, 2, 3], [0, 4, 5, -1], [6, -1, -1, -1], [7, 5, 6, 4]])
    table = factor_table(IMAGES, top.ravel())
    assert table.ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    rep = ground_truth_report(np.array([0.8, 0.4, 0.3, 0.1]), top, table=table, n_pairs=None)
    p = purity(top, IMAGES)
    # purity: neuron 0 (4 factors fully shared, 3 weakly) 5.25/7, neuron 1 (3 fully, 4 partly) 16/3/7,
    # neuron 3 (every factor 2 of 4) 0.5: ranks (2, 3, 1) against MS ranks (3, 2, 1)
    assert p.purity[[0, 1, 3]] == pytest.approx([5.25 / 7, 16 / 3 / 7, 0.5])
    assert rep["ms_ground_truth_spearman"] == pytest.approx(1 - 6 * (1 + 1 + 0) / (3 * (9 - 1)))
    # the simulated users count fully shared factors: 4 > 3 > 0, the MS order
    assert rep["purity"][2] is None and rep["n_neurons_scored"] == 3
    assert rep["purity"][0] == pytest.approx(float(p.purity[0]))
    assert rep["ms_agreement"] == pytest.approx(1.0)
    assert rep["dominant_value"][1] == "left"


def test_ms_with_an_oracle_embedder_tracks_purity():
    """Synthetic neurons that fire on conjunctions of 1-3 world factor values (plus random firing),
    scored by MS with a ground-truth embedder (one-hot factor values, one unit block per type):
    MS and the top-16 purity must rank them alike, and the simulated users must mostly agree."""
    from sae_core.monosemanticity import monosemanticity_score

    spec, n = WorldSpec(seed=0), 1000
    table = factor_table([sample_factors(spec, "val", i) for i in range(n)], np.arange(n))
    emb = np.concatenate([m / np.maximum(m.sum(1, keepdims=True), 1) for m in table.member], 1)
    rng = np.random.default_rng(0)
    acts = np.zeros((n, 150))
    for k in range(acts.shape[1]):
        sel = np.ones(n, bool)
        for t in rng.choice(len(table.types), rng.integers(1, 4), replace=False):
            sel &= table.member[t][:, rng.integers(table.member[t].shape[1])]
        fire = sel | (rng.random(n) < rng.random() * 0.06)
        acts[:, k] = np.where(fire, rng.exponential(1.0, n), 0.0)
    ms = monosemanticity_score(acts, emb).ms
    order = np.argsort(-acts, 0, kind="stable")[:16].T
    top = np.where(np.take_along_axis(acts.T, order, 1) > 0, order, -1)
    rep = ground_truth_report(ms, top, table=table, n_pairs=None)
    assert rep["ms_ground_truth_spearman"] > 0.6
    assert rep["ms_agreement"] > 0.7


def test_factor_embedding_cosine_counts_shared_factors():
    """Single-object images: the cosine of two factor embeddings is (shared factor types) / 7."""
    table = factor_table(IMAGES, list(IMAGES))
    e = factor_embedding(table, [0, 1, 3, 6])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    # 0 and 3: circle, round, red, warm, small/large, left/centre, plain/plain -> 5 shared of 7
    assert float(e[0] @ e[2]) == pytest.approx(5 / 7)
    # 0 and 1: shape, family, colour, group shared; size, position, texture differ -> 4 of 7
    assert float(e[0] @ e[1]) == pytest.approx(4 / 7)
    # 0 and 6: nothing shared
    assert float(e[0] @ e[3]) == pytest.approx(0.0)
    # image 5 has two objects: its shape block puts 1/2 on star and 1/2 on circle
    e5 = factor_embedding(table, [5])[0]
    shape_block = e5[:len(table.values[0])]
    assert sorted(shape_block[shape_block > 0].tolist()) == [0.5, 0.5]
    with pytest.raises(ValueError):
        factor_embedding(table, [-1])


def test_ideal_neurons_fire_on_exactly_one_conjunction():
    """Each ideal neuron's firing set is closed: it holds every image that has all the factor values
    its firing images have in common (so it is the conjunction of those values), with >= 16 images."""
    spec, n = WorldSpec(seed=0), 600
    table = factor_table([sample_factors(spec, "val", i) for i in range(n)], np.arange(n))
    acts = ideal_neurons(table, n_neurons=60, seed=1)
    assert acts.shape == (n, 60) and acts.min() >= 0 and acts.max() <= 1
    for j in range(60):
        fires = acts[:, j] > 0
        assert fires.sum() >= 16 and np.all(acts[fires, j] > 0.5)
        common = np.ones(n, bool)
        for m in table.member:
            shared = m[fires].all(0)                      # values every firing image has
            common &= m[:, shared].all(1)
        np.testing.assert_array_equal(fires, common)
    np.testing.assert_array_equal(ideal_neurons(table, 60, seed=1), acts)      # a pure function of the seed
    top = top_images(acts)
    assert top.shape == (60, 16)
    for j in range(60):
        np.testing.assert_array_equal(np.sort(acts[top[j], j])[::-1], np.sort(acts[:, j])[::-1][:16])


def test_ideal_neurons_with_a_perfect_embedder_agree_with_the_users():
    """The calibration's premise, measured: perfectly monosemantic neurons scored with a perfect
    embedder rank as the simulated users do (measured: agreement 0.92, Spearman 0.86 on this world),
    and an embedder that knows nothing of the images does not (measured 0.44 and -0.15)."""
    spec, n = WorldSpec(seed=0), 1500
    table = factor_table([sample_factors(spec, "val", i) for i in range(n)], np.arange(n))
    rep = ideal_neuron_report(table, factor_embedding(table, table.ids), n_neurons=300, n_pairs=None)
    assert rep["ms_agreement"] > 0.85 and rep["ms_ground_truth_spearman"] > 0.8
    rng = np.random.default_rng(0)
    noisy = np.asarray(rng.normal(size=(n, 8)), np.float32)  # an embedder that knows nothing
    rep_noise = ideal_neuron_report(table, noisy, n_neurons=300, n_pairs=None)
    assert rep_noise["ms_agreement"] < 0.6 and rep_noise["ms_ground_truth_spearman"] < 0.2
    with pytest.raises(ValueError):
        ideal_neuron_report(table, noisy[:10])
