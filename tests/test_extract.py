"""The extract job end to end: stores equal an independent output_hidden_states reference, corrupt
images are skipped and counted, kill -9 then resume gives the identical store, and torchrun with two
gloo processes gives the same rows as one process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute.extract import ExtractConfig, extract
from sae_core.activation_store import ActivationStore
from sae_core.errors import UserError
from tests import extract_helpers as H

REPO = Path(__file__).resolve().parents[1]


def _reference_hidden_states(model_dir, image_root, indices):
    """output_hidden_states=True of the saved model on the listed images, one image at a time."""
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(model_dir).eval()
    proc = AutoImageProcessor.from_pretrained(model_dir)
    files = sorted(p for p in image_root.rglob("*") if p.is_file())
    out = []
    with torch.no_grad():
        for i in indices:
            px = proc(images=Image.open(files[i]).convert("RGB"), return_tensors="pt")["pixel_values"]
            o = model(pixel_values=px, output_hidden_states=True)
            out.append((o.hidden_states, o.pooler_output))
    return out


def _store_bytes(out: Path) -> dict:
    """Every shard and index file of every layer, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("layer_*/shards/*.npy"))}


def test_extract_equals_hidden_states_and_skips_corrupt_images(tmp_path):
    model_dir = H.clip_vision_dir()
    images = H.image_dir(10, corrupt=(3, 4))
    cfg = ExtractConfig(model=f"hf:{model_dir}", dataset=f"imagefolder:{images}", out=str(tmp_path / "acts"),
                        layers=["0", "-1", "embed"], tokens="all", batch_size=3, shard_images=4)
    summary = extract(cfg)
    assert summary["complete"] and summary["n_skipped"] == 2 and summary["n_shards"] == 3
    good = [i for i in range(10) if i not in (3, 4)]
    ref = _reference_hidden_states(model_dir, images, good)
    for name, hs_index in (("0", 1), ("-1", -1)):
        s = ActivationStore(tmp_path / "acts" / f"layer_{name}")
        m = s.manifest
        assert (len(s), s.d, m["dtype"], m["tokens"], m["n_skipped"]) == (8 * 17, 32, "float16", "all", 2)
        assert [x["index"] for x in m["skipped"]] == [3, 4] and m["skipped"][0]["item"] == "cat/0003.png"
        assert m["model"]["token_layout"]["n_tokens"] == 17 and m["block"] == (0 if name == "0" else 2)
        want = np.concatenate([hs[hs_index][0].numpy() for hs, _ in ref])
        np.testing.assert_allclose(s.rows(0, len(s)).astype(np.float32), want, rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(s.image_index(), np.repeat(good, 17))
        np.testing.assert_array_equal(s.token_position(), np.tile(np.arange(17), 8))
    e = ActivationStore(tmp_path / "acts" / "layer_embed")
    np.testing.assert_allclose(e.rows(0, 8).astype(np.float32), np.concatenate([p.numpy() for _, p in ref]),
                               rtol=2e-3, atol=2e-3)
    assert e.token_position().tolist() == [-1] * 8 and e.manifest["tokens"] == "embed"
    # a finished run is not redone
    before = _store_bytes(tmp_path / "acts")
    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "acts").glob("layer_*/shards/*.npy")]
    extract(cfg)
    assert _store_bytes(tmp_path / "acts") == before
    assert mtimes == [p.stat().st_mtime_ns for p in (tmp_path / "acts").glob("layer_*/shards/*.npy")]


