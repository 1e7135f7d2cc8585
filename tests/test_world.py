"""The embedded world: generator determinism, labels against pixels, text, taxonomy, the tiny preset."""
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_core.errors import UserError
from sae_core.world.generator import WorldSpec, render, sample_factors

REPO = Path(__file__).resolve().parents[1]
SPEC = WorldSpec(seed=3, image_size=32, splits={"train": 500, "val": 100, "ood": 100})

# An independent copy of the colour specification (RGB of each colour name), not imported.
PALETTE = {"red": (220, 30, 30), "orange": (245, 130, 20), "yellow": (240, 220, 30), "pink": (245, 120, 190),
           "green": (40, 170, 60), "cyan": (30, 200, 220), "blue": (30, 70, 220), "purple": (140, 50, 190),
           "white": (250, 250, 250), "grey": (120, 120, 120), "black": (20, 20, 20), "brown": (130, 75, 30)}
# Area of a shape in units of r^2 (r = half its diameter), from its geometry.
AREA = {"circle": np.pi, "oval": np.pi * 0.58, "ring": np.pi * 0.75, "square": 1.48 ** 2,
        "diamond": 1.6, "triangle": 0.5 * 1.9 * 1.72, "hexagon": 1.5 * np.sqrt(3), "cross": 2.72 - 0.68 ** 2}
SYMMETRIC = {"circle", "oval", "ring", "square", "diamond", "hexagon", "cross"}

DIGEST = """
import hashlib, json, sys
from sae_core.world.generator import WorldSpec, render
spec = WorldSpec(seed=3, image_size=32, splits={"train": 500, "val": 100, "ood": 100})
h = hashlib.sha256()
for split in ("train", "val", "ood"):
    for i in range(0, 60, 7):
        img, masks, f = render(spec, split, i)
        h.update(img.tobytes()); h.update(masks.tobytes()); h.update(json.dumps(f, sort_keys=True).encode())
print(h.hexdigest())
"""


