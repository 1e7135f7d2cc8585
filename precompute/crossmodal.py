"""`python -m precompute crossmodal --world DIR --out B2 [--preset tiny|demo]`: an SAE on the tiny LLaVA's
language-model residual stream, trained on image and text tokens together, its cross-modal latents,
and a bundle to browse them.

Stages (each resumable; intermediate files in B2/.work/), after --lm-layer is checked against the LLaVA's
config (before --out is made) and the LLaVA is loaded (every run; its bar to the log as a stage's output):
  rows      residuals at --lm-layer of the train split's caption prompts (image + text tokens), shuffled
  train     a BatchTopK SAE on those rows (`precompute train`)
  scan      the atlas scan of the val split at the *image tokens* (a duck-typed adapter), so the bundle's
            neuron pages show top images and patch heat maps as for a vision SAE
  crossmodal  cross-modal scores (sae_core.crossmodal) on val caption prompts -> B2/crossmodal.json
  atlas     the remaining atlas stages (labels, hierarchy, index, ground truth, thumbnails) and the manifest

The bundle follows the contract; its model layer is "lm:L" (not a vision-tower layer, so steering
refuses it with its usual sentence); crossmodal.json adds the text side: per latent its best concept,
score, AUROCs and top words, plus the examples and counts (also in manifest["crossmodal"]).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sae_core.atomic import strict_json, writer_lock
from sae_core.errors import UserError
from sae_core.folders import refuse_bundle_as_world

from .args import command_line, nonnegative_int, out_folder, positive_int, share


@dataclass(frozen=True)
class CrossModalPreset:
    train_images: int
    width: int
    k: int
    steps: int
    batch_size: int
    eval_images: int
    atlas_images: int | None


PRESETS = {
    "tiny": CrossModalPreset(train_images=300, width=256, k=8, steps=300, batch_size=512, eval_images=200,
                             atlas_images=None),
    "demo": CrossModalPreset(train_images=3000, width=512, k=8, steps=1500, batch_size=1024, eval_images=1000,
                             atlas_images=None),
}
WEIGHTS = {"load LLaVA": 2, "rows": 10, "train": 30, "atlas: scan": 5, "crossmodal": 10}


def add_arguments(p) -> None:
    p.add_argument("--world", required=True, help="a built world directory (precompute world)")
    p.add_argument("--out", required=True, help="bundle directory to create or resume")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="tiny: for tests; demo: the README's figures")
    p.add_argument("--lm-layer", type=int, default=1,
                   help="hidden_states index of the language model (1 = output of decoder layer 0)")
    p.add_argument("--threshold", type=share, default=0.5,
                   help="cross-modal score a latent must reach, in (0, 1]: the score is at most 1")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the row order and the SAE")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object (always the last line)")


def _concepts():
    from sae_core.world.generator import COLOURS, SHAPES, TEXTURES

    return [*COLOURS, *SHAPES, *TEXTURES]


def run(args) -> int:
    import torch

    from sae_core import bundle as B
    from sae_core.activation_store import save_npy_atomic
    from sae_core.crossmodal import LanguageResidual, check_lm_layer, collect_rows, lm_layer_count
    from sae_core.world.dataset import WorldDataset

    from . import atlas, train
    from .demo import _sub_args
    from .progress import PipelineProgress

    preset = PRESETS[args.preset]
    world = Path(args.world).resolve()
    refuse_bundle_as_world(world)
    if not (world / "llava" / "config.json").is_file():
        raise UserError(f"{world} has no tiny LLaVA (llava/config.json); build it with `python -m precompute world --out {world}`.")
    check_lm_layer(args.lm_layer, lm_layer_count(world / "llava"))  # before --out is made (a typo leaves no folder)
    out = out_folder(Path(args.out).resolve(), "the bundle", writes=("bundle",))
    with writer_lock(out):  # a second run into this folder is refused while this one runs
        work = out / ".work"
        work.mkdir(parents=True, exist_ok=True)
        rows_path, sae_dir, cm_path = work / "lm_rows.npy", work / "sae", out / "crossmodal.json"
        # every stage's output depends on these; a resume with others would mix them (rows of one layer, an SAE
        # trained on them, a report at another threshold) under the new names
        settings = {"world": str(world), "preset": args.preset, **asdict(preset), "lm_layer": args.lm_layer,
                    "threshold": args.threshold, "seed": args.seed}
        built = rows_path.is_file() or sae_dir.exists() or cm_path.is_file() or (out / atlas.STAGE_DIR).is_dir()
        atlas.hold_settings(out, ".work/settings.json", settings, built)
        torch.manual_seed(args.seed)
        torch.set_num_threads(max(1, args.threads))
        layer = f"lm:{args.lm_layer}"
        progress = PipelineProgress({**atlas.STAGE_WEIGHTS, **WEIGHTS}, desc=f"crossmodal ({args.preset})",
                                    log=work / "log.txt", enabled=not args.quiet)
        t0 = time.time()
        with progress:
            with progress.stage("load LLaVA"):  # transformers' "Loading weights" bar to the log, as in the other stages
                lm = LanguageResidual(str(world / "llava"), args.lm_layer)
            # 1. training rows: image + text tokens of the train split's caption prompts
            if rows_path.is_file():
                progress.skip("rows")
            else:
                with progress.stage("rows") as advance:
                    ds = WorldDataset(world, "train")
                    n = min(preset.train_images, len(ds))
                    rows = collect_rows(lm, ds, range(n), progress=lambda d: advance(d / n))
                    x = rows.x[np.random.default_rng(args.seed).permutation(len(rows.x))]
                    # its summary first: the rows' file marks the stage done (a kill between the two left the
                    # summary unwritten for good until 2026-12-05)
                    B.write_json(out, ".work/rows.json", {"n_images": n, "n_rows": int(len(x)),
                                                          "n_image_rows": int(rows.is_image.sum()), "layer": layer})
                    save_npy_atomic(rows_path, x.astype(np.float32))
            # 2. the SAE
            if train.finished(sae_dir):
                progress.skip("train")
            else:
                with progress.stage("train"):
                    train.run(_sub_args(train, [
                        "--activations", str(rows_path), "--arch", "batchtopk", "--width", str(preset.width),
                        "--k", str(preset.k), "--steps", str(preset.steps), "--batch-size", str(preset.batch_size),
                        "--seed", str(args.seed), "--device", "cpu", "--out", str(sae_dir)]))
            job = atlas.AtlasJob(
                sae=str(sae_dir), dataset=f"world:{world}:val", model=f"world:{world}:llava", out=str(out), layer=layer,
                embedder=f"world:{world}", score="max", limit=preset.atlas_images, seed=args.seed, device="cpu",
                command=command_line(args))
            # 3. the atlas scan at the image tokens
            from sae_core.checkpoint import load_sae

            sae = load_sae(sae_dir)
            if atlas.stage_info(out, "scan") is None:
                atlas._check_identity(out, job.identity())
                with progress.stage("atlas: scan") as advance:
                    info = _scan(job, lm, sae, out, advance)
                atlas._mark(out, "scan", info)
            # 4. cross-modal scores
            if cm_path.is_file():
                progress.skip("crossmodal")
                report = json.loads(cm_path.read_text(encoding="utf-8"))
            else:
                with progress.stage("crossmodal") as advance:
                    report = crossmodal_report(lm, sae, WorldDataset(world, "val"), preset.eval_images, args.threshold,
                                               advance)
                report.update({"layer": layer, "world": str(world), "sae_config": {"architecture": sae.cfg.arch,
                                                                           "d_sae": sae.cfg.d_sae, "k": sae.cfg.k}})
                B.write_json(out, "crossmodal.json", report)
            # 5. the other atlas stages and the manifest
            job.extra_manifest = {"crossmodal": {
                "file": "crossmodal.json", "definition": report["definition"], "threshold": report["threshold"],
                "n_cross_modal": report["sae"]["n_cross_modal"], "n_latents": report["sae"]["n_units"],
                "raw_n_cross_modal": report["raw"]["n_cross_modal"], "raw_n_units": report["raw"]["n_units"],
                "per_concept": report["sae"]["per_concept"], "examples": report["sae"]["examples"][:10]}}
            manifest = atlas.build_atlas(job, progress)
        summary = {"out": str(out), "preset": args.preset, "layer": layer, "n_cross_modal": report["sae"]["n_cross_modal"],
                   "n_latents": report["sae"]["n_units"], "raw_n_cross_modal": report["raw"]["n_cross_modal"],
                   "raw_n_units": report["raw"]["n_units"], "fvu": manifest["metrics"].get("fvu"),
                   "examples": [(e["unit"], e["concept"], e["score"]) for e in report["sae"]["examples"][:10]],
                   "total_s": round(time.time() - t0, 1)}
        if not args.json:
            print(f"{summary['n_cross_modal']} of {summary['n_latents']} latents are cross-modal "
                  f"(raw residual dimensions: {summary['raw_n_cross_modal']} of {summary['raw_n_units']})", file=sys.stderr)
        print(strict_json(summary))
    return 0


def _scan(job, lm, sae, out: Path, advance) -> dict:
    """The atlas scan over the val split at the image tokens (what `precompute atlas` does in its scan stage)."""
    from sae_core import bundle as B
    from sae_core.adapters import load_adapter
    from sae_core.atlas import AtlasConfig, scan
    from sae_core.checkpoint import copy_sae
    from sae_core.crossmodal import LanguageImageAdapter
    from sae_core.datasets import open_dataset

    from . import atlas

    adapter = LanguageImageAdapter(lm, job.model)
    embedder = load_adapter(job.embedder)
    ds = open_dataset(job.dataset)
    n = len(ds) if job.limit is None else min(job.limit, len(ds))
    cfg = AtlasConfig(layer=job.layer, score=job.score, topk=job.topk, batch_size=64, seed=job.seed, metric_tokens="all")
    result = scan(adapter, sae, ds, cfg, embedder=embedder, n_images=n, progress=lambda done: advance(done / n))
    for name, arr in result.neurons.items():
        B.write_array(out, f"neurons/{name}.npy", arr)
    B.write_array(out, B.RAW_MS, result.raw_ms)
    for name, arr in result.raw_top.items():
        B.write_array(out, f"raw/{name}.npy", arr)
    B.write_array(out, B.EMBEDDINGS, result.embeddings)
    copy_sae(job.sae, out / B.SAE_DIR, sae)
    layout = adapter.layout
    return {"metrics": {**result.metrics, "ms_mean": atlas._nanmean(result.neurons["ms"]),
                        "ms_mean_raw": atlas._nanmean(result.raw_ms),
                        "ms_nan": int(np.isnan(result.neurons["ms"]).sum()), "ms_nan_raw": int(np.isnan(result.raw_ms).sum())},
            "n_images": n, "n_scanned": result.n_images, "skipped": [{"index": int(i), "error": e} for i, e in result.skipped],
            "model": {"spec": job.model, "layer": job.layer, "tokens": job.score, "n_tokens": layout.n_tokens,
                      "n_patches": layout.n_patches, "n_prefix": 0, "grid": list(layout.grid), "has_cls": False,
                      "d": adapter.width, "describe": adapter.describe(), "sae_trained_on_tokens": "image and text tokens"},
            "embedder": {"spec": job.embedder, "d": int(result.embeddings.shape[1])},
            "dataset": {**ds.describe(), "spec": job.dataset, "n_images": n}}


def crossmodal_report(lm, sae, dataset, n_images: int, threshold: float, advance=None) -> dict:
    """Cross-modal scores of the SAE latents and of the raw residual dimensions (both signs) on the caption
    prompts of the first `n_images` images; JSON-ready."""
    import torch

    from sae_core.crossmodal import collect_rows, concept_labels, cross_modal_scores, summary

    n = min(n_images, len(dataset))
    rows = collect_rows(lm, dataset, range(n), progress=(lambda d: advance(0.8 * d / n)) if advance else None)
    concepts = _concepts()
    lab_img, lab_txt = concept_labels(rows, dataset, lm.grid, concepts)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(rows.x)).numpy()
    img, txt = rows.is_image, ~rows.is_image
    sc = cross_modal_scores(z[img], lab_img, z[txt], lab_txt, concepts)
    raw = np.maximum(np.concatenate([rows.x, -rows.x], axis=1), 0)  # x+ and (-x)+: either sign may carry a concept
    sr = cross_modal_scores(raw[img], lab_img, raw[txt], lab_txt, concepts)
    if advance:
        advance(1.0)
    s_sae = summary(sc, threshold)
    d = rows.x.shape[1]
    _, best_raw = sr.best()
    raw_best = np.fmax(best_raw[:d], best_raw[d:])
    s_raw = {"n_units": d, "n_cross_modal": int((raw_best >= threshold).sum()),
             "best_score": float(np.nanmax(raw_best)) if np.isfinite(raw_best).any() else None}
    idx, val = sc.best()
    fires = (z[txt] > 0)
    words = rows.word[txt]
    vocab = sorted(set(words.tolist()))
    wmean = np.stack([z[txt][words == w].mean(0) for w in vocab], axis=1)  # (K, V)
    per_unit = []
    for k in range(z.shape[1]):
        top_w = np.argsort(-wmean[k], kind="stable")[:5]
        j = int(idx[k])
        per_unit.append({"concept": concepts[j] if j >= 0 else None,
                         "score": None if not np.isfinite(val[k]) else round(float(val[k]), 4),
                         "auroc_image": None if j < 0 else round(float(sc.auroc_image[k, j]), 4),
                         "auroc_text": None if j < 0 else round(float(sc.auroc_text[k, j]), 4),
                         "image_freq": round(float((z[img][:, k] > 0).mean()), 4),
                         "text_freq": round(float(fires[:, k].mean()), 4),
                         "top_words": [[vocab[j], round(float(wmean[k, j]), 4)] for j in top_w if wmean[k, j] > 0]})
    return {"definition": ("score(f, c) = min over the image and text side of (on - off) / (on + off), on/off = mean "
                           "activation of latent f on tokens with/without concept c (image: patch shows colour/shape c "
                           "over >= 1/4 of it, or background texture c; text: the word c), for latents firing on >= "
                           f"{sc.min_support} c-tokens on each side; cross-modal when the best concept's score >= "
                           "threshold; auroc_image/auroc_text = how much of the concept it covers"),
            "concepts": concepts, "n_images": n, "n_image_tokens": int(img.sum()), "n_text_tokens": int(txt.sum()),
            "threshold": threshold, "sae": s_sae, "raw": s_raw, "units": per_unit}