def test_random_tokens_and_mean_do_not_depend_on_batching(tmp_path):
    images = H.image_dir(10)
    stores = []
    for bs, shard in ((2, 4), (5, 10)):
        out = tmp_path / f"b{bs}"
        extract(ExtractConfig(model=f"hf:{H.clip_vision_dir()}", dataset=f"imagefolder:{images}", out=str(out),
                              layers=["1"], tokens="random:3", batch_size=bs, shard_images=shard, seed=7))
        stores.append(ActivationStore(out))
    a, b = stores
    np.testing.assert_array_equal(a.row_index(), b.row_index())
    np.testing.assert_allclose(a.rows(0, 30).astype(np.float32), b.rows(0, 30).astype(np.float32), rtol=2e-3, atol=2e-3)
    pos = a.token_position().reshape(10, 3)
    assert (np.diff(pos, axis=1) > 0).all() and len({tuple(p) for p in pos}) > 1
    # mean = the mean of the patch tokens of the "all" rows
    extract(ExtractConfig(model=f"hf:{H.clip_vision_dir()}", dataset=f"imagefolder:{images}", out=str(tmp_path / "m"),
                          layers=["1"], tokens="mean", limit=4, dtype="float32"))
    extract(ExtractConfig(model=f"hf:{H.clip_vision_dir()}", dataset=f"imagefolder:{images}", out=str(tmp_path / "all"),
                          layers=["1"], tokens="all", limit=4, dtype="float32"))
    full = ActivationStore(tmp_path / "all").rows(0, 68).reshape(4, 17, 32)
    np.testing.assert_allclose(ActivationStore(tmp_path / "m").rows(0, 4), full[:, 1:].mean(1), rtol=1e-5, atol=1e-6)


def _cli(out, *extra, model=None, images=None):
    return [sys.executable, "-m", "precompute", "extract", "--model", model or f"hf:{H.clip_vision_dir()}",
            "--dataset", f"imagefolder:{images or H.image_dir(10, corrupt=(3, 4))}", "--out", str(out),
            "--layer", "1,embed", "--tokens", "random:2", "--batch-size", "1", "--shard-images", "2", *extra]