def test_images_are_identical_in_another_process():
    other = subprocess.run([sys.executable, "-c", DIGEST], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert other.returncode == 0, other.stderr
    h = hashlib.sha256()
    for split in ("train", "val", "ood"):
        for i in range(0, 60, 7):
            img, masks, f = render(SPEC, split, i)
            h.update(img.tobytes()); h.update(masks.tobytes()); h.update(json.dumps(f, sort_keys=True).encode())
    assert other.stdout.strip() == h.hexdigest()
    # a different seed or index gives a different image
    a = np.asarray(render(SPEC, "train", 0)[0])
    assert not np.array_equal(a, np.asarray(render(WorldSpec(seed=4), "train", 0)[0]))
    assert not np.array_equal(a, np.asarray(render(SPEC, "train", 1)[0]))


def test_labels_match_pixels_and_masks_are_where_the_shapes_are():
    checked_area = 0
    for i in range(150):
        img, masks, f = render(SPEC, "train", i)
        px = np.asarray(img).astype(int)
        assert img.mode == "RGB" and img.size == (32, 32) and masks.shape == (len(f["objects"]), 32, 32)
        union = masks.any(0)
        for k, obj in enumerate(f["objects"]):
            m = masks[k]
            assert m.sum() >= 12, (i, obj)
            inside = px[m]
            median = np.median(inside, axis=0)
            nearest = min(PALETTE, key=lambda c: np.abs(np.array(PALETTE[c]) - median).max())
            assert nearest == obj["colour"], (i, obj, median)
            # the fill is flat: nearly every mask pixel is the object's own RGB (edges are anti-aliased)
            exact = (np.abs(inside - np.array(obj["rgb"])).max(1) <= 6).mean()
            assert exact >= 0.45, (i, obj, exact)
            assert np.abs(np.array(obj["rgb"]) - PALETTE[obj["colour"]]).max() <= 12
            if len(f["objects"]) == 1 and obj["shape"] in AREA:
                r = obj["diameter"] * 32 / 2
                expected = AREA[obj["shape"]] * r * r
                assert abs(m.sum() - expected) <= 0.25 * expected + 3, (i, obj, m.sum(), expected)
                checked_area += 1
                if obj["shape"] in SYMMETRIC:
                    ys, xs = np.nonzero(m)
                    assert abs(xs.mean() + 0.5 - obj["x"] * 32) < 0.8 and abs(ys.mean() + 0.5 - obj["y"] * 32) < 0.8
        # far from every mask, no pixel has an object's colour
        grown = union.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= np.roll(np.roll(union, dy, 0), dx, 1)
        for obj in f["objects"]:
            far = px[~grown]
            assert (np.abs(far - np.array(obj["rgb"])).max(1) <= 6).mean() < 0.01, (i, obj)
    assert checked_area >= 40


def test_splits_hold_out_one_shape_and_one_colour():
    seen = {"train": set(), "val": set()}
    for split in ("train", "val"):
        for i in range(300):
            for o in sample_factors(SPEC, split, i)["objects"]:
                seen[split].add((o["shape"], o["colour"]))
                assert o["shape"] != SPEC.ood_shape and o["colour"] != SPEC.ood_colour
    shapes = {s for s, _ in seen["train"]}
    colours = {c for _, c in seen["train"]}
    assert len(shapes) >= 9 and len(colours) >= 9
    kinds = set()
    for i in range(100):
        objs = sample_factors(SPEC, "ood", i)["objects"]
        held = [(o["shape"] == SPEC.ood_shape, o["colour"] == SPEC.ood_colour) for o in objs]
        assert any(a or b for a, b in held)
        kinds.update(h for h in held if any(h))
    assert kinds == {(True, False), (False, True), (True, True)}
    textures = {sample_factors(SPEC, "train", i)["background"]["texture"] for i in range(200)}
    assert len(textures) >= 4
    two = sum(len(sample_factors(SPEC, "train", i)["objects"]) == 2 for i in range(400))
    assert 60 < two < 180  # about 30% of images hold two objects


def test_pinned_factors_of_a_known_image():
    """Guards cross-version drift of the seeded stream: these values were recorded once."""
    f = sample_factors(WorldSpec(seed=0), "train", 0)
    summary = [(o["shape"], o["colour"], o["size"], o["position"]) for o in f["objects"]]
    assert (summary, f["background"]["texture"]) == ([("crescent", "red", "small", "right")], "dotted")


def test_taxonomy_has_four_levels_and_inaturalist_names():
    from sae_core.world.taxonomy import build_taxonomy, taxonomy_path

    tax = build_taxonomy(SPEC)
    assert tax["levels"] == ["family", "shape", "colour_group", "colour"]
    families = {leaf["path"][0] for leaf in tax["leaves"]}
    shapes = {leaf["path"][1] for leaf in tax["leaves"]}
    assert len(families) >= 3 and len(shapes) >= 9
    for k, leaf in enumerate(tax["leaves"]):
        parts = leaf["name"].split("_")
        assert parts[0] == f"{k:05d}" and parts[1:] == leaf["path"]
        assert leaf["held_out"] == (SPEC.ood_shape in leaf["path"] or SPEC.ood_colour in leaf["path"])
    paths = {tuple(leaf["path"]) for leaf in tax["leaves"]}
    for i in range(50):
        img, masks, f = render(SPEC, "train", i)
        path = taxonomy_path(f, masks)
        assert tuple(path) in paths
        # the path is about the object with the most visible pixels
        big = f["objects"][int(np.argmax(masks.sum((1, 2))))]
        assert path[1] == big["shape"] and path[3] == big["colour"]


def test_text_names_the_factors_and_tokenizes_without_unknown_words():
    from sae_core.world.text import UNK, WHAT_IS_SHOWN, build_tokenizer, caption, qa_pairs, training_text

    tok = build_tokenizer(add_eos=True, model_max_length=32)
    rng = np.random.default_rng(0)
    for split in ("train", "ood"):
        for i in range(100):
            img, masks, f = render(SPEC, split, i)
            cap = caption(f)
            objects, background = cap.split(" , ")
            phrases = [p.split() for p in objects.split(" and ")]
            assert [p[:4] for p in phrases] == [["a", o["size"], o["colour"], o["shape"]] for o in f["objects"]]
            assert background == f"{f['background']['texture']} background"
            texts = [cap, training_text(f, rng)[0]] + [q + " " + a for _, q, a in qa_pairs(f, masks)]
            ids = tok(texts)["input_ids"]
            assert all(tok.convert_tokens_to_ids(UNK) not in seq for seq in ids)
            assert max(map(len, ids)) <= 32
            qa = {q: a for _, q, a in qa_pairs(f, masks)}
            assert qa[WHAT_IS_SHOWN] in {o["shape"] for o in f["objects"]}


def test_training_is_deterministic_for_a_seed():
    import torch

    from precompute.world.clip import build_clip, train_clip
    from precompute.world.pool import Pool
    from sae_core.world.text import build_tokenizer, vocabulary

    cfg = dict(hidden=32, layers=2, heads=2, patch=8, text_hidden=32, text_layers=1, max_text_len=32, proj=16,
               lr=3e-3, wd=0.05, steps=4, batch=16, full_caption_prob=0.3)
    pool = Pool(SPEC, "train", 64)
    tok = build_tokenizer(True, 32)

    def weights(seed):
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        m = build_clip(cfg, 32, len(vocabulary()))
        train_clip(m, tok, pool, cfg, seed)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    a, b, c = weights(0), weights(0), weights(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_claims_decide_which_images_a_text_describes():
    from precompute.world.clip import claim_matrix
    from precompute.world.pool import Pool
    from sae_core.world.text import caption, training_text

    pool = Pool(SPEC, "train", 80)
    idx = np.arange(80)
    star = [i for i in idx if any(o["shape"] == "star" for o in pool.factors[i]["objects"])]
    red = [i for i in idx if any(o["colour"] == "red" for o in pool.factors[i]["objects"])]
    red_star = [i for i in idx if any(o["colour"] == "red" and o["shape"] == "star" for o in pool.factors[i]["objects"])]
    texts = ["a photo of a star", "a photo of a red object", "a red star", caption(pool.factors[5]), "dotted background"]
    claims = [{"object": {"shape": "star"}}, {"object": {"colour": "red"}},
              {"object": {"colour": "red", "shape": "star"}}, {"exact": True}, {"texture": "dotted"}]
    t = claim_matrix(pool, idx, claims, texts)
    assert list(np.flatnonzero(t[0])) == star and list(np.flatnonzero(t[1])) == red
    assert list(np.flatnonzero(t[2])) == red_star and t[3, 5]
    assert list(np.flatnonzero(t[4])) == [i for i in idx if pool.factors[i]["background"]["texture"] == "dotted"]
    # the texts training draws, on a batch with repeated images, against the claims written out
    rng = np.random.default_rng(3)
    idx = rng.integers(80, size=200)
    drawn = dict(training_text(pool.factors[i], rng) for i in idx)  # text -> claim, each text once

    def describes(f, claim, text):
        if claim.get("exact"):
            return caption(f) == text
        if "texture" in claim:
            return f["background"]["texture"] == claim["texture"]
        return any(all(o[k] == v for k, v in claim["object"].items()) for o in f["objects"])

    t = claim_matrix(pool, idx, list(drawn.values()), list(drawn))
    want = np.array([[describes(pool.factors[i], claim, text) for i in idx] for text, claim in drawn.items()])
    assert len(drawn) > 50 and 0.01 < want.mean() < 0.5 and np.array_equal(t, want)


# ---- the tiny preset, built once per session (tests/conftest.py) ----

def test_tiny_world_meets_its_gates(tiny_world):
    from precompute.world.presets import PRESETS

    report = json.loads((tiny_world / "report.json").read_text())
    gates = PRESETS["tiny"]["gates"]
    assert gates["clip_colour_acc"] >= 0.8 and gates["llava_colour_acc"] >= 0.8
    for key, floor in gates.items():
        assert report[key] >= floor, (key, report[key], floor)
    assert report["gates_passed"] is True and report["preset"] == "tiny" and report["seed"] == 0
    assert report["build_time_s"] > 0
    meta = json.loads((tiny_world / "world.json").read_text())
    assert meta["preset"] == "tiny" and meta["ood_shape"] not in meta["train_shapes"]


def test_models_load_with_transformers_alone(tiny_world):
    import torch
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    from precompute.world.pool import normalise
    from sae_core.world.dataset import WorldDataset
    from sae_core.world.text import WHAT_IS_SHOWN, llava_prompt

    clip = CLIPModel.from_pretrained(tiny_world / "clip")
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_world / "llava")
    proc = AutoProcessor.from_pretrained(tiny_world / "llava")
    clip_proc = AutoProcessor.from_pretrained(tiny_world / "clip")
    assert llava.config.vision_feature_layer == -2
    assert not list((tiny_world / "llava").glob("*.bin")) and list((tiny_world / "llava").glob("*.safetensors"))
    # the LLaVA's vision tower is the CLIP's, unchanged by LLaVA training
    tower = llava.model.vision_tower.state_dict()
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(tower[k], v), k
    ds = WorldDataset(tiny_world, "val")
    images = [ds[i] for i in range(24)]
    # the saved processor prepares images exactly as training did
    pix = clip_proc(images=images, return_tensors="pt")["pixel_values"]
    ref = normalise(torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]))
    assert torch.allclose(pix, ref, atol=1e-5)
    inputs = proc(images=images, text=[llava_prompt("What colour is the shape? Use one word.")] * 24,
                  return_tensors="pt", padding=True)
    n_patches = (32 // 8) ** 2
    assert int((inputs["input_ids"][0] == llava.config.image_token_index).sum()) == n_patches
    out = llava.generate(**inputs, max_new_tokens=2, do_sample=False)
    answers = proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    truth = [ds.taxonomy_path(i)[3] for i in range(24)]
    right = np.mean([a.split()[0] == t if a.split() else False for a, t in zip(answers, truth)])
    assert right >= 0.6, list(zip(answers, truth))
    # the chat template gives the trained prompt format, and the steering prompt yields a shape word
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": WHAT_IS_SHOWN}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    assert text.split() == llava_prompt(WHAT_IS_SHOWN).split()
    inputs = proc(images=images[:8], text=[text] * 8, return_tensors="pt", padding=True)
    out = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
    words = [a.split()[0] for a in proc.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    shapes = set(json.loads((tiny_world / "world.json").read_text())["train_shapes"])
    assert all(w in shapes for w in words), words


def test_dataset_adapter_reads_the_world(tiny_world):
    from sae_core.world.dataset import WorldDataset

    meta = json.loads((tiny_world / "world.json").read_text())
    for split in ("train", "val", "ood"):
        ds = WorldDataset(tiny_world, split)
        assert len(ds) == meta["splits"][split]
        img = ds[len(ds) - 1]
        assert img.mode == "RGB" and img.size == (32, 32)
        spec = WorldSpec.from_json(meta)
        ref, masks, f = render(spec, split, 5)
        assert np.array_equal(np.asarray(ds[5]), np.asarray(ref)) and np.array_equal(ds.masks(5), masks)
        assert ds.factors(5) == f and len(ds.taxonomy_path(5)) == len(ds.taxonomy["levels"])
        assert ds.class_name(5).split("_")[1:] == ds.taxonomy_path(5)
        assert ds.caption(5).startswith("a ")
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(UserError, match="split"):
        WorldDataset(tiny_world, "test")


def test_dataset_adapter_refuses_a_directory_that_is_no_world(tmp_path):
    from sae_core.world.dataset import WorldDataset

    with pytest.raises(UserError, match="precompute world --out"):
        WorldDataset(tmp_path)


def test_a_bundle_where_a_world_goes_names_its_world(tmp_path, capsys):
    """A bundle given as a world (world:BUNDLE:val, --model world:BUNDLE, world --out, demo/crossmodal --world)
    said "no taxonomy.json", "no saved model" or "does not describe a world", and offered to build a world into
    the bundle; each now names the world the bundle carries, or the one its manifest was built on."""
    from precompute.__main__ import main
    from sae_core.adapters import world_model_dir
    from sae_core.datasets import open_dataset

    carries, elsewhere = tmp_path / "carries", tmp_path / "elsewhere"
    for bundle in (carries, elsewhere):
        (bundle / "world").mkdir(parents=True)
        (bundle / "world.json").write_text('{"ms_agreement": 0.7}')  # a bundle's figures, not a world's spec
    (carries / "world" / "world.json").write_text("{}")
    (carries / "manifest.json").write_text('{"schema_version": 1}')
    (elsewhere / "manifest.json").write_text(json.dumps({"schema_version": 1, "world": "/data/w"}))
    for bundle, where in ((carries, f"the world it carries is {carries / 'world'}: pass that"),
                          (elsewhere, "it was built on the world /data/w: pass that")):
        sentence = f"{bundle} is a bundle, not a world's folder; {where}."
        for read in (lambda: open_dataset(f"world:{bundle}:val"), lambda: world_model_dir(f"{bundle}:llava")):
            with pytest.raises(UserError) as e:
                read()
            assert str(e.value) == sentence
        for argv in (["world", "--out", str(bundle), "--preset", "tiny"],
                     ["demo", "--out", str(tmp_path / "new"), "--world", str(bundle), "--preset", "tiny", "--quiet"],
                     ["crossmodal", "--world", str(bundle), "--out", str(tmp_path / "cm"), "--quiet"]):
            assert main(argv) == 2
            assert capsys.readouterr().err == f"error: {sentence}\n"
        assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "world", "world.json"]  # nothing added
    assert not (tmp_path / "new").exists() and not (tmp_path / "cm").exists()


def test_command_resumes_and_recomputes_the_same_report(tiny_world, tmp_path, capsys):
    copy = tmp_path / "w"
    shutil.copytree(tiny_world, copy)
    before = json.loads((copy / "report.json").read_text())
    (copy / "report.json").unlink()
    from precompute.__main__ import main

    def inspected():  # `inspect` said the folder held "none of what inspect reads"
        assert main(["inspect", str(copy), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    s = inspected()
    assert s["kind"] == "world" and s["stages_done"] == ["world", "clip", "llava"] and not s["complete"]
    assert s["report"] is None and (s["preset"], s["seed"]) == ("tiny", 0)
    spec = json.loads((copy / "world.json").read_text())
    assert (s["splits"], s["ood_shape"], s["ood_colour"]) == (spec["splits"], spec["ood_shape"], spec["ood_colour"])
    assert s["model_seconds"] == {n: json.loads((copy / n / "world_stage.json").read_text())["seconds"]
                                  for n in ("clip", "llava")}
    cmd = [sys.executable, "-m", "precompute", "world", "--out", str(copy), "--preset", "tiny"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("world", "clip", "llava"):
        assert f"stage {stage}: already done" in proc.stderr
    after = json.loads((copy / "report.json").read_text())
    for key in ("clip_colour_acc", "clip_shape_acc", "llava_colour_acc", "llava_shape_acc", "caption_acc", "eval"):
        assert after[key] == before[key], key
    s = inspected()
    assert s["complete"] and s["gates_passed"] is after["gates_passed"] and s["gates"] == after["gates"]
    assert s["report"] == {k: after[k] for k in after["gates"]} and len(s["report"]) == 5
    # a world where a bundle goes, or as a bundle's --out, is named as a world (it was "unfinished bundle")
    from sae_core.bundle import open_bundle

    with pytest.raises(UserError, match=rf"^{re.escape(str(copy))} is an embedded world \(python -m precompute world\), "
                                        rf"not a bundle; build a bundle on it with `python -m precompute demo --world "):
        open_bundle(copy)
    assert main(["demo", "--out", str(copy), "--preset", "tiny", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: --out {copy} holds an embedded world (precompute world); give a new "
                                       "folder for the bundle.\n")
    bad = subprocess.run(cmd[:-2] + ["--preset", "demo"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "already holds a world built with --preset tiny" in bad.stderr
    # a folder whose world.json is not a world's (a bundle's ground-truth figures; one cut short): one sentence
    other = tmp_path / "bundle_like"
    other.mkdir()
    for text in ('{"ms_agreement": 0.7}', '{"preset": "tiny", "se'):
        (other / "world.json").write_text(text)
        assert main(["world", "--out", str(other), "--preset", "tiny"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {other / 'world.json'} does not describe a world this command built (no preset and " \
                      "seed in it); choose another --out.\n"


def test_train_pool_is_rendered_once_per_world_in_a_process(tmp_path):
    """The CLIP and LLaVA stages of one build share the rendered train images; another world (or a
    cleared memo) renders its own, equal to a fresh rendering."""
    import torch

    from precompute.world import stages
    from precompute.world.pool import Pool

    spec = WorldSpec(splits={"train": 40, "val": 10, "ood": 10})
    try:
        pool = stages.train_pool(tmp_path, spec)
        assert stages.train_pool(tmp_path, spec) is pool
        fresh = Pool(spec, "train", 40)
        assert torch.equal(pool.pixels, fresh.pixels) and pool.factors == fresh.factors
        other = stages.train_pool(tmp_path, WorldSpec(seed=1, splits={"train": 40, "val": 10, "ood": 10}))
        assert not torch.equal(other.pixels, pool.pixels)
        assert stages.train_pool(tmp_path, spec) is not pool  # one world kept at a time
        stages.forget_train_pool()
        assert stages._train_pools == {}
    finally:
        stages.forget_train_pool()


def test_a_resumed_demo_still_says_it_built_its_world(tiny_world, tmp_path, monkeypatch, capsys):
    """The manifest's demo.world_built_here came from the process's memory: a demo killed after its world stage and
    run again said false (a helper's 4 of 4 trials, until 2026-12-05). A demo on a world that was there says false."""
    import dataclasses

    import precompute.demo
    import precompute.extract
    import precompute.world
    from precompute.__main__ import main

    def build_world(args):  # the tiny world, copied in place of its minute of training
        shutil.copytree(tiny_world, args.out, dirs_exist_ok=True)

    real_extract = precompute.extract.run

    def killed(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompute.world, "run", build_world)
    monkeypatch.setattr(precompute.extract, "run", killed)
    # the flag is the matter here, not the SAE: a smaller pipeline than the preset's (16 s of the suite before)
    monkeypatch.setitem(precompute.demo.PRESETS, "tiny", dataclasses.replace(
        precompute.demo.PRESETS["tiny"], train_images=200, steps=10, batch_size=64, atlas_images=64))
    argv = ["demo", "--out", str(tmp_path / "b"), "--preset", "tiny", "--world", str(tmp_path / "w"), "--threads", "1",
            "--quiet"]
    assert main(argv) == 130  # killed in the extract stage, after the world's
    monkeypatch.setattr(precompute.extract, "run", real_extract)
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["demo"] == {"preset": "tiny", "world_built_here": True}
    argv = ["demo", "--out", str(tmp_path / "b2"), "--preset", "tiny", "--world", str(tmp_path / "w"), "--threads", "1",
            "--quiet"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "b2" / "manifest.json").read_text())["demo"]["world_built_here"] is False


def test_world_images_load_in_workers_started_by_spawn(tiny_world):
    """`extract --workers 2` on the world (the default on a CPU of more than 4 cores, so the one-command demo too)
    failed under the `spawn` start method (macOS's and Windows' way, Linux's forkserver from Python 3.14): the
    dataset's per-instance render cache could not be pickled (until 2026-12-05). Images read by a spawned worker
    equal this process's, pixel for pixel."""
    import copy

    import torch

    from sae_core.world.dataset import WorldDataset

    ds = WorldDataset(tiny_world, "val")
    # the state round trip a worker's unpickling makes (__getstate__/__setstate__), without the pickle module here
    assert np.array_equal(np.asarray(copy.deepcopy(ds)[3]), np.asarray(ds[3]))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [0, 1, 2, 3]), batch_size=2, num_workers=1,
                                         collate_fn=list, multiprocessing_context="spawn")
    got = [np.asarray(im) for batch in loader for im in batch]
    assert len(got) == 4 and all(np.array_equal(g, np.asarray(ds[i])) for i, g in enumerate(got))
