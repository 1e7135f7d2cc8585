"""`python -m precompute probes --bundle B [--json]`: linear probes for the world's factors from SAE codes
versus raw activations, and generalisation to held-out (shape, colour) combinations.

Single-object images only (an object factor of a two-object image is ambiguous). Factor probes: fitted on
the world's train split (at most --fit-images), tested on its val split. Held-out combinations
(sae_core.probes.split_combinations): shape and colour probes fitted on train images of seen pairs,
tested on val images of unseen pairs ("unseen") and of seen pairs ("seen"). Writes OUT/probes.json.
"""
from __future__ import annotations

import numpy as np

from sae_core.errors import UserError

from .args import positive_int
from .probe_common import add_common, features, open_inputs, print_result, world_split, write_outputs


def add_arguments(p) -> None:
    add_common(p, fit_images=10000)
    p.add_argument("--test-images", type=positive_int, help="test on at most this many val images")
    p.add_argument("--unseen-per-shape", type=positive_int, default=3, help="colours held out per shape for the combination test")


def run(args) -> int:
    from sae_core.probes import FACTORS, fit_probe, probe_accuracy, split_combinations, world_factor_labels
    from sae_core.world.dataset import WorldDataset

    with open_inputs(args, "probes") as (bundle, source, out, cache):
        if bundle.world_dir is None:
            raise UserError(f"{bundle.root} is not a world bundle; factor probes need the embedded world's labels "
                            "(build one with `python -m precompute demo`).")
        train_spec = world_split(bundle, "train")
        test_spec = world_split(bundle, "val")
        w_tr, w_te = WorldDataset(bundle.world_dir, "train"), WorldDataset(bundle.world_dir, "val")
        check_sets(args, w_tr, w_te)  # from the world's index, before any image is rendered
        f_tr = features(source, train_spec, cache, args.fit_images, args.batch_size, "train")
        f_te = features(source, test_spec, cache, args.test_images, args.batch_size, "val")
        w_tr, w_te = WorldDataset(bundle.world_dir, "train"), WorldDataset(bundle.world_dir, "val")
        y_tr, single_tr = world_factor_labels(w_tr.factors, f_tr.ids)
        y_te, single_te = world_factor_labels(w_te.factors, f_te.ids)
        feats = {"sae": (f_tr.codes, f_te.codes), "raw": (f_tr.raw, f_te.raw)}
        result = {"train": {"spec": train_spec, "n_single": int(single_tr.sum())},
                  "test": {"spec": test_spec, "n_single": int(single_te.sum())},
                  "features": {"layer": source.layer, "pooling": source.score,
                               "d_sae": int(f_tr.codes.shape[1]), "d_raw": int(f_tr.raw.shape[1])},
                  "factors": {}, "held_out_combinations": {}}
        table = ["| factor | SAE acc | raw acc | chance |", "| --- | ---: | ---: | ---: |"]
        for f in FACTORS:
            entry = {}
            for kind, (xtr, xte) in feats.items():
                r = probe_accuracy(xtr[single_tr], y_tr[f][single_tr], xte[single_te], y_te[f][single_te])
                entry[kind] = r.accuracy
                entry["chance"] = r.chance
                entry[f"{kind}_l2"] = r.l2
            result["factors"][f] = entry
            table.append(f"| {f} | {shown(entry['sae'])} | {shown(entry['raw'])} | {shown(entry['chance'])} |")

        unseen = split_combinations(w_tr.spec.train_shapes, w_tr.spec.train_colours, args.unseen_per_shape)
        pair_tr = np.array([(s, c) in unseen for s, c in zip(y_tr["shape"], y_tr["colour"])])
        pair_te = np.array([(s, c) in unseen for s, c in zip(y_te["shape"], y_te["colour"])])
        fit_rows = single_tr & ~pair_tr
        result["held_out_combinations"] = {"unseen_pairs": sorted(map(list, unseen)), "n_fit": int(fit_rows.sum()),
                                           "n_test_seen": int((single_te & ~pair_te).sum()),
                                           "n_test_unseen": int((single_te & pair_te).sum())}
        table += ["", "| held-out combinations | SAE seen | SAE unseen | raw seen | raw unseen |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for f in ("shape", "colour"):
            entry = {}
            for kind, (xtr, xte) in feats.items():
                probe = fit_probe(xtr[fit_rows], y_tr[f][fit_rows])
                for which, rows in (("seen", single_te & ~pair_te), ("unseen", single_te & pair_te)):
                    # no test image of the kind: no accuracy (null in probes.json), not the mean of nothing
                    entry[f"{kind}_{which}"] = probe.accuracy(xte[rows], y_te[f][rows]) if rows.any() else None
            result["held_out_combinations"][f] = entry
            table.append(f"| {f} | {shown(entry['sae_seen'])} | {shown(entry['sae_unseen'])} | "
                         f"{shown(entry['raw_seen'])} | {shown(entry['raw_unseen'])} |")
        paths = write_outputs(out, "probes", result)
        result["outputs"] = paths
        print_result(args, result, table + ["", f"wrote {paths['json']}"])
        return 0


def shown(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def check_sets(args, w_tr, w_te) -> None:
    """Refuse settings no probe can be fitted or tested with, in one sentence, before any extraction."""
    from sae_core.probes import FACTORS, world_factor_labels

    n_colours = len(w_tr.spec.train_colours)
    if not args.unseen_per_shape < n_colours:
        raise UserError(f"--unseen-per-shape {args.unseen_per_shape} holds out every colour of a shape; "
                        f"give 1 to {n_colours - 1} (the world has {n_colours} colours per shape).")
    for w, n, flag in ((w_tr, args.fit_images, "--fit-images"), (w_te, args.test_images, "--test-images")):
        n = len(w) if n is None else min(n, len(w))
        y, single = world_factor_labels(w.factors, range(n))
        if not single.any():
            raise UserError(f"the first {n} {w.split} images hold no single-object image, so no factor probe can be "
                            f"{'fitted' if w is w_tr else 'tested'}; raise {flag} (the split has {len(w)}).")
        one = [f for f in FACTORS if len(set(y[f][single])) < 2]
        if w is w_tr and one:
            raise UserError(f"the single-object images among the first {n} train images show one {one[0]} only, "
                            f"and a probe needs two classes; raise {flag} (the split has {len(w)}).")