def _extract_like_cli(out):
    """In this process, the same extraction as `_cli`, on one thread as torchrun's workers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extract(ExtractConfig(model=f"hf:{H.clip_vision_dir()}", dataset=f"imagefolder:{H.image_dir(10, corrupt=(3, 4))}",
                              out=str(out), layers=["1", "embed"], tokens="random:2", batch_size=1, shard_images=2))
    finally:
        torch.set_num_threads(threads)


def _inspect(path, capsys) -> dict:
    from precompute.__main__ import main

    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_kill_9_then_resume_gives_the_identical_store(tmp_path, capsys):
    ref = tmp_path / "ref"
    _extract_like_cli(ref)
    out = tmp_path / "killed"
    env = {**os.environ, "SAE_EXTRACT_THROTTLE_S": "0.4", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list((out / "progress").glob("*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / "progress").glob("*.json"))
    assert 2 <= len(done) < 5 and not (out / "layer_1" / "manifest.json").exists()
    with pytest.raises(UserError, match="not a finished activation store"):
        ActivationStore(out / "layer_1")
    # `inspect` of the killed run: how far it got, from the files alone
    plan = json.loads((out / "extract.json").read_text())
    seen = _inspect(out, capsys)
    assert (seen["kind"], seen["complete"], seen["shards_done"], seen["stores"]) == ("extraction", False, len(done), [])
    assert seen["n_shards"] == plan["n_shards"] > len(done) and seen["layers"] == plan["layers"]
    kept = {p.name: p.stat().st_mtime_ns for p in done}
    env.pop("SAE_EXTRACT_THROTTLE_S")
    r = subprocess.run(_cli(out), cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in done} == kept  # finished shards were not redone
    assert _store_bytes(out) == _store_bytes(ref)
    assert not list(out.rglob(".*tmp*"))
    for layer in ("layer_1", "layer_embed"):
        a, b = (json.loads((d / layer / "manifest.json").read_text()) for d in (ref, out))
        assert a["shards"] == b["shards"] and a["skipped"] == b["skipped"]
    seen = _inspect(out, capsys)
    assert seen["complete"] and seen["shards_done"] == seen["n_shards"]
    for store in seen["stores"]:  # each layer's store as the reader opens it
        reader = ActivationStore(store["path"])
        assert (store["rows"], store["d"], store["layer"]) == (len(reader), reader.d, reader.layer)
        assert store["model"] == reader.manifest["model"]["spec"] and store["n_images"] == reader.manifest["n_images"]
    assert sorted(s["layer"] for s in seen["stores"]) == sorted(plan["layers"])
    assert _inspect(out / "layer_1", capsys) == next(s for s in seen["stores"] if s["layer"] == "1")


def test_torchrun_two_processes_give_the_same_rows_as_one(tmp_path):
    one = tmp_path / "one"
    _extract_like_cli(one)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "precompute", *_cli(two)[3:]]
    for attempt in range(2):  # a free port picked by --standalone can be taken by a parallel job: retry once
        r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        if r.returncode == 0 or "address already in use" not in r.stderr.lower():
            break
    assert r.returncode == 0, r.stderr[-3000:]
    for layer in ("layer_1", "layer_embed"):
        a, b = ActivationStore(one / layer), ActivationStore(two / layer)
        assert len(a) == len(b) == (16 if layer == "layer_1" else 8)
        np.testing.assert_array_equal(a.rows(0, len(a)), b.rows(0, len(b)))
        np.testing.assert_array_equal(a.row_index(), b.row_index())
        assert a.manifest["skipped"] == b.manifest["skipped"] and b.manifest["n_skipped"] == 2
    session = json.loads((two / "extract.json").read_text())["last_session"]
    assert session["processes"] == 2 and session["images"] == 10


def test_resume_with_other_settings_and_cli_errors(tmp_path, capsys):
    from precompute.__main__ import main

    images = H.image_dir(10)
    base = ["extract", "--model", f"hf:{H.clip_vision_dir()}", "--dataset", f"imagefolder:{images}",
            "--out", str(tmp_path / "o"), "--limit", "3"]
    assert main(base + ["--layer", "0"]) == 0
    # the first 3 images of a folder read class by class are all cats: said, as the folder's own counts give it
    assert (f"warning: --limit 3 takes the first 3 of the 10 images of imagefolder:{images}, which hold 1 of its 2 "
            "classes") in capsys.readouterr().err
    assert main(base + ["--layer", "0", "--tokens", "mean"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "other settings (tokens: 'cls' there, 'mean' now)" in err and "Traceback" not in err
    assert main(base + ["--layer", "7"]) == 2
    assert "layer 7 does not exist" in capsys.readouterr().err
    assert main(base[:-4] + ["--out", str(tmp_path / "neg"), "--limit", "2", "--layer", "-2,embed"]) == 0  # no `=` needed
    assert json.loads((tmp_path / "neg" / "extract.json").read_text())["layers"] == ["-2", "embed"]
    assert main(base[:-4] + ["--out", str(tmp_path / "p"), "--tokens", "random:99", "--layer", "0"]) == 2
    assert "more tokens than the 17" in capsys.readouterr().err
    # two names of one block (hidden_states -1 is the last block of the tower's n) wrote two identical stores
    n = json.loads((Path(H.clip_vision_dir()) / "config.json").read_text())["num_hidden_layers"]
    assert main(base[:-4] + ["--out", str(tmp_path / "dup"), "--layer", f"-1,{n - 1}"]) == 2
    assert f"error: layers -1 and {n - 1} are one place of hf:{H.clip_vision_dir()} (output of block {n - 1} " in \
        capsys.readouterr().err
    assert not (tmp_path / "dup").exists()


def test_a_resume_on_another_list_of_images_is_refused(tmp_path, capsys):
    """A killed extraction resumed after its image list was rewritten (same length) mixed the old images' rows with the
    new ones, and a finished one rerun kept the old rows, each in silence with exit 0 (a reviewer's run: 32 of 200 rows
    were the old images'; until 2026-12-05): the names of the images are part of what a resume must match."""
    from precompute.__main__ import main

    images = sorted(p for p in H.image_dir(10).rglob("*") if p.is_file())
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in images[:3]))
    out = tmp_path / "o"
    cmd = ["extract", "--model", f"hf:{H.clip_vision_dir()}", "--dataset", f"files:{listing}", "--out", str(out),
           "--layer", "0"]
    assert main(cmd) == 0
    kept = _store_bytes(out)
    listing.write_text("".join(f"{p}\n" for p in images[3:6]))
    capsys.readouterr()
    assert main(cmd) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {out} was started on other images: the names of the first 3 images of files:{listing} have changed "
        f"since (files added, removed or renamed); pass a new --out, or delete {out} to extract there from the start.")
    assert _store_bytes(out) == kept
    assert main([*cmd, "--limit", "2"]) == 2  # another number of images is that setting, though the names differ too
    assert "other settings (n_images: 3 there, 2 now)" in capsys.readouterr().err
    listing.write_text("".join(f"{p}\n" for p in images[:3]))  # the list it was started on: resumes (nothing to do)
    assert main(cmd) == 0 and _store_bytes(out) == kept


