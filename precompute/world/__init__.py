"""`python -m precompute world --out DIR [--preset tiny|demo] [--seed S]`: build the embedded world.

Stages, each written to a temporary name and renamed when complete, and skipped when present:
  1. world.json + taxonomy.json  (the generator's parameters; images are never stored)
  2. clip/     tiny CLIPModel trained contrastively, with its CLIPProcessor
  3. llava/    tiny LlavaForConditionalGeneration on the frozen CLIP tower, with its LlavaProcessor
  4. report.json  gate figures measured on val through from_pretrained (the path users take)
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from sae_core.atomic import strict_json, writer_lock
from sae_core.errors import UserError
from sae_core.folders import refuse_bundle_as_world

from ..args import nonnegative_int, out_folder, positive_int
from .presets import PRESETS

STAGE_FILE = "world_stage.json"  # inside clip/ and llava/: how the stage was built and how long it took


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="world directory to create or resume")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="demo: meets the gates (about 7 minutes on 2 shared cores); tiny: for tests (under a minute)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="one seed for images and training")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: safe on a shared machine, where two threads ran up to "
                        "7x slower, and the same bits on any CPU count; 2 was 1.7x faster on idle cores)")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _fresh_tmp(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def run(args) -> int:
    from . import stages

    out = Path(args.out)
    preset = PRESETS[args.preset]
    refuse_bundle_as_world(out)
    out_folder(out, "the world", writes=("world",))  # not into an SAE's, an extraction's, ... (it hid them)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "world.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if not (isinstance(meta, dict) and {"preset", "seed"} <= meta.keys()):
            # e.g. a bundle, whose world.json holds its ground-truth figures: it read as "--preset None"
            raise UserError(f"{meta_path} does not describe a world this command built (no preset and seed in "
                            "it); choose another --out.")
        if (meta.get("preset"), meta.get("seed")) != (args.preset, args.seed):
            raise UserError(f"{out} already holds a world built with --preset {meta.get('preset')} --seed "
                            f"{meta.get('seed')}; pass those to resume it or choose another --out.")
    t_start = time.time()
    stages.configure_torch(args.threads)
    done = []
    try:
        with writer_lock(out):  # a second `world --out` here (or a second app start's build) is refused
            for name in stages.STAGES:
                if stages.stage_done(out, name):
                    print(f"[world] stage {name}: already done, skipped", file=sys.stderr)
                    continue
                t = time.time()
                getattr(stages, f"stage_{name}")(out, preset, args.seed)
                done.append(name)
                print(f"[world] stage {name}: {time.time() - t:.1f} s", file=sys.stderr)
    finally:
        stages.forget_train_pool()  # the rendered train images, no longer needed (demo goes on in-process)
    with open(out / "report.json", encoding="utf-8") as f:
        report = json.load(f)
    gates = {k: report[k] for k in stages.GATE_KEYS}
    print(strict_json({"out": str(out), "preset": args.preset, **gates, "gates_passed": report["gates_passed"],
                      "build_time_s": report["build_time_s"], "this_run_s": round(time.time() - t_start, 1)}))
    return 0
