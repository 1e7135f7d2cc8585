"""Counts and shares on the command line: a value no command can use ends in one line (exit 2), without
argparse's usage block, before anything runs. Most of these ran before, and crashed, ran forever or gave an
empty result."""
import os
from pathlib import Path

import pytest

from precompute.__main__ import main

REFUSED = [  # (argv, the flag named in the message, what it must be)
    # the cross-modal score is at most 1: --threshold 2 found no latent, silently
    (["crossmodal", "--world", "w", "--out", "o", "--threshold", "2"], "--threshold", "a share in (0, 1]"),
    (["crossmodal", "--world", "w", "--out", "o", "--threshold", "-0.5"], "--threshold", "a share in (0, 1]"),
    # every other command's --threads is a positive integer; the world's took -3 (and ran on one thread)
    (["world", "--out", "w", "--threads", "-3"], "--threads", "a positive integer"),
    # eta^2 is at most 1: --tau 5 left the swap strategies without a latent and reported their figures anyway
    (["steer-eval", "--bundle", "b", "--tau", "5"], "--tau", "a share in (0, 1]"),
    (["extract", "--model", "m", "--dataset", "d", "--layer", "-2", "--out", "o", "--shard-images", "-1"],
     "--shard-images", "a positive integer"),
    (["extract", "--model", "m", "--dataset", "d", "--layer", "-2", "--out", "o", "--workers", "-1"],
     "--workers", "an integer of 0 or more"),
    (["ood", "--bundle", "b", "--k", "0"], "--k", "a positive integer"),
    (["ood", "--bundle", "b", "--fit-images", "0"], "--fit-images", "a positive integer"),
    (["ood", "--bundle", "b", "--max-images", "0"], "--max-images", "a positive integer"),
    (["ontology", "--bundle", "b", "--top", "0"], "--top", "a positive integer"),
    (["ontology", "--bundle", "b", "--min-share", "2"], "--min-share", "a share in (0, 1]"),
    (["ontology", "--bundle", "b", "--min-share", "nan"], "--min-share", "a finite number"),
    (["probes", "--bundle", "b", "--threads", "0"], "--threads", "a positive integer"),
    (["steer", "--bundle", "b", "--image", "x.png", "--max-new-tokens", "0"], "--max-new-tokens", "a positive integer"),
    (["steer", "--bundle", "b", "--image", "x.png", "--top", "two"], "--top", "a positive integer"),
    (["train", "--activations", "a", "--arch", "topk", "--width", "8", "--steps", "5", "--out", "o", "--k", "0"],
     "--k", "a positive integer"),
    (["atlas", "--sae", "s", "--dataset", "d", "--model", "m", "--out", "o", "--topk", "0"], "--topk", "a positive integer"),
    (["steer-eval", "--bundle", "b", "--learn-steps", "-1"], "--learn-steps", "an integer of 0 or more"),
    (["extract", "--model", "m", "--dataset", "d", "--layer", "-2", "--out", "o", "--seed", "-1"],
     "--seed", "an integer of 0 or more"),
    (["train", "--activations", "a", "--arch", "topk", "--width", "8", "--steps", "5", "--out", "o", "--aux-k", "-3"],
     "--aux-k", "a positive integer"),
    (["train", "--activations", "a", "--arch", "topk", "--expansion", "nan", "--steps", "5", "--out", "o"],
     "--expansion", "a finite number"),
    (["train", "--activations", "a", "--arch", "topk", "--width", "8", "--steps", "5", "--out", "o", "--lr", "0"],
     "--lr", "a number above 0"),
    (["train", "--activations", "a", "--arch", "topk", "--width", "8", "--steps", "5", "--out", "o", "--aux-coeff", "nan"],
     "--aux-coeff", "a finite number"),
    (["train", "--activations", "a", "--arch", "relu", "--width", "8", "--steps", "5", "--out", "o", "--l1-coeff", "-1"],
     "--l1-coeff", "a number of 0 or more"),
]


