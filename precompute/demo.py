"""`python -m precompute demo --out BUNDLE [--preset tiny|demo] [--world DIR]`: the whole pipeline on the
embedded world in one command, resumable stage by stage, with one progress display.

Stages: world (built only if missing) -> extract (the tiny LLaVA's vision layer -2, sampled tokens of
the train split, for training) -> train (Matryoshka BatchTopK SAE) -> atlas (scan of the val split
with all tokens, labels, hierarchy, FAISS index, ground-truth figures, thumbnails, manifest last).
Intermediate outputs live in BUNDLE/.work/ (activations, SAE) and are kept, so a killed run resumes.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sae_core.atomic import first_difference, strict_json, writer_lock
from sae_core.errors import UserError
from sae_core.folders import refuse_bundle_as_world

from .args import command_line, nonnegative_int, out_folder, positive_int


@dataclass(frozen=True)
class DemoPreset:
    world: str
    """Preset of `precompute world` used when the world must be built."""
    train_images: int
    tokens: str
    """Token sample per training image (`precompute extract --tokens`)."""
    width: int
    k: int
    groups: str
    steps: int
    batch_size: int
    atlas_split: str
    atlas_images: int | None
    score: str | None
    """Image score of the atlas (None: the default for the training tokens, max over patches)."""
    weights: dict
    """Expected seconds per stage on 2 CPU cores (progress bar weights)."""


PRESETS = {
    "tiny": DemoPreset(world="tiny", train_images=2000, tokens="random:4", width=256, k=8, groups="32,32,64,128",
                       steps=300, batch_size=512, atlas_split="val", atlas_images=None, score=None,
                       weights={"world": 40, "extract": 8, "train": 12, "atlas: scan": 6}),
    # Chosen on the demo world (README "The bundle and the atlas"): CLS scoring gave Spearman(MS,
    # purity) 0.63 against 0.46 for max over patches with the same SAE; k 16 beat k 8 and k 4; 4,000
    # steps gave 0.63-0.64 over three SAE seeds where 1,000 steps gave 0.48 (2,000: 0.56 and 0.71).
    "demo": DemoPreset(world="demo", train_images=10000, tokens="random:4", width=512, k=16,
                       groups="32,32,64,128,256", steps=4000, batch_size=1024, atlas_split="val", atlas_images=None,
                       score="cls", weights={"world": 300, "extract": 15, "train": 120, "atlas: scan": 10}),
}


def settings_before_they_were_recorded(work: Path) -> dict:
    """What a demo folder of before 2026-12-05, which wrote no .work/settings.json, was built with, as far as its
    extraction's and its SAE's own records tell (seed, tokens, SAE shape and schedule; not the number of training
    images, which a world's smaller train split caps): until then such a folder took a resume with another --seed
    or --preset as its own, and recorded the new settings over it."""
    from .atlas import read_json_dict

    found = {}
    identity = (read_json_dict(work / "acts" / "extract.json") or {}).get("identity")
    if isinstance(identity, dict):
        found.update(seed=identity.get("seed"), tokens=identity.get("tokens"))
    sae = read_json_dict(work / "sae" / "config.json") or {}
    training = sae.get("training") if isinstance(sae.get("training"), dict) else {}
    if sae:
        groups = sae.get("group_sizes")
        found.update(seed=training.get("seed"), width=sae.get("d_sae"), k=sae.get("k"), steps=training.get("steps"),
                     batch_size=training.get("batch_size"),
                     groups=",".join(str(g) for g in groups) if isinstance(groups, list) else None)
    return {k: v for k, v in found.items() if v is not None}


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="bundle directory to create or resume")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="demo: the bundle the explorer serves (a few minutes); tiny: for tests (about a minute)")
    p.add_argument("--world", help="world directory to use, or to build there when missing (default: BUNDLE/world)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the world (when built) and of the SAE")
    p.add_argument("--threads", type=positive_int, default=2,
                   help="torch CPU threads (default 2; pass 1 on a machine shared with other jobs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _sub_args(module, argv: list[str]) -> argparse.Namespace:
    """The arguments of another command's module, as its own command line would give them."""
    from .__main__ import COMMANDS, parse

    name = next(n for n, (m, _) in COMMANDS.items() if m == module.__name__)
    return parse([name, *argv])


def _hold_world_files(out: Path, world: Path) -> None:
    """Refuse to go on with a world whose world.json or models were rewritten since `out` recorded them (its
    activations, SAE and bundle are of the old one: until 2026-12-05 a rerun kept them in silence, and a run killed
    before its atlas mixed the old SAE with the new LLaVA); record them on the first run that has the world."""
    from sae_core import bundle as B
    from sae_core.datasets import files_changed, files_digest, model_files_digest

    from .atlas import read_json_dict

    now = {"world.json": files_digest([world / "world.json"]), "clip": model_files_digest(f"world:{world}"),
           "llava": model_files_digest(f"world:{world}:llava")}
    record = out / ".work" / "world_files.json"
    then = read_json_dict(record) if record.is_file() else None
    if then is not None and {k: then.get(k) for k in now} != now:
        raise files_changed(out, f"the world in {world} (its world.json or models)", "build")
    if then != now:
        B.write_json(out, ".work/world_files.json", now)


def run(args) -> int:
    import torch

    from sae_core import bundle as B

    from . import atlas, extract, train
    from . import world as world_cmd
    from .progress import PipelineProgress

    preset = PRESETS[args.preset]
    out = out_folder(Path(args.out).resolve(), "the bundle", writes=("bundle",))
    world = Path(args.world).resolve() if args.world else out / "world"
    refuse_bundle_as_world(world)
    # a second demo into this folder (a command started twice, two app starts building the default bundle) is
    # refused while this one runs (its .work stores and SAE, and the atlas, are written only under the lock)
    with writer_lock(out):
        work = out / ".work"
        work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(max(1, args.threads))
        t_start = time.time()

        # every stage depends on these: a resume with others was taken as the rest of this run (an SAE of seed 0
        # under a manifest of seed 1, a tiny SAE in a demo-preset bundle), so they are held from the first stage on
        acts, sae_dir = work / "acts", work / "sae"
        settings = {"preset": args.preset, **asdict(preset), "world_dir": str(world), "seed": args.seed}
        built = (acts.exists() or sae_dir.exists() or (out / atlas.STAGE_DIR).is_dir()
                 or (not args.world and world.exists()))
        if built and not (work / "settings.json").is_file():  # a folder of before 2026-12-05 recorded none
            old = settings_before_they_were_recorded(work)
            if differs := first_difference(old, {k: settings[k] for k in old}):
                raise UserError(f"{out} holds a bundle built with other settings ({differs}); pass the same options "
                                "to resume, or a new --out.")
        atlas.hold_settings(out, ".work/settings.json", settings, built)

        weights = {**atlas.STAGE_WEIGHTS, **preset.weights}
        progress = PipelineProgress(weights, desc=f"demo ({args.preset})", log=work / "log.txt", enabled=not args.quiet)
        timings = {}
        with progress:
            # 1. world models (only if missing or unfinished)
            # a marker, not this process's memory: a demo killed after its world stage and resumed said it had not
            # built the world (manifest demo.world_built_here false until 2026-12-05)
            built_here = work / "world_built_here"
            if (world / "report.json").is_file():
                progress.skip("world")
            else:
                built_here.touch()
                with progress.stage("world"):
                    world_cmd.run(argparse.Namespace(out=str(world), preset=preset.world, seed=args.seed,
                                                     threads=args.threads))
            built_world = built_here.is_file()
            _hold_world_files(out, world)
            wmeta = json.loads((world / "world.json").read_text(encoding="utf-8"))

            # 2. activations for training: sampled tokens of the train split at LLaVA's vision layer -2
            model = f"world:{world}:llava"
            n_train = min(preset.train_images,
                          int(wmeta["splits"]["train"]) if "splits" in wmeta else preset.train_images)
            if (acts / "layer_-2" / "manifest.json").is_file():
                progress.skip("extract")
            else:
                with progress.stage("extract"):
                    extract.run(_sub_args(extract, [
                        "--model", model, "--layer=-2", "--tokens", preset.tokens, "--dataset", f"world:{world}:train",
                        "--out", str(acts), "--limit", str(n_train), "--batch-size", "256", "--seed", str(args.seed),
                        "--device", "cpu"]))

            # 3. the SAE
            if train.finished(sae_dir):
                progress.skip("train")
            else:
                with progress.stage("train"):
                    # One thread: the demo SAE's matmuls (1,024 x 64 x 512) are too small to share, and the
                    # second thread only costs (`precompute train` alone on the preset's tokens, 1,000 steps:
                    # 27.6-27.7 s on one thread, 37.6-41.7 s on two, alternating runs, 2026-12-01).
                    torch.set_num_threads(1)
                    try:
                        train.run(_sub_args(train, [
                            "--activations", str(acts / "layer_-2"), "--arch", "matryoshka", "--width",
                            str(preset.width), "--k", str(preset.k), "--groups", preset.groups, "--steps",
                            str(preset.steps), "--batch-size", str(preset.batch_size), "--seed", str(args.seed),
                            "--device", "cpu", "--out", str(sae_dir)]))
                    finally:
                        torch.set_num_threads(max(1, args.threads))

            # 4. the atlas (its own stages, resumable)
            job = atlas.AtlasJob(
                sae=str(sae_dir), dataset=f"world:{world}:{preset.atlas_split}", model=model, out=str(out), layer="-2",
                embedder=f"world:{world}", limit=preset.atlas_images, seed=args.seed, device="cpu", score=preset.score,
                command=command_line(args),
                extra_manifest={"demo": {"preset": args.preset, "world_built_here": built_world}})
            manifest = atlas.build_atlas(job, progress)
        timings = {**progress.timings, "total_s": round(time.time() - t_start, 1)}
        B.write_json(out, ".work/timings.json", timings)
        summary = {"out": str(out), "preset": args.preset, **{k: manifest["metrics"].get(k) for k in (
            "fvu", "l0", "dead_frac", "ms_mean", "ms_mean_raw", "ms_ground_truth_spearman", "ms_agreement",
            "label_accuracy", "label_accuracy_patch_gallery", "hierarchy_depth")}, "timings": timings}
        print(strict_json(summary))
    return 0
