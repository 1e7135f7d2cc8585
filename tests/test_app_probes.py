"""The Overview's probe panels: the ROC figure and tables from the files the probe commands write, the
sentence for a missing or unusable file, and the cross-modal panel of a `precompute crossmodal` bundle."""
import json
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.probes import CROSSMODAL_COLUMNS, ONTOLOGY_COLUMNS, ProbeResults, command
from sae_core.crossmodal import cross_modal_scores, summary

# tables show figures to 3 decimals: at most half a thousandth from the file's (0.4975 shows as 0.497)
SHOWN = 5e-4 + 1e-9


def results(root: Path) -> ProbeResults:
    return ProbeResults(root, json.loads((root / "manifest.json").read_text()))


def trapezoid(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def test_roc_panel_follows_the_ood_json(probe_outputs):
    d = json.loads((probe_outputs.bundle / "probes" / "ood.json").read_text())
    note, fig, table = results(probe_outputs.bundle).ood()
    *curves, chance = fig["data"]
    assert chance["x"] == [0, 1] and chance["y"] == [0, 1]
    names = [t["name"].split(" ")[0] for t in curves]
    assert sorted(names) == sorted(d["methods"])
    for n, t in zip(names, curves):  # every point as the command wrote it
        assert t["x"] == d["curves"][n]["fpr"] and t["y"] == d["curves"][n]["tpr"]
        assert t["line"]["dash"] == ("solid" if n.startswith("sae_") else "dash")
    shown = {n for n, t in zip(names, curves) if t["visible"] is True}
    assert {t["visible"] for t in curves} <= {True, "legendonly"}
    assert shown == {d["best_sae"]["method"], d["best_raw"]["method"]}
    # the highlighted curves are, by the area under the drawn points, the best of their family
    for fam in ("sae_", "raw_"):
        area = {n: trapezoid(d["curves"][n]["fpr"], d["curves"][n]["tpr"]) for n in names if n.startswith(fam)}
        best = next(n for n in shown if n.startswith(fam))
        assert area[best] >= max(area.values()) - 0.02
    # the table: one row per detector, best AUROC first, figures and held-out groups as in the file
    headers, rows = table["headers"], table["data"]
    groups = sorted(d["ood_groups"])
    assert headers[:4] == ["method", "family", "AUROC", "FPR@95"] and headers[4:-1] == [f"AUROC {g}" for g in groups]
    assert [r[0] for r in rows] == sorted(d["methods"], key=lambda n: (-d["methods"][n]["auroc"], n))
    for r in rows:
        m = d["methods"][r[0]]
        assert r[1] == ("SAE" if r[0].startswith("sae_") else "raw")
        assert r[2] == pytest.approx(m["auroc"], abs=SHOWN) and r[3] == pytest.approx(m["fpr95"], abs=SHOWN)
        assert r[4:-1] == pytest.approx([m["auroc_by_group"][g] for g in groups], abs=SHOWN)
    shown = re.sub(r"\\(.)", r"\1", note)  # as the page shows it: a method's "_" is backslashed in the Markdown
    assert d["best_sae"]["method"] in shown and ("not met" in note) == (not d["goal"]["met"])


def test_ontology_and_probe_tables_follow_their_files(probe_outputs):
    onto = json.loads((probe_outputs.bundle / "probes" / "ontology.json").read_text())
    pr = json.loads((probe_outputs.bundle / "probes" / "probes.json").read_text())
    res = results(probe_outputs.bundle)
    _, table = res.ontology()
    assert table["headers"] == ONTOLOGY_COLUMNS
    want = [(view, kind, c, e[c]["score"]) for view, kinds in onto["views"].items() for kind, e in kinds.items()
            for c in ("coactivation", "decoder_cosine") if c in e]
    got = [(r[0], "sae" if r[1] == "SAE" else r[1], r[2], r[4]) for r in table["data"]]
    assert [g[:3] for g in got] == [w[:3] for w in want] and len(got) == 3 * 3  # views x (SAE 2 + raw 1)
    for g, w in zip(got, want):
        assert (g[3] is None and w[3] is None) or g[3] == pytest.approx(w[3], abs=SHOWN)
    _, table = res.probes()
    rows = {r[0]: r[1:] for r in table["data"]}
    for f, e in pr["factors"].items():
        assert rows[f] == pytest.approx([e["sae"], e["raw"], e["chance"]], abs=SHOWN)
    unseen = pr["held_out_combinations"]["colour"]
    assert rows["colour, unseen (shape, colour) pairs"][:2] == pytest.approx([unseen["sae_unseen"], unseen["raw_unseen"]],
                                                                            abs=SHOWN)


def test_missing_and_unusable_files_give_one_sentence(probe_outputs, tmp_path):
    root = tmp_path / "b"
    (root / "probes").mkdir(parents=True)
    res = ProbeResults(root, {"model": {"layer": "-2"}, "world": "/world"})
    note, fig, table = res.ood()
    assert fig is None and table is None
    assert "missing" in note and f"`python -m precompute ood --bundle {root}`" in note
    assert command("ood", root) == f"python -m precompute ood --bundle {root}"
    assert f"`python -m precompute ontology --bundle {root}`" in res.ontology()[0]
    good = json.loads((probe_outputs.bundle / "probes" / "ood.json").read_text())
    text = json.dumps(good)
    no_curve = json.loads(text)
    del no_curve["curves"][next(iter(no_curve["curves"]))]
    short_curve = json.loads(text)
    next(iter(short_curve["curves"].values()))["tpr"].pop()
    bad_auroc = json.loads(text)
    next(iter(bad_auroc["methods"].values()))["auroc"] = "high"
    nan_fpr = json.loads(text)
    next(iter(nan_fpr["methods"].values()))["fpr95"] = float("nan")
    variants = [text[: len(text) // 2], "", "[]", "null", '{"methods": {}}', json.dumps({"methods": good["methods"]}),
                json.dumps(no_curve), json.dumps(short_curve), json.dumps(bad_auroc), json.dumps(nan_fpr)]
    path = root / "probes" / "ood.json"
    for i, v in enumerate(variants):
        path.write_text(v)
        os.utime(path, ns=(i * 10**9, i * 10**9))  # a new stamp for each variant: the panel re-reads it
        note, fig, table = res.ood()
        assert fig is None and table is None, v[:80]
        assert note.startswith("`probes/ood.json` is unreadable (") and f"`{command('ood', root)}`" in note, note
        assert "\n" not in note and note.endswith(".")
    path.write_text(text)  # the command rewrote it: the panel comes back without a restart
    os.utime(path, ns=(99 * 10**9, 99 * 10**9))
    assert res.ood()[1] is not None
    (root / "probes" / "probes.json").write_text('{"factors": {"colour": {"sae": null}}}')
    assert res.probes()[0].startswith("`probes/probes.json` is unreadable (")


def test_hints_of_a_bundle_without_the_world_are_commands_that_run(tiny_bundle, tiny_world, tmp_path, capsys):
    import shutil

    from precompute.__main__ import main
    from sae_core.world.dataset import WorldDataset

    root = tmp_path / "nw"  # the tiny bundle as if built on a plain image folder
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("probes"))
    for name, split, n in (("id", "val", 30), ("ood", "ood", 10)):
        (tmp_path / name).mkdir()
        w = WorldDataset(tiny_world, split)
        for i in range(n):
            w[i].save(tmp_path / name / f"{i:03d}.png")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["world"]
    # as an image folder describes itself; n_images stays the arrays' row count, which the reader checks
    manifest["dataset"] = {"spec": f"imagefolder:{tmp_path / 'id'}", "kind": "ImageFolder",
                           "n_images": manifest["dataset"]["n_images"]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    res = ProbeResults(root, manifest)
    # the commands the world bundle's hints name fail here (no default OOD set, no factor labels)
    assert main(["ood", "--bundle", str(root)]) == 2 and main(["probes", "--bundle", str(root)]) == 2
    capsys.readouterr()
    note = res.ood()[0]
    hinted = f"python -m precompute ood --bundle {root} --ood imagefolder:PATH"
    assert f"`{hinted}` (PATH: a folder of out-of-distribution images)" in note
    argv = hinted.replace("PATH", str(tmp_path / "ood")).split()[3:]
    assert main([*argv, "--no-cache"]) == 0 and res.ood()[1] is not None  # the hinted command runs
    assert f"`python -m precompute ontology --bundle {root} --dataset imagefolder:PATH`" in res.ontology()[0]
    probes = res.probes()[0]
    assert "need the embedded world's labels" in probes and "precompute probes" not in probes


def constructed_report():
    """crossmodal.json's figures for activations built by hand: unit 0 fires on red patches (2.0) and on the
    word "red" (1.0) only; unit 1 on red patches only; unit 2 on everything (the writer's per-unit fields)."""
    rng = np.random.default_rng(0)
    concepts = ["red", "blue"]
    lab_img, lab_txt = np.zeros((400, 2), bool), np.zeros((300, 2), bool)
    lab_img[:100, 0] = lab_txt[:50, 0] = True
    lab_img[100:200, 1] = lab_txt[50:100, 1] = True
    img, txt = np.zeros((400, 3)), np.zeros((300, 3))
    img[:100, 0], txt[:50, 0] = 2.0, 1.0
    img[:100, 1] = 1.0
    img[:, 2], txt[:, 2] = rng.random(400) + 0.1, rng.random(300) + 0.1
    sc = cross_modal_scores(img, lab_img, txt, lab_txt, concepts, min_support=20)
    idx, val = sc.best()
    units = [{"concept": concepts[j] if j >= 0 else None, "score": None if not np.isfinite(v) else float(v),
              "auroc_image": None, "auroc_text": None, "top_words": [["red", 1.0]] if k == 0 else []}
             for k, (j, v) in enumerate(zip(idx, val))]
    return {"threshold": 0.5, "sae": summary(sc, 0.5), "raw": {"n_units": 6, "n_cross_modal": 1}, "units": units}


def test_crossmodal_panel(tiny_crossmodal_bundle, tmp_path):
    cm = json.loads((tiny_crossmodal_bundle.path / "crossmodal.json").read_text())
    res = results(tiny_crossmodal_bundle.path)
    assert res.is_crossmodal
    note, counts, table = res.crossmodal()
    n = cm["sae"]["n_cross_modal"]
    assert f"{n} of {cm['sae']['n_units']} SAE latents" in note
    assert counts["data"] == sorted([[c, v] for c, v in cm["sae"]["per_concept"].items() if v],
                                    key=lambda r: (-r[1], r[0]))
    assert [r[0] for r in table["data"]] == sorted(
        (k for k, u in enumerate(cm["units"]) if u["score"] is not None and u["score"] >= cm["threshold"]),
        key=lambda k: -cm["units"][k]["score"])
    assert "vision-layer bundles" in res.ood()[0]  # the probe commands do not apply; said in one line
    # activations built by hand: the panel lists exactly the cross-modal unit, with its constructed means
    root = tmp_path / "cm"
    root.mkdir()
    (root / "crossmodal.json").write_text(json.dumps(constructed_report()))
    manifest = {"model": {"layer": "lm:1"}, "crossmodal": {"file": "crossmodal.json"}}
    note, counts, table = ProbeResults(root, manifest).crossmodal()
    assert counts["data"] == [["red", 1]] and "1 of 3 SAE latents" in note and "1 of 6" in note
    assert table["headers"] == CROSSMODAL_COLUMNS
    assert table["data"] == [[0, "red", 1.0, 2.0, 0.0, 1.0, 0.0, None, None, "red"]]
    # no crossmodal.json: the manifest's summary, and a sentence saying so
    rep = constructed_report()
    (root / "crossmodal.json").unlink()
    manifest["crossmodal"] = {"n_latents": 3, "n_cross_modal": 1, "per_concept": rep["sae"]["per_concept"],
                              "examples": rep["sae"]["examples"], "threshold": 0.5}
    note, counts, table = ProbeResults(root, manifest).crossmodal()
    assert "`crossmodal.json` is missing" in note and [r[:3] for r in table["data"]] == [[0, "red", 1.0]]
    assert ProbeResults(root, {"model": {"layer": "-2"}}).crossmodal() is None


def test_app_serves_a_crossmodal_bundle(tiny_crossmodal_bundle, tmp_path):
    """`python -m app --bundle B2`: the cross-modal panel, neuron pages, and steering off with its reason."""
    from gradio_client import Client

    from app.server import spawn

    root = tiny_crossmodal_bundle.path
    proc, url = spawn(root, cache=tmp_path / "cache", extra_env={"OMP_NUM_THREADS": "1"})
    try:
        c = Client(url, verbose=False, download_files=False)
        names = set(c.view_api(print_info=False, return_format="dict")["named_endpoints"])
        assert {"/probes_overview", "/crossmodal_overview", "/open_neuron_from_crossmodal"} <= names
        assert "/steer" not in names  # steering is off for a language-model SAE
        note, counts, table = c.predict(api_name="/crossmodal_overview")
        cm = json.loads((root / "crossmodal.json").read_text())
        assert f"{cm['sae']['n_cross_modal']} of {cm['sae']['n_units']} SAE latents" in note
        assert table["value"]["headers"] == CROSSMODAL_COLUMNS
        support = np.load(root / "neurons" / "support.npy")
        k = int(table["value"]["data"][0][0]) if table["value"]["data"] else int(np.argmax(support))
        page = c.predict(k, api_name="/neuron_page")
        top = np.load(root / "neurons" / "top_images.npy")[k]
        assert page[0] == k and [g["caption"].split()[0] for g in page[2]] == [f"#{i}" for i in top if i >= 0]
        assert "vision-layer bundles" in c.predict(api_name="/probes_overview")[0]
        # search by image codes the image at the vision layer: off here, in words that say why (it said the
        # bundle's model was "not available", which had loaded), and its upload is not on the page
        from gradio_client import handle_file
        from gradio_client.exceptions import AppError
        from PIL import Image

        Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
        with pytest.raises(AppError, match=r"^search by image is off for this bundle: its SAE reads the language model"):
            c.predict(handle_file(str(tmp_path / "red.png")), api_name="/search_neurons_by_image")
        config = httpx.get(f"{url}/config", timeout=30).json()
        upload = next(x for x in config["components"] if x.get("props", {}).get("elem_id") == "search-upload")
        assert upload["props"]["visible"] is False
    finally:
        proc.terminate()
        proc.wait(30)