def test_a_resume_after_an_image_or_the_weights_were_rewritten_is_refused(tmp_path, capsys):
    """An image rewritten under its own name, or other weights saved into the --model folder, and the rerun kept the
    old shards and said "wrote" (a reviewer's runs: 1,088 of 69,632 values, and all 5 shards, off a fresh extraction;
    until 2026-12-05). A resume is held to each file's size and modification time, for the images and the model; and
    each shard's sha256, which the manifest now lists, is that of the array the shard file holds."""
    import hashlib
    import shutil

    from precompute.__main__ import main

    images = sorted(p for p in H.image_dir(10).rglob("*") if p.is_file())
    folder, model = tmp_path / "photos", tmp_path / "clip"
    folder.mkdir()
    for j, p in enumerate(images[:3]):
        shutil.copy(p, folder / f"{j}{p.suffix}")
    shutil.copytree(H.clip_vision_dir(), model)
    out = tmp_path / "o"
    cmd = ["extract", "--model", f"hf:{model}", "--dataset", f"imagefolder:{folder}", "--out", str(out), "--layer", "0"]
    assert main(cmd) == 0
    kept = _store_bytes(out)
    # the store's digest of every row: sha256 of each image's id and rows, summed mod 2^256 (written out here from
    # the store's rows and row index), whatever the shard grid: one shard per image gives the same
    store = ActivationStore(out / "layer_0")
    rows, image = store.rows(0, len(store)), store.image_index()
    total = sum(int.from_bytes(hashlib.sha256(int(i).to_bytes(8, "little", signed=True)
                                              + rows[image == i].tobytes()).digest(), "big") for i in np.unique(image))
    assert store.identity()["content"] == f"{total % 2**256:064x}"[:32]
    assert main([*cmd[:-4], "--out", str(tmp_path / "grid"), "--layer", "0", "--shard-images", "1"]) == 0
    other_grid = ActivationStore(tmp_path / "grid" / "layer_0")
    assert len(other_grid.shards) == 3 and len(store.shards) == 1
    assert other_grid.identity()["content"] == store.identity()["content"]

    def refused(what):
        capsys.readouterr()
        assert main(cmd) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {out} was made from other files: {what} changed since (a file's size or modification time); pass "
            f"a new --out, or delete {out} to extract there from the start.")
        assert _store_bytes(out) == kept

    first = folder / f"0{images[0].suffix}"
    own, stat = first.read_bytes(), first.stat()
    first.write_bytes(images[5].read_bytes())  # another picture under the same name
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    refused(f"the first 3 images of imagefolder:{folder}")
    first.write_bytes(own)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # its own file back, as it was: resumes
    assert main(cmd) == 0 and _store_bytes(out) == kept
    # a plan of before these digests resumes as made from today's files, and records them from then on
    plan = json.loads((out / "extract.json").read_text())
    for key in ("images_files", "model_files"):
        del plan["identity"][key]
    (out / "extract.json").write_text(json.dumps(plan))
    assert main(cmd) == 0 and _store_bytes(out) == kept
    assert {"images_files", "model_files"} <= set(json.loads((out / "extract.json").read_text())["identity"])
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # saved again
    refused(f"the weights of hf:{model}")


