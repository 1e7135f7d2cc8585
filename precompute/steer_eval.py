"""`python -m precompute steer-eval`: steering figures of a world bundle: the paper's CLIP-score protocol
and the world's ground truth (success rate, collateral kept) for several ways of steering."""
from __future__ import annotations

import math
import re
from pathlib import Path

from sae_core.atomic import strict_json
from sae_core.errors import UserError

from .args import check_writable, nonnegative_float, nonnegative_int, positive_int, share


def add_arguments(p) -> None:
    p.add_argument("--bundle", required=True, help="a world bundle (python -m precompute demo)")
    p.add_argument("--images", type=positive_int, default=600, help="single-object val images (half tune, half test)")
    p.add_argument("--per-concept", type=positive_int, default=40, help="test images per target concept")
    p.add_argument("--tune-per-concept", type=positive_int, default=48, help="tune images per target concept")
    p.add_argument("--alphas", default="1,1.5,2,2.5,3,3.5,4", help="strengths swept (x max activation / x mean code)")
    p.add_argument("--factors", default="colour,shape", help="world factors to steer towards, comma-separated")
    p.add_argument("--tau", type=share, default=0.1,
                   help="a factor latent has eta^2 of the factor >= TAU on object tokens (eta^2 is at most 1)")
    p.add_argument("--purity", type=nonnegative_float, default=1.0, help="... and >= PURITY x the other factor's eta^2")
    p.add_argument("--learn-steps", type=nonnegative_int, default=None,
                   help="Adam steps of the learned strategy per colour (default 80; 0 leaves it out)")
    p.add_argument("--learn-lambda", type=nonnegative_float, default=None,
                   help="weight of keeping the shape answer in the learned strategy's loss (default 1)")
    p.add_argument("--learned-out", help="write the learned deltas (JSON; ConceptSteerer(..., learned=FILE) applies them)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "4bit"),
                   help="LLaVA's precision, as `precompute steer --precision`")
    p.add_argument("--out", help="also write the JSON here; with it a killed run resumes (rerun the same command): "
                                 "finished steps are kept in OUT.partial")
    p.add_argument("--json", action="store_true", help="print the JSON (default: a summary table)")


def run(args) -> int:
    from sae_core.atomic import output_lock, remove_stale_temporaries
    from sae_core.steering_eval import LEARN_STEPS, MIN_IMAGES

    # every argument is checked before the model loads and the evaluation runs (minutes): a bad one found
    # after it would lose the run
    try:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    except ValueError:
        raise UserError(f"--alphas {args.alphas!r} is not a comma-separated list of numbers.") from None
    if not all(math.isfinite(a) for a in alphas):  # NaN clamps answer nothing: every figure 0, no error
        raise UserError(f"--alphas {args.alphas!r} holds NaN or an infinity; give finite strengths, e.g. --alphas 2,3.")
    factors = tuple(f.strip() for f in args.factors.split(",") if f.strip())
    if not factors:
        raise UserError(f"--factors {args.factors!r} names no factor; give colour, shape or colour,shape.")
    if not set(factors) <= {"colour", "shape"}:
        raise UserError(f"--factors {args.factors!r} may only name colour and shape.")
    if args.images < MIN_IMAGES:
        raise UserError(f"--images {args.images} is too few; steer-eval needs at least {MIN_IMAGES} single-object "
                        "images (half tune, half test).")
    learn_steps = LEARN_STEPS if args.learn_steps is None else args.learn_steps
    from sae_core.bundle import open_bundle

    if open_bundle(args.bundle).world_dir is None:  # found after LLaVA's load until 2026-12-06 (a 7B model: minutes)
        raise UserError(f"bundle {args.bundle} is not a world bundle (its manifest names no world), and steer-eval "
                        "needs the world's ground truth; build one with `python -m precompute demo`.")
    if args.learned_out and (learn_steps == 0 or "colour" not in factors):
        raise UserError("--learned-out needs the learned strategy; run with --learn-steps above 0 and colour in --factors.")
    for flag, path in (("--out", args.out), ("--learned-out", args.learned_out)):
        if path:
            try:
                check_writable(Path(path))
            except UserError as e:  # its sentence names --out
                raise UserError(re.sub(r"--out\b", flag, str(e))) from None
    if not args.out:  # nothing written, so nothing to resume
        return _evaluate(args, alphas, factors, learn_steps)
    out, partial = Path(args.out), partial_path(args.out)
    check_writable(partial)
    with output_lock(out):  # a second run with this --out is refused: the two would append to one journal
        remove_stale_temporaries(out.resolve().parent, [out.name, partial.name])  # a kill inside an atomic write
        return _evaluate(args, alphas, factors, learn_steps)


