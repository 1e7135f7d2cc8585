"""Representation probes: ROC metrics, OOD detectors, ontology agreement, cross-modal score, linear probes."""
import itertools
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from sae_core.crossmodal import cross_modal_scores, patch_concepts
from sae_core.ontology import assign_nodes, taxonomy_distances, top_images, tree_agreement
from sae_core.ood import calibrated_surprise, combine_calibrated, knn_distance, mahalanobis_fit, set_novelty
from sae_core.probes import fit_probe, split_combinations
from sae_core.roc import auroc, auroc_columns, fpr_at_tpr, roc_curve, thin_curve


# ----------------------------------------------------------------------------------------------
# ROC metrics against their definitions
# ----------------------------------------------------------------------------------------------
def brute_auroc(pos, neg):
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])


def brute_fpr95(pos, neg):
    best = 1.0
    for t in np.unique(np.r_[pos, neg]):
        tpr = np.mean(pos >= t)
        if tpr >= 0.95:
            best = min(best, np.mean(neg >= t))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_fpr95_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 8, 60).astype(float) + (seed == 2) * rng.normal(size=60)  # ties unless seed 2
    neg = rng.integers(-2, 6, 90).astype(float)
    assert auroc(pos, neg) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)
    assert fpr_at_tpr(pos, neg, 0.95) == pytest.approx(brute_fpr95(pos, neg), abs=1e-12)
    fpr, tpr, _ = roc_curve(pos, neg)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auroc(pos, neg), abs=1e-12)  # ties: diagonal steps
    # the plotted curve: at most max_points of the curve's own points, in order, both ends kept (the (1, 1) end
    # was dropped); a curve shorter than max_points is kept whole
    points = list(zip(np.round(fpr, 5).tolist(), np.round(tpr, 5).tolist()))
    for max_points in (7, len(fpr) + 5):
        f, t = thin_curve(fpr, tpr, max_points)
        assert len(f) == len(t) == min(len(fpr), max_points)
        assert (f[0], t[0], f[-1], t[-1]) == (0, 0, 1, 1)
        at = [points.index(p) for p in zip(f, t)]  # each kept point is one of the curve's, in the curve's order
        assert at == sorted(set(at)) and at[-1] == len(points) - 1


def test_auroc_edge_cases_and_columns():
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0 and auroc([1, 1], [1]) == 0.5
    assert fpr_at_tpr([2, 3], [0, 1]) == 0.0
    with pytest.raises(ValueError):
        auroc([], [1.0])
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (50, 3)).astype(float)
    labels = rng.random((50, 2)) < 0.3
    got = auroc_columns(scores, labels)
    for k, c in itertools.product(range(3), range(2)):
        assert got[k, c] == pytest.approx(brute_auroc(scores[labels[:, c], k], scores[~labels[:, c], k]))


# ----------------------------------------------------------------------------------------------
# OOD detectors against textbook formulas
# ----------------------------------------------------------------------------------------------
def test_detectors_match_definitions():
    rng = np.random.default_rng(0)
    bank, q = rng.normal(size=(40, 5)), rng.normal(size=(7, 5))
    un = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    dist = 1 - un(q) @ un(bank).T
    assert np.allclose(knn_distance(bank, q, k=3), np.sort(dist, axis=1)[:, 2], atol=1e-6)
    # Mahalanobis with the module's shrinkage, written out
    mu = bank.mean(0)
    cov = np.cov(bank.T)
    cov += 1e-3 * np.trace(cov) / 5 * np.eye(5)
    ref = np.einsum("nd,de,ne->n", q - mu, np.linalg.inv(cov), q - mu)
    assert np.allclose(mahalanobis_fit(bank)(q), ref, rtol=1e-8)
    labels = np.arange(40) % 2
    means = [bank[labels == c].mean(0) for c in (0, 1)]
    within = np.concatenate([bank[labels == c] - means[c] for c in (0, 1)])
    cov = within.T @ within / 39
    cov += 1e-3 * np.trace(cov) / 5 * np.eye(5)
    P = np.linalg.inv(cov)
    ref = np.min([np.einsum("nd,de,ne->n", q - m, P, q - m) for m in means], axis=0)
    assert np.allclose(mahalanobis_fit(bank, labels)(q), ref, rtol=1e-8)
    # set novelty: 1 - max Jaccard of active sets, brute force
    A, Q = rng.random((30, 12)) * (rng.random((30, 12)) < 0.3), rng.random((6, 12)) * (rng.random((6, 12)) < 0.3)
    jac = lambda a, b: len(a & b) / len(a | b) if a | b else 1.0  # noqa: E731
    sets = [set(np.flatnonzero(r)) for r in A]
    ref = [1 - max(jac(set(np.flatnonzero(r)), s) for s in sets) for r in Q]
    assert np.allclose(set_novelty(A, Q), ref)