def test_a_run_that_read_no_image_reads_them_again_once_mended(tmp_path, capsys):
    """All images unreadable: refused, and the rerun after the files were mended read nothing (their shards
    were marked done) and was refused again. The progress bar's skipped count is the run's, not the shard's."""
    from PIL import Image

    from precompute.__main__ import main

    folder = tmp_path / "imgs" / "cls"
    folder.mkdir(parents=True)
    for j in range(3):
        (folder / f"{j}.png").write_bytes(b"not a picture")
    args = ["extract", "--model", f"hf:{H.clip_vision_dir()}", "--dataset", f"imagefolder:{tmp_path / 'imgs'}",
            "--out", str(tmp_path / "o"), "--layer", "0", "--batch-size", "1", "--shard-images", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: none of the 3 images of imagefolder:" in err and "run the same command again" in err
    bars = [ln for ln in err.replace("\r", "\n").splitlines() if "skipped=" in ln]
    assert bars and bars[-1].rstrip().endswith("skipped=3]"), bars[-1:]
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "1.png")  # one mended
    assert main(args) == 0
    store = ActivationStore(tmp_path / "o" / "layer_0")
    assert store.manifest["n_images"] == 1 and [x["index"] for x in store.manifest["skipped"]] == [0, 2]
    np.testing.assert_array_equal(np.unique(store.image_index()), [1])


def test_float16_overflow_is_a_user_error(tmp_path):
    from transformers import CLIPVisionModel

    m = CLIPVisionModel.from_pretrained(H.clip_vision_dir())
    with torch.no_grad():
        m.encoder.layers[0].mlp.fc2.bias.add_(1e6)  # block 0's output leaves float16's range
    m.save_pretrained(tmp_path / "big")
    (tmp_path / "big" / "preprocessor_config.json").write_text((H.clip_vision_dir() / "preprocessor_config.json").read_text())
    cfg = ExtractConfig(model=f"hf:{tmp_path / 'big'}", dataset=f"imagefolder:{H.image_dir(10)}", out=str(tmp_path / "o"),
                        layers=["-3"], tokens="cls", limit=2)
    with pytest.raises(UserError, match="--dtype float32"):
        extract(cfg)
    cfg.dtype, cfg.out = "float32", str(tmp_path / "o32")
    extract(cfg)
    assert np.abs(ActivationStore(tmp_path / "o32").rows(0, 2)).max() > 65504


def test_half_precision_on_a_cpu_that_emulates_it_warns_and_still_extracts(tmp_path, monkeypatch, capsys):
    """--precision bf16 where bf16 is 100x slower than fp32: one warning line, and the store still
    holds the model's activations (bf16 rounding only, against the fp32 store)."""
    import sae_core.precision as P
    from precompute.__main__ import main

    speeds = {torch.float32: 70.0, torch.bfloat16: 1.3, torch.float16: 1.4}  # an AVX2-only AMD EPYC host
    monkeypatch.setattr(P, "_matmul_gflops", lambda dtype: speeds[dtype])
    base = ["extract", "--model", f"hf:{H.clip_vision_dir()}", "--dataset", f"imagefolder:{H.image_dir(10)}",
            "--layer", "-2", "--tokens", "all", "--limit", "4", "--dtype", "float32"]
    assert main(base + ["--out", str(tmp_path / "fp32")]) == 0
    assert "matmuls run at" not in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "warning: bf16 matmuls run at 1.3 GFLOP/s" in err and "--precision fp32 is faster" in err
    ref, half = ActivationStore(tmp_path / "fp32"), ActivationStore(tmp_path / "bf16")
    assert len(half) == len(ref) == 4 * 17
    a, b = ref.rows(0, len(ref)), half.rows(0, len(half))
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert 0 < rel < 0.02, rel  # bf16 rounding through 2 blocks: 0.5% measured
    speeds[torch.bfloat16] = 280.0  # a CPU with native bf16: no warning
    assert main(base + ["--out", str(tmp_path / "bf16_fast"), "--precision", "bf16"]) == 0
    assert "matmuls run at" not in capsys.readouterr().err