def partial_path(out: str) -> Path:
    """Where a run with --out OUT keeps its finished steps until OUT is written."""
    return Path(out).with_name(Path(out).name + ".partial")


def _evaluate(args, alphas: tuple, factors: tuple, learn_steps: int) -> int:
    """run's work, once its arguments are checked: load, evaluate (resuming OUT.partial), write, print."""
    import hashlib
    import sys

    import torch

    from sae_core.atomic import write_json_atomic
    from sae_core.resume import Journal
    from sae_core.steering import SteeringSession
    from sae_core.steering_eval import LEARN_LAMBDA, evaluate_world

    learn_lambda = LEARN_LAMBDA if args.learn_lambda is None else args.learn_lambda
    session = SteeringSession.from_bundle(args.bundle, device=args.device, precision=args.precision)
    world = session.bundle.world_dir  # the world the bundle carries, else the one its manifest names (run checked)
    torch.manual_seed(0)
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    journal = None
    if args.out:
        # everything an answer depends on: the bundle (its manifest is written last, so a rebuilt bundle has
        # another), the model's device and precision, and every setting of the evaluation
        manifest = hashlib.sha256((session.bundle.root / "manifest.json").read_bytes()).hexdigest()
        journal = Journal(partial_path(args.out), {
            "bundle_manifest_sha256": manifest, "device": session.device.type, "dtype": str(session.adapter.dtype),
            "images": args.images, "per_concept": args.per_concept, "tune_per_concept": args.tune_per_concept,
            "alphas": list(alphas), "factors": list(factors), "tau": args.tau, "purity": args.purity,
            "learn_steps": learn_steps, "learn_lambda": learn_lambda})
        if journal.restarted:
            log(f"starting over, {journal.path.name} is not of these settings ({journal.restarted})")
        elif journal.done:
            log(f"resuming: {len(journal.done)} finished steps read from {journal.path.name}")
    result = evaluate_world(session, world, n_images=args.images, alphas=alphas, max_images=args.per_concept,
                            tune_images=args.tune_per_concept, factors=factors, tau=args.tau,
                            purity=args.purity, log=log, learn_steps=learn_steps, learn_lambda=learn_lambda,
                            journal=journal)
    result["bundle"] = str(session.bundle.root)
    if args.out:
        write_json_atomic(args.out, result)
    learned = result["factors"].get("colour", {}).get("chosen", {}).get("learned")
    if args.learned_out and learned is not None:
        write_json_atomic(args.learned_out, {"factor": "colour", "bundle": str(session.bundle.root), **learned["deltas"],
                                             "settings": {"n_images": args.images, "tau": args.tau, "purity": args.purity}})
    if journal is not None:  # after --out and --learned-out: the steps are in them now
        journal.remove()
    if args.json:
        print(strict_json(result))
    else:
        _print_summary(result)
    if args.learned_out and learned is None:  # after the figures are out: they are not lost
        n = len(result["factors"]["colour"]["factor_latents"])
        raise UserError(f"--learned-out {args.learned_out} was not written: {n} colour latents passed --tau "
                        f"{args.tau:g} and --purity {args.purity:g}, so nothing was learned; lower them.")
    return 0


def _print_summary(result: dict) -> None:
    from sae_core.steering_eval import kept_text

    print("| factor | family (chosen per concept on tune) | success (test) | min | concepts >= 0.70 | collateral kept |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for f, r in result["factors"].items():
        for fam, v in r["chosen"].items():
            s = v["summary"]
            print(f"| {f} | {fam} | {s['success_rate']:.2f} | {s['success_min']:.2f} | "
                  f"{s['concepts_at_0.70']}/{s['n_concepts']} | {kept_text(s['collateral_kept'])} |")
    for f, r in result["factors"].items():
        if not r["factor_latents"]:  # profile and swap move the factor's latents: with none they steer nothing
            print(f"no {f} latent passed --tau and --purity: the {f} rows of best_profile, best_swap and "
                  "best_swap_oracle are unsteered answers")
    pp = result.get("paper_protocol")
    if pp:
        print(f"CLIP score (paper protocol, {pp['n_neurons']} neurons): steered {pp['clip_score_steered']:.3f}, "
              f"unsteered {pp['clip_score_unsteered']:.3f}")
    if "headline" in result:  # the colour factor's; --factors shape has none
        print(f"headline ({result['headline']['family']}): success {result['success_rate']:.2f}, "
              f"collateral kept {kept_text(result['collateral_kept'])}")