def test_calibrated_combination_matches_brute_force():
    rng = np.random.default_rng(5)
    cal = {"a": rng.integers(0, 10, 50).astype(float), "b": rng.normal(size=50)}
    scores = {"a": np.r_[rng.integers(-2, 13, 20).astype(float), cal["a"][:5]], "b": rng.normal(size=25) * 2}
    ref = {n: np.array([-np.log((np.sum(cal[n] >= x) + 1) / 51) for x in scores[n]]) for n in cal}
    for n in cal:
        assert np.allclose(calibrated_surprise(cal[n], scores[n]), ref[n])
    assert np.allclose(combine_calibrated(scores, cal, ["a", "b"]), (ref["a"] + ref["b"]) / 2)
    # a score above every calibration score gets the smallest p, 1 / (n + 1); below all of them p = 1
    assert calibrated_surprise(cal["b"], [1e9, -1e9]) == pytest.approx([np.log(51), 0.0])


def test_residual_features_match_a_per_image_loop(tiny_bundle):
    from sae_core.bundle import open_bundle
    from sae_core.datasets import open_dataset
    from sae_core.image_features import bundle_source, extract_features

    bundle = open_bundle(tiny_bundle)
    source = bundle_source(bundle)
    ds = open_dataset(f"world:{bundle.world_dir}:val")
    feats = extract_features(source, ds, 5, batch_size=2)
    ad, sae = source.adapter, source.sae
    layer = ad.resolve_layer(source.layer)
    n_prefix = ad.layout.n_prefix
    with torch.no_grad():
        for row, i in enumerate(feats.ids):
            x = ad.capture(ad.preprocess([ds[int(i)]]), [layer])[layer.name][0].float()  # (T, d)
            res = [float(torch.linalg.norm(x[t] - sae.decode(sae.encode(x[t:t + 1]))[0]))
                   for t in range(n_prefix, x.shape[0])]
            assert feats.resid_max[row] == pytest.approx(max(res), rel=1e-4, abs=1e-6)
            rel = [r * r / float((x[t] ** 2).sum()) for r, t in zip(res, range(n_prefix, x.shape[0]))]
            assert feats.recon_max[row] == pytest.approx(max(rel), rel=1e-3, abs=1e-6)


def test_the_best_detector_of_a_tie_is_the_one_the_table_shows_first():
    """On equal AUROCs ood.json named the alphabetically last detector best, while the explorer's table (highest
    AUROC first, then by name) put the first on top: the note and the table named different winners."""
    from sae_core.ood import OODResult

    res = OODResult(methods={n: {"auroc": a, "family": "sae"} for n, a in
                             (("sae_b", 0.9), ("sae_a", 0.9), ("sae_c", 0.95), ("sae_d", 0.5))})
    assert res.best("sae") == ("sae_c", 0.95)
    res.methods["sae_c"]["auroc"] = 0.9
    assert res.best("sae") == ("sae_a", 0.9) and res.best("raw") == (None, None)


def test_ood_command_end_to_end(probe_outputs):
    res, out = probe_outputs.ood, probe_outputs.bundle / "probes"  # --fit-images 800 --max-images 200 --cal-images 150
    methods = res["methods"]
    assert any(n.startswith("sae_") for n in methods) and {"raw_knn", "raw_mahalanobis", "raw_msp"} <= set(methods)
    assert {"sae_resid_max", "sae_combined", "raw_combined"} <= set(methods)
    # calibration images come right after the fit images of the train split, never from the evaluated sets
    assert res["fit"]["n_images"] == 800 and res["calibration"]["n_images"] == 150
    assert res["calibration"]["which"].startswith("fit-set images 800-949")
    for m in methods.values():
        assert 0 <= m["auroc"] <= 1 and 0 <= m["fpr95"] <= 1
        assert set(m["auroc_by_group"]) <= {"shape", "colour", "both"}
    top = max(m["auroc"] for n, m in methods.items() if n.startswith("sae_"))
    assert res["best_sae"] == {"method": min(n for n, m in methods.items() if n.startswith("sae_") and m["auroc"] == top),
                               "auroc": top}
    assert res["fit"]["spec"].endswith(":train") and res["ood"]["spec"].endswith(":ood")
    saved = json.loads((out / "ood.json").read_text())
    for name, curve in saved["curves"].items():  # the curve's area is the AUROC it reports
        assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(methods[name]["auroc"], abs=0.02)
    assert (out / "ood.html").stat().st_size > 10_000
    # the colour detectors see the held-out colour: SAE and raw kNN well above chance on it
    assert methods["sae_knn"]["auroc_by_group"]["colour"] > 0.6 and methods["raw_knn"]["auroc_by_group"]["colour"] > 0.6


# ----------------------------------------------------------------------------------------------
# Ontology: a tree that follows the taxonomy beats a shuffled one
# ----------------------------------------------------------------------------------------------
def test_a_killed_probe_runs_temporaries_go(probe_outputs):
    """The probe commands never removed what a kill inside an atomic write left (a cut feature cache can be GBs,
    one more per kill; until 2026-12-05). The fixture planted a dead writer's temporaries of ood.json, ood.html and
    a cache file, and a live writer's (this process) in the cache the three commands share: the runs removed the
    dead ones and kept the live one."""
    probes = probe_outputs.bundle / "probes"
    left = sorted(str(p.relative_to(probes)) for p in probes.rglob(".*.tmp*"))
    assert left == [f".features/.live.npz.tmp{os.getpid()}"], left


