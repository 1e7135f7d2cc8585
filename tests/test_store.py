"""ActivationStore reading across shards, row metadata, the prefetching batch iterator, atomic writes."""
import json

import numpy as np
import pytest

from sae_core.activation_store import (ActivationStore, save_npy_atomic, shuffled_batch_index,
                                       write_json_atomic)
from sae_core.atomic import atomic_path, first_difference, remove_stale_temporaries
from sae_core.errors import UserError


def _make_store(path, sizes=(7, 0, 13, 5), d=6, with_index=True):
    rng = np.random.default_rng(0)
    full = rng.standard_normal((sum(sizes), d)).astype(np.float16)
    index = np.stack([np.arange(len(full)) // 2, np.arange(len(full)) % 2], 1).astype(np.int64)
    (path / "shards").mkdir(parents=True)
    shards, off = [], 0
    for k, n in enumerate(sizes):
        save_npy_atomic(path / "shards" / f"{k}.npy", full[off:off + n])
        save_npy_atomic(path / "shards" / f"{k}.index.npy", index[off:off + n])
        entry = {"path": f"shards/{k}.npy", "rows": n}
        if with_index:
            entry["index"] = f"shards/{k}.index.npy"
        shards.append(entry)
        off += n
    write_json_atomic(path / "manifest.json", {"shards": shards, "d": d, "dtype": "float16", "layer": "22",
                                               "tokens": "random:2", "skipped": [{"index": 3}]})
    return full, index


def test_take_rows_and_row_index_across_shards(tmp_path):
    full, index = _make_store(tmp_path / "s")
    s = ActivationStore(tmp_path / "s")
    assert len(s) == 25 and s.d == 6 and s.dtype == np.float16 and s.layer == "22" and s.skipped == [{"index": 3}]
    idx = np.array([24, 0, 7, 7, 19, 6, 20, 3])
    np.testing.assert_array_equal(s.take(idx), full[idx])
    for a, b in ((0, 25), (5, 21), (7, 20), (20, 30), (24, 25), (3, 3), (-10, 25), (-3, -1), (-40, 4), (9, 2)):
        np.testing.assert_array_equal(s.rows(a, b), full[a:b])  # a slice's reading (-10 was row 0)
    np.testing.assert_array_equal(s.row_index(idx), index[idx])
    # a manifest whose width the shards do not have: one sentence with the way out (it named none until 2026-12-06)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    write_json_atomic(tmp_path / "s" / "manifest.json", {**manifest, "d": 7})
    with pytest.raises(UserError) as e:
        ActivationStore(tmp_path / "s")
    assert str(e.value) == (f"{tmp_path / 's'}: its manifest.json gives the width d 7 but the shards hold 6; the store "
                            "is damaged: extract it again.")
    np.testing.assert_array_equal(s.image_index(), index[:, 0])
    np.testing.assert_array_equal(s.token_position(idx), index[idx, 1])
    with pytest.raises(IndexError):
        s.take(np.array([25]))
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes leave no temporary files


def test_a_folder_being_written_is_refused_to_a_second_writer_until_its_holder_ends(tmp_path, capsys,
                                                                                    hold_lock_elsewhere):
    """Two processes writing one folder (a command started twice, two app starts building the default bundle)
    each removed the other's temporaries and wrote the same files. The second is refused in one sentence naming
    the holder; a killed holder's lock goes with it, so a killed job resumes at once; no .lock file stays."""
    from precompute.__main__ import main
    from sae_core.atomic import LOCK_FILE, writer_lock

    folder = tmp_path / "w"
    holder = hold_lock_elsewhere(f"writer_lock({str(folder)!r})")
    with pytest.raises(UserError, match=rf"^{folder} is being written by another process \(pid {holder.pid} on "
                                        r".+, since .+\); wait for it to finish, or give another --out\.$"):
        with writer_lock(folder):
            pass
    # a command into that folder stops before writing anything (the world command: its first write)
    assert main(["world", "--out", str(folder), "--preset", "tiny"]) == 2
    assert f"error: {folder} is being written by another process (pid {holder.pid}" in capsys.readouterr().err
    # extract too (refused before its model or dataset is read: neither exists here)
    assert main(["extract", "--model", f"hf:{tmp_path / 'no_model'}", "--dataset", f"imagefolder:{tmp_path}",
                 "--out", str(folder)]) == 2
    assert f"error: {folder} is being written by another process (pid {holder.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]
    holder.kill()  # as a killed job: the kernel drops its lock, its .lock file stays
    holder.wait()
    assert (folder / LOCK_FILE).is_file()
    with writer_lock(folder):
        with writer_lock(folder):  # re-entrant: the demo's atlas writes the folder the demo holds
            (folder / "x").write_text("mine")
        assert (folder / LOCK_FILE).is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["x"]


def test_ms_is_refused_an_output_another_run_writes_and_writes_others_beside_it(tmp_path, capsys,
                                                                                hold_lock_elsewhere):
    """`ms` removes its outputs' stale temporaries and checkpoints to OUT.partial: a second run into the same
    --out deleted the first's temporaries and shared its checkpoint. It is refused (naming the holder) before it
    reads or deletes anything; a run writing another output in that folder (a job array's other layer) goes on."""
    from precompute.__main__ import main

    rng = np.random.default_rng(0)
    np.save(tmp_path / "A.npy", rng.random((12, 3)).astype(np.float32))
    np.save(tmp_path / "E.npy", rng.standard_normal((12, 4)).astype(np.float32))
    out = tmp_path / "scores" / "a.npy"
    holder = hold_lock_elsewhere(f"output_lock({str(out)!r})")
    theirs = out.with_name(f".a.npy.tmp{holder.pid}")  # the holder's write under way
    theirs.write_bytes(b"half")
    argv = ["ms", "--activations", str(tmp_path / "A.npy"), "--embeddings", str(tmp_path / "E.npy")]
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out} is being written by another process (pid {holder.pid} on ") and \
        err.endswith("; wait for it to finish, or name another output.") and "\n" not in err
    assert sorted(p.name for p in out.parent.iterdir()) == [".a.npy.lock", theirs.name]
    assert main(argv + ["--out", str(out.with_name("b.npy"))]) == 0  # another output beside it
    capsys.readouterr()
    assert sorted(p.name for p in out.parent.iterdir()) == [".a.npy.lock", theirs.name, "b.json", "b.npy",
                                                            "b_support.npy"]
    holder.kill()
    holder.wait()
    assert main(argv + ["--out", str(out)]) == 0  # the killed holder's lock went with it
    assert not theirs.exists() and not out.with_name(".a.npy.lock").exists()
    np.testing.assert_array_equal(np.load(out), np.load(out.with_name("b.npy")))


def test_a_killed_atomic_writes_temporaries_are_removed_and_nothing_else(tmp_path):
    def killed_write(path):  # enters atomic_path and never leaves it, as a killed process would
        tmp = atomic_path(path).__enter__()
        tmp.write_bytes(b"half")
        return tmp

    left = [killed_write(tmp_path / "a.npy"), killed_write(tmp_path / "b.json"),
            killed_write(tmp_path / "layer_3" / "shards" / "0.npy")]
    kept = [tmp_path / "a.npy", tmp_path / ".thumbs.tmp" / "1.png", tmp_path / ".notes.tmpx", tmp_path / "x.tmp12"]
    for p in kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"mine")
    assert all(p.is_file() for p in left)

    assert remove_stale_temporaries(tmp_path, names=["a.npy", "c.npy"]) == 1   # only a.npy's, only at the top
    assert [p.is_file() for p in left] == [False, True, True]
    assert remove_stale_temporaries(tmp_path) == 2                             # every one, at any depth
    assert not any(p.exists() for p in left) and all(p.read_bytes() == b"mine" for p in kept)
    assert remove_stale_temporaries(tmp_path / "missing") == 0


def test_json_files_are_strict_json_with_null_for_nan(tmp_path):
    """JSON has no NaN: json.dumps writes a bare NaN that JSON.parse (the browser) and strict readers refuse,
    and the atlas manifest held one in degenerate cases (no neuron with an MS). Read back here by a parser
    that refuses NaN and Infinity."""
    import json
    import math

    def strict(name):
        raise ValueError(f"{name} in a JSON file")

    write_json_atomic(tmp_path / "m.json", {"ms_mean": float("nan"), "fvu": np.float64("inf"), "l0": 3.5,
                                            "depth": [1.0, -math.inf, {"x": float("nan")}], "name": "NaN"})
    got = json.loads((tmp_path / "m.json").read_text(), parse_constant=strict)
    assert got == {"ms_mean": None, "fvu": None, "l0": 3.5, "depth": [1.0, None, {"x": None}], "name": "NaN"}


def test_first_difference_names_the_first_differing_setting_by_its_path():
    assert first_difference({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 2]}}) is None
    assert first_difference({"a": 1, "b": 2}, {"a": 1, "b": 3}) == "b: 2 there, 3 now"
    assert first_difference({"m": {"spec": "x", "layer": -2}}, {"m": {"spec": "x", "layer": -1}}) == \
        "m.layer: -2 there, -1 now"
    assert first_difference({"a": 1, "gone": "x"}, {"a": 1}) == "gone: 'x' there, None now"  # recorded only
    assert first_difference({"a": 1}, {"a": 1, "new": True}) == "new: None there, True now"
    assert first_difference({"a": {"b": 1}}, {"a": 5}) == "a: {'b': 1} there, 5 now"
    assert first_difference({"a": 1, "b": 1}, {"b": 2, "a": 2}) == "b: 1 there, 2 now"  # in the new order