@pytest.mark.parametrize("argv,flag,wanted", REFUSED, ids=[f"{a[0]} {f}" for a, f, _ in REFUSED])
def test_unusable_counts_are_refused_before_anything_runs(argv, flag, wanted, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: must be {wanted}" in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and f"`python -m precompute {argv[0]} --help`" in err


@pytest.mark.parametrize("argv,said", [
    # before: "the following arguments are required: --embeddings": the typo was not named
    (["ms", "--activations", "a", "--embedings", "e", "--out", "o.npy"],
     "unrecognized arguments: --embedings (did you mean --embeddings?)"),
    (["train", "--activations", "a", "--outt", "o", "--stepz=5"],
     "unrecognized arguments: --outt --stepz=5 (did you mean --out or --steps?)"),
    (["inspect", "b", "--jsn"], "unrecognized arguments: --jsn (did you mean --json?)"),
    (["ms", "--sae", "s"], "unrecognized arguments: --sae (`"),  # nothing near: no guess
    (["atlas", "--quiet"], "unrecognized arguments: --quiet (`"),  # not "--out": the dashes are not compared
    (["inspect", "b", "c"], "unrecognized arguments: c (`"),
    # ontology fits nothing: it took --fit-images and ignored it until 2026-12-05
    (["ontology", "--bundle", "b", "--fit-images", "5"], "unrecognized arguments: --fit-images (did you mean --max-images?)"),
])
def test_what_a_command_does_not_take_is_named_by_that_command(argv, said, capsys):
    """Unknown options were refused by the top parser, pointing to `python -m precompute --help`, which lists
    no option, and after a missing required option, which hid the typo; now by the command's parser, first,
    with the nearest option of each misspelt one."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {said}")
    assert err.endswith(f"(`python -m precompute {argv[0]} --help` lists the options).\n")


def test_options_may_be_abbreviated_and_values_may_look_like_options():
    from precompute.__main__ import parse

    args = parse(["inspect", "b", "--js"])  # argparse's prefixes still work
    assert args.json is True
    args = parse(["steer", "--bundle", "b", "--image", "3", "--prompt=--what is it"])
    assert args.prompt == "--what is it"
    assert parse(["inspect", "--", "--odd-folder"]).path == "--odd-folder"  # after --, positional
    # a comma list starting with a negative number is a value, as "-5" alone is (argparse took "-5,3" for an
    # option until 2026-12-05: "expected one argument", where learned deltas usually start negative)
    for value in ("-5", "-5,3", "-0.5,2e-3", "-.5,-1", "3,-5"):
        args = parse(["steer", "--bundle", "b", "--image", "3", "--latent", "1,2", "--value", value, "--mode", "add"])
        assert (args.value, args.mode) == (value, "add")
    assert parse(["steer", "--bundle", "b", "--image", "3", "--latent", "1,2", "--strength", "-2,1"]).strength == "-2,1"
    assert parse(["steer", "--bundle", "b", "--image", "3", "--latent", "1,2", "--val", "-5,3"]).value == "-5,3"  # a prefix
    # the layers' lists too, which extract and atlas each read with a regex of their own until 2026-12-05
    for layer in ("-2", "-2,embed", "-1,-2"):
        assert parse(["extract", "--model", "m", "--dataset", "d", "--out", "o", "--layer", layer]).layer == layer
    assert parse(["atlas", "--sae", "s", "--dataset", "d", "--model", "m", "--out", "o", "--layer", "-2"]).layer == "-2"
    with pytest.raises(SystemExit):  # a flag takes no value: the list stays an unknown option
        parse(["inspect", "b", "--json", "-5,3"])


def test_export_takes_the_sae_as_atlas_and_steer_do(tmp_path, capsys):
    """`export --sae DIR`, as `atlas --sae` and `steer --sae`, was "unrecognized arguments: --sae"; the
    positional DIR still works, and both or neither is one sentence."""
    import json

    from sae_core.sae import SAEConfig, SparseAutoencoder
    from sae_core.checkpoint import save_sae

    save_sae(SparseAutoencoder(SAEConfig(d_in=4, d_sae=8, arch="topk", k=2)), tmp_path / "sae")
    for argv, out in ((["export", "--sae", str(tmp_path / "sae")], "a"), (["export", str(tmp_path / "sae")], "b")):
        assert main(argv + ["--out", str(tmp_path / out)]) == 0
        assert json.loads((tmp_path / out / "cfg.json").read_text())["d_sae"] == 8
    capsys.readouterr()
    for argv in (["export"], ["export", str(tmp_path / "sae"), "--sae", str(tmp_path / "sae")]):
        assert main(argv + ["--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: give the SAE to export once:") and err.count("\n") == 1
    assert not (tmp_path / "c").exists()


def test_usable_counts_pass():
    from precompute.__main__ import parser_for

    argv = ["ontology", "--bundle", "b", "--top", "8", "--min-share", "1", "--permutations", "5"]
    args = parser_for(argv).parse_args(argv)
    assert (args.top, args.min_share, args.permutations) == (8, 1.0, 5)
    argv = ["extract", "--model", "m", "--dataset", "d", "--layer", "-2", "--out", "o", "--workers", "0"]
    assert parser_for(argv).parse_args(argv).workers == 0


def test_an_out_that_is_a_file_is_one_sentence(tmp_path, capsys):
    """--out naming a file where a folder goes: one line, no traceback, the file untouched."""
    import numpy as np

    np.save(tmp_path / "acts.npy", np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32))
    (tmp_path / "taken").write_text("a file the user already has\n")
    argv = ["train", "--activations", str(tmp_path / "acts.npy"), "--arch", "topk", "--width", "16", "--k", "2",
            "--steps", "2", "--batch-size", "64", "--out", str(tmp_path / "taken")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {tmp_path / 'taken'} is a file; give a folder for the SAE.\n"  # as the other commands say
    assert (tmp_path / "taken").read_text() == "a file the user already has\n"


def test_train_options_another_architecture_reads_are_refused(tmp_path, capsys):
    """`--arch relu --k 4` trained a relu SAE (no k) and `--arch topk --groups ...` a topk SAE without groups,
    silently; each such option is now refused before the activations are read (this file does not exist)."""
    base = ["train", "--activations", str(tmp_path / "none.npy"), "--width", "16", "--steps", "2", "--out",
            str(tmp_path / "o")]
    for arch, option, value, readers in [("relu", "--k", "4", "topk / batchtopk / matryoshka"),
                                         ("relu", "--aux-k", "8", "topk / batchtopk / matryoshka"),
                                         ("relu", "--aux-coeff", "0.1", "topk / batchtopk / matryoshka"),
                                         ("topk", "--l1-coeff", "0", "relu"),
                                         ("batchtopk", "--groups", "8,8", "matryoshka"),
                                         ("topk", "--groups", "0.5,0.5", "matryoshka")]:
        assert main([*base, "--arch", arch, option, value]) == 2
        assert capsys.readouterr().err == (f"error: {option} applies to --arch {readers}, not {arch}; leave it out "
                                           "or pick another --arch.\n")
    # relu trained in fp32 under --dtype bfloat16, while its config.json recorded bfloat16
    assert main([*base, "--arch", "relu", "--dtype", "bfloat16"]) == 2
    assert capsys.readouterr().err == ("error: --dtype bfloat16 applies to --arch topk / batchtopk / matryoshka, not "
                                       "relu, which trains in float32; leave it out or pick another --arch.\n")
    assert not (tmp_path / "o").exists()
    # the same options for an architecture that reads them get as far as the activations
    for arch, option, value in [("relu", "--l1-coeff", "0"), ("matryoshka", "--groups", "8,8"), ("topk", "--k", "4")]:
        assert main([*base, "--arch", arch, option, value]) == 2
        assert "none.npy is neither an activation store directory nor a .npy file" in capsys.readouterr().err


def test_an_expansion_of_no_latent_names_the_option(tmp_path, capsys):
    """It said "SAE sizes must be positive, got d_in=16, d_sae=0", naming no option."""
    import numpy as np

    np.save(tmp_path / "acts.npy", np.zeros((64, 16), np.float32))
    assert main(["train", "--activations", str(tmp_path / "acts.npy"), "--arch", "topk", "--expansion", "0.01",
                 "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == ("error: --expansion 0.01 of the activations' width 16 is 0 latents; give "
                                       "--expansion 0.0625 or more, or --width.\n")
    assert not (tmp_path / "o").exists()


def test_a_reader_that_stops_reading_is_no_traceback(tmp_path):
    """`inspect B | head -2` printed a BrokenPipeError traceback (and Python's "Exception ignored" at exit); the
    pipe here is closed before the command writes, as head does once it has its lines."""
    import subprocess
    import sys

    import numpy as np

    np.save(tmp_path / "acts.npy", np.zeros((64, 16), np.float32))
    proc = subprocess.Popen([sys.executable, "-m", "precompute", "inspect", str(tmp_path / "acts.npy")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    proc.stdout.close()  # before the child has imported anything, so before it writes
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_a_path_it_may_not_read_is_not_called_an_out_to_free(tmp_path, monkeypatch, capsys):
    """A permission refused on reading (`inspect` of a bundle whose neurons/ this user may not read) was reported as
    "cannot write ...; give an --out that is free", by the handler meant for --out clashes. (Raised here by hand:
    the tests run as root, whom no file mode stops.)"""
    import precompute.inspect
    from precompute.__main__ import main

    def unreadable(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "b" / "neurons" / "ms.npy"))

    monkeypatch.setattr(precompute.inspect, "run", unreadable)
    assert main(["inspect", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == (f"error: permission denied on {tmp_path / 'b' / 'neurons' / 'ms.npy'}; give this "
                                       "user access to it (read for an input, write for an --out), or use another "
                                       "path.\n")


def test_benchmarks_refuse_in_one_line(tmp_path, monkeypatch, capsys):
    """A missing bundle (app_load built the demo bundle, unseen, until spawn's timeout), a count of 0
    (tracebacks) and an option a benchmark does not take (argparse's usage block first) end in one line, exit 2."""
    import sys

    from benchmarks.__main__ import main as benchmarks_main

    monkeypatch.setattr(sys, "argv", ["benchmarks", "app_load", "--bundle", str(tmp_path / "none")])
    assert benchmarks_main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: bundle {tmp_path / 'none'} does not exist")
    assert not (tmp_path / "none").exists()
    for argv, said in ((["ms", "--n", "0"], "--n: must be a positive integer"),
                       # a density of 2 fired every latent and ran for minutes; -1 s read nothing and reported it
                       (["coact", "--density", "0.1,2"], "--density: must be shares in (0, 1] separated by commas"),
                       (["store_read", "--seconds", "-1"], "--seconds: must be a number above 0"),
                       (["sae_train", "--stpes", "3"], "unrecognized arguments: --stpes 3 (`python -m benchmarks "
                                                        "sae_train --help` lists the options)")):
        monkeypatch.setattr(sys, "argv", ["benchmarks", *argv])
        with pytest.raises(SystemExit) as e:
            benchmarks_main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and err.count("\n") == 1, err
    # a misspelt or missing name: the usage line alone, without "error" or the name (until 2026-12-05)
    for argv, said in ((["bnds"], "error: there is no benchmark 'bnds' (did you mean bands?); run `python -m "
                                  "benchmarks NAME [options]` with NAME one of store_read, "),
                       ([], "error: no benchmark was named; run `python -m benchmarks NAME [options]` with NAME one")):
        monkeypatch.setattr(sys, "argv", ["benchmarks", *argv])
        assert benchmarks_main() == 2
        err = capsys.readouterr().err
        assert err.startswith(said) and err.count("\n") == 1, err
    # --help lists the benchmarks (it was taken for a benchmark's name until 2026-12-05: exit 2)
    from benchmarks.__main__ import BENCHMARKS

    for flag in ("-h", "--help"):
        monkeypatch.setattr(sys, "argv", ["benchmarks", flag])
        assert benchmarks_main() == 0
        out = capsys.readouterr().out
        assert f"NAME is one of {', '.join(BENCHMARKS)};" in out


def test_a_demo_resumed_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    """A demo killed after its first stage and rerun with another --seed or --preset took the stages done
    as its own (an SAE of seed 0 under a manifest of seed 1, a tiny SAE in a demo-preset bundle)."""
    import precompute.world as world_cmd
    from sae_core.errors import UserError

    def killed(args):
        raise UserError("killed while the world was built")
    monkeypatch.setattr(world_cmd, "run", killed)
    out = tmp_path / "bundle"
    argv = ["demo", "--out", str(out), "--preset", "tiny", "--world", str(tmp_path / "world"), "--quiet"]
    assert main(argv) == 2
    assert main(argv + ["--seed", "1"]) == 2  # nothing built yet: the new settings replace the old ...
    capsys.readouterr()
    (out / ".work" / "acts").mkdir()  # ... once a stage has output, they are held
    for other, said in ((["--seed", "2"], "seed: 1 there, 2 now"), (["--preset", "demo", "--seed", "1"],
                                                                    "preset: 'tiny' there, 'demo' now")):
        assert main(argv + other) == 2
        assert f"holds a bundle built with other settings ({said})" in capsys.readouterr().err
    assert main(argv + ["--seed", "1"]) == 2 and "killed while the world" in capsys.readouterr().err  # the same: resumes
    # `inspect` names the command that resumes it, from the settings the stages hold (the reader said "unfinished")
    import json

    assert main(["inspect", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["kind"], s["built_by"], s["stages_done"]) == ("unfinished_bundle", "demo", [])
    assert s["stages_left"][:3] == ["world", "extract", "train"] and s["stages_left"][3] == "atlas: scan"
    assert s["resume"] == (f"python -m precompute demo --out {out} --preset tiny --seed 1 --world "
                           f"{(tmp_path / 'world').resolve()}")
    # a folder of before 2026-12-05 recorded no settings: they are read from its extraction's and SAE's records
    # (it took a resume with another --seed as its own, and recorded the new seed over it, until then)
    old = tmp_path / "old"
    (old / ".work" / "acts").mkdir(parents=True)
    (old / ".work" / "sae").mkdir()
    (old / ".work" / "acts" / "extract.json").write_text(json.dumps(
        {"identity": {"seed": 0, "tokens": "random:4", "n_images": 2000}}))
    (old / ".work" / "sae" / "config.json").write_text(json.dumps(
        {"d_sae": 256, "k": 8, "group_sizes": [32, 32, 64, 128], "training": {"seed": 0, "steps": 300, "batch_size": 512}}))
    argv = ["demo", "--out", str(old), "--preset", "tiny", "--world", str(tmp_path / "world"), "--quiet"]
    for other, said in ((["--seed", "1"], "seed: 0 there, 1 now"), (["--preset", "demo"], "width: 256 there, 512 now")):
        assert main(argv + other) == 2
        assert f"holds a bundle built with other settings ({said})" in capsys.readouterr().err
        assert not (old / ".work" / "settings.json").exists()
    assert main(argv) == 2 and "killed while the world" in capsys.readouterr().err  # its own: resumes, and records
    assert json.loads((old / ".work" / "settings.json").read_text())["seed"] == 0
    # a cross-modal bundle's settings give its own command
    cm = tmp_path / "cm"
    (cm / ".work").mkdir(parents=True)
    (cm / ".work" / "settings.json").write_text(json.dumps({"world": "/w", "preset": "tiny", "lm_layer": 2,
                                                             "threshold": 0.6, "seed": 3}))
    assert main(["inspect", str(cm)]) == 0
    printed = capsys.readouterr().out
    assert (f"resume   python -m precompute crossmodal --world /w --out {cm} --preset tiny --lm-layer 2 --threshold 0.6 "
            "--seed 3") in printed and "left     rows, train, atlas: scan" in printed


def test_a_demo_on_a_world_rewritten_since_is_refused(tiny_world, tmp_path, monkeypatch, capsys):
    """`demo --world W` after W was built again (other models, other images) kept its activations, SAE and bundle
    and printed the old figures, exit 0; killed before its atlas, it would have put the old SAE under the new LLaVA
    (a reviewer's run: 1,713 of 1,736 files off a fresh build; until 2026-12-05). The first run that has the world
    records its world.json's and models' files, and a rerun is held to them."""
    import shutil

    import precompute.extract as extract_cmd
    from sae_core.errors import UserError

    def killed(args):
        raise UserError("killed in extract")
    monkeypatch.setattr(extract_cmd, "run", killed)
    world, out = tmp_path / "world", tmp_path / "bundle"
    shutil.copytree(tiny_world, world)
    argv = ["demo", "--out", str(out), "--preset", "tiny", "--world", str(world), "--quiet"]
    assert main(argv) == 2 and "killed in extract" in capsys.readouterr().err
    assert main(argv) == 2 and "killed in extract" in capsys.readouterr().err  # the same world: resumes
    record = (out / ".work" / "world_files.json").read_bytes()
    weights = world / "llava" / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # saved again a second later
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {out} was made from other files: the world in {world} (its world.json or models) changed since (a "
        f"file's size or modification time); pass a new --out, or delete {out} to build there from the start.")
    assert (out / ".work" / "world_files.json").read_bytes() == record  # the world it was started on, still


def test_every_option_is_explained_with_its_default():
    """Each command's --help: every option has a help text, and every option with a default says it, once
    (42 options left their default unsaid, and 19 had no help at all). Read from the printed help, option by
    option, against the defaults the parser holds."""
    import argparse
    import re

    from precompute.__main__ import COMMANDS, parser_for

    for name in COMMANDS:
        root = parser_for([name])
        parser = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        text = parser.format_help()
        options = text[text.index("options:"):]
        blocks = re.split(r"\n  (?=-)", options)[1:]  # one block per option, its help lines included
        actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert len(blocks) == len(actions) + 1, name  # + -h
        for action in actions:
            assert action.help, (name, action.option_strings)
            block = " ".join(next(b for b in blocks if b.split()[0].rstrip(",") in action.option_strings).split())
            d = action.default
            if d is None or d is False or d in ("", []):
                assert "(default: None)" not in block, (name, block)
                continue
            assert "default" in block.lower(), (name, block)
            said_twice = block.lower().count("default") > 1 and f"(default: {d})" in block
            assert not said_twice, (name, block)


def test_an_out_that_holds_another_steps_output_is_refused_before_any_work(tmp_path, capsys):
    """An SAE trained into an extraction's folder, stores extracted into an SAE's, a bundle built into either:
    each mixed two runs' files in one folder (the SAE landed beside extract.json and layer_*/). Refused in one
    sentence naming what the folder holds, before anything is read or written there."""
    import numpy as np

    from sae_core.checkpoint import save_sae
    from sae_core.sae import SAEConfig, SparseAutoencoder
    from tests.test_store import _make_store

    _make_store(tmp_path / "store")
    save_sae(SparseAutoencoder(SAEConfig(arch="topk", d_in=6, d_sae=12, k=2)), tmp_path / "sae")
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).standard_normal((600, 6)).astype(np.float32))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    world = ["--dataset", "world:W:val", "--model", "world:W:llava", "--layer", "-2"]
    for argv, holds, what in (
            (["train", "--activations", str(tmp_path / "acts.npy"), "--arch", "topk", "--width", "16", "--k", "2",
              "--steps", "2", "--out", str(tmp_path / "store")], "an activation store", "the SAE"),
            (["extract", *world, "--tokens", "cls", "--out", str(tmp_path / "sae")], "an SAE", "the activation stores"),
            (["atlas", "--sae", str(tmp_path / "sae"), *world, "--embedder", "world:W", "--out", str(tmp_path / "sae")],
             "an SAE", "the bundle"),
            (["demo", "--preset", "tiny", "--out", str(tmp_path / "store")], "an activation store", "the bundle"),
            # a world built into an SAE's folder hid the SAE (inspect called it a world); an export went beside
            # an extraction's stores, or replaced a training run's SAE (until 2026-12-05)
            (["world", "--preset", "tiny", "--out", str(tmp_path / "sae")], "an SAE", "the world"),
            (["world", "--preset", "tiny", "--out", str(tmp_path / "store")], "an activation store", "the world"),
            (["export", str(tmp_path / "sae"), "--out", str(tmp_path / "store")], "an activation store",
             "the exported SAE")):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == f"error: --out {argv[-1]} holds {holds}; give a new folder for {what}.\n"
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written anywhere
    # an SAE of another library's layout: ours beside it would be read first, hiding it
    from sae_core.checkpoint import export_saelens

    export_saelens(tmp_path / "sae", tmp_path / "theirs")
    argv = ["train", "--activations", str(tmp_path / "acts.npy"), "--arch", "topk", "--width", "16", "--k", "2",
            "--steps", "2", "--out", str(tmp_path / "theirs")]
    assert main(argv) == 2
    said = f"error: --out {tmp_path / 'theirs'} holds an SAE in saelens's layout; give a new folder for the SAE.\n"
    assert capsys.readouterr().err == said
    # the command's own output is resumed as before: a finished SAE's folder given to train again is its own
    argv = ["train", "--activations", str(tmp_path / "acts.npy"), "--arch", "topk", "--width", "16", "--k", "2",
            "--steps", "2", "--batch-size", "64", "--out", str(tmp_path / "mine")]
    assert main(argv) == 0 and main(argv) == 0


def test_running_out_of_memory_is_one_sentence_with_the_commands_own_ways_out(tmp_path, monkeypatch, capsys):
    """A command that runs out of memory ends in one line naming torch's words and the options of that command
    that need less (it was torch's traceback; on the CPU the allocator's failure is a RuntimeError that an
    `except torch.OutOfMemoryError` misses). Any other RuntimeError is still a traceback: a bug, not the machine."""
    import numpy as np
    import torch

    from precompute.__main__ import out_of_memory_advice, parse
    from sae_core.monosemanticity import MSAccumulator

    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.random((20, 3)).astype(np.float32))
    np.save(tmp_path / "e.npy", rng.standard_normal((20, 4)).astype(np.float32))
    argv = ["ms", "--activations", str(tmp_path / "a.npy"), "--embeddings", str(tmp_path / "e.npy"),
            "--chunk", "8", "--device", "cpu"]

    def too_big(self, acts, embeddings):
        torch.empty(2 ** 62, dtype=torch.uint8)  # 4 EiB: more than any address space, so the allocator refuses

    monkeypatch.setattr(MSAccumulator, "update", too_big)
    assert main([*argv, "--out", str(tmp_path / "ms.npy")]) == 2
    err = capsys.readouterr().err.strip()  # the progress bar's lines, then the error's
    assert "Traceback" not in err and err.splitlines()[-1] == ("error: ms ran out of memory (DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                   "4611686018427387904 bytes. Error code 12 (Cannot allocate memory)); try a smaller --chunk than 8; "
                   "or free some memory or use a larger device.")
    assert not (tmp_path / "ms.npy").exists()

    def a_bug(self, acts, embeddings):
        raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")

    monkeypatch.setattr(MSAccumulator, "update", a_bug)
    with pytest.raises(RuntimeError, match="must match"):
        main([*argv, "--out", str(tmp_path / "ms2.npy")])

    def advice(*argv):
        return out_of_memory_advice(parse(list(argv)))

    assert advice("train", "--activations", "a", "--arch", "topk", "--width", "8", "--steps", "5", "--out", "o", "--batch-size", "512") \
        == "try a smaller --batch-size than 512 (a different run: give it a new --out); or free some memory or use a larger device."
    assert advice("extract", "--model", "m", "--dataset", "d", "--layer", "-2", "--out", "o") == (
        "try a smaller --batch-size than 64 (the results do not depend on it); or free some memory or use a larger device.")
    assert advice("atlas", "--sae", "s", "--dataset", "d", "--model", "m", "--out", "o", "--memory-gib", "0.5") == (
        "try a smaller --batch-size than 128 (the results do not depend on it), a smaller --memory-gib than 0.5; or "
        "free some memory or use a larger device.")
    assert advice("steer", "--bundle", "b", "--image", "x.png") == (
        "try --precision 4bit on a CUDA GPU or bf16; or free some memory or use a larger device.")
    assert advice("steer-eval", "--bundle", "b", "--precision", "fp16") == (
        "try --precision 4bit on a CUDA GPU; or free some memory or use a larger device.")
    assert advice("steer-eval", "--bundle", "b", "--precision", "4bit") == "free some memory or use a larger device."
    assert advice("ms", "--activations", "a", "--embeddings", "e", "--out", "o", "--chunk", "1") == (
        "free some memory or use a larger device.")


def test_an_argument_that_is_not_utf8_is_refused_before_anything_runs(tmp_path, capsys):
    """A Latin-1 "café" folder reaches Python as "caf\\udce9": an atlas of it was built and passed `inspect`, and then
    every page of the explorer failed in Gradio's JSON encoder (until 2026-12-05). One line, naming it by its bytes."""
    import os

    folder = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    with pytest.raises(SystemExit) as e:
        main(["atlas", "--sae", "s", "--dataset", f"imagefolder:{folder}", "--model", "m", "--out", "o"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: the argument 'imagefolder:{tmp_path}/caf\\xe9' is not UTF-8 text"), err


def test_class_folders_not_named_in_utf8_are_labelled_by_their_bytes(tmp_path):
    """A class folder "caf\\xe9" (Latin-1) labelled its images "caf\\udce9", which the text tower's tokenizer refused
    after the whole scan and no page could send (until 2026-12-05): its label is "caf\\\\xe9" now, and its images
    still open (the paths keep the folder's own name)."""
    import os

    from PIL import Image

    from precompute.progress import PipelineProgress
    from sae_core.datasets import image_folder
    from sae_core.labels import class_concepts

    for name in (b"caf\xe9", b"tea"):
        os.makedirs(bytes(tmp_path) + b"/data/" + name)
        Image.new("RGB", (4, 4), "red").save(os.fsdecode(bytes(tmp_path) + b"/data/" + name + b"/x\xff.png"))
    ds = image_folder(f"imagefolder:{tmp_path / 'data'}", str(tmp_path / "data"))
    assert ds.labels == ["caf\\xe9", "tea"] and ds[0].size == (4, 4) and ds[1].size == (4, 4)
    concepts, _ = class_concepts(ds)
    assert [c.name for c in concepts] == ["caf\\xe9", "tea"]
    # the line saying an image could not be read: it went to the build's log as a traceback that lost the --out
    with PipelineProgress({"atlas": 1.0}, desc="atlas", log=tmp_path / "log.txt") as progress:
        progress.note(f"could not read {ds.item(0)}")
    assert (tmp_path / "log.txt").read_text(encoding="utf-8").endswith("could not read caf\\udce9/x\\udcff.png\n")


def test_a_storage_that_refuses_writes_ends_a_command_in_one_line_and_it_resumes(tmp_path):
    """A full disk, a quota, a file-size limit or a read-only disk ended every long command in a traceback until
    2026-12-05 (numpy's errno-less "65536 requested and 24512 written", safetensors' SafetensorError, ...), and on a
    disk already full the writer lock left its empty --out and .lock behind. Here the file-size limit (ulimit -f)
    plays the full disk: one line and exit 2, nothing left where nothing was written, and the same command without
    the limit writes what a clean run writes."""
    import errno
    import os
    import resource
    import subprocess
    import sys

    import numpy as np

    from sae_core.errors import write_failure

    rng = np.random.default_rng(0)
    np.save(tmp_path / "A.npy", rng.random((400, 300)).astype(np.float32))
    np.save(tmp_path / "E.npy", rng.normal(size=(400, 16)).astype(np.float32))
    repo = Path(__file__).resolve().parents[1]

    def ms(out, limit=None):
        def cap():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return subprocess.run([sys.executable, "-m", "precompute", "ms", "--activations", str(tmp_path / "A.npy"),
                               "--embeddings", str(tmp_path / "E.npy"), "--out", str(out)], cwd=repo, text=True,
                              capture_output=True, timeout=120, preexec_fn=cap if limit is not None else None,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))

    # the lock's holder line cannot be written: no --out and no .lock are left
    run = ms(tmp_path / "new" / "deeper" / "ms.npy", 0)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: ms could not write") and "past the size limit (ulimit -f); raise the " \
        "limit (ulimit -f unlimited) and run the same command again" in run.stderr, run.stderr
    assert not (tmp_path / "new").exists()
    # 700 bytes of a 1,328-byte ms.npy: numpy lost the short write in its own stream's close, and the cut file was
    # renamed into place as the result, exit 0, in silence (until 2026-12-05)
    run = ms(tmp_path / "o" / "ms.npy", 700)
    said = [line for line in run.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert run.returncode == 2 and said == [run.stderr.splitlines()[-1]], run.stderr
    assert said[0].startswith("error: ms could not write: a file could not be written whole"), said
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    assert ms(tmp_path / "o" / "ms.npy").returncode == 0 and ms(tmp_path / "clean" / "ms.npy").returncode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "ms.npy"), np.load(tmp_path / "clean" / "ms.npy"))
    # the three shapes of the refusal, and what is no refusal of the storage
    from safetensors import SafetensorError

    assert write_failure(OSError(errno.ENOSPC, "No space left on device")) == "no space is left on the device"
    assert write_failure(OSError("65536 requested and 24512 written")).startswith("a file could not be written whole")
    assert write_failure(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert write_failure(OSError(errno.EROFS, "Read-only file system")) == "the file system is read-only"
    assert write_failure(FileNotFoundError(errno.ENOENT, "x")) is None and write_failure(ValueError("x")) is None


def test_the_explorer_refuses_a_bundle_path_that_is_not_utf8(tmp_path, capsys, monkeypatch):
    """`python -m app --bundle <a Latin-1 café folder>` ended its start in a UnicodeEncodeError (until 2026-12-05);
    so did SAE_APP_BUNDLE of such a path. One line, exit 2, before anything loads."""
    import os

    from app.__main__ import main as app_main

    folder = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    assert app_main(["--bundle", folder]) == 2
    err = capsys.readouterr().err
    assert err == f"error: the argument '{tmp_path}/caf\\xe9' is not UTF-8 text (a name in another encoding, shown by " \
                  "its bytes); rename that file or folder to UTF-8 (e.g. `convmv -f latin1 -t utf8 -r --notest NAME`) " \
                  "and run again\n", err
    monkeypatch.setenv("SAE_APP_BUNDLE", folder)
    assert app_main([]) == 2 and "is not UTF-8 text" in capsys.readouterr().err