def test_tree_agreement_on_a_known_taxonomy():
    leaves = [(f, s, c) for f in "ab" for s in "xyz" for c in "pq"]
    nodes = [leaves[i % len(leaves)] for i in range(48)]
    tax = taxonomy_distances(nodes)
    # brute force: path length between nodes = depth a + depth b - 2 * shared prefix
    i, j = 3, 17
    shared = next(n for n in range(4) if n == 3 or nodes[i][n] != nodes[j][n])
    k = i * 48 - i * (i + 1) // 2 + (j - i - 1)
    assert tax[k] == 6 - 2 * shared
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(0)
    dist = squareform(tax) + 0.3 * rng.random((48, 48))  # the taxonomy's own distances, a little noise
    good = tree_agreement(dist, nodes, n_perm=30)
    shuffled = tree_agreement(dist, [nodes[p] for p in rng.permutation(48)], n_perm=30)
    assert good.score > 0.9 and good.z > 5
    assert shuffled.score < 0.3 and good.score > shuffled.score + 0.6


def test_assign_nodes_from_top_images():
    paths = {0: ["a", "x"], 1: ["a", "x"], 2: ["a", "y"], 3: ["b", "z"], 4: ["a", "y"]}
    scores = np.array([[5, 0, 1], [4, 0, 1], [0, 3, 1], [0, 2, 1], [0, 0, 1]], float)  # (5 images, 3 units)
    top = top_images(scores, n_top=3)
    assert top[0].tolist() == [0, 1, -1] and top[2].tolist() == [0, 1, 2]
    nodes = assign_nodes(top, paths.get, min_share=0.7, min_images=2)
    assert nodes == [("a", "x"), (), ("a",)]  # unit 1: a/y vs b/z; unit 2: 3 of 3 under a, 2 of 3 under a/x (< 0.7)
    # below a share of 1/2 two nodes can hold it untied: the one holding more, 5 of 10 images over the best-ranked
    # image's 3 (the best-ranked's node until 2026-12-05); of tied ones the best-ranked's
    paths = {i: ["a", "p"] if i < 3 else ["a", "q"] if i < 8 else ["b", "r"] for i in range(10)}
    assert assign_nodes(np.arange(10)[None], paths.get, min_share=0.3, min_images=2) == [("a", "q")]
    assert assign_nodes(np.array([[0, 1, 3, 4]]), paths.get, min_share=0.3, min_images=2) == [("a", "p")]
    assert assign_nodes(np.array([[3, 0, 1, 4]]), paths.get, min_share=0.3, min_images=2) == [("a", "q")]


# ----------------------------------------------------------------------------------------------
# Cross-modal score on constructed activations
# ----------------------------------------------------------------------------------------------
def test_cross_modal_score_on_constructed_activations():
    rng = np.random.default_rng(0)
    concepts = ["red", "blue"]
    n_img, n_txt = 400, 300
    lab_img = np.zeros((n_img, 2), bool)
    lab_img[:100, 0] = True  # red patches
    lab_img[100:200, 1] = True  # blue patches
    lab_txt = np.zeros((n_txt, 2), bool)
    lab_txt[:50, 0] = True  # the word "red"
    lab_txt[50:100, 1] = True
    img = np.zeros((n_img, 3))
    txt = np.zeros((n_txt, 3))
    img[:100, 0] = 2.0  # unit 0: red in both modalities
    txt[:50, 0] = 1.0
    img[:100, 1] = 1.0  # unit 1: red patches only, silent on text
    img[:, 2] = rng.random(n_img) + 0.1  # unit 2: fires on everything
    txt[:, 2] = rng.random(n_txt) + 0.1
    sc = cross_modal_scores(img, lab_img, txt, lab_txt, concepts, min_support=20)
    s = sc.score
    assert s[0, 0] == pytest.approx(1.0) and sc.best()[0][0] == 0  # (2 - 0)/(2 + 0) and (1 - 0)/(1 + 0)
    assert np.isnan(s[1]).all()  # no text support: undefined, never cross-modal
    on_i, off_i = img[:100, 2].mean(), img[100:, 2].mean()
    on_t, off_t = txt[:50, 2].mean(), txt[50:, 2].mean()
    ref = min((on_i - off_i) / (on_i + off_i), (on_t - off_t) / (on_t + off_t))
    assert s[2, 0] == pytest.approx(ref) and abs(s[2, 0]) < 0.2
    assert sc.auroc_image[0, 0] == 1.0 and sc.auroc_text[0, 0] == 1.0


def test_patch_concepts_from_masks():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, :4, :4] = True  # top-left patch fully covered
    masks[0, 4, 4] = True  # 1/16 of the bottom-right patch: below the 1/4 cover
    fac = {"objects": [{"colour": "red", "shape": "star"}], "background": {"texture": "dotted"}}
    lab = patch_concepts(fac, masks, (2, 2), ["red", "star", "dotted", "blue"])
    assert lab.tolist() == [[True, True, False, False], [False, False, True, False],
                            [False, False, True, False], [False, False, True, False]]


