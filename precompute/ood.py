"""`python -m precompute ood --bundle B [--id SPEC --ood SPEC] [--json] [--out DIR]`: OOD detection from
SAE features against raw-activation baselines (AUROC, FPR at 95% TPR, ROC plot).

Defaults for a world bundle: detectors are fitted on the world's train split (at most --fit-images),
ID = its val split, OOD = its ood split (held-out shape and colour). For other bundles pass --ood
(and --id; default the bundle's dataset); --fit defaults to --id, in which case the ID images are split
in two by index parity: even ones fit, odd ones are evaluated. --cal-images ID training images are held
out from fitting (world: the train images after the fit ones) to calibrate sae_combined / raw_combined.
Outputs: OUT/ood.json ({"methods": {name: {"auroc", "fpr95", ...}}, "curves": {name: {"fpr", "tpr"}}, ...})
and OUT/ood.html (plotly ROC).
"""
from __future__ import annotations

import numpy as np

from .args import positive_int
from .probe_common import (add_common, features, labels_of, need_spec, open_inputs, print_result, world_split,
                           write_outputs)


def add_arguments(p) -> None:
    add_common(p, default_images=10000)
    p.add_argument("--id", dest="id_spec", help="in-distribution images (default: the world's val split)")
    p.add_argument("--ood", dest="ood_spec", help="out-of-distribution images (default: the world's ood split)")
    p.add_argument("--fit", dest="fit_spec", help="ID training images the detectors are fitted on "
                   "(default: the world's train split, else --id split by parity)")
    p.add_argument("--cal-images", type=positive_int, default=2000,
                   help="ID training images held out from fitting to calibrate the combined detectors: those "
                   "after the --fit-images fit ones, else the last fifth of the fit set (default %(default)s)")
    p.add_argument("--k", type=positive_int, default=10, help="k of the kNN detectors")
    p.add_argument("--max-images", type=positive_int, help="evaluate at most this many ID and OOD images each")


