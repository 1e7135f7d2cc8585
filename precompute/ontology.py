"""`python -m precompute ontology --bundle B [--json]`: tree agreement of hierarchical clusterings of SAE
latents (decoder cosine, co-activation) and of raw neurons (co-activation) with the dataset's taxonomy.

Images: the bundle's dataset (world: its val split), scored as the atlas scores them. Taxonomy views:
the dataset's paths (world: family > shape > colour group > colour; iNaturalist folders: 7 levels),
and for a world dataset also its shape tree (family > shape) and colour tree (colour group > colour),
because a colour latent has no place in a shape-first tree. Writes OUT/ontology.json.
"""
from __future__ import annotations

import numpy as np

from sae_core.datasets import WorldImages

from .args import positive_int, share
from .probe_common import add_common, features, open_inputs, print_result, write_outputs


def add_arguments(p) -> None:
    add_common(p)
    p.add_argument("--dataset", help="images with taxonomy paths (default: the bundle's dataset)")
    p.add_argument("--max-images", type=positive_int, help="use at most this many images")
    p.add_argument("--top", type=positive_int, default=16,
                   help="top images per unit that place it in the taxonomy (at least 4; default %(default)s)")
    p.add_argument("--min-share", type=share, default=0.5, help="share of top images a node must hold")
    p.add_argument("--permutations", type=positive_int, default=100, help="permutations of the null")


def run(args) -> int:
    from sae_core.datasets import open_dataset
    from sae_core.errors import UserError
    from sae_core.ontology import (MIN_IMAGES, assign_nodes, correlation_distance_matrix, cosine_distance_matrix, top_images,
                                   tree_agreement)

    if args.top < MIN_IMAGES:
        raise UserError(f"--top must be at least {MIN_IMAGES}: a unit is placed from at least {MIN_IMAGES} of its "
                        "top images.")
    with open_inputs(args, "ontology") as (bundle, source, out, cache):
        spec = args.dataset or (f"world:{bundle.world_dir}:{bundle.manifest['world_split']}"
                                if bundle.world_dir is not None and bundle.manifest.get("world_split")
                                else bundle.manifest["dataset"]["spec"])
        ds = open_dataset(spec)
        n = len(ds) if args.max_images is None else min(args.max_images, len(ds))
        if n < MIN_IMAGES:  # no unit could be placed: the file would hold only empty scores
            raise UserError(f"{n} image{'s' if n != 1 else ''} of {spec} cannot place a unit in the taxonomy (a unit needs "
                            f"{MIN_IMAGES} top images); give --max-images {MIN_IMAGES} or more (default: all "
                            f"{len(ds)}).")
        paths = {i: ds.taxonomy_path(i) for i in range(n)}  # checked before the features are extracted
        if all(p is None for p in paths.values()):
            raise UserError(f"{spec} has no taxonomy paths (world or iNaturalist-style folders); pass --dataset with one.")
        feats = features(source, spec, cache, n, args.batch_size, "images")

        def cut(lo, hi):  # an image without a path (a loose file beside the class folders) has no place
            return lambda r: None if (p := paths[int(feats.ids[r])]) is None else p[lo:hi]

        views = {"taxonomy": cut(0, None)}
        if isinstance(ds, WorldImages):  # the world's path is [family, shape, colour_group, colour]; other taxonomies not
            views["shape_tree"] = cut(0, 2)
            views["colour_tree"] = cut(2, None)
        W_dec = source.sae.W_dec.detach().cpu().numpy()
        units = {"sae": (feats.codes, True), "raw": (feats.raw, False)}
        result = {"dataset": spec, "n_images": int(len(feats)), "top": args.top, "min_share": args.min_share,
                  "score": "Spearman(cophenetic distance of the average-linkage tree, taxonomy path length) over unit pairs",
                  "views": {}}
        table = ["| view | units | clustering | placed units | tree agreement | null mean +- std | z |",
                 "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for view, path_of in views.items():
            result["views"][view] = {}
            for kind, (scores, positive) in units.items():
                nodes = assign_nodes(top_images(scores, args.top, positive_only=positive), path_of, args.min_share,
                                     MIN_IMAGES)
                keep = np.array([n is not None and len(n) > 0 for n in nodes])
                kept_nodes = [nodes[k] for k in np.flatnonzero(keep)]
                depth = placed_depths(kept_nodes)
                clusterings = {"coactivation": correlation_distance_matrix(scores[:, keep])}
                if kind == "sae":
                    clusterings["decoder_cosine"] = cosine_distance_matrix(W_dec[keep])
                entry = {"n_units": int(len(nodes)), "n_placed": int(keep.sum()), "placed_depths": depth}
                for cname, dist in clusterings.items():
                    agg = tree_agreement(dist, kept_nodes, n_perm=args.permutations)
                    entry[cname] = agg.to_dict()
                    table.append(f"| {view} | {kind} | {cname} | {agg.n_units} | {agg.score:.3f} | "
                                 f"{agg.null_mean:.3f} +- {agg.null_std:.3f} | {agg.z:.1f} |")
                result["views"][view][kind] = entry
        if not any(e[c]["score"] is not None for v in result["views"].values() for e in v.values()
                   for c in ("coactivation", "decoder_cosine") if c in e):
            # kept from writing over a file with figures (the app shows this file)
            raise UserError(f"no clustering could be scored: in every view fewer than 3 units were placed, or all "
                            f"on one node, from {len(feats)} images; use more images (--max-images) or a lower "
                            "--top; nothing written.")
        paths_out = write_outputs(out, "ontology", result)
        result["outputs"] = paths_out
        print_result(args, result, table + ["", f"wrote {paths_out['json']}"])
        return 0


def placed_depths(nodes) -> dict:
    """{depth: number of units placed at that depth}."""
    from collections import Counter

    return {str(k): int(v) for k, v in sorted(Counter(len(n) for n in nodes).items())}