# ----------------------------------------------------------------------------------------------
# Linear probes
# ----------------------------------------------------------------------------------------------
def test_fit_probe_separable_and_combination_split():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 4)) * 0.3
    x[np.arange(300), y] += 3.0
    probe = fit_probe(x[:200], y[:200])
    assert probe.accuracy(x[200:], y[200:]) > 0.97
    assert np.allclose(probe.proba(x[:5]).sum(1), 1)
    shapes, colours = [f"s{i}" for i in range(11)], [f"c{i}" for i in range(11)]
    unseen = split_combinations(shapes, colours, 3)
    assert len(unseen) == 33
    seen = set(itertools.product(shapes, colours)) - unseen
    assert {s for s, _ in seen} == set(shapes) and {c for _, c in seen} == set(colours)


def test_probes_and_ontology_commands(probe_outputs):
    res, onto = probe_outputs.probes, probe_outputs.ontology  # probes --fit-images 1500; ontology 200 images
    col = res["factors"]["colour"]
    assert col["sae"] > col["chance"] + 0.4 and col["raw"] > col["chance"] + 0.4  # the tiny CLIP knows colours
    assert res["factors"]["colour_group"]["sae"] > res["factors"]["colour_group"]["chance"] + 0.3
    held = res["held_out_combinations"]
    assert held["n_test_unseen"] > 0 and held["colour"]["sae_unseen"] > 0.5
    for view in ("taxonomy", "shape_tree", "colour_tree"):
        sae = onto["views"][view]["sae"]
        assert {"coactivation", "decoder_cosine"} <= set(sae) and "coactivation" in onto["views"][view]["raw"]
        assert 0 < sae["n_placed"] <= sae["n_units"]
    assert (probe_outputs.bundle / "probes" / "probes.json").is_file()
    assert (probe_outputs.bundle / "probes" / "ontology.json").is_file()
    # the three ran at once into one folder, each under its own output's lock, and each lock went with its run
    assert not list((probe_outputs.bundle / "probes").glob(".*lock"))


def test_crossmodal_command_builds_a_bundle(tiny_crossmodal_bundle, tiny_world, capsys, monkeypatch):
    from precompute.__main__ import main
    from sae_core.bundle import open_bundle

    out, res = tiny_crossmodal_bundle.path, tiny_crossmodal_bundle.summary
    assert res["n_latents"] == 256 and 0 <= res["n_cross_modal"] <= 256
    b = open_bundle(out)
    b.validate()
    assert b.manifest["model"]["layer"] == "lm:1" and b.manifest["model"]["n_patches"] == 16
    cm = json.loads((out / "crossmodal.json").read_text())
    assert len(cm["units"]) == 256 and cm["sae"]["n_cross_modal"] == res["n_cross_modal"]
    assert cm["n_image_tokens"] == 16 * cm["n_images"] and cm["n_text_tokens"] > cm["n_images"]
    page = b.neuron(int(np.argmax(b.array("support"))))
    assert page["top"] and page["top_heat"].shape[1] == 16
    # the rows' summary is written before the rows' file, which marks the stage done: a kill between the two left
    # it unwritten for good (until 2026-12-05)
    work = out / ".work"
    assert json.loads((work / "rows.json").read_text())["n_images"] == 300  # the tiny preset's training images
    assert (work / "rows.json").stat().st_mtime_ns <= (work / "lm_rows.npy").stat().st_mtime_ns
    # a rerun with other settings is refused before anything runs: every stage's output depends on them
    before = (out / "crossmodal.json").read_bytes()
    for flag, sentence in ((["--threshold", "0.2"], "threshold: 0.5 there, 0.2 now"),
                           (["--lm-layer", "2"], "lm_layer: 1 there, 2 now"),
                           (["--preset", "demo"], "preset: 'tiny' there, 'demo' now")):
        argv = ["crossmodal", "--world", str(tiny_world), "--out", str(out), "--preset", "tiny", "--quiet", *flag]
        assert main(argv) == 2
        assert sentence in capsys.readouterr().err
    assert (out / "crossmodal.json").read_bytes() == before
    # --quiet is quiet: transformers' "Loading weights" bar of the LLaVA load was printed before the stages began
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    argv = ["crossmodal", "--world", str(tiny_world), "--out", str(out), "--preset", "tiny", "--quiet", "--json"]
    assert main(argv) == 0  # every stage done: a resume that loads LLaVA and skips the rest
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["n_cross_modal"] == res["n_cross_modal"]
    assert captured.err == ""
    # a layer the language model lacks is refused before --out is made (it left a folder with settings.json)
    fresh = out.parent / "never_made"
    argv = ["crossmodal", "--world", str(tiny_world), "--out", str(fresh), "--preset", "tiny", "--quiet", "--lm-layer", "3"]
    assert main(argv) == 2
    assert "--lm-layer 3 does not exist: the language model has 2 layers, so pass 1..2" in capsys.readouterr().err
    assert not fresh.exists()