def test_iter_batches_is_the_shuffled_index_and_resumable(tmp_path):
    full, _ = _make_store(tmp_path / "s")
    s = ActivationStore(tmp_path / "s")
    got = list(s.iter_batches(4, seed=3, start_step=2, stop_step=9, rank=1, world_size=2))
    assert len(got) == 7
    for step, batch in zip(range(2, 9), got):
        np.testing.assert_array_equal(batch, full[shuffled_batch_index(25, 4, step, 3, 1, 2)])
    # over the trainer's training rows only: its batches, never a held-out row
    from sae_core.activation_store import held_out_split

    split = held_out_split(s, 5)  # 2 rows per image: 3 images, 6 rows
    got = list(s.iter_batches(4, seed=3, stop_step=12, held_out=split))
    for step, batch in enumerate(got):
        np.testing.assert_array_equal(batch, full[split.training_rows(shuffled_batch_index(split.n_train, 4, step, 3))])
    kept = np.setdiff1d(np.arange(25), split.held_out_rows())
    held_out, served = ({row.tobytes() for row in rows} for rows in (full[split.held_out_rows()], np.concatenate(got)))
    assert split.n_train == 19 and served <= {row.tobytes() for row in full[kept]} and not held_out & served
    # an endless iterator can be abandoned midway (the reader thread stops)
    it = s.iter_batches(5, seed=0, prefetch=1)
    first = [next(it) for _ in range(12)]  # crosses epochs
    it.close()
    np.testing.assert_array_equal(np.concatenate(first[:5])[np.argsort(np.concatenate([shuffled_batch_index(25, 5, k, 0) for k in range(5)]))], full)