def test_world_specs_extract_then_train_end_to_end(tmp_path, monkeypatch, capsys):
    """world:DIR:llava at LLaVA's own layer on world:DIR:SPLIT images, then the SAE train command."""
    import types

    from PIL import Image

    from precompute.__main__ import main
    from sae_core.checkpoint import load_sae

    class TinyWorld:  # the agreed WorldDataset interface; the real one renders shapes
        taxonomy = {}

        def __init__(self, root, split="train"):
            self.n = {"train": 40, "val": 24, "ood": 8}[split]

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Image.new("RGB", (32, 32), ((37 * i) % 256, (91 * i) % 256, 128))

        def factors(self, i):
            return {}

        def taxonomy_path(self, i):
            return ["round", "circle", "warm", "red"]

    fake = types.ModuleType("sae_core.world.dataset")
    fake.WorldDataset = TinyWorld
    monkeypatch.setitem(sys.modules, "sae_core.world.dataset", fake)
    world = H.world_dir()
    out = tmp_path / "acts"
    extract(ExtractConfig(model=f"world:{world}:llava", dataset=f"world:{world}:val", out=str(out),
                          tokens="random:4", batch_size=8))
    s = ActivationStore(out)  # one layer: the run directory opens as its store
    assert s.layer == "-2" and s.manifest["block"] == 2 and len(s) == 96 and s.d == 32
    assert s.dataset["spec"] == f"world:{world}:val" and s.model["read_tokens"] == "patches"
    assert main(["train", "--activations", str(out), "--arch", "topk", "--width", "64", "--k", "4", "--steps", "20",
                 "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "sae")]) == 0
    sae = load_sae(tmp_path / "sae", d_in=32)
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64


def test_unreadable_and_unprocessable_images_are_skipped_in_the_loader():
    from precompute.extract import _Collate, _Items
    from sae_core.adapters import ImageTransform
    from sae_core.datasets import open_dataset

    ds = open_dataset(f"imagefolder:{H.image_dir(10, corrupt=(3, 4))}")
    odd = ds[5].size

    def transform(im):
        if im.size == odd:
            raise ValueError("cannot resize")
        return torch.full((3, 2, 2), float(im.size[0]))

    collate = _Collate(ImageTransform(transform), ds)
    pixels, ids, skipped = collate([_Items(ds)[i] for i in range(2, 7)])
    assert ids.tolist() == [2, 6] and pixels.shape == (2, 3, 2, 2)
    assert pixels[:, 0, 0, 0].tolist() == [ds[2].size[0], ds[6].size[0]]
    assert [i for i, _ in skipped] == [3, 4, 5]
    assert "preprocessing failed: ValueError: cannot resize" in skipped[2][1] and ds.item(5) in skipped[2][1]
    assert collate([_Items(ds)[3]])[0] is None


def test_a_done_shard_whose_files_are_gone_or_cut_short_is_redone(tmp_path):
    """A marker alone made a shard count as done: with its file deleted or truncated afterwards, the rerun
    wrote the manifest again ("wrote 2 store(s)") and the store could not be read, its message saying to
    rerun. Reference: an extraction that was never damaged."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    _extract_like_cli(ref)
    _extract_like_cli(out)
    (out / "layer_1" / "shards" / "00001.npy").unlink()
    cut = out / "layer_embed" / "shards" / "00003.index.npy"
    cut.write_bytes(cut.read_bytes()[:-8])
    with pytest.raises(UserError, match="rerun the same extraction command"):
        ActivationStore(out / "layer_1")
    kept = (out / "progress" / "00000.json").stat().st_mtime_ns
    _extract_like_cli(out)
    assert _store_bytes(out) == _store_bytes(ref)
    assert (out / "progress" / "00000.json").stat().st_mtime_ns == kept  # the whole shards were not redone
    for layer in ("layer_1", "layer_embed"):
        store = ActivationStore(out / layer)
        assert np.array_equal(store.rows(0, len(store)), ActivationStore(ref / layer).rows(0, len(store)))
        assert np.array_equal(store.row_index(), ActivationStore(ref / layer).row_index())


def test_a_processor_that_keeps_the_image_shape_is_refused_before_anything_is_written(tmp_path, capsys):
    """DINOv2 without its centre crop, a wide and a square image: extract ended in torch.stack's traceback (with
    --batch-size 1: "block output has 61 tokens, the layout says 17") and left a plan, a store folder and progress/
    that `inspect` called an unfinished extraction."""
    import shutil

    from PIL import Image

    from precompute.__main__ import main

    model = tmp_path / "dino_nocrop"
    shutil.copytree(H.dinov2_dir(), model)
    cfg = json.loads((model / "preprocessor_config.json").read_text())
    (model / "preprocessor_config.json").write_text(json.dumps({**cfg, "do_center_crop": False}))
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("RGB", (60, 60), (10, 200, 30)).save(tmp_path / "imgs" / "a" / "sq.png")
    Image.new("RGB", (200, 60), (200, 10, 30)).save(tmp_path / "imgs" / "a" / "wide.png")
    for batch in ("64", "1"):
        out = tmp_path / f"o{batch}"
        assert main(["extract", "--model", f"hf:{model}", "--layer", "1", "--tokens", "all", "--batch-size", batch,
                     "--dataset", f"imagefolder:{tmp_path / 'imgs'}", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"error: the image processor of {model} gives pictures of different sizes" in err, err[-2000:]
        assert "Traceback" not in err and not out.exists()


def test_relative_paths_in_specs_are_recorded_absolute_and_resume(tmp_path, monkeypatch, capsys):
    """`extract --model hf:clip --dataset imagefolder:imgs` recorded both as typed in the stores, and so in the SAE
    trained on them: a later command in another folder read another ./clip or none. The stores, the run file and
    the SAE record the absolute paths, and the same command from the same folder resumes (also over a run file
    that recorded them as typed)."""
    import shutil

    from precompute.__main__ import main

    here = tmp_path.resolve()
    shutil.copytree(H.clip_vision_dir(), here / "clip")
    shutil.copytree(H.image_dir(10), here / "imgs")
    monkeypatch.chdir(here)
    argv = ["extract", "--model", "hf:clip", "--dataset", "imagefolder:imgs", "--out", "acts", "--layer", "0",
            "--limit", "4"]
    assert main(argv) == 0
    m = ActivationStore(here / "acts/layer_0").manifest
    assert (m["model"]["spec"], m["model"]["name"], m["dataset"]["spec"], m["dataset"]["root"]) == (
        f"hf:{here}/clip", f"{here}/clip", f"imagefolder:{here}/imgs", f"{here}/imgs")
    run = json.loads((here / "acts/extract.json").read_text())
    assert (run["identity"]["model"], run["identity"]["dataset"]) == (f"hf:{here}/clip", f"imagefolder:{here}/imgs")
    before = _store_bytes(here / "acts")
    assert main(argv) == 0 and _store_bytes(here / "acts") == before
    (here / "acts/extract.json").write_text(json.dumps(
        {**run, "identity": {**run["identity"], "model": "hf:clip", "dataset": "imagefolder:imgs"}}))
    assert main(argv) == 0 and _store_bytes(here / "acts") == before
    assert main(["train", "--activations", "acts/layer_0", "--arch", "topk", "--k", "2", "--expansion", "1", "--steps",
                 "2", "--batch-size", "2", "--out", "sae"]) == 0
    act = json.loads((here / "sae/config.json").read_text())["training"]["activations"]
    assert (act["model"]["spec"], act["dataset"]["spec"]) == (f"hf:{here}/clip", f"imagefolder:{here}/imgs")