# ----------------------------------------------------------------------------------------------
# The commands' inputs: which images they compare, the feature cache, input refused before the work
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_sets(tiny_world, tmp_path_factory):
    """PNG folders rendered from the tiny world: id/ (40 val images, flat), ood/ (20 ood images),
    other/ (40 further ood images), one_class/things/ (the 40 val images in one class folder), and
    inat/ (two iNaturalist-style class folders of 12 val images each, plus 4 loose images)."""
    from sae_core.world.dataset import WorldDataset

    root = tmp_path_factory.mktemp("image_sets")
    val, ood = WorldDataset(tiny_world, "val"), WorldDataset(tiny_world, "ood")
    inat = ["00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
            "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Pica_pica"]
    for folder, ds, ids in (("id", val, range(40)), ("ood", ood, range(20)), ("other", ood, range(20, 60)),
                            ("one_class/things", val, range(40)), (f"inat/{inat[0]}", val, range(12)),
                            (f"inat/{inat[1]}", val, range(12, 24)), ("inat", val, range(24, 28))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(ids):
            ds[i].save(root / folder / f"{j:04d}.png")
    return root


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    import shutil

    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("probes"))
    return root


def run_command(capsys, *argv):
    """(exit code, parsed --json line or None, stderr) of an in-process `python -m precompute ...`."""
    from precompute.__main__ import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    line = out.strip().splitlines()[-1] if out.strip() else ""
    return rc, (json.loads(line, parse_constant=_no_constant) if line.startswith("{") else None), err


def _no_constant(name):
    raise AssertionError(f"bare {name} in JSON output")


def aurocs(res):
    return {n: m["auroc"] for n, m in res["methods"].items()}


def test_ood_compares_sets_by_their_images_not_their_specs(bundle_copy, image_sets, capsys, tmp_path, tiny_world):
    import os

    idf, oodf = image_sets / "id", image_sets / "ood"
    base = ["ood", "--bundle", bundle_copy, "--ood", f"imagefolder:{oodf}", "--id", f"imagefolder:{idf}", "--json",
            "--out", tmp_path / "out"]
    rc, ref, _ = run_command(capsys, *base, "--fit", f"imagefolder:{idf}")
    assert rc == 0 and ref["id"]["n_images"] == 20
    # the 20 even ones: the last fifth calibrates, the note names the 16 fitted (until 2026-12-05 "ID images with
    # even index", as if all 20 were; a fit set's note said "first 4000 images" of a fit on 3,200)
    assert (ref["fit"]["n_images"], ref["calibration"]["n_images"]) == (16, 4)
    assert ref["fit"]["which"] == "the first 16 ID images with even index (evaluated on the odd ones)"
    # the same folder spelled otherwise is the same set: fitted on the even images, evaluated on the odd
    # ones, the same figures (before: "first 40 images", every evaluated image also fitted on, AUROCs inflated)
    for spelling in (f"{idf}/", f"{idf}/../id", os.path.relpath(idf)):
        rc, got, _ = run_command(capsys, *base, "--fit", f"imagefolder:{spelling}")
        assert rc == 0 and got["fit"]["which"] == ref["fit"]["which"] and aurocs(got) == aurocs(ref)
    # a fit list naming some evaluated ID images by another path is refused before any extraction
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "fit.txt").write_text("".join(f"../other_fit/{j:04d}.png\n" for j in range(5)) + f"{idf}/0007.png\n")
    cached = sorted((bundle_copy / "probes" / ".features").iterdir())
    rc, _, err = run_command(capsys, "ood", "--bundle", bundle_copy, "--id", f"imagefolder:{idf}", "--ood",
                             f"imagefolder:{oodf}", "--fit", f"files:{lists / 'fit.txt'}")
    assert rc == 2 and f"1 of 40 images of the evaluated ID images of imagefolder:{idf} are also in the fit set" in err
    assert sorted((bundle_copy / "probes" / ".features").iterdir()) == cached
    # an OOD set that is the ID set (or the fit set) is refused in one sentence
    rc, _, err = run_command(capsys, "ood", "--bundle", bundle_copy, "--ood", f"imagefolder:{idf}/", "--id",
                             f"imagefolder:{idf}")
    assert rc == 2 and f"the OOD set imagefolder:{idf}/ is the ID set imagefolder:{idf}" in err
    rc, _, err = run_command(capsys, "ood", "--bundle", bundle_copy, "--ood", f"world:{tiny_world}/:train")
    assert rc == 2 and "is the fit set" in err
    # a copy of the world (a bundle carries one) renders the same images: the same set, not another folder's
    copy = tmp_path / "world_copy"
    copy.mkdir()
    for name in ("world.json", "taxonomy.json"):
        shutil.copy(tiny_world / name, copy / name)
    rc, _, err = run_command(capsys, "ood", "--bundle", bundle_copy, "--ood", f"world:{copy}:train")
    assert rc == 2 and f"the OOD set world:{copy}:train is the fit set" in err
    rc, _, err = run_command(capsys, "ood", "--bundle", bundle_copy, "--ood", f"world:{copy}:val", "--id",
                             f"world:{tiny_world}:val")
    assert rc == 2 and "is the ID set" in err
    # the world's OOD split spelled with a slash still gets its per-group AUROCs
    rc, res, _ = run_command(capsys, "ood", "--bundle", bundle_copy, "--ood", f"world:{tiny_world}/:ood", "--json",
                             "--max-images", 30, "--fit-images", 100, "--cal-images", 20, "--no-cache")
    assert rc == 0 and res["ood_groups"] and all("auroc_by_group" in m for m in res["methods"].values())