def split_calibration(f_fit, n_fit: int, n_cal: int):
    """(fit, calibration) rows: the first n_fit rows fit and the up to n_cal after them calibrate; when fewer
    than n_cal are left, the last fifth of the first n_fit rows (at most n_cal) calibrate instead.
    Calibration is None when n_cal is 0 or the set is too small to spare any."""
    rows = np.arange(len(f_fit))
    if n_cal <= 0:
        return f_fit.subset(rows < n_fit), None
    if len(f_fit) - n_fit >= n_cal:
        return f_fit.subset(rows < n_fit), f_fit.subset((rows >= n_fit) & (rows < n_fit + n_cal))
    take = min(n_cal, n_fit // 5)
    if take == 0:
        return f_fit.subset(rows < n_fit), None
    return f_fit.subset(rows < n_fit - take), f_fit.subset((rows >= n_fit - take) & (rows < n_fit))


def run(args) -> int:
    from sae_core.ood import evaluate, ood_scores, roc_figure

    bundle, source, out, cache = open_inputs(args)
    id_spec = args.id_spec or world_split(bundle, "val") or bundle.manifest["dataset"]["spec"]
    ood_spec = need_spec(args.ood_spec or world_split(bundle, "ood"), "OOD set", "--ood")
    fit_spec = args.fit_spec or world_split(bundle, "train") or id_spec
    from sae_core.datasets import open_dataset

    for spec in (id_spec, ood_spec, fit_spec):  # bad specs fail before any extraction
        open_dataset(spec)
    f_id = features(source, id_spec, cache, args.max_images, args.batch_size, "ID")
    f_ood = features(source, ood_spec, cache, args.max_images, args.batch_size, "OOD")
    n_cal = max(0, args.cal_images)
    if fit_spec == id_spec:  # fit and evaluate on disjoint halves of the ID images
        f_fit = f_id.subset(f_id.ids % 2 == 0)
        f_id = f_id.subset(f_id.ids % 2 == 1)
        fit_note = "ID images with even index (evaluated on the odd ones)"
        n_fit = len(f_fit) if args.fit_images is None else min(args.fit_images, len(f_fit))
    else:
        n_fit = args.fit_images
        f_fit = features(source, fit_spec, cache, None if n_fit is None else n_fit + n_cal, args.batch_size, "fit")
        n_fit = len(f_fit) if n_fit is None else min(n_fit, len(f_fit))
        fit_note = f"first {n_fit} images"
    f_fit, f_cal = split_calibration(f_fit, n_fit, n_cal)
    fit_labels = labels_of(fit_spec, f_fit.ids)
    test = type(f_id).concat([f_id, f_ood])
    is_ood = np.r_[np.zeros(len(f_id), bool), np.ones(len(f_ood), bool)]
    scores = ood_scores(f_fit, test, np.asarray(fit_labels) if fit_labels is not None else None, k=args.k,
                        cal=f_cal)
    groups = None
    if ood_spec == world_split(bundle, "ood"):  # which held-out factor each OOD image shows
        from sae_core.ood import world_ood_groups
        from sae_core.world.dataset import WorldDataset

        w = WorldDataset(bundle.world_dir, "ood")
        groups = world_ood_groups(w.factors, f_ood.ids, w.spec.ood_shape, w.spec.ood_colour)
    res = evaluate(scores, is_ood, groups)
    best_sae, auc_sae = res.best("sae")
    best_raw, auc_raw = res.best("raw")
    result = {
        "methods": res.methods,
        "best_sae": {"method": best_sae, "auroc": auc_sae},
        "best_raw": {"method": best_raw, "auroc": auc_raw},
        "goal": {"sae_auroc_at_least": 0.8, "met": bool(auc_sae is not None and auc_sae >= 0.8
                                                       and (auc_raw is None or auc_sae >= auc_raw))},
        "id": {"spec": id_spec, "n_images": int(len(f_id))},
        "ood": {"spec": ood_spec, "n_images": int(len(f_ood))},
        "fit": {"spec": fit_spec, "n_images": int(len(f_fit)), "which": fit_note,
                "labels": "dataset labels (world: taxonomy leaf)" if fit_labels is not None else None},
        "calibration": None if f_cal is None else {
            "n_images": int(len(f_cal)), "which": f"fit-set images {int(f_cal.ids.min())}-{int(f_cal.ids.max())} "
            "held out from fitting (ID, never evaluated)"},
        "ood_groups": None if groups is None else {str(g): int((groups == g).sum()) for g in np.unique(groups)},
        "features": {"layer": source.layer, "pooling": source.score, "k": args.k},
        "bundle": str(bundle.root),
        "curves": res.curves,
    }
    paths = write_outputs(out, "ood", result, roc_figure(res))
    result["outputs"] = paths
    table = [f"OOD detection: ID {id_spec} ({len(f_id)}) vs OOD {ood_spec} ({len(f_ood)}); fitted on {fit_spec} "
             f"({len(f_fit)})", "", "| method | AUROC | FPR@95 |" + (" AUROC " + " | ".join(np.unique(groups)) + " |" if groups is not None else ""),
             "| --- | ---: | ---: |" + (" ---: |" * len(np.unique(groups)) if groups is not None else "")]
    for name in sorted(res.methods, key=lambda n: -res.methods[n]["auroc"]):
        m = res.methods[name]
        by = "".join(f" {v:.3f} |" for v in m.get("auroc_by_group", {}).values())
        table.append(f"| {name} | {m['auroc']:.3f} | {m['fpr95']:.3f} |{by}")
    table += ["", f"best SAE: {best_sae} {auc_sae:.3f}; best raw: {best_raw} {auc_raw:.3f}",
              f"wrote {', '.join(paths.values())}"]
    print_result(args, {k: v for k, v in result.items() if k != "curves"}, table)
    return 0
