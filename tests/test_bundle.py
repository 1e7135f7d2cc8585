"""The bundle: writer/reader round trip, refusals, and the tiny demo bundle through the reader and `inspect`."""
import json
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sae_core import bundle as B
from sae_core.checkpoint import save_sae
from sae_core.errors import UserError
from sae_core.sae import SAEConfig, SparseAutoencoder

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _write_small_bundle(root, K=6, T=3, P=4, N=20, manifest=True):
    rng = np.random.default_rng(0)
    save_sae(SparseAutoencoder(SAEConfig("matryoshka", 8, K, k=2, group_sizes=(2, 4))), root / "sae")
    arrays = {
        "ms": rng.random(K).astype(np.float32), "support": rng.integers(0, N, K),
        "frequency": rng.random(K).astype(np.float32), "mean_act": rng.random(K).astype(np.float32),
        "max_act": rng.random(K).astype(np.float32), "hist_counts": rng.integers(0, 5, (K, 5)),
        "hist_edges": np.linspace(-3, 1, 6).astype(np.float32),
        "top_images": np.array([[3, 1, -1]] * K), "top_acts": np.array([[2.0, 1.0, 0.0]] * K, np.float32),
        "top_patch": np.array([[5, 2, -1]] * K, np.int32), "top_heat": (rng.random((K, T, P)) + 0.01).astype(np.float16),
        "band_images": np.full((K, 2, 2), -1), "band_acts": np.zeros((K, 2, 2), np.float32),
        "group": np.array([0, 0, 1, 1, 1, 1], np.int32), "parent": np.array([-1, -1, 0, 0, 1, 0]),
        "parent_coact": np.array([-1, -1, 1, 0, 1, 1]), "label_score": np.arange(K, dtype=np.float32),
        "decoder_neighbors": np.tile(np.arange(2), (K, 1)), "decoder_neighbor_cos": np.full((K, 2), 0.5, np.float32),
    }
    arrays["band_images"][:, 1, 0] = 7
    arrays["band_acts"][:, 1, 0] = 0.25
    arrays["band_patch"] = np.full((K, 2, 2), -1, np.int16)
    arrays["band_patch"][:, 1, 0] = 3
    for name, arr in arrays.items():
        B.write_array(root, f"neurons/{name}.npy", arr)
    B.write_json(root, B.LABELS, {"method": "test", "vocabulary": ["a", "b"], "labels": [f"c{k}" for k in range(K)]})
    B.write_json(root, B.HIERARCHY, {"nodes": [], "depth_per_level": [1.0, 2.0]})
    if manifest:
        B.write_manifest(root, {"model": {"spec": "x"}, "sae": {"d_sae": K}, "dataset": {"spec": "none", "n_images": N},
                                "embedder": {"spec": "x", "d": 4}, "metrics": {"fvu": 0.1}})
    return arrays


def test_round_trip(tmp_path):
    arrays = _write_small_bundle(tmp_path)
    b = B.open_bundle(tmp_path)
    b.validate()
    assert b.n_neurons == 6 and b.n_images == 20
    assert isinstance(b.array("ms"), np.memmap)  # lazy: memory-mapped, not read
    for name, arr in arrays.items():
        np.testing.assert_array_equal(np.asarray(b.array(name)), arr)
    n = b.neuron(2)
    assert n["ms"] == pytest.approx(float(arrays["ms"][2]))
    assert n["top"] == [(3, 2.0, 5), (1, 1.0, 2)]  # the empty slot is dropped
    heat = arrays["top_heat"].copy()
    heat[2, 1] = 0  # image 1 fires neuron 2 on no patch (on the CLS token only): no best patch
    B.write_array(tmp_path, "neurons/top_heat.npy", heat)
    assert B.open_bundle(tmp_path).neuron(2)["top"] == [(3, 2.0, 5), (1, 1.0, -1)]
    np.testing.assert_array_equal(n["top_heat"], arrays["top_heat"][2, :2].astype(np.float32))
    assert n["bands"] == [[], [(7, 0.25, 3)]] and n["patch_bands"] is None  # bands by patches: CLS-scored only
    assert (n["group"], n["parent"], n["parent_coact"]) == (1, 0, 1)
    assert b.neuron(0)["children"] == [2, 3, 5] and b.neuron(1)["children"] == [4]
    assert n["label"] == "c2" and n["label_method"] == "test" and n["label_score"] == 2.0
    assert n["label_by_patch"] is None and n["label_by_patch_score"] is None  # CLS-scored bundles only
    assert n["neighbors"] == [(0, 0.5), (1, 0.5)]
    counts, edges = n["hist"]
    np.testing.assert_array_equal(counts, arrays["hist_counts"][2])
    np.testing.assert_array_equal(edges, arrays["hist_edges"])
    assert b.hierarchy()["depth_per_level"] == [1.0, 2.0]
    (tmp_path / B.HIERARCHY).unlink()  # read once: the Hierarchy page's every subtree read 17 MB again at K 65,536
    assert b.hierarchy()["depth_per_level"] == [1.0, 2.0]
    sae = b.load_sae()
    assert sae.cfg.d_sae == 6 and sae.cfg.group_sizes == (2, 4)
    assert b.manifest["schema_version"] == B.SCHEMA_VERSION
    assert b.manifest["files"]["ms"] == "neurons/ms.npy"