def test_ood_on_a_single_class_id_set_skips_the_label_detectors(bundle_copy, image_sets, capsys, tmp_path):
    base = ["ood", "--bundle", bundle_copy, "--ood", f"imagefolder:{image_sets / 'ood'}", "--json", "--no-cache",
            "--out", tmp_path / "out"]
    rc, flat, _ = run_command(capsys, *base, "--id", f"imagefolder:{image_sets / 'id'}", "--fit",
                              f"imagefolder:{image_sets / 'id'}")
    assert rc == 0 and flat["fit"]["n_images"] == 16  # 20 even images, the last fifth held out to calibrate
    # the same images in one class folder: the label detectors are skipped as for unlabelled images, the
    # others give the same figures (before: "a probe needs at least two classes", after every extraction)
    rc, one, _ = run_command(capsys, *base, "--id", f"imagefolder:{image_sets / 'one_class'}", "--fit",
                             f"imagefolder:{image_sets / 'one_class'}")
    assert rc == 0 and aurocs(one) == aurocs(flat)
    assert not any(n.endswith(("_msp", "_mahalanobis_class")) for n in one["methods"])
    assert one["fit"]["label_detectors"].startswith("skipped: every fit image has the one class 'things'")
    assert one["fit"]["labels"] is None
    # fewer fit images than the kNN detectors' neighbours: refused, not scored with a k the file misreports
    # (it recorded k 10 for a fit on one image); by the flag before any image is read, by the set after
    written = (tmp_path / "out" / "ood.json").read_bytes()
    rc, _, err = run_command(capsys, *base, "--fit-images", 5)
    assert rc == 2 and err.strip().endswith("error: --fit-images 5 is fewer than --k 10: the kNN detectors score "
                                            "an image by its 10th nearest fit image; give --fit-images 10 or more, "
                                            "or a smaller --k.")
    fit = f"imagefolder:{image_sets / 'id'}"
    rc, _, err = run_command(capsys, *base, "--id", fit, "--fit", fit, "--k", 17)
    assert rc == 2 and err.strip().endswith(f"error: {fit} leaves 16 images to fit on, fewer than --k 17 (the kNN "
                                            "detectors' neighbours); pass a larger --fit set, a smaller --cal-images "
                                            "or a smaller --k.")
    assert (tmp_path / "out" / "ood.json").read_bytes() == written


def test_feature_cache_follows_the_files_and_serves_smaller_requests(bundle_copy, image_sets, tmp_path, monkeypatch):
    import shutil

    from sae_core import image_features
    from sae_core.bundle import open_bundle
    from sae_core.datasets import open_dataset
    from sae_core.image_features import bundle_source, cached_features, extract_features

    source = bundle_source(open_bundle(bundle_copy))
    folder, cache = tmp_path / "imgs", tmp_path / "cache"
    shutil.copytree(image_sets / "id", folder)
    spec = f"imagefolder:{folder}"

    def same(a, b, exact=True):
        for f in image_features.FIELDS:
            x, y = getattr(a, f), getattr(b, f)
            assert x.shape == y.shape and (np.array_equal(x, y) if exact else np.allclose(x, y, atol=1e-5)), f

    first = cached_features(source, spec, cache, 30, batch_size=8)
    same(first, extract_features(source, open_dataset(spec), 30, batch_size=8))
    calls = []

    def counted(src, ds, n=None, batch_size=128, progress=None, first=0):
        calls.append((first, n))
        return extract_features(src, ds, n, batch_size=batch_size, progress=progress, first=first)

    monkeypatch.setattr(image_features, "extract_features", counted)
    # fewer images of the same folder (any spelling): rows of the cached extraction, nothing extracted
    part = cached_features(source, f"{spec}/", cache, 20)
    assert calls == [] and part.ids.tolist() == list(range(20))
    same(part, first.subset(np.arange(20)))
    # more images: only the missing ones are extracted
    more = cached_features(source, spec, cache, 40, batch_size=8)
    assert calls == [(30, 40)]
    same(more, extract_features(source, open_dataset(spec), 40, batch_size=8), exact=False)
    # other images under the same names and count: extracted again, not served stale
    for j, png in enumerate(sorted((image_sets / "other").glob("*.png"))):
        shutil.copyfile(png, folder / f"{j:04d}.png")
    fresh = cached_features(source, spec, cache, 40, batch_size=8)
    assert calls[-1] == (0, 40)
    same(fresh, extract_features(source, open_dataset(spec), 40, batch_size=8))
    assert not np.allclose(fresh.codes, more.codes)
    assert len(list(cache.glob("*.npz"))) == 1  # one file per SAE and dataset, whatever the counts asked


