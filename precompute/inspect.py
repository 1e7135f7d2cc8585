"""`python -m precompute inspect BUNDLE [--json]`: a bundle's summary (validated through the reader)."""
from __future__ import annotations

import numpy as np

from sae_core.atomic import strict_json
from sae_core.bundle import INDEX
from sae_core.sae import K_ARCHS

from .atlas import WORLD_FIGURES

KEYS = ("n_neurons", "n_images", "fvu", "l0", "dead_frac", "dense_frac", "dead_frac_images", "dense_frac_images",
        "mean_cosine", "ms_mean", "ms_mean_raw", "ms_nan", "ms_nan_raw", "ms_mean_patch", "ms_nan_patch") + WORLD_FIGURES
WORLD_JSON_KEYS = ("ms_agreement_raw", "ms_ground_truth_spearman_factor_embedder", "ms_ground_truth_spearman_ideal_neurons")
"""World bundles: figures read from world.json (the manifest's metrics do not carry them)."""


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def summary(path) -> dict:
    from sae_core.bundle import open_bundle

    b = open_bundle(path)
    b.validate()
    m = b.manifest
    metrics = m.get("metrics", {})
    out = {"bundle": str(b.root), "schema_version": m["schema_version"], "n_neurons": b.n_neurons,
           "n_images": b.n_images}
    out.update({k: metrics.get(k) for k in KEYS if k in metrics})
    for k in ("ms_ground_truth_spearman", "ms_agreement", "label_accuracy", "hierarchy_depth"):
        out.setdefault(k, metrics.get(k))
    world = b.world_figures()
    if world:
        calibration = world.get("calibration") or {}
        out["ms_agreement_raw"] = world.get("ms_agreement_raw")
        for name in ("factor_embedder", "ideal_neurons"):
            out[f"ms_ground_truth_spearman_{name}"] = (calibration.get(name) or {}).get("ms_ground_truth_spearman")
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
        "command": m.get("command"),
    })
    return out


def _bands(b, prefix: str) -> dict:
    """A bundle's activation bands: quantile groups (since 2026-12-04) or runs of the histogram's log bins (the
    bundles before, which stored no band sizes); bands a latent, samples a band, latents with every band full."""
    ids = np.asarray(b.array(f"{prefix}band_images"))  # (K, bands, samples), -1 = empty slot
    n_bands, samples = ids.shape[1:]
    return {"kind": "quantile" if b.has(f"{prefix}band_counts") else "log_bins", "n_bands": n_bands,
            "samples": samples, "all_full": int(((ids >= 0).sum(2) == samples).all(1).sum())}


def run(args) -> int:
    s = summary(args.bundle)
    if args.json:
        print(strict_json(s))
        return 0
    print(f"bundle {s['bundle']} (schema {s['schema_version']}, built {s['created']})")
    print(f"  model    {s['model']} layer {s['layer']}, image score = {s['score']}")
    sae = s["sae"]
    print(f"  SAE      {sae['architecture']} {sae['d_in']} -> {sae['d_sae']}"
          + (f", k {sae['k']}" if sae["architecture"] in K_ARCHS else "")
          + (f", groups {sae['group_sizes']}" if sae["group_sizes"] else "")
          + (f", imported from {sae['imported']['format']} ({sae['imported']['from']})" if sae["imported"] else ""))
    print(f"  data     {s['dataset']} ({s['n_images']} images); embedder {s['embedder']}")
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
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)