def test_refuses_unfinished_missing_and_wrong_schema(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        B.open_bundle(tmp_path / "nothing")
    _write_small_bundle(tmp_path, manifest=False)
    with pytest.raises(UserError, match="unfinished"):
        B.open_bundle(tmp_path)
    B.write_manifest(tmp_path, {"model": {}, "sae": {"d_sae": 6}, "dataset": {"n_images": 20}, "embedder": {},
                                "metrics": {}})
    B.open_bundle(tmp_path)
    m = json.loads((tmp_path / B.MANIFEST).read_text())
    m["schema_version"] = B.SCHEMA_VERSION + 1
    (tmp_path / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UserError, match="schema version 2") as e:
        B.open_bundle(tmp_path)
    assert str(e.value).replace(B.MANIFEST, "").count(".") <= 3  # one sentence (the path may hold dots)
    for manifest in ({k: v for k, v in m.items() if k != "schema_version"}, [1, 2]):
        (tmp_path / B.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(UserError, match="has no schema_version in manifest.json"):
            B.open_bundle(tmp_path)


def test_refuses_out_of_range_neurons_and_missing_arrays(tmp_path):
    _write_small_bundle(tmp_path)
    b = B.open_bundle(tmp_path)
    for bad in (6, -1, 10**9, "x", None):
        with pytest.raises(UserError, match="neuron"):
            b.neuron(bad)
    # a fraction was read as the neuron below it (int(2.5) == 2), inf was an OverflowError, True neuron 1
    for bad in (2.5, np.float32(1.5), "2.5", float("inf"), float("nan"), True):
        with pytest.raises(UserError, match=r"^neuron id .* is not an integer; pick one between 0 and 5\.$"):
            b.neuron(bad)
    # ... in a 0-d array or tensor too, as a notebook hands it over (np.array(2.5) was neuron 2 until 2026-12-05)
    for bad in (np.array(2.5), torch.tensor(2.5), torch.tensor(1.5, dtype=torch.bfloat16), np.bool_(True),
                torch.tensor(True)):
        with pytest.raises(UserError, match=r"^neuron id .* is not an integer; pick one between 0 and 5\.$"):
            b.neuron(bad)
    assert [b.neuron(k)["id"] for k in (np.int64(3), 3.0, np.float64(4.0), "5", np.array(2), torch.tensor(4.0),
                                        torch.tensor(1))] == [3, 3, 4, 5, 2, 4, 1]
    with pytest.raises(UserError, match="image 20 does not exist"):
        b.image(20)
    for bad in (2.5, "x", None):  # "x" was a ValueError traceback
        with pytest.raises(UserError, match=r"^image id .* is not an integer; pick one between 0 and 19\.$"):
            b.image(bad)
    (tmp_path / "neurons/top_acts.npy").unlink()
    with pytest.raises(UserError, match="missing"):
        b.validate()
    for name in ("../etc/passwd", "/etc/passwd", "neurons/../../x.json"):  # b.json read any file ("../../etc/passwd")
        for read in (b.array, b.json):
            with pytest.raises(UserError, match=rf"^'{re.escape(name)}' is not a file inside the bundle "):
                read(name)
        assert not b.has(name)
    (tmp_path / "neurons" / "labels.json").parent.mkdir(exist_ok=True)
    (tmp_path / "neurons" / "labels.json").write_text('{"labels": ["red", ')  # cut short after the build
    with pytest.raises(UserError, match="labels.json cannot be read as JSON.*damaged"):
        b.json("neurons/labels.json")
    (tmp_path / "neurons" / "labels.json").write_text("[1, 2]")  # JSON, not the object it was (a traceback)
    with pytest.raises(UserError, match="labels.json holds a JSON list, not an object; the bundle is damaged"):
        b.json("neurons/labels.json")
    with pytest.raises(UserError, match="is a file, not a bundle"):
        B.open_bundle(tmp_path / B.MANIFEST)


def test_a_store_or_an_sae_given_as_a_bundle_is_named_as_such(tmp_path, capsys):
    """The other folders of a run, given where a bundle goes (`open_bundle`, `python -m app --bundle`): a store was
    "a bundle with no schema_version ... rebuild it", an SAE folder "unfinished", and the app offered to build the
    demo into it."""
    from app.__main__ import main as app_main
    from tests.test_store import _make_store

    _make_store(tmp_path / "store")
    save_sae(SparseAutoencoder(SAEConfig(arch="topk", d_in=6, d_sae=12, k=2)), tmp_path / "sae")
    for folder, said in ((tmp_path / "store", r"store is an activation store \(python -m precompute extract\), not a "
                                              r"bundle; train an SAE on it"),
                         (tmp_path / "sae", rf"sae is an SAE folder, not a bundle; build a bundle from it with "
                                            rf"`python -m precompute atlas --sae {tmp_path / 'sae'} \.\.\. --out BUNDLE`")):
        with pytest.raises(UserError, match=said):
            B.open_bundle(folder)
        assert app_main(["--bundle", str(folder)]) == 2  # refused before any server starts
        assert re.search(said, capsys.readouterr().err)
    (tmp_path / "empty").mkdir()  # anything else keeps its own sentence
    with pytest.raises(UserError, match="has no manifest.json, so it is unfinished"):
        B.open_bundle(tmp_path / "empty")


def test_validate_catches_shape_mismatch(tmp_path):
    _write_small_bundle(tmp_path)
    B.write_array(tmp_path, "neurons/ms.npy", np.zeros(5, np.float32))
    with pytest.raises(UserError, match="5 rows"):
        B.open_bundle(tmp_path).validate()
    B.write_array(tmp_path, "neurons/ms.npy", np.zeros((6, 2), np.float32))  # passed: its median was printed
    with pytest.raises(UserError, match=r"ms.npy has shape \(6, 2\), not one value per neuron \(6,\)"):
        B.open_bundle(tmp_path).validate()
    # the raw units' MS (any count: the layer's width) is one number each, as the Overview draws it
    B.write_array(tmp_path, "neurons/ms.npy", np.zeros(6, np.float32))
    B.write_array(tmp_path, B.RAW_MS, np.zeros(4, np.float32))
    B.open_bundle(tmp_path).validate()
    for bad in (np.zeros((4, 2), np.float32), np.array(["a"] * 4)):
        B.write_array(tmp_path, B.RAW_MS, bad)
        with pytest.raises(UserError, match=rf"raw/ms.npy holds {bad.dtype} values of shape \({bad.shape[0]},"):
            B.open_bundle(tmp_path).validate()


def test_damaged_manifest_sections_and_arrays_are_refused_in_one_sentence(tmp_path):
    """Manifest sections of the wrong JSON type, sizes that are not whole numbers, a file without numpy's
    header, an array of strings and embeddings of another size: each a UserError naming the file (each
    was a TypeError/ValueError/AttributeError traceback in `inspect`, or passed, or was called "pickled")."""
    _write_small_bundle(tmp_path)
    good = json.loads((tmp_path / B.MANIFEST).read_text())
    for change, message in (({"metrics": None}, "holds metrics as a JSON null, not an object"),
                            ({"model": []}, "holds model as a JSON list, not an object"),
                            ({"sae": {"d_sae": "x"}}, 'holds sae.d_sae = "x", not a whole number'),
                            ({"dataset": {"n_images": 2.5}}, "holds dataset.n_images = 2.5, not a whole number"),
                            ({"sae": {"d_sae": True}}, "holds sae.d_sae = true, not a whole number")):
        (tmp_path / B.MANIFEST).write_text(json.dumps({**good, **change}))
        with pytest.raises(UserError, match=message):
            B.open_bundle(tmp_path)
    (tmp_path / B.MANIFEST).write_text(json.dumps(good))
    B.open_bundle(tmp_path).validate()
    (tmp_path / "neurons/top_images.npy").write_text("garbage\n")
    with pytest.raises(UserError, match="top_images.npy is not a .npy file .*; the bundle is damaged") as e:
        B.open_bundle(tmp_path).validate()
    assert "pickle" not in str(e.value)
    B.write_array(tmp_path, "neurons/top_images.npy", np.array([[3, 1, -1]] * 6))
    B.write_array(tmp_path, "neurons/ms.npy", np.array(["a"] * 6))
    with pytest.raises(UserError, match="ms.npy holds <U1 values, not numbers"):
        B.open_bundle(tmp_path).validate()
    B.write_array(tmp_path, "neurons/ms.npy", np.zeros(6, np.float32))
    B.write_array(tmp_path, B.EMBEDDINGS, np.zeros((19, 4), np.float16))
    B.write_manifest(tmp_path, {k: good[k] for k in ("model", "sae", "dataset", "embedder", "metrics")})
    with pytest.raises(UserError, match=r"embeddings.npy has shape \(19, 4\), not one row for each of its 20 images"):
        B.open_bundle(tmp_path).validate()
    B.write_array(tmp_path, B.EMBEDDINGS, np.zeros((20, 4), np.float16))
    B.open_bundle(tmp_path).validate()
    # labels.json of another shape (KeyError, TypeError, ValueError before) and `files` entries that are not
    # paths inside the bundle (a TypeError; "../" read a file outside it)
    good_labels = json.loads((tmp_path / B.LABELS).read_text())
    for change in ({"labels": None}, {"labels": 5}, {"labels": ["a", 7, "c", "d", "e", "f"]},
                   {"labels_by_patch": "red"}, {"from_patch_gallery": ["a"]}, {"from_patch_gallery": 3}):
        B.write_json(tmp_path, B.LABELS, {k: v for k, v in {**good_labels, **change}.items() if v is not None})
        with pytest.raises(UserError, match="labels.json.*the bundle is damaged, rebuild it"):
            B.open_bundle(tmp_path).validate()
    B.write_json(tmp_path, B.LABELS, good_labels)
    manifest = json.loads((tmp_path / B.MANIFEST).read_text())
    for rel in (5, "../../etc/passwd", "/etc/passwd"):
        (tmp_path / B.MANIFEST).write_text(json.dumps({**manifest, "files": {**manifest["files"], "ms": rel}}))
        with pytest.raises(UserError, match=r"lists ms at .*, not a path inside the bundle"):
            B.open_bundle(tmp_path)
    (tmp_path / B.MANIFEST).write_text(json.dumps(manifest))
    B.open_bundle(tmp_path).validate()


def test_validate_catches_a_bad_patch_gallery_and_label_provenance(tmp_path):
    """A CLS-scored bundle's second gallery and labels.json's from_patch_gallery are checked like the rest."""
    _write_small_bundle(tmp_path)
    good = np.array([[4, -1, -1]] * 6)
    for bad, sentence in ((np.array([[20, -1, -1]] * 6), "patch_top_images holds ids outside 0..19"),
                          (good[:, :2], "patch_top_images.npy has 2 top slots")):
        B.write_array(tmp_path, "neurons/patch_top_images.npy", bad)
        with pytest.raises(UserError, match=sentence):
            B.open_bundle(tmp_path).validate()
    B.write_array(tmp_path, "neurons/patch_top_images.npy", good)
    B.write_array(tmp_path, "neurons/patch_top_acts.npy", np.array([[1.5, 0, 0]] * 6, np.float32))
    B.open_bundle(tmp_path).validate()
    labels = {"method": "test", "vocabulary": ["a"], "labels": ["a"] * 6, "from_patch_gallery": [2]}
    B.write_json(tmp_path, B.LABELS, labels)
    b = B.open_bundle(tmp_path)
    b.validate()
    assert [b.neuron(k)["label_from_patch"] for k in range(6)] == [k == 2 for k in range(6)]
    B.write_json(tmp_path, B.LABELS, {**labels, "from_patch_gallery": [6]})
    with pytest.raises(UserError, match="outside 0..5 as labelled from patches"):
        B.open_bundle(tmp_path).validate()
    B.write_json(tmp_path, B.LABELS, {**labels, "labels_by_patch": ["b"] * 5})
    with pytest.raises(UserError, match="5 labels by patches for 6 neurons"):
        B.open_bundle(tmp_path).validate()
    B.write_json(tmp_path, B.LABELS, {**labels, "labels_by_patch": ["b"] * 5 + [""]})
    B.write_array(tmp_path, "neurons/patch_label_score.npy", np.linspace(0, 0.5, 6).astype(np.float32))
    b = B.open_bundle(tmp_path)
    b.validate()
    assert [(b.neuron(k)["label_by_patch"], b.neuron(k)["label_by_patch_score"]) for k in (0, 5)] == [("b", 0.0), ("", 0.5)]
    # and its bands by the max over patches (CLS bands alike)
    band_acts = np.zeros((6, 2, 2), np.float32)
    band_acts[:, 0, :] = [0.5, 0.25]
    B.write_array(tmp_path, "neurons/patch_band_acts.npy", band_acts)
    for name, bad, sentence in (("patch_band_images", np.full((6, 2, 2), 20), "patch_band_images holds ids outside 0..19"),
                                ("patch_band_images", np.full((6, 2, 3), -1), "patch_band_images.npy and patch_band_acts.npy differ"),
                                ("band_images", np.full((6, 2, 2), -2), "band_images holds ids outside")):
        B.write_array(tmp_path, f"neurons/{name}.npy", bad)
        with pytest.raises(UserError, match=sentence):
            B.open_bundle(tmp_path).validate()
        B.write_array(tmp_path, f"neurons/{name}.npy", np.array([[[9, 4], [-1, -1]]] * 6))
    b = B.open_bundle(tmp_path)
    b.validate()
    # no patch_band_patch (a bundle of 2026-12-02 before 22:40): no best patch
    assert b.neuron(3)["patch_bands"] == [[(9, 0.5, -1), (4, 0.25, -1)], []]
    assert b.neuron(3)["bands"] == [[(9, 0.0, -1), (4, 0.0, -1)], []]
    B.write_array(tmp_path, "neurons/band_patch.npy", np.array([[[5, -1], [-1, -1]]] * 6, np.int16))
    assert B.open_bundle(tmp_path).neuron(3)["bands"] == [[(9, 0.0, 5), (4, 0.0, -1)], []]
    B.write_array(tmp_path, "neurons/band_patch.npy", np.full((6, 2, 3), -1, np.int16))
    with pytest.raises(UserError, match="band_images.npy and band_patch.npy differ"):
        B.open_bundle(tmp_path).validate()


def test_validate_catches_what_the_pages_index_and_draw_by(tmp_path):
    """Neuron ids out of range in the tree and the neighbours, a patch grid that is no grid or not the heat arrays',
    a view the pictures cannot be cut by and metrics that are not numbers: each one sentence (each passed, and a page
    showed numpy's "index 9999 is out of bounds", "cannot reshape", or a format error)."""
    _write_small_bundle(tmp_path)  # K 6, heat of 4 patches
    good = json.loads((tmp_path / B.MANIFEST).read_text())
    for name, bad in (("parent", np.array([-1, -1, 0, 0, 6, 0])), ("parent_coact", np.full(6, -2)),
                      ("decoder_neighbors", np.tile([1, 9999], (6, 1)))):
        kept = np.load(tmp_path / f"neurons/{name}.npy")
        B.write_array(tmp_path, f"neurons/{name}.npy", bad)
        with pytest.raises(UserError, match=rf"^bundle {tmp_path}: {name} holds neuron ids outside 0\.\.5; rebuild it\.$"):
            B.open_bundle(tmp_path).validate()
        B.write_array(tmp_path, f"neurons/{name}.npy", kept)
    for model, sentence in (({"grid": [2, 2], "n_patches": 4}, None), ({"grid": None}, None),
                            ({"grid": "2x2"}, 'holds model.grid = "2x2", not the \\[rows, columns\\]'),
                            ({"grid": [2, 2.0]}, "holds model.grid = \\[2, 2.0\\], not"),
                            ({"grid": [4, 4], "n_patches": 16}, r"model.grid \[4, 4\] has 16 patches but "
                                                                r"neurons/top_heat.npy has 4; the bundle is damaged"),
                            ({"grid": [2, 2], "n_patches": "4"}, 'model.n_patches has "4"'),
                            ({"view": {"resize": "big"}}, 'holds model.view = {"resize": "big"}, not the part of an image'),
                            ({"view": {"resize": {"height": 8}}}, "holds model.view"),
                            ({"view": {"resize": {"shortest_edge": 8}, "crop": {"height": 8}}}, "holds model.view"),
                            ({"view": {"resize": {"height": 8, "width": 6}, "crop": None}}, None), ({"view": None}, None)):
        (tmp_path / B.MANIFEST).write_text(json.dumps({**good, "model": {**good["model"], **model}}))
        if sentence is None:
            B.open_bundle(tmp_path).validate()
        else:
            with pytest.raises(UserError, match=sentence):
                B.open_bundle(tmp_path).validate()
    for metrics in ({"fvu": "abc", "l0": None, "hierarchy_depth": [1.0, None], "metric_tokens": "all"},
                    {"fvu": 0.1, "hierarchy_depth": [1.0, "x"]}):
        (tmp_path / B.MANIFEST).write_text(json.dumps({**good, "metrics": metrics}))
        with pytest.raises(UserError, match=r"holds metrics that are not numbers \((fvu|hierarchy_depth)\); the bundle "
                                            "is damaged, rebuild it"):
            B.open_bundle(tmp_path).validate()
    (tmp_path / B.MANIFEST).write_text(json.dumps({**good, "metrics": {"fvu": float("nan"), "metric_tokens": "all"}}))
    B.open_bundle(tmp_path).validate()
    # the tree, checked where the Hierarchy page reads it (a KeyError "'level'" or a TypeError on the page)
    tree = {"nodes": [{"id": k, "level": int(k > 1), "parent": -1 if k < 2 else 0, "label": "x", "ms": None}
                      for k in range(6)], "depth_per_level": [1.0, None]}
    B.write_json(tmp_path, B.HIERARCHY, tree)
    assert B.open_bundle(tmp_path).hierarchy() == tree
    for change, said in (({"nodes": "x"}, "nodes is not a list"), ({"nodes": [{"id": 0}]}, 'node 0 is {"id": 0}'),
                         ({"nodes": tree["nodes"] + [{**tree["nodes"][0], "id": 9999}]}, "node 6 is "),
                         ({"nodes": [{**tree["nodes"][0], "level": "0"}]}, "node 0 is "),
                         ({"depth_per_level": "deep"}, "depth_per_level is not a list of numbers")):
        B.write_json(tmp_path, B.HIERARCHY, {**tree, **change})
        with pytest.raises(UserError, match=rf"hierarchy.json is not the tree the atlas writes \({said}.*a node is "
                                            r"\{id: a neuron 0..5, level, parent: whole numbers, label, ms\}\); the "
                                            "bundle is damaged, rebuild it"):
            B.open_bundle(tmp_path).hierarchy()


def test_crafted_bundles_from_a_review_are_one_sentence(tmp_path):
    """A reviewer's damaged bundles of 2026-12-05, each a traceback, a hang or a wrong figure before: a parent loop in
    the tree (the Hierarchy page walked it for ever, +50 MB/s), JSON nested 200,000 deep (a RecursionError traceback),
    a manifest's spec, tokens or world that is no string and labels.json's method a number (tracebacks at the app's
    start or on every neuron page), an MS of inf or 7.0 and an infinite max activation (shown as figures)."""
    _write_small_bundle(tmp_path)  # K 6
    damaged = "the bundle is damaged, rebuild it"
    tree = {"nodes": [{"id": k, "level": int(k > 1), "parent": -1 if k < 2 else k - 1, "label": "x", "ms": None}
                      for k in range(6)], "depth_per_level": [1.0, None]}
    B.write_json(tmp_path, B.HIERARCHY, tree)
    assert B.open_bundle(tmp_path).hierarchy() == tree  # a chain 0 <- 2 <- 3 <- 4 <- 5 is no loop
    for parents, said in (({4: 5}, "the parents of node 4 -> 5 -> 4 make a loop"),
                          ({3: 3}, "the parents of node 3 -> 3 make a loop"),
                          ({k: (k + 1) % 6 for k in range(6)}, "the parents of node 0 -> 1 -> 2 -> 3 -> 4 -> 5 -> ... "
                                                               "make a loop"),
                          ({2: 6}, "node 2 has parent 6, outside -1..5"), ({2: -2}, "node 2 has parent -2")):
        nodes = [{**n, "parent": parents.get(n["id"], n["parent"])} for n in tree["nodes"]]
        B.write_json(tmp_path, B.HIERARCHY, {**tree, "nodes": nodes})
        with pytest.raises(UserError, match=rf"hierarchy.json is not the tree the atlas writes \({re.escape(said)}"):
            B.open_bundle(tmp_path).hierarchy()
    B.write_json(tmp_path, B.HIERARCHY, tree)
    good = json.loads((tmp_path / B.MANIFEST).read_text())
    for change, said in (({"world": 5}, "holds world = 5, not a string"),
                         ({"model": {**good["model"], "spec": 5}}, "holds model.spec = 5, not a string"),
                         ({"model": {**good["model"], "tokens": [1]}}, "holds model.tokens = [1], not a string"),
                         ({"embedder": {**good["embedder"], "spec": {"a": 1}}}, 'holds embedder.spec = {"a": 1}'),
                         ({"dataset": {**good["dataset"], "spec": 5}}, "holds dataset.spec = 5, not a string")):
        (tmp_path / B.MANIFEST).write_text(json.dumps({**good, **change}))
        with pytest.raises(UserError, match=rf"manifest.json {re.escape(said)}.*; {damaged}"):
            B.open_bundle(tmp_path)
    (tmp_path / B.MANIFEST).write_text("[" * 200_000)
    with pytest.raises(UserError, match=r"manifest.json cannot be read as JSON \(maximum recursion depth"):
        B.open_bundle(tmp_path)
    (tmp_path / B.MANIFEST).write_text(json.dumps(good))
    (tmp_path / B.HIERARCHY).write_text("[" * 200_000)
    with pytest.raises(UserError, match=r"hierarchy.json cannot be read as JSON \(maximum recursion depth"):
        B.open_bundle(tmp_path).hierarchy()
    B.write_json(tmp_path, B.HIERARCHY, tree)
    labels = json.loads((tmp_path / B.LABELS).read_text())
    B.write_json(tmp_path, B.LABELS, {**labels, "method": 5})
    with pytest.raises(UserError, match=rf"labels.json: method is 5, not a string; {damaged}"):
        B.open_bundle(tmp_path).validate()
    B.write_json(tmp_path, B.LABELS, labels)
    ms = np.load(tmp_path / "neurons/ms.npy")
    for name, value, said in (("ms", np.inf, "ms holds inf, outside the -1 to 1"), ("ms", 7.0, "ms holds 7, outside"),
                              ("ms", -1.5, "ms holds -1.5, outside"), ("max_act", np.inf, "max_act.npy holds an infinite"),
                              ("top_acts", -np.inf, "top_acts.npy holds an infinite")):
        kept = np.load(tmp_path / f"neurons/{name}.npy")
        bad = kept.copy()
        bad.flat[1] = value
        B.write_array(tmp_path, f"neurons/{name}.npy", bad)
        with pytest.raises(UserError, match=rf"^bundle {tmp_path}: (neurons/)?{re.escape(said)}.*; {damaged}\.$"):
            B.open_bundle(tmp_path).validate()
        B.write_array(tmp_path, f"neurons/{name}.npy", kept)
    B.write_array(tmp_path, "neurons/ms.npy", np.array([np.nan, 1.0, -1.0, 0.5, np.nan, 0.0], np.float32))
    B.open_bundle(tmp_path).validate()  # NaN (too few images) and the ends of the range are scores
    B.write_array(tmp_path, "neurons/ms.npy", ms)


def test_arrays_of_the_wrong_rank_and_a_malformed_skipped_list_are_one_sentence(tmp_path):
    """A per-neuron array saved with an axis too few (hist_counts or top_images 1-D: an IndexError in validate and
    `inspect`) or one too many, and a manifest whose `skipped` is not the list of images (a TypeError at the app's start)."""
    arrays = _write_small_bundle(tmp_path)  # K 6
    for name, bad, said in (("hist_counts", arrays["hist_counts"][:, 0], r"\(6,\), not a row per neuron \(6, n\)"),
                            ("top_images", arrays["top_images"][:, 0], r"\(6,\), not a row per neuron \(6, n\)"),
                            ("top_heat", arrays["top_heat"][:, :, 0], r"\(6, 3\), not a table per neuron \(6, n, m\)"),
                            ("band_acts", arrays["band_acts"][..., None], r"\(6, 2, 2, 1\), not a table per neuron \(6, n, m\)")):
        B.write_array(tmp_path, f"neurons/{name}.npy", bad)
        with pytest.raises(UserError, match=rf"^bundle {tmp_path}: neurons/{name}.npy has shape {said}; rebuild the bundle\.$"):
            B.open_bundle(tmp_path).validate()
        B.write_array(tmp_path, f"neurons/{name}.npy", arrays[name])
    B.write_array(tmp_path, "neurons/hist_edges.npy", np.linspace(-3, 1, 6)[None])  # (1, 6): 6 edges, as if right
    with pytest.raises(UserError, match="hist_edges does not match hist_counts"):
        B.open_bundle(tmp_path).validate()
    B.write_array(tmp_path, "neurons/hist_edges.npy", arrays["hist_edges"])
    good = json.loads((tmp_path / B.MANIFEST).read_text())
    for skipped in ("oops", [3], [{"index": 20, "error": "x"}], [{"error": "x"}]):
        (tmp_path / B.MANIFEST).write_text(json.dumps({**good, "skipped": skipped}))
        with pytest.raises(UserError, match=r"holds skipped = .*, not the list of images the scan could not read"):
            B.open_bundle(tmp_path).validate()
    (tmp_path / B.MANIFEST).write_text(json.dumps({**good, "skipped": [{"index": 19, "error": "truncated"}]}))
    B.open_bundle(tmp_path).validate()


def test_the_app_refuses_a_damaged_bundle_at_its_start_in_one_line(tmp_path, capsys, monkeypatch):
    """`python -m app --bundle B` validates B before serving it: an array of the wrong length was a traceback at
    the start ("operands could not be broadcast"), ids out of range served with numpy's text on the page."""
    from app.__main__ import main as app_main
    from app.server import create_app
    from app.settings import AppSettings

    for var in ("SAE_APP_CACHE", "GRADIO_TEMP_DIR"):  # the start sets Gradio's folder: put back after the test
        monkeypatch.setenv(var, str(tmp_path / "cache"))
    _write_small_bundle(tmp_path / "b")
    B.write_array(tmp_path / "b", "neurons/ms.npy", np.zeros(5, np.float32))
    assert app_main(["--bundle", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: bundle {tmp_path / 'b'}: neurons/ms.npy has 5 rows but the SAE has 6 neurons; rebuild the bundle.\n"
    B.write_array(tmp_path / "b", "neurons/ms.npy", np.zeros(6, np.float32))
    B.write_array(tmp_path / "b", "neurons/parent.npy", np.full(6, 9999))
    with pytest.raises(UserError, match="parent holds neuron ids outside 0..5"):  # before any page is built
        create_app(AppSettings.from_env(bundle=tmp_path / "b", cache=tmp_path / "cache"))


def test_tiny_bundle_through_the_reader(tiny_bundle):
    torch.set_num_threads(1)
    b = B.open_bundle(tiny_bundle)
    b.validate()
    # every one-value-per-neuron array the atlas writes is checked as one (token_max was not)
    assert {n for n in B.NEURON_ARRAYS if b.has(n) and b.array(n).ndim == 1} == {n for n in B.ONE_PER_NEURON if b.has(n)}
    m = b.manifest
    assert m["model"]["layer"] == "-2" and m["model"]["tokens"] == "max"
    assert m["sae"]["architecture"] == "matryoshka" and m["world"]
    assert not (tiny_bundle / ".work").exists() or ".work" not in json.dumps(m["files"])
    k = int(np.nanargmax(np.asarray(b.array("ms"))))
    page = b.neuron(k)
    assert page["support"] >= 2 and page["top"]
    i, act, patch = page["top"][0]
    assert act == pytest.approx(page["max_act"], rel=1e-5)
    assert m["model"]["n_prefix"] <= patch < m["model"]["n_tokens"]
    assert page["top_heat"].shape == (len(page["top"]), m["model"]["n_patches"])
    # The heat of the best patch is the image's score (max over patches), up to float16.
    assert page["top_heat"][0].max() == pytest.approx(act, rel=2e-3)
    # A gallery image comes from its thumbnail, and equals the dataset's rendering.
    assert b.thumb_path(i).is_file()
    assert np.array_equal(np.asarray(b.image(i)), np.asarray(b.dataset()[i]))
    # Search by image: an image's own embedding finds itself first.
    emb = np.asarray(b.array("images/embeddings"), np.float32)
    index = b.search_index()
    ids, _ = index.search(emb[i:i + 1], 3)
    assert ids[0, 0] == i or np.allclose(emb[ids[0, 0]], emb[i], atol=1e-3)
    sae = b.load_sae()
    assert sae.cfg.d_sae == b.n_neurons
    # each step the demo ran records its own command, runnable as it stands (they read as the demo's)
    from precompute.__main__ import parser_for

    store = next((tiny_bundle / ".work" / "acts").glob("layer_*/manifest.json"), None)
    recorded = [m["sae"]["training"]["command"]] + ([json.loads(store.read_text())["command"]] if store else [])
    for command, step in zip(recorded, ("train", "extract")):
        argv = shlex.split(command)
        assert argv[:4] == ["python", "-m", "precompute", step], command
        parser_for(argv[3:]).parse_args(argv[3:])


def test_a_damaged_thumbnail_is_rendered_again_from_the_dataset(tiny_bundle, tmp_path):
    """A thumbnail that cannot be read (garbage, cut short, empty, a decompression bomb's header) is skipped as a
    missing one is: the image comes from the dataset (it was "cannot identify image file" on the neuron page and the
    Images page, with a traceback); without the dataset either, one sentence naming the file and the fix."""
    import struct
    import zlib

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("world", ".work", ".stages"))
    i = int(B.open_bundle(tiny_bundle).array("top_images")[0, 0])
    thumb = root / B.THUMBS / f"{i}.png"
    rendered = np.asarray(B.open_bundle(tiny_bundle).dataset()[i])  # the reference: the dataset's own rendering
    good = thumb.read_bytes()
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 400 million pixels: PIL refuses to decode
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + good[33:]
    for damaged in (b"not a png at all" * 10, good[:-30], b"", bomb):
        thumb.write_bytes(damaged)
        assert np.array_equal(np.asarray(B.open_bundle(root).image(i)), rendered)
    manifest = json.loads((root / B.MANIFEST).read_text())
    manifest.pop("world")
    manifest["dataset"]["spec"] = f"imagefolder:{tmp_path / 'not-copied'}"
    (root / B.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"^the thumbnail {thumb} cannot be read \(DecompressionBombError: .*\) and the "
                                        rf"dataset cannot render it instead \(.*not-copied does not exist.*\); copy the "
                                        r"bundle's images/thumbs again or make its dataset available here\.$"):
        B.open_bundle(root).image(i)


def test_dataset_and_index_open_once_under_concurrent_first_calls(tiny_bundle, monkeypatch):
    """The app's first requests may arrive together: each lazily opened resource is opened once."""
    import threading
    import time

    from sae_core import datasets, search_index

    calls = {"index": 0, "dataset": 0}
    real_index, real_dataset = search_index.load_index, datasets.open_dataset

    def slow(name, real):
        def opener(*args, **kwargs):
            calls[name] += 1
            time.sleep(0.05)            # widen the window a second opener would slip through
            return real(*args, **kwargs)
        return opener

    monkeypatch.setattr(search_index, "load_index", slow("index", real_index))
    monkeypatch.setattr(datasets, "open_dataset", slow("dataset", real_dataset))
    b = B.open_bundle(tiny_bundle)
    got: list = []
    barrier = threading.Barrier(8)

    def first_call():
        barrier.wait()
        got.append((b.search_index(), b.dataset()))

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == {"index": 1, "dataset": 1}
    assert len(got) == 8 and all(g[0] is got[0][0] and g[1] is got[0][1] for g in got)


def test_inspect_json(tiny_bundle, capsys, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "precompute", "inspect", str(tiny_bundle), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    for key in ("n_neurons", "fvu", "l0", "dead_frac", "ms_mean", "ms_mean_raw", "ms_ground_truth_spearman",
                "ms_agreement", "ms_agreement_factor_embedder", "ms_agreement_ideal_neurons", "label_accuracy",
                "hierarchy_depth"):
        assert key in s, key
    b = B.open_bundle(tiny_bundle)
    ms = np.asarray(b.array("ms"), np.float64)
    assert s["n_neurons"] == len(ms)
    assert s["ms_mean"] == pytest.approx(float(np.nanmean(ms)), rel=1e-5)
    # dead_frac counts latents silent on every token of the scanned images (all tokens, as random:K SAEs
    # are measured), so each of them has support 0 under the tiny bundle's CLS score, not conversely
    no_gallery = float((np.asarray(b.array("support")) == 0).mean())
    assert s["dead_frac_images"] == pytest.approx(no_gallery)
    assert s["dead_frac"] <= no_gallery + 1e-9
    # the figures the manifest does not carry, from world.json and the index's metadata
    world = json.loads((tiny_bundle / "world.json").read_text())
    assert s["ms_agreement_raw"] == world["ms_agreement_raw"] and 0 < s["ms_agreement_raw"] < 1
    for name in ("factor_embedder", "ideal_neurons"):
        assert s[f"ms_ground_truth_spearman_{name}"] == world["calibration"][name]["ms_ground_truth_spearman"]
    assert s["search_index"]["kind"] == "flat" and s["search_index"]["n"] == b.n_images
    from precompute.__main__ import main  # the refusal in-process: the JSON above came from the real command

    damaged = tmp_path / "calibration"  # world.json's calibration of another type: an AttributeError in inspect
    shutil.copytree(tiny_bundle, damaged, ignore=shutil.ignore_patterns("world", ".work", ".stages"))
    for calibration in ("x", {"factor_embedder": 0.5}):
        (damaged / "world.json").write_text(json.dumps({**world, "calibration": calibration}))
        for json_flag in ([], ["--json"]):
            assert main(["inspect", str(damaged), *json_flag]) == 2
            assert capsys.readouterr().err == (f"error: {damaged / 'world.json'} holds calibration as "
                                               f"{json.dumps(calibration)}, not an object of calibration runs; the "
                                               "bundle is damaged: copy it again or rebuild it.\n")

    assert main(["inspect", str(tiny_bundle / "neurons")]) == 2
    assert "neurons holds none of what inspect reads: a bundle" in capsys.readouterr().err
    # an SAE folder (the bundle's copy of its SAE): what the bundle's manifest records of it
    assert main(["inspect", str(tiny_bundle / "sae"), "--json"]) == 0
    sae = json.loads(capsys.readouterr().out)
    assert (sae["kind"], sae["architecture"], sae["d_sae"], sae["k"]) == \
        ("sae", b.manifest["sae"]["architecture"], b.n_neurons, b.manifest["sae"]["k"])
    assert sae["trained_on"]["layer"] == b.manifest["model"]["layer"]
    from sae_core.checkpoint import load_sae  # the bundle given where an SAE folder goes: pointed to its copy

    with pytest.raises(UserError, match=rf"is a bundle, not an SAE folder; its SAE is {tiny_bundle / 'sae'} \(pass that\)"):
        load_sae(tiny_bundle)
    damaged = tmp_path / "sae"
    shutil.copytree(tiny_bundle / "sae", damaged)
    (damaged / "metrics.json").write_text('{"fvu": ')  # optional: the SAE is still inspected, the file named
    assert main(["inspect", str(damaged)]) == 0
    assert f"{damaged / 'metrics.json'} cannot be read as JSON" in capsys.readouterr().out
    unfinished = tmp_path / "unfinished"
    (unfinished / ".stages").mkdir(parents=True)  # a build stopped before its manifest, with no settings recorded
    assert main(["inspect", str(unfinished)]) == 0  # was refused as "unfinished"; now says how far it got
    out = capsys.readouterr().out
    assert out.startswith(f"unfinished bundle {unfinished} (its build stopped or is still running)")
    assert "done     nothing yet" in out and "resume   no settings recorded: re-run the command that built it" in out


def test_inspect_gives_the_hierarchy_depth_of_a_bundle_not_of_the_world(tiny_bundle, tmp_path, capsys):
    """A bundle on a taxonomy other than the world's (an iNaturalist folder) has its depth per level in the manifest's
    hierarchy stage and in hierarchy.json (the Hierarchy page's table), not in world.json: `inspect` said null."""
    from precompute.__main__ import main

    root = tmp_path / "inat"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("world", "world.json", ".work", ".stages"))
    manifest = json.loads((root / B.MANIFEST).read_text())
    for key in ("world", "world_split"):
        manifest.pop(key)
    manifest["files"].pop("world.json")
    manifest["files"].pop("world_dir", None)  # where the bundle carries its world (the suite's may name it outside)
    manifest["metrics"] = {k: v for k, v in manifest["metrics"].items() if k not in ("hierarchy_depth", "ms_agreement")}
    (root / B.MANIFEST).write_text(json.dumps(manifest))
    depth = json.loads((root / B.HIERARCHY).read_text())["depth_per_level"]  # what the Hierarchy page shows
    assert len(depth) == 4 and all(0 < d < 5 for d in depth)
    assert main(["inspect", str(root), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["hierarchy_depth"] == depth and s["ms_agreement"] is None and s["world"] is None
    assert main(["inspect", str(root)]) == 0
    assert re.search(r"hierarchy_depth +\[" + ", ".join(f"{d:.4f}" for d in depth) + r"\]\n", capsys.readouterr().out)


def test_inspect_of_a_bundle_copied_without_its_world_says_to_copy_it(tiny_bundle, tmp_path, capsys):
    """A demo bundle copied without the world/ it carries, built on another machine: `inspect` refused it with "lists
    world but it is missing; rebuild the bundle"; the explorer serves it from its thumbnails, so inspect shows it and
    says to copy the folder along."""
    from precompute.__main__ import main

    root = tmp_path / "copied"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("world", ".work", ".stages"))
    manifest = json.loads((root / B.MANIFEST).read_text())
    manifest["files"]["world_dir"] = "world"  # a bundle that carries its world, as `demo --out` writes one
    (root / B.MANIFEST).write_text(json.dumps({**manifest, "world": str(tmp_path / "cluster" / "world")}))
    said = (f"{root / 'world'} is missing (the embedded world its images and models come from): copy the world/ "
            "folder along with the bundle, or rebuild it; until then the explorer shows its gallery thumbnails only and "
            "cannot steer")
    assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["world_missing"] == said
    assert main(["inspect", str(root)]) == 0
    assert f"\n  world    {said}\n" in capsys.readouterr().out
    shutil.copytree(B.open_bundle(tiny_bundle).world_dir, root / "world")  # copied along: nothing to say
    assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["world_missing"] is None
    # built with --world beside it (the suite's layout) and moved without that world: said too (nothing until
    # 2026-12-05), and nothing once the world is where the manifest names it
    shutil.rmtree(root / "world")
    manifest["files"].pop("world_dir")
    (root / B.MANIFEST).write_text(json.dumps({**manifest, "world": str(tmp_path / "cluster" / "world")}))
    assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["world_missing"] == (
        f"the world {tmp_path / 'cluster' / 'world'} it was built on is missing (its images and models come from it): "
        "put a copy there or inside the bundle as world/, or rebuild it; until then the explorer shows its gallery "
        "thumbnails only and cannot steer")
    shutil.copytree(B.open_bundle(tiny_bundle).world_dir, tmp_path / "cluster" / "world")
    assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["world_missing"] is None


def test_inspect_prints_a_bundles_strings_without_their_terminal_controls(tiny_bundle, tmp_path, capsys):
    """A labels method of "\\x1b[2J...\\x1b]0;title\\x07" came out of `inspect` byte for byte until 2026-12-05: it
    cleared the screen, recoloured the text and set the window's title. Each control character reads \\xNN now,
    the rest of the table as before; --json escapes them as JSON does."""
    from precompute.__main__ import main

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns(".work", ".stages"))
    labels = json.loads((root / "neurons" / "labels.json").read_text())
    method = "clip-text \x1b[2J\x1b[31mRED\x1b]0;pwned\x07 \x9b31m end"
    (root / "neurons" / "labels.json").write_text(json.dumps({**labels, "method": method}))
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "  labels   clip-text \\x1b[2J\\x1b[31mRED\\x1b]0;pwned\\x07 \\x9b31m end\n" in out
    assert not set(out) & ({chr(c) for c in range(32)} - {"\n"} | {chr(c) for c in range(0x7f, 0xa0)})
    assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label_method"] == method


def test_inspect_table_shows_an_ivfpq_index_text_recall(tiny_bundle, tmp_path, capsys):
    """The table says what --json says of an IVF-PQ index: its image recall and, tuned for the vocabulary's
    prompts, their recall (the table left the text figure out)."""
    from precompute.__main__ import main
    from sae_core.search_index import build_index

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b, ignore=shutil.ignore_patterns(".work", "thumbs"))
    emb = np.load(b / B.EMBEDDINGS)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((5, emb.shape[1])).astype(np.float32)
    build_index(emb, exact_threshold=1000, text_queries=text / np.linalg.norm(text, axis=1, keepdims=True)).save(b / B.INDEX)
    m = json.loads((b / B.MANIFEST).read_text())
    m["files"] = {k: v for k, v in m["files"].items() if k != "thumbs"}
    (b / B.MANIFEST).write_text(json.dumps(m))
    r = json.loads((b / "images/index.faiss.json").read_text())["recall"]
    assert main(["inspect", str(b)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("search"))
    assert line == (f"  search   ivfpq index of {len(emb)} images, recall@10 {r['value']:.4f}, text prompts "
                    f"{r['value_text']:.4f} within the exact top-100")


def test_inspect_says_what_the_activation_bands_are(tiny_bundle, tmp_path, capsys):
    """inspect's bands: quantile groups, and how many latents have every band full, counted here from the band
    sizes (a band is full when it holds at least as many images as it samples); a bundle whose scan stored no
    sizes (built before quantile groups) is named as such, with the way to rebuild its bands."""
    from precompute.__main__ import main

    b = B.open_bundle(tiny_bundle)
    counts = np.asarray(b.array("band_counts"))
    samples = np.asarray(b.array("band_images")).shape[2]
    full = int((counts >= samples).all(1).sum())
    assert 0 < full < b.n_neurons
    assert main(["inspect", str(tiny_bundle), "--json"]) == 0
    bands = json.loads(capsys.readouterr().out)["bands"]
    assert bands["image_score"] == {"kind": "quantile", "n_bands": counts.shape[1], "samples": samples, "all_full": full}
    assert main(["inspect", str(tiny_bundle)]) == 0
    assert f"all {counts.shape[1]} full for {full} latents" in capsys.readouterr().out

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old, ignore=shutil.ignore_patterns(".work", "band_counts.npy", "patch_band_counts.npy"))
    m = json.loads((old / B.MANIFEST).read_text())
    m["files"] = {k: v for k, v in m["files"].items() if not k.endswith("band_counts")}
    (old / B.MANIFEST).write_text(json.dumps(m))
    assert main(["inspect", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bands"]["image_score"]["kind"] == "log_bins"
    assert main(["inspect", str(old)]) == 0
    assert "log bins (built before 2026-12-04); for quantile groups delete .stages/scan.json" in capsys.readouterr().out


def test_an_old_cls_bundles_strength_unit_is_said_to_be_the_cls_max(tiny_bundle, tmp_path, capsys):
    """A CLS-scored bundle built before 2026-12-01 kept neither `token_max` nor the patch gallery, so a steering
    strength of 1 was each latent's largest CLS activation (1.0 raw where it never fires on the CLS token), and
    nothing said so (a reviewer's old bundle: `--strength 2` set 2.0 where the rebuilt bundle set 9.76). `inspect`,
    `steer --strength` and the Steer page say so now; a bundle with `token_max` says nothing."""
    from precompute.__main__ import main

    root = tmp_path / "old_cls"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns(".work", ".stages"))
    manifest = json.loads((root / B.MANIFEST).read_text())
    (root / manifest["files"].pop("token_max")).unlink()
    manifest["model"]["tokens"] = "cls"
    (root / B.MANIFEST).write_text(json.dumps(manifest))
    b = B.open_bundle(root)
    said = b.strength_unit_problem()
    assert said.startswith(f"{root} was built before 2026-12-01 and records each latent's largest activation on its "
                           "CLS token only") and str(root / ".stages" / "scan.json") in said
    max_act = np.asarray(b.array("max_act"), np.float64)
    np.testing.assert_array_equal(b.strength_units(), np.where(max_act > 0, max_act, 1.0))
    assert B.open_bundle(tiny_bundle).strength_unit_problem() is None
    assert main(["inspect", str(root)]) == 0 and f"\n  steering {said}\n" in capsys.readouterr().out
    assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["strength_unit_problem"] == said
    k = int(np.argmax(max_act))
    assert main(["steer", "--bundle", str(root), "--image", "0", "--latent", str(k), "--strength", "2",
                 "--max-new-tokens", "2", "--json"]) == 0
    assert f"steer: warning: {said}; or pass --value for raw activations.\n" in capsys.readouterr().err