def _class_sorted_store(path, n_images, rows_per_image, images_per_class, d=4):
    """A store as `extract` writes one from a class-sorted folder: image-major rows, classes in order."""
    index = _indexed_store(path, np.full(n_images, rows_per_image), d)
    return ActivationStore(path), index[:, 0] // images_per_class


def _indexed_store(path, rows_per_image, d=4) -> np.ndarray:
    """One shard of random rows, image-major, image i with rows_per_image[i] rows; its (rows, 2) index."""
    ids = np.repeat(np.arange(len(rows_per_image)), rows_per_image)
    index = np.stack([ids, np.concatenate([np.arange(r) for r in rows_per_image])], 1).astype(np.int64)
    (path / "shards").mkdir(parents=True)
    save_npy_atomic(path / "shards/0.npy", np.random.default_rng(0).standard_normal((len(ids), d)).astype(np.float32))
    save_npy_atomic(path / "shards/0.index.npy", index)
    write_json_atomic(path / "manifest.json", {"shards": [{"path": "shards/0.npy", "index": "shards/0.index.npy",
                                                           "rows": len(ids)}], "d": d, "dtype": "float32"})
    return index


def test_held_out_rows_are_whole_images_spread_over_the_store(tmp_path):
    """The trainer held out the store's last rows: in a folder sorted by class they were its last classes,
    which the SAE then never saw (ImageNet's last ~51 at the default). Now: whole images, spread evenly.
    Checked against sets built row by row."""
    from sae_core.activation_store import held_out_split, last_rows_split

    store, classes = _class_sorted_store(tmp_path / "s", n_images=200, rows_per_image=3, images_per_class=20)
    split = held_out_split(store, 30)
    held = split.held_out_rows()
    train = split.training_rows(np.arange(split.n_train))
    assert (split.block, split.n_eval, split.n_train) == (3, 30, 570)
    assert sorted(set(held.tolist()) | set(train.tolist())) == list(range(600))   # every row, once
    assert not set(held.tolist()) & set(train.tolist()) and (np.diff(train) > 0).all()
    images = store.image_index()
    held_images = set(images[held].tolist())
    assert len(held_images) == 10 and not held_images & set(images[train].tolist())  # no image split in two
    assert set(classes[held].tolist()) == set(range(10))                             # every class, not the last
    assert set(classes[last_rows_split(600, 30).held_out_rows()].tolist()) == {9}    # as before: the last only
    gaps = np.diff(sorted(held_images))
    assert gaps.max() <= 2 * 200 / 10                                                # spread, not bunched
    assert held_out_split(store, 31).n_eval == 33                                    # rounded up to whole images

    # other shapes, against the brute-force complement, row by row
    for n_images, rows, eval_rows in ((7, 1, 2), (50, 4, 9), (101, 2, None), (40, 5, 100), (1000, 1, None)):
        st, _ = _class_sorted_store(tmp_path / f"s{n_images}_{rows}", n_images, rows, 10)
        sp = held_out_split(st, eval_rows)
        held = sp.held_out_rows()
        assert len(held) == sp.n_eval >= (eval_rows or max(1, len(st) // 20))
        complement = np.setdiff1d(np.arange(len(st)), held)
        np.testing.assert_array_equal(sp.training_rows(np.arange(sp.n_train)), complement)
        assert (held % rows == np.tile(np.arange(rows), sp.n_blocks)).all()         # whole images

    with pytest.raises(UserError, match=r"too few to hold out 400 rows \(134 images of 3 rows\).*--eval-rows"):
        held_out_split(store, 400)

    # images of 3 and 2 rows in turn (not a store `extract` writes): blocks of the first image's 3 rows would
    # cut images in two while claiming whole ones; such a store is held out row by row
    n = len(_indexed_store(tmp_path / "uneven", np.tile([3, 2], 50)))
    sp = held_out_split(ActivationStore(tmp_path / "uneven"), 10)
    assert (sp.block, sp.n_eval) == (1, 10)
    np.testing.assert_array_equal(np.sort(np.concatenate([sp.held_out_rows(), sp.training_rows(np.arange(sp.n_train))])),
                                  np.arange(n))


def test_extraction_dir_with_one_layer_opens_as_that_store(tmp_path):
    _make_store(tmp_path / "run" / "layer_-2")
    (tmp_path / "run" / "extract.json").write_text(json.dumps({"layers": ["-2"]}))
    assert ActivationStore(tmp_path / "run").path == tmp_path / "run" / "layer_-2"
    _make_store(tmp_path / "run" / "layer_embed")
    (tmp_path / "run" / "extract.json").write_text(json.dumps({"layers": ["-2", "embed"]}))
    with pytest.raises(UserError, match="layer_-2"):
        ActivationStore(tmp_path / "run")


def test_unfinished_and_foreign_stores_are_user_errors(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="not a finished activation store"):
        ActivationStore(tmp_path / "x")
    _make_store(tmp_path / "old", with_index=False)
    s = ActivationStore(tmp_path / "old")
    with pytest.raises(UserError, match="no image index"):
        s.row_index()
    np.save(tmp_path / "a.npy", np.zeros((3, 2, 2), np.float32))
    with pytest.raises(UserError, match="expected \\(rows, d\\)"):
        ActivationStore(tmp_path / "a.npy")
    # row indices are integers: 1.9 was row 1, in silence
    np.save(tmp_path / "rows.npy", np.arange(12, dtype=np.float32).reshape(6, 2))
    rows = ActivationStore(tmp_path / "rows.npy")
    assert rows.take(np.array([4, 1])).tolist() == [[8, 9], [2, 3]] and rows.take([]).shape == (0, 2)
    with pytest.raises(UserError, match="row indices must be integers, not float64"):
        rows.take(np.array([1.9]))
    # ... for the row index too (row_index([1.9]) was row 1's until the night of 2026-12-05), and one dimension: a bare
    # 5 or a 2-D array were numpy's "len() of unsized object" / "object too deep"
    full, index = _make_store(tmp_path / "indexed")
    indexed = ActivationStore(tmp_path / "indexed")
    assert indexed.row_index(np.array([1, 9])).tolist() == index[[1, 9]].tolist()
    for read in (indexed.row_index, indexed.image_index, indexed.token_position):
        with pytest.raises(UserError, match="row indices must be integers, not float64"):
            read(np.array([1.9]))
    for read in (indexed.take, indexed.row_index):
        for bad, shape in ((5, r"\(\)"), (np.array([[1, 2]]), r"\(1, 2\)")):
            with pytest.raises(UserError, match=rf"^row indices must be a 1-D array, not of shape {shape}; pass e\.g\. "):
                read(bad)
    # a text file named .npy was "pickled (object) data ... allow_pickle=" in numpy's words, as `ms` says it now
    (tmp_path / "text.npy").write_text("hello\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    for name, why in (("text", "it has no .npy header"), ("empty", "the file is empty")):
        with pytest.raises(UserError, match=rf"^cannot read activation shard .*{name}\.npy \({why}\); save the \(N, d\) "):
            ActivationStore(tmp_path / f"{name}.npy")


def test_a_folder_whose_manifest_is_not_a_stores_is_one_sentence(tmp_path):
    """A bundle (its manifest.json has no shards: a KeyError traceback from `train --activations BUNDLE`), a
    manifest or extract.json cut short or of another shape: each one sentence that names the file."""
    full, _ = _make_store(tmp_path / "good")
    cases = {"bundle": ({"schema_version": 1, "n_neurons": 4, "arrays": {}},
                        r"bundle/? is a bundle \(written by `python -m precompute atlas` or `demo`\), not an activation "
                        r"store; pass the --out directory of `python -m precompute extract`"),
             "cut": ('{"shards": [{"path": "shards/0.npy", ', r"cut/manifest.json cannot be read as JSON"),
             "list": ([1, 2], r"list/manifest.json holds a JSON list, not an object"),
             "other": ({"shards": "shards/"}, r"other/manifest.json does not list shards as an activation store's does"),
             "no_path": ({"shards": [{"rows": 3}]}, r"no_path/manifest.json does not list shards")}
    for name, (manifest, message) in cases.items():
        (tmp_path / name).mkdir()
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (tmp_path / name / "manifest.json").write_text(text)
        with pytest.raises(UserError, match=message):
            ActivationStore(tmp_path / name)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "extract.json").write_text('{"layers": [')
    with pytest.raises(UserError, match=r"run/extract.json cannot be read as JSON"):
        ActivationStore(tmp_path / "run")
    np.testing.assert_array_equal(ActivationStore(tmp_path / "good").take(np.arange(len(full))), full)


def test_a_shard_or_row_index_of_another_length_than_listed_is_refused(tmp_path):
    """The manifest's row counts were not checked against the files, so a shard or index file of another
    length shifted every later row onto another image without a word."""
    full, index = _make_store(tmp_path / "s")
    s = ActivationStore(tmp_path / "s")
    assert np.array_equal(s.rows(0, len(s)), full) and np.array_equal(s.row_index(), index)
    save_npy_atomic(tmp_path / "s" / "shards" / "2.index.npy", index[:12])
    with pytest.raises(UserError, match=r"row index .*2\.index\.npy has shape \(12, 2\), not \(13, 2\)"):
        ActivationStore(tmp_path / "s").row_index()
    save_npy_atomic(tmp_path / "s" / "shards" / "2.npy", full[:12])
    with pytest.raises(UserError, match=r"holds 12 rows but .*manifest.json lists 13; rerun the same extraction"):
        ActivationStore(tmp_path / "s")
    np.save(tmp_path / "t.npy", full)
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-10])
    with pytest.raises(UserError, match="save the \\(N, d\\) array again"):
        ActivationStore(tmp_path / "t.npy")


