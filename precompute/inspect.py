"""`python -m precompute inspect PATH [--json]`: what a bundle, an SAE folder, an activation store, a training
run still under way or an embedded world holds (a bundle validated through the reader, an SAE loaded as the atlas
would load it)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from sae_core.atomic import read_json_object, strict_json
from sae_core.bundle import INDEX, WORLD, WORLD_DIR
from sae_core.errors import UserError, terminal_text
from sae_core.folders import folder_kind
from sae_core.sae import K_ARCHS

from .atlas import WORLD_FIGURES

KEYS = ("n_neurons", "n_images", "fvu", "l0", "dead_frac", "dense_frac", "dead_frac_images", "dense_frac_images",
        "mean_cosine", "ms_mean", "ms_mean_raw", "ms_nan", "ms_nan_raw", "ms_mean_patch", "ms_nan_patch") + WORLD_FIGURES
WORLD_JSON_KEYS = ("ms_agreement_raw", "ms_ground_truth_spearman_factor_embedder", "ms_ground_truth_spearman_ideal_neurons")
"""World bundles: figures read from world.json (the manifest's metrics do not carry them)."""
SAE_METRICS = ("fvu", "l0", "dead_fraction", "dense_fraction", "mean_cosine", "rows", "prefix_sizes", "prefix_fvu")
"""metrics.json of a finished `precompute train` (on its held-out rows)."""
READS = ("a bundle (precompute atlas or demo), an SAE folder (ours, SAELens's, sparsify's, dictionary_learning's, or "
         "hf:OWNER/REPO[/FOLDER]), an activation store (an extraction's --out, one layer's store, or an (N, d) .npy), "
         "the --out of a training run under way, or an embedded world (precompute world)")


def add_arguments(p) -> None:
    p.add_argument("path", metavar="PATH", help=f"what to inspect: {READS}")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def kind_of(spec: str) -> str:
    """A key of KINDS: what `spec` names, from its files alone."""
    if str(spec).startswith("hf:"):
        return "sae"
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; give the path of {READS}.")
    if path.is_file():
        if path.suffix == ".npy":
            return "store"
        raise UserError(f"{path} is a file; give {READS}.")
    kind = folder_kind(path)
    if kind is None and (path.parent / "extract.json").is_file():
        kind = "store"  # one layer's store of an extraction, unfinished (the store reader says so)
    if kind is None:
        raise UserError(f"{path} holds none of what inspect reads: {READS}.")
    return kind


def summary(path) -> dict:
    from sae_core.bundle import MANIFEST, open_bundle

    if not (Path(path).expanduser() / MANIFEST).is_file():
        return unfinished_summary(path)
    b = open_bundle(path)
    b.validate()
    m = b.manifest
    metrics = m.get("metrics", {})
    out = {"kind": "bundle", "bundle": str(b.root), "schema_version": m["schema_version"], "n_neurons": b.n_neurons,
           "n_images": b.n_images}
    out.update({k: metrics.get(k) for k in KEYS if k in metrics})
    for k in ("ms_ground_truth_spearman", "ms_agreement", "label_accuracy", "hierarchy_depth"):
        out.setdefault(k, metrics.get(k))
    if out["hierarchy_depth"] is None:  # a taxonomy not the world's (an iNaturalist folder): the atlas's hierarchy
        # stage measured it all the same, and the Hierarchy page shows it (until 2026-12-05 inspect said null)
        stage = m["stages"].get("hierarchy") if isinstance(m.get("stages"), dict) else None
        out["hierarchy_depth"] = stage.get("depth_per_level") if isinstance(stage, dict) else None
    world = b.world_figures()
    if world:
        calibration = world.get("calibration") or {}
        if not (isinstance(calibration, dict) and all(isinstance(v, dict) for v in calibration.values())):
            raise UserError(f"{b.root / WORLD} holds calibration as {json.dumps(calibration)[:80]}, not an object of "
                            "calibration runs; the bundle is damaged: copy it again or rebuild it.")
        out["ms_agreement_raw"] = world.get("ms_agreement_raw")
        for name in ("factor_embedder", "ideal_neurons"):
            out[f"ms_ground_truth_spearman_{name}"] = (calibration.get(name) or {}).get("ms_ground_truth_spearman")
    # copied without the world/ it lists (and no world where it was built): still served from its thumbnails, so not
    # refused (until 2026-12-05 "lists world but it is missing; rebuild the bundle"), but said
    world_dir = b.world_dir
    until = "until then the explorer shows its gallery thumbnails only and cannot steer"
    out["world_missing"] = None
    if "world_dir" in m["files"] and not (world_dir and (world_dir / WORLD).is_file()):
        out["world_missing"] = (f"{b.root / WORLD_DIR} is missing (the embedded world its images and models come from): "
                                f"copy the world/ folder along with the bundle, or rebuild it; {until}")
    elif "world_dir" not in m["files"] and m.get("world") and not (Path(m["world"]) / WORLD).is_file():
        # built with --world elsewhere (the suite's layout) and moved without it: said since 2026-12-05
        out["world_missing"] = (f"the world {m['world']} it was built on is missing (its images and models come from "
                                f"it): put a copy there or inside the bundle as {WORLD_DIR}/, or rebuild it; {until}")
    if (b.root / f"{INDEX}.json").is_file():
        index = b.json(f"{INDEX}.json")
        out["search_index"] = {"kind": index.get("kind"), "n": index.get("n"), "recall": index.get("recall")}
    out["bands"] = {("max_over_patches" if prefix else "image_score"): _bands(b, prefix) for prefix in ("", "patch_")
                    if b.has(f"{prefix}band_images")} or None
    ms = np.asarray(b.array("ms"), np.float64)
    out["ms_median"] = float(np.nanmedian(ms)) if np.isfinite(ms).any() else None
    out.update({
        "model": m["model"].get("spec"), "layer": m["model"].get("layer"), "score": m["model"].get("tokens"),
        "sae": {**{k: m["sae"].get(k) for k in ("architecture", "d_in", "d_sae", "k", "group_sizes")},
                "imported": (m["sae"].get("training") or {}).get("imported")},
        "dataset": m["dataset"].get("spec"), "embedder": m["embedder"].get("spec"),
        "label_method": b.labels.get("method"), "world": m.get("world"), "created": m.get("created"),
        "command": m.get("command"), "skipped": m.get("skipped") or [],
        "strength_unit_problem": b.strength_unit_problem(),
    })
    return out


def _bands(b, prefix: str) -> dict:
    """A bundle's activation bands: quantile groups (since 2026-12-04) or runs of the histogram's log bins (the
    bundles before, which stored no band sizes); bands a latent, samples a band, latents with every band full."""
    ids = np.asarray(b.array(f"{prefix}band_images"))  # (K, bands, samples), -1 = empty slot
    n_bands, samples = ids.shape[1:]
    return {"kind": "quantile" if b.has(f"{prefix}band_counts") else "log_bins", "n_bands": n_bands,
            "samples": samples, "all_full": int(((ids >= 0).sum(2) == samples).all(1).sum())}


def sae_summary(spec: str) -> dict:
    """An SAE folder as the atlas and the steering session load it: its architecture, where it was trained (or
    imported from), and its held-out metrics where `precompute train` wrote them."""
    from sae_core.checkpoint import load_sae, resolve_sae, sae_format, trained_on

    sae = load_sae(spec)
    path = resolve_sae(spec)
    info = sae.training_info or {}
    cfg = sae.cfg
    metrics, unread = {}, None
    if (path / "metrics.json").is_file():  # optional: an SAE without readable metrics is still inspected
        try:
            metrics = read_json_object(path / "metrics.json", "the SAE itself is unaffected")
        except UserError as e:
            unread = str(e)
    data = info.get("data") or {}
    return {"kind": "sae", "path": str(path), "format": sae_format(path), "architecture": cfg.arch,
            "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k if cfg.arch in K_ARCHS else None,
            "group_sizes": list(cfg.group_sizes) or None, "imported": info.get("imported"),
            "trained_on": {**trained_on(sae), "dataset": data.get("dataset"), "rows": data.get("rows")},
            "steps": info.get("steps"), "batch_size": info.get("batch_size"), "training_tokens": info.get("tokens"),
            "metrics": {k: metrics[k] for k in SAE_METRICS if k in metrics} or None, "metrics_unreadable": unread,
            "command": info.get("command")}


def store_summary(spec: str) -> dict:
    """One activation store (a layer's folder or an (N, d) .npy): rows, width, and what they are activations of."""
    from sae_core.activation_store import ActivationStore

    store = ActivationStore(spec)
    m = store.manifest
    model, dataset = m.get("model"), m.get("dataset")
    return {"kind": "store", "path": str(store.path), "rows": len(store), "d": store.d,
            "dtype": str(store.shards[0].dtype), "shards": len(store.shards),
            "model": model.get("spec") if isinstance(model, dict) else model, "layer": m.get("layer"),
            "layer_description": m.get("layer_description"), "tokens": m.get("tokens"),
            "dataset": dataset.get("spec") if isinstance(dataset, dict) else dataset, "n_images": m.get("n_images"),
            "n_skipped": m.get("n_skipped"), "command": m.get("command")}


def extraction_summary(spec: str) -> dict:
    """An extraction's --out folder: finished or not (and how far), and each layer's store once it is written."""
    from sae_core.activation_store import RUN_FILE

    path = Path(spec).expanduser()
    run = read_json_object(path / RUN_FILE, "rerun the extraction command to write it again")
    identity = run.get("identity") or {}
    done = sum(1 for _ in (path / "progress").glob("*.json")) if (path / "progress").is_dir() else None
    stores = [store_summary(str(path / f"layer_{layer}")) for layer in run.get("layers", [])
              if (path / f"layer_{layer}" / "manifest.json").is_file()]
    return {"kind": "extraction", "path": str(path), "complete": bool(run.get("complete")),
            "model": identity.get("model"), "dataset": identity.get("dataset"), "layers": run.get("layers"),
            "tokens": identity.get("tokens"), "n_images": identity.get("n_images"), "n_shards": run.get("n_shards"),
            "shards_done": done, "stores": stores}


def training_summary(spec: str) -> dict:
    """A training --out folder with no finished SAE yet: the checkpoint's step of how many (None before the first
    checkpoint), and its last logged row (train_log.csv)."""
    from sae_core.training import _Checkpoint

    path = Path(spec).expanduser()
    last = None
    log = path / "train_log.csv"
    if log.is_file():
        with open(log, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        last = {k: _number(v) for k, v in rows[-1].items()} if rows else None
    if not (path / "checkpoint").is_dir():  # started, its first checkpoint not saved yet: the log alone says how far
        return {"kind": "training", "path": str(path), "step": None, "steps": None, "tokens": None,
                "architecture": None, "d_sae": None, "data": None, "last_logged": last}
    ckpt = _Checkpoint(path)
    if not ckpt.exists():
        raise UserError(f"{path} has a checkpoint/ folder without a readable checkpoint; re-run the training command "
                        "that writes there to resume it, or delete the folder to start over.")
    meta = ckpt.read_meta()
    config = meta.get("run_config") or {}
    sae, train = config.get("sae") or {}, config.get("train") or {}
    return {"kind": "training", "path": str(path), "step": meta.get("step"), "steps": train.get("steps"),
            "tokens": meta.get("tokens"), "architecture": sae.get("arch"), "d_sae": sae.get("d_sae"),
            "data": (config.get("data") or {}).get("dataset"), "last_logged": last}


def unfinished_summary(spec: str) -> dict:
    """A bundle whose build stopped (or runs): the command that builds it, rebuilt from the settings its stages hold
    (`demo`, `crossmodal` or `atlas`), and which of its stages are done. The reader only says "unfinished"."""
    from .atlas import STAGE_DIR, STAGES
    from .train import finished

    path = Path(spec).expanduser()

    def settings(rel):
        f = path / rel
        return read_json_object(f, f"delete {f} and re-run the command that builds the bundle") if f.is_file() else {}

    pipeline, atlas = settings(".work/settings.json"), settings(f"{STAGE_DIR}/settings.json")
    if "lm_layer" in pipeline:
        built_by, argv = "crossmodal", ["--world", pipeline.get("world"), "--out", path, "--preset",
                                         pipeline.get("preset"), "--lm-layer", pipeline.get("lm_layer"), "--threshold",
                                         pipeline.get("threshold"), "--seed", pipeline.get("seed")]
        steps = {"rows": (path / ".work" / "lm_rows.npy").is_file(), "train": finished(path / ".work" / "sae")}
    elif "world_dir" in pipeline:
        world = pipeline.get("world_dir")
        built_by, argv = "demo", ["--out", path, "--preset", pipeline.get("preset"), "--seed", pipeline.get("seed"),
                                  *(["--world", world] if world and Path(world) != path.resolve() / "world" else [])]
        steps = {"world": bool(world) and (Path(world) / "report.json").is_file(),
                 "extract": (path / ".work" / "acts" / "layer_-2" / "manifest.json").is_file(),  # as the demo reads it
                 "train": finished(path / ".work" / "sae")}
    elif atlas:
        options = [("--sae", "sae"), ("--dataset", "dataset"), ("--model", "model"), ("--layer", "layer"),
                   ("--embedder", "embedder"), ("--topk", "topk"), ("--score", "score"), ("--limit", "limit"),
                   ("--seed", "seed"), ("--vocabulary", "vocabulary")]
        built_by, argv, steps = "atlas", [*(x for flag, key in options if atlas.get(key) is not None
                                            for x in (flag, atlas[key])), "--out", path], {}
    else:
        built_by, argv, steps = None, [], {}
    steps.update({f"atlas: {s}": (path / STAGE_DIR / f"{s}.json").is_file() for s in STAGES})
    command = shlex.join(["python", "-m", "precompute", built_by, *map(str, argv)]) if built_by else None
    return {"kind": "unfinished_bundle", "path": str(path), "built_by": built_by, "resume": command,
            "stages_done": [s for s, done in steps.items() if done],
            "stages_left": [s for s, done in steps.items() if not done]}


def world_summary(spec: str) -> dict:
    """An embedded world's folder: its spec (preset, seed, splits, held-out factors), the stages done, each model's
    training time, and report.json's gate figures once the world is finished."""
    from sae_core.world.dataset import WorldDataset

    from .world import STAGE_FILE
    from .world.stages import STAGES, stage_done

    path = Path(spec).expanduser()
    meta = read_json_object(path / "world.json", "rebuild the world with `python -m precompute world`")
    try:
        WorldDataset(str(path), "val")  # the spec and taxonomy parse: the images can be rendered
    except (UserError, FileNotFoundError, KeyError, ValueError) as e:
        raise UserError(f"{path} holds a world that cannot be read ({e}); rebuild it with `python -m precompute world "
                        f"--out {path}`.") from None
    models = {}
    for name in ("clip", "llava"):
        stage = path / name / STAGE_FILE
        models[name] = read_json_object(stage, f"delete {path / name} and resume the world command") if \
            stage.is_file() else None
    report = (read_json_object(path / "report.json", "delete it and resume the world command")
              if (path / "report.json").is_file() else None)
    done = [s for s in STAGES if stage_done(path, s)]
    gates = (report or {}).get("gates") or {}
    return {"kind": "world", "path": str(path), "preset": meta.get("preset"), "seed": meta.get("seed"),
            "splits": meta.get("splits"), "image_size": meta.get("image_size"), "ood_shape": meta.get("ood_shape"),
            "ood_colour": meta.get("ood_colour"), "stages_done": done,
            "complete": done == list(STAGES),
            "model_seconds": {n: (m or {}).get("seconds") for n, m in models.items()},
            "report": {k: report[k] for k in gates if k in report} if report else None, "gates": gates or None,
            "gates_passed": (report or {}).get("gates_passed"), "build_time_s": (report or {}).get("build_time_s")}


def _number(text: str):
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def run(args) -> int:
    s = KINDS[kind_of(args.path)](args.path)
    if args.json:
        print(strict_json(s))  # JSON escapes control characters itself
    else:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            PRINTERS[s["kind"]](s)
        sys.stdout.write(terminal_text(text.getvalue()))
    return 0


def _print_bundle(s: dict) -> None:
    print(f"bundle {s['bundle']} (schema {s['schema_version']}, built {s['created']})")
    print(f"  model    {s['model']} layer {s['layer']}, image score = {s['score']}")
    sae = s["sae"]
    print(f"  SAE      {sae['architecture']} {sae['d_in']} -> {sae['d_sae']}"
          + (f", k {sae['k']}" if sae["architecture"] in K_ARCHS else "")
          + (f", groups {sae['group_sizes']}" if sae["group_sizes"] else "")
          + (f", imported from {sae['imported']['format']} ({sae['imported']['from']})" if sae["imported"] else ""))
    print(f"  data     {s['dataset']} ({s['n_images']} images); embedder {s['embedder']}")
    if s.get("skipped"):  # images the scan could not read: left out of every figure
        first = s["skipped"][0]
        print(f"  skipped  {len(s['skipped'])} unreadable image(s), left out (first: #{first.get('index')}, "
              f"{first.get('error')}); the manifest's `skipped` lists them")
    if s.get("world_missing"):
        print(f"  world    {s['world_missing']}")
    rows = [(k, s.get(k)) for k in KEYS[2:] + WORLD_JSON_KEYS + ("ms_median",) if s.get(k) is not None]
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"  {k:<{width}}  {_fmt(v)}")
    if s.get("search_index"):
        ix = s["search_index"]
        r = ix.get("recall") if isinstance(ix.get("recall"), dict) else {}
        line = f"  search   {ix['kind']} index of {ix['n']} images"
        if "value" in r:
            line += f", recall@{r.get('k')} {_fmt(r['value'])}"
        if r.get("value_text") is not None:  # an IVF-PQ index tuned for the vocabulary's prompts too
            line += f", text prompts {_fmt(r['value_text'])} within the exact top-{r.get('text_pool')}"
        print(line)
    print(f"  labels   {s['label_method']}")
    bands = s["bands"] or {}
    if bands and all(v["kind"] == "quantile" for v in bands.values()):
        first = next(iter(bands.values()))
        print(f"  bands    {first['n_bands']} quantile groups a latent, {first['samples']} images sampled from each; "
              f"all {first['n_bands']} full for " + ", ".join(
                  f"{v['all_full']} latents" + (" by the max over patches" if score == "max_over_patches" else "")
                  for score, v in bands.items()))
    elif bands:
        print("  bands    runs of the histogram's log bins (built before 2026-12-04); for quantile groups delete "
              ".stages/scan.json in the bundle and run the command that built it again")
    if s.get("strength_unit_problem"):
        print(f"  steering {s['strength_unit_problem']}")


def _sae_line(arch, d_in, d_sae, k, groups) -> str:
    return (f"{arch} {d_in} -> {d_sae}" + (f", k {k}" if arch in K_ARCHS and k is not None else "")
            + (f", groups {groups}" if groups else ""))


def _print_sae(s: dict) -> None:
    print(f"SAE {s['path']} ({s['format']} layout)")
    print(f"  SAE      {_sae_line(s['architecture'], s['d_in'], s['d_sae'], s['k'], s['group_sizes'])}")
    imported = s["imported"]
    if imported:
        print(f"  imported from {imported.get('format')} ({imported.get('from')})"
              + (f"; model {imported['model']}" if imported.get("model") else "")
              + (f", hook {imported['hook']}" if imported.get("hook") else ""))
    t = s["trained_on"]
    if t.get("model") or t.get("layer") is not None:  # layer 0 is a layer; an imported SAE may name no model
        print("  trained  on " + (f"{t['model']} " if t.get("model") else "")
              + (f"layer {t['layer']}" if t.get("layer") is not None else "an unrecorded layer")
              + f", tokens {t.get('tokens') or 'unrecorded'}"
              + (f", {t['rows']} rows of {t['dataset']}" if t.get("rows") else "")
              + (f"; {s['steps']} steps x {s['batch_size']}" if s.get("steps") else ""))
    else:
        print("  trained  on an unrecorded layer (give --layer to atlas and steer)")
    metrics = s["metrics"] or {}
    if s.get("metrics_unreadable"):
        print(f"  {s['metrics_unreadable']}")
    if metrics:
        print(f"  held out {metrics.get('rows')} rows of its training data (metrics.json; dead = no firing on them):")
    for k, v in metrics.items():
        if k != "rows":
            print(f"  {k:<14}  {_fmt(v)}")


def _store_line(s: dict) -> str:
    return (f"{s['rows']} rows x {s['d']} ({s['dtype']}, {s['shards']} shard{'s' if s['shards'] != 1 else ''})"
            + (f": {s['model']} layer {s['layer']}, tokens {s['tokens']}, {s['n_images']} images of {s['dataset']}"
               if s.get("model") else "") + (f", {s['n_skipped']} skipped" if s.get("n_skipped") else ""))


def _print_store(s: dict) -> None:
    print(f"activation store {s['path']}")
    print(f"  {_store_line(s)}")


def _print_extraction(s: dict) -> None:
    state = "complete" if s["complete"] else (
        f"unfinished: {s['shards_done']} of {s['n_shards']} shards done; run the same command to resume"
        if s.get("shards_done") is not None else "unfinished; run the same command to resume")
    print(f"extraction {s['path']} ({state})")
    print(f"  {s['model']} layer{'s' if len(s['layers'] or []) != 1 else ''} {', '.join(map(str, s['layers'] or []))}, "
          f"tokens {s['tokens']}, {s['n_images']} images of {s['dataset']}")
    for store in s["stores"]:
        print(f"  layer {store['layer']}: {store['rows']} rows x {store['d']} ({store['dtype']}) in {store['path']}")


def _print_training(s: dict) -> None:
    if s["step"] is None:
        print(f"training run {s['path']} (under way or stopped before its first checkpoint, saved every "
              "--checkpoint-every steps or 5 minutes: stopped now, it starts over)")
    else:
        print(f"training run {s['path']} (under way or stopped; run the same command to resume)")
        print(f"  checkpoint at step {s['step']} of {s['steps']} ({s['tokens']} tokens); {s['architecture']} with "
              f"{s['d_sae']} latents")
    last = s.get("last_logged")
    if last:
        print("  last logged: " + ", ".join(f"{k} {_fmt(last[k])}" for k in ("step", "fvu", "l0", "dead_fraction")
                                              if k in last))


def _print_world(s: dict) -> None:
    state = "complete" if s["complete"] else (
        f"unfinished: {', '.join(s['stages_done'])} done; resume with `python -m precompute world --out {s['path']} "
        f"--preset {s['preset']} --seed {s['seed']}`")
    print(f"embedded world {s['path']} ({state})")
    splits = s["splits"] or {}
    print(f"  preset {s['preset']}, seed {s['seed']}; {s['image_size']} px images: "
          + ", ".join(f"{n} {splits[n]}" for n in splits) + f"; held out: {s['ood_shape']}, {s['ood_colour']}")
    trained = [f"{n} in {t:.1f} s" for n, t in s["model_seconds"].items() if t is not None]
    if trained:
        print(f"  models   {', '.join(trained)}" + (f"; the whole build {s['build_time_s']:.1f} s"
                                                   if s.get("build_time_s") is not None else ""))
    report, gates = s["report"] or {}, s["gates"] or {}
    if report:
        print("  report   " + ", ".join(f"{k} {_fmt(v)} (gate {_fmt(gates[k])})" for k, v in report.items())
              + ("; gates passed" if s["gates_passed"] else "; gates NOT passed"))


def _print_unfinished(s: dict) -> None:
    print(f"unfinished bundle {s['path']} (its build stopped or is still running)")
    print(f"  done     {', '.join(s['stages_done']) or 'nothing yet'}")
    print(f"  left     {', '.join(s['stages_left']) or 'the manifest'}")
    print(f"  resume   {s['resume']}" if s["resume"] else
          "  resume   no settings recorded: re-run the command that built it")


KINDS = {"bundle": summary, "sae": sae_summary, "store": store_summary, "extraction": extraction_summary,
         "training": training_summary, "world": world_summary}
"""What `kind_of` names -> its summary as a JSON-ready dict (whose `kind` says which printer shows it)."""
PRINTERS = {"bundle": _print_bundle, "unfinished_bundle": _print_unfinished, "sae": _print_sae, "store": _print_store,
            "extraction": _print_extraction, "training": _print_training, "world": _print_world}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)