def test_unwritable_outputs_and_cache_are_handled_before_the_work(bundle_copy, image_sets, capsys, tmp_path,
                                                                  monkeypatch):
    import os

    base = ["ood", "--bundle", bundle_copy, "--id", f"imagefolder:{image_sets / 'id'}", "--ood",
            f"imagefolder:{image_sets / 'ood'}", "--fit", f"imagefolder:{image_sets / 'id'}", "--json"]
    # a cache that cannot be written (a file in its place; a read-only bundle alike): read where present,
    # not saved, one note (before: the failed write ended the run after the extraction)
    (bundle_copy / "probes").mkdir()
    (bundle_copy / "probes" / ".features").write_text("")
    rc, res, err = run_command(capsys, *base, "--out", tmp_path / "out")
    assert rc == 0 and res["id"]["n_images"] == 20 and (tmp_path / "out" / "ood.json").is_file()
    assert "note: the feature cache" in err and "cannot be written" in err
    # a folder where ood.html goes: refused before the work, nothing written (until 2026-12-05 refused after the
    # scoring, naming a temporary file, with a fresh ood.json left beside it)
    (tmp_path / "html" / "ood.html").mkdir(parents=True)
    rc, _, err = run_command(capsys, *base, "--out", tmp_path / "html")
    assert rc == 2 and err == f"error: {tmp_path / 'html' / 'ood.html'} is a folder, so the output cannot be " \
                              "written there; give another --out.\n"
    assert sorted(p.name for p in (tmp_path / "html").iterdir()) == ["ood.html"]
    # an output folder that cannot be written: refused before any extraction (before: after all of it)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(bundle_copy))
                        else real(p, mode, **kw))
    (bundle_copy / "probes" / ".features").unlink()
    rc, _, err = run_command(capsys, *base)
    assert rc == 2 and "is not writable" in err and "--out" in err
    assert list((bundle_copy / "probes").iterdir()) == []


def test_a_probe_command_is_refused_an_output_another_run_writes(tiny_bundle, capsys, tmp_path, hold_lock_elsewhere):
    """Two `ood` runs into one folder each wrote ood.json and then ood.html, so the pair there could come from
    two runs. The second is refused in one sentence naming the first, before it reads an image."""
    out = tmp_path / "p"
    holder = hold_lock_elsewhere(f"output_lock({str(out / 'ood.json')!r})")
    rc, _, err = run_command(capsys, "ood", "--bundle", tiny_bundle, "--out", out, "--no-cache")
    assert rc == 2 and err.startswith(f"error: {out / 'ood.json'} is being written by another process (pid "
                                      f"{holder.pid} on ") and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == [".ood.json.lock"]


def test_probes_write_null_where_no_test_image_is_left(bundle_copy, capsys, tmp_path):
    # 3 val images hold no unseen (shape, colour) pair: those accuracies are null, never a bare NaN
    rc, res, _ = run_command(capsys, "probes", "--bundle", bundle_copy, "--fit-images", 300, "--test-images", 3,
                             "--json", "--no-cache")
    assert rc == 0
    held = res["held_out_combinations"]
    assert held["n_test_unseen"] == 0 and held["shape"]["sae_unseen"] is None and held["colour"]["raw_unseen"] is None
    text = (bundle_copy / "probes" / "probes.json").read_text()
    assert "NaN" not in text and json.loads(text, parse_constant=_no_constant)["held_out_combinations"] == held
    # settings no probe can work with are refused before any image is rendered
    rc, _, err = run_command(capsys, "probes", "--bundle", bundle_copy, "--unseen-per-shape", 11, "--out", tmp_path)
    assert rc == 2 and "--unseen-per-shape 11 holds out every colour of a shape; give 1 to 10" in err
    rc, _, err = run_command(capsys, "probes", "--bundle", bundle_copy, "--fit-images", 2, "--out", tmp_path)
    assert rc == 2 and "a probe needs two classes; raise --fit-images" in err
    assert not (bundle_copy / "probes" / ".features").exists()


