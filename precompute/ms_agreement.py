"""`python -m precompute ms-agreement`: the paper's Alignment Score of MS with users' preferences (pairs.csv)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from precompute.ms import compute_ms, load_activations, load_matrix
from sae_core.alignment import DEFAULT_EDGES, alignment_figure, alignment_score, check_edges, read_pairs_csv
from sae_core.atomic import atomic_path, write_json_atomic
from sae_core.errors import UserError
from sae_core.precision import resolve_device

from .args import check_writable, out_folder, positive_int


def add_arguments(p):
    p.add_argument("--pairs", required=True, help="pairs.csv: k_x,k_y,R_user[,MS_x_NAME,MS_y_NAME ...]")
    p.add_argument("--activations", help="activations.csv (rows `k,a_1..a_N`) or (N, K) .npy, to compute MS here")
    p.add_argument("--embeddings", nargs="+", default=[],
                   help="(N, d) .npy image embeddings (one MS variant per file, ours_STEM; ours_FOLDER/STEM "
                        "where stems repeat)")
    p.add_argument("--r-user-center", type=float, default=0.0,
                   help="R_user above this prefers neuron x, below prefers y, equal is no preference (skipped)")
    p.add_argument("--bins", default=",".join(f"{e:g}" for e in DEFAULT_EDGES),
                   help="edges of the |MS_x - MS_y| bins, comma-separated (inf allowed)")
    p.add_argument("--out", help="directory for alignment.json and alignment.html (default: PAIRS_DIR/ms_agreement)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (for the MS computed here)")
    p.add_argument("--chunk", type=positive_int, default=4096, help="images per streamed chunk (MS computed here)")
    p.add_argument("--matmul", choices=["float64", "float32"], default="float64",
                   help="dtype of the per-chunk product (as `precompute ms --matmul`)")


def parse_edges(text: str) -> tuple:
    try:
        edges = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--bins must be comma-separated numbers such as 0,0.1,0.2,inf, got {text!r}.") from None
    return check_edges(edges, "--bins")


def variant_names(paths) -> list[str]:
    """`ours_STEM` per embeddings file; where stems repeat (e1/emb.npy, e2/emb.npy), as many folders
    above as tell them apart (`ours_e1/emb`), so no variant overwrites another."""
    full = [Path(p).resolve() for p in paths]
    if len(set(full)) < len(full):
        twice = next(p for p in paths if full.count(Path(p).resolve()) > 1)
        raise UserError(f"--embeddings lists {twice} more than once; give each file once.")
    keys = [p.parts[:-1] + (p.stem,) for p in full]
    if len(set(keys)) < len(keys):  # emb.npy beside emb.NPY: only the suffix tells them apart
        keys = [p.parts for p in full]
    names = []
    for key in keys:
        depth = 1
        while sum(k[-depth:] == key[-depth:] for k in keys) > 1:
            depth += 1
        names.append("ours_" + "/".join(key[-depth:]))
    return names


def computed_variants(args, k_x, k_y) -> dict:
    """{name: (ms_x, ms_y)} from MS computed here on --activations and each --embeddings file."""
    if bool(args.activations) != bool(args.embeddings):
        raise UserError("computing MS needs both --activations and --embeddings; give both or neither.")
    if not args.activations:
        return {}
    names = variant_names(args.embeddings)
    device = resolve_device(args.device)
    ids, acts = load_activations(args.activations)
    ids = np.arange(acts.shape[1]) if ids is None else ids
    wanted = np.union1d(k_x, k_y)
    unknown = np.setdiff1d(wanted, ids)
    if unknown.size:
        more = f" (and {unknown.size - 1} more)" if unknown.size > 1 else ""
        raise UserError(f"pairs name neuron {unknown[0]}{more} that {args.activations} does not hold; use the "
                        f"activations file that goes with these pairs.")
    # score only the neurons the pairs use
    cols = np.searchsorted(ids, wanted, sorter=np.argsort(ids))
    cols = np.argsort(ids)[cols]
    sub = np.ascontiguousarray(acts[:, cols])
    out = {}
    for name, path in zip(names, args.embeddings):
        emb = load_matrix(path, "embeddings")
        try:
            r = compute_ms(sub, emb, device, args.chunk, args.matmul, 2)
        except UserError as e:  # an activation's "column j" counts the pairs' neurons only: name the neuron
            if not str(e).startswith("activations"):
                raise
            raise UserError(re.sub(r"column (\d+)", lambda m: f"neuron {wanted[int(m.group(1))]}", str(e),
                                   count=1)) from None
        lookup = dict(zip(wanted.tolist(), r.ms.tolist()))
        out[name] = (np.array([lookup[k] for k in k_x]), np.array([lookup[k] for k in k_y]))
    return out


def format_table(results: dict) -> str:
    first = next(iter(results.values()))
    heads = [f"[{b.lo:g},{b.hi:g})" for b in first.bins]
    width = max(14, *(len(n) for n in results))
    # pairs: scored; MS tie and no MS: skipped as MS_x == MS_y or as a neuron without a score (per variant)
    lines = [f"{'MS variant':<{width}} {'pairs':>6} {'MS tie':>6} {'no MS':>6} {'overall':>8}  "
             + "  ".join(f"{h:>14}" for h in heads)]
    for name, r in results.items():
        cells = ["-" if math.isnan(b.agreement) else f"{b.agreement:.3f} ({b.n})" for b in r.bins]
        overall = "-" if math.isnan(r.agreement) else f"{r.agreement:.3f}"
        lines.append(f"{name:<{width}} {r.n_pairs:>6} {r.n_ms_ties:>6} {r.n_missing:>6} {overall:>8}  "
                     + "  ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def run(args) -> int:
    edges = parse_edges(args.bins)
    if not math.isfinite(args.r_user_center):
        raise UserError(f"--r-user-center must be a finite number, got {args.r_user_center}.")
    pairs = read_pairs_csv(args.pairs)
    if np.isnan(pairs["R_user"]).any():
        raise UserError(f"column R_user of {args.pairs} has empty or NaN entries; every pair needs a preference.")
    out = out_folder(Path(args.out) if args.out else Path(args.pairs).resolve().parent / "ms_agreement",
                     "alignment.json and alignment.html")
    for f in (out / "alignment.json", out / "alignment.html"):
        check_writable(f)
    variants = dict(pairs["ms"])
    clash = sorted(set(variant_names(args.embeddings)) & set(variants))
    if clash:  # the file's scores were replaced by the computed ones, silently
        raise UserError(f"{args.pairs} has columns MS_x_{clash[0]}/MS_y_{clash[0]}, the name of the variant computed "
                        f"from --embeddings; rename those columns or the embeddings file.")
    variants.update(computed_variants(args, pairs["k_x"], pairs["k_y"]))
    if not variants:
        raise UserError(f"{args.pairs} has no MS_x_NAME/MS_y_NAME columns; pass --activations and --embeddings "
                        f"to compute MS here.")
    preference = pairs["R_user"] - args.r_user_center
    results = {name: alignment_score(x, y, preference, edges) for name, (x, y) in variants.items()}
    n_ties = int((preference == 0).sum())  # the file's: a variant counts only its pairs with both MS (until 2026-12-05)
    print(f"{len(preference)} pairs from {args.pairs}; R_user > {args.r_user_center:g} prefers x, "
          f"< {args.r_user_center:g} prefers y; {n_ties} without a preference (R_user at the centre) skipped")
    if (pairs["R_user"] >= 0).all() and args.r_user_center == 0:
        print("note: every R_user is >= 0; if it is the share of users preferring x, pass --r-user-center 0.5")
    print(format_table(results))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "alignment.json", {
        "pairs": str(args.pairs), "r_user_center": args.r_user_center, "n_pairs_in_file": int(len(preference)),
        "variants": {name: r.to_dict() for name, r in results.items()}})
    with atomic_path(out / "alignment.html") as tmp:
        alignment_figure(results).write_html(str(tmp), include_plotlyjs=True, full_html=True)
    print(f"wrote {out / 'alignment.json'} and {out / 'alignment.html'}")
    return 0