def test_epoch_permutations_are_numpys_own_in_half_the_memory():
    """The cached per-epoch permutation is numpy's `permutation(n)` for that seed and epoch (so batches are
    those of earlier versions), stored as int32: int64 held 5.9 GB per cached epoch at 738M rows."""
    from sae_core.activation_store import _epoch_permutation

    for n, seed, epoch in [(1, 0, 0), (1000, 3, 2), (123_457, 7, 0)]:
        perm = _epoch_permutation(n, seed, epoch)
        assert np.array_equal(perm, np.random.default_rng([seed, epoch]).permutation(n))
        assert perm.dtype == np.int32
    batches = np.concatenate([shuffled_batch_index(1000, 100, s, 3) for s in range(20, 30)])
    assert np.array_equal(np.sort(batches), np.arange(1000))  # epoch 2: every row once


def test_inspect_names_what_a_folder_holds(tmp_path, capsys):
    """`inspect` reads stores, not only bundles: a store folder and an (N, d) .npy give their rows and width
    (it said "bundle ... has no manifest.json, so it is unfinished" of an SAE or a store); a folder of none of
    the kinds is one sentence naming them."""
    from precompute.__main__ import main

    full, _ = _make_store(tmp_path / "store")
    np.save(tmp_path / "rows.npy", full[:9].astype(np.float32))
    for path, rows, dtype, shards, layer, tokens in ((tmp_path / "store", len(full), "float16", 4, "22", "random:2"),
                                                     (tmp_path / "rows.npy", 9, "float32", 1, None, None)):
        assert main(["inspect", str(path), "--json"]) == 0
        seen = json.loads(capsys.readouterr().out)
        assert (seen["kind"], seen["rows"], seen["d"], seen["dtype"], seen["shards"]) == ("store", rows, 6, dtype, shards)
        assert (seen["layer"], seen["tokens"]) == (layer, tokens)  # what _make_store's manifest says, or nothing
    assert main(["inspect", str(tmp_path / "store")]) == 0
    assert f"{len(full)} rows x 6 (float16, 4 shards)" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "store" / "shards"):
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path} holds none of what inspect reads: a bundle" in err and "an SAE folder" in err


def test_a_lock_removes_the_folders_it_made_where_nothing_was_written(tmp_path):
    """A command refused after taking its --out's lock (bad data in the first batch, a layer the model lacks) left
    that folder behind, empty, and the parents it made; a folder written into, or there before, stays."""
    from sae_core.atomic import output_lock, writer_lock

    with pytest.raises(UserError):
        with writer_lock(tmp_path / "a" / "b"):
            raise UserError("refused")
    assert not (tmp_path / "a").exists()
    with output_lock(tmp_path / "d" / "e" / "ms.npy"):
        pass
    assert not (tmp_path / "d").exists()
    with writer_lock(tmp_path / "c" / "out"):
        (tmp_path / "c" / "out" / "x.json").write_text("{}")
    assert [p.name for p in (tmp_path / "c" / "out").iterdir()] == ["x.json"]  # the lock's file goes, the rest stays
    (tmp_path / "there").mkdir()
    with writer_lock(tmp_path / "there"):
        pass
    assert (tmp_path / "there").is_dir()