def test_ontology_inputs(bundle_copy, image_sets, capsys, tmp_path, tiny_crossmodal_bundle):
    # a folder of iNaturalist classes plus loose images on a world bundle: the loose images have no place,
    # and the world's shape and colour trees are not cut from this taxonomy (before: a TypeError traceback)
    rc, res, _ = run_command(capsys, "ontology", "--bundle", bundle_copy, "--dataset",
                             f"imagefolder:{image_sets / 'inat'}", "--permutations", 5, "--top", 8, "--json",
                             "--out", tmp_path, "--no-cache")
    assert rc == 0 and set(res["views"]) == {"taxonomy"} and res["n_images"] == 28
    for entry in res["views"]["taxonomy"].values():
        assert entry["n_placed"] > 0 and set(entry["placed_depths"]) <= {str(d) for d in range(1, 8)}
    # refused in one sentence, before any extraction
    rc, _, err = run_command(capsys, "ontology", "--bundle", bundle_copy, "--top", 3)
    assert rc == 2 and "--top must be at least 4" in err
    rc, _, err = run_command(capsys, "ontology", "--bundle", bundle_copy, "--dataset", f"imagefolder:{image_sets / 'id'}")
    assert rc == 2 and "has no taxonomy paths" in err
    rc, _, err = run_command(capsys, "ontology", "--bundle", bundle_copy, "--max-images", 3)
    assert rc == 2 and re.search(  # it wrote a file of empty scores over the app's panel
        r"error: 3 images of world:\S+:val cannot place a unit in the taxonomy \(a unit needs 4 top images\); "
        r"give --max-images 4 or more \(default: all 2000\)\.$", err.strip())
    # eight images under eight different kingdoms: no node holds half of a unit's top images, so no unit is placed
    # and no clustering has a score; the file with figures stays as it was
    kingdoms = tmp_path / "kingdoms"
    for j in range(8):
        (kingdoms / f"{j:05d}_K{j}_P_C_O_F_G_s").mkdir(parents=True)
        shutil.copy(image_sets / "id" / f"{j:04d}.png", kingdoms / f"{j:05d}_K{j}_P_C_O_F_G_s")
    (tmp_path / "ontology.json").write_text("{}")
    rc, _, err = run_command(capsys, "ontology", "--bundle", bundle_copy, "--dataset", f"imagefolder:{kingdoms}",
                             "--top", 8, "--out", tmp_path, "--no-cache")
    said = ("error: no clustering could be scored: in every view fewer than 3 units were placed, or all on one node, "
            "from 8 images; use more images (--max-images) or a lower --top; nothing written.")
    assert rc == 2 and err.strip().endswith(said)
    assert (tmp_path / "ontology.json").read_text() == "{}"
    # eight images of one species: every unit is placed, all on that leaf, so no distance ranks them; the
    # sentence said "fewer than 3 units were placed" until 2026-12-05
    one = tmp_path / "one" / "00000_K_P_C_O_F_G_s"
    one.mkdir(parents=True)
    for j in range(8):
        shutil.copy(image_sets / "id" / f"{j:04d}.png", one)
    rc, _, err = run_command(capsys, "ontology", "--bundle", bundle_copy, "--dataset", f"imagefolder:{one.parent}",
                             "--top", 8, "--out", tmp_path, "--no-cache", "--json")
    assert rc == 2 and err.strip().endswith(said)
    assert (tmp_path / "ontology.json").read_text() == "{}"
    assert not (bundle_copy / "probes" / ".features").exists()
    for cmd in ("ood", "ontology", "probes"):
        rc, _, err = run_command(capsys, cmd, "--bundle", tiny_crossmodal_bundle.path)
        assert rc == 2 and "is a cross-modal bundle whose SAE reads the language model (lm:1)" in err


def test_assign_nodes_is_the_deepest_node_held_by_min_share():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(4, 17))
        raw = [[f"l{lev}{rng.integers(0, 2 if lev < 2 else 3)}" for lev in range(3)] for _ in range(n)]
        paths = [tuple("/".join(p[:lev + 1]) for lev in range(3)) for p in raw]
        share = float(rng.choice([0.5, 0.34, 0.7]))
        got = assign_nodes(np.arange(n)[None], lambda i: paths[i], share)[0]
        held = {q[:lev] for q in paths for lev in range(1, 4)
                if sum(p[:lev] == q[:lev] for p in paths) >= share * n}
        deepest = max((len(h) for h in held), default=0)
        # several at the deepest level (below a share of 1/2): the one more images share; of tied ones the node of
        # the best-ranked image (the first in top order)
        count = {h: sum(p[:deepest] == h for p in paths) for h in held if len(h) == deepest}
        want = next((p[:deepest] for p in paths if count.get(p[:deepest]) == max(count.values())), ()) if deepest else ()
        assert got == want, (paths, share)


@pytest.mark.parametrize("command", ["ood", "ontology", "probes"])
def test_a_device_this_machine_lacks_is_one_sentence(tiny_bundle, tmp_path, capsys, command):
    """--device was handed to torch unchecked: "cuda" without a GPU or a misspelt device was torch's traceback
    when the model moved, after the bundle was read; it is the sentence every other command gives, before."""
    from precompute.__main__ import main

    out = ["--out", str(tmp_path / "p")]
    assert main([command, "--bundle", str(tiny_bundle), "--device", "gpu", *out]) == 2
    assert capsys.readouterr().err == "error: --device gpu is not a device this runs on; use auto, cpu, cuda or cuda:N.\n"
    if not torch.cuda.is_available():
        assert main([command, "--bundle", str(tiny_bundle), "--device", "cuda", *out]) == 2
        assert "no CUDA GPU is visible here; use cpu (or auto)." in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_the_language_residual_is_the_hidden_state_it_names(tiny_world):
    """--lm-layer L reads hidden_states[L] of the LLaVA's language model: for the last layer transformers applies
    the final norm, which a hook on that layer does not see (until 2026-12-05 it read the unnormed output, 3.1 apart
    on values up to 4.1). Reference: the model's own output_hidden_states."""
    from sae_core.crossmodal import CAPTION_QUESTION, LanguageResidual
    from sae_core.world.dataset import WorldDataset
    from sae_core.world.text import llava_prompt

    images = [WorldDataset(tiny_world, "val")[i] for i in range(3)]
    for layer in (1, 2):  # the tiny LLaVA has 2 layers
        lm = LanguageResidual(str(tiny_world / "llava"), lm_layer=layer)
        h, ids, mask = lm.run(images)
        inputs = lm.processor(images=images, text=[llava_prompt(CAPTION_QUESTION)] * 3, return_tensors="pt",
                              padding=True)
        with torch.inference_mode():
            ref = lm.model(**inputs, output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(h, ref.float(), rtol=1e-5, atol=1e-5, msg=f"lm:{layer}")
