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

from sae_core.datasets import WorldImages
from sae_core.errors import UserError
from sae_core.image_features import dataset_identity, image_keys

from .args import positive_int
from .probe_common import (add_common, features, labels_of, need_spec, open_inputs, print_result, world_split,
                           write_outputs)


def add_arguments(p) -> None:
    add_common(p, fit_images=10000)
    p.add_argument("--id", dest="id_spec", help="in-distribution images (default: the world's val split)")
    p.add_argument("--ood", dest="ood_spec", help="out-of-distribution images (default: the world's ood split)")
    p.add_argument("--fit", dest="fit_spec", help="ID training images the detectors are fitted on "
                   "(default: the world's train split, else --id split by parity)")
    p.add_argument("--cal-images", type=positive_int, default=2000,
                   help="ID training images held out from fitting to calibrate the combined detectors: those "
                   "after the --fit-images fit ones, else the last fifth of the fit set (default %(default)s)")
    p.add_argument("--k", type=positive_int, default=10, help="k of the kNN detectors")
    p.add_argument("--max-images", type=positive_int, help="evaluate at most this many ID and OOD images each")


def check_disjoint(ds_id, ds_ood, ds_fit, id_spec: str, ood_spec: str, fit_spec: str, n_eval, n_fit,
                   same_fit: bool) -> None:
    """Refuse, before any extraction, sets that share images: OOD images among the ID or fit images
    (the detectors could not tell them apart), and evaluated ID images among the fit images (a
    detector that saw them scores them as ID: inflated AUROC). Images are compared by file (real
    path) or world image, whatever the specs' spelling."""
    keys_id, keys_ood = image_keys(ds_id, n_eval), image_keys(ds_ood, n_eval)
    if dataset_identity(ds_ood) == dataset_identity(ds_id):
        raise UserError(f"the OOD set {ood_spec} is the ID set {id_spec}; pass other images with --ood.")
    pairs = [(keys_ood, keys_id, f"the OOD set {ood_spec}", f"the ID set {id_spec}", "--ood")]
    if not same_fit:
        if dataset_identity(ds_ood) == dataset_identity(ds_fit):
            raise UserError(f"the OOD set {ood_spec} is the fit set {fit_spec}; pass other images with --ood.")
        keys_fit = image_keys(ds_fit, n_fit)
        pairs += [(keys_ood, keys_fit, f"the OOD set {ood_spec}", f"the fit set {fit_spec}", "--ood"),
                  (keys_id, keys_fit, f"the evaluated ID images of {id_spec}", f"the fit set {fit_spec}",
                   "--fit (or leave --fit out: the ID images are then split in two, even ones fit, odd ones evaluated)")]
    for a, b, name_a, name_b, flag in pairs:
        shared = set(a).intersection(b)
        if shared:
            raise UserError(f"{len(shared)} of {len(a)} images of {name_a} are also in {name_b} "
                            f"(e.g. {min(shared)}); pass a disjoint {flag}.")


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
    from sae_core.datasets import open_dataset
    from sae_core.ood import evaluate, ood_scores, roc_figure

    with open_inputs(args, "ood", html=True) as (bundle, source, out, cache):
        id_spec = args.id_spec or world_split(bundle, "val") or bundle.manifest["dataset"]["spec"]
        ood_spec = need_spec(args.ood_spec or world_split(bundle, "ood"), "OOD set", "--ood")
        fit_spec = args.fit_spec or world_split(bundle, "train") or id_spec
        ds_id, ds_ood, ds_fit = (open_dataset(s) for s in (id_spec, ood_spec, fit_spec))  # bad specs fail here
        n_cal = max(0, args.cal_images)
        if args.fit_images is not None and args.fit_images < args.k:  # the kNN detectors would use fewer neighbours
            raise UserError(f"--fit-images {args.fit_images} is fewer than --k {args.k}: the kNN detectors score an image "
                            f"by its {args.k}th nearest fit image; give --fit-images {args.k} or more, or a smaller --k.")
        # compared by what the sets hold, not by their specs' spelling (a trailing slash is the same folder)
        same_fit = dataset_identity(ds_fit) == dataset_identity(ds_id)
        n_fit_wanted = None if same_fit or args.fit_images is None else args.fit_images + n_cal
        check_disjoint(ds_id, ds_ood, ds_fit, id_spec, ood_spec, fit_spec, args.max_images, n_fit_wanted, same_fit)
        f_id = features(source, id_spec, cache, args.max_images, args.batch_size, "ID")
        f_ood = features(source, ood_spec, cache, args.max_images, args.batch_size, "OOD")
        if same_fit:  # fit and evaluate on disjoint halves of the ID images
            f_fit = f_id.subset(f_id.ids % 2 == 0)
            f_id = f_id.subset(f_id.ids % 2 == 1)
            n_fit = len(f_fit) if args.fit_images is None else min(args.fit_images, len(f_fit))
        else:
            f_fit = features(source, fit_spec, cache, n_fit_wanted, args.batch_size, "fit")
            n_fit = len(f_fit) if args.fit_images is None else min(args.fit_images, len(f_fit))
        f_fit, f_cal = split_calibration(f_fit, n_fit, n_cal)
        # after the split: calibration may take the last fifth of the n_fit (until 2026-12-05 the note said
        # "first 4000 images" of a fit on 3,200, the other 800 calibrating)
        fit_note = (f"the first {len(f_fit)} ID images with even index (evaluated on the odd ones)" if same_fit
                    else f"first {len(f_fit)} images")
        if len(f_fit) < args.k:
            raise UserError(f"{fit_spec} leaves {len(f_fit)} images to fit on, fewer than --k {args.k} (the kNN detectors' "
                            f"neighbours); pass a larger --fit set, a smaller --cal-images or a smaller --k.")
        fit_labels = labels_of(fit_spec, f_fit.ids)
        label_note = None
        if fit_labels is None:
            label_note = "skipped: the fit images have no class labels"
        elif len(set(fit_labels)) < 2:  # a probe or a per-class covariance needs two classes
            label_note = f"skipped: every fit image has the one class {fit_labels[0]!r}"
            fit_labels = None
        test = type(f_id).concat([f_id, f_ood])
        is_ood = np.r_[np.zeros(len(f_id), bool), np.ones(len(f_ood), bool)]
        scores = ood_scores(f_fit, test, np.asarray(fit_labels) if fit_labels is not None else None, k=args.k,
                            cal=f_cal)
        groups = None
        if isinstance(ds_ood, WorldImages) and ds_ood.split == "ood":  # which held-out factor each shows
            from sae_core.ood import world_ood_groups

            w = ds_ood.world
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
                    "labels": "dataset labels (world: taxonomy leaf)" if fit_labels is not None else None,
                    "label_detectors": ("msp and mahalanobis_class fitted on the labels" if label_note is None
                                        else f"{label_note}; msp and mahalanobis_class need two classes or more")},
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
        if label_note is not None:
            table += ["", f"label detectors (msp, mahalanobis_class) {label_note}."]
        table += ["", f"best SAE: {best_sae} {auc_sae:.3f}; best raw: {best_raw} {auc_raw:.3f}",
                  f"wrote {', '.join(paths.values())}"]
        print_result(args, {k: v for k, v in result.items() if k != "curves"}, table)
        return 0
