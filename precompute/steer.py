"""`python -m precompute steer`: three greedy answers about one image: the original LLaVA, the SAE
inserted with nothing clamped, and the SAE with the chosen latents clamped."""
from __future__ import annotations

import math
import os
import sys

from sae_core.atomic import strict_json
from sae_core.errors import UserError, counted, integer_text, terminal_text

from .args import positive_int


def _numbers(text: str | None, cast, what: str) -> list:
    if text is None or text == "":
        return []
    try:
        numbers = [cast(x) for x in str(text).split(",") if x.strip() != ""]
    except ValueError:
        raise UserError(f"--{what} {text!r} is not a comma-separated list of numbers, e.g. --{what} 3,17.") from None
    if not all(math.isfinite(x) for x in numbers):  # a NaN clamp makes every answer empty
        raise UserError(f"--{what} {text!r} holds NaN or an infinity; give finite numbers, e.g. --{what} 4.")
    return numbers


def add_arguments(p) -> None:
    from sae_core.world.text import WHAT_IS_SHOWN

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="bundle directory (its SAE, and the LLaVA that reads its layer)")
    source.add_argument("--sae", help="or an SAE without a bundle: a folder (ours, SAELens's, sparsify's, "
                        "dictionary_learning's) or hf:OWNER/REPO[/FOLDER]")
    p.add_argument("--layer", help="with --sae: the layer it reads (default: the one it records)")
    p.add_argument("--image", required=True, help="image file, or world:INDEX / INDEX for an image of the bundle's dataset")
    p.add_argument("--latent", help="latent id(s) to clamp: K or K1,K2,...; without it, the command lists the "
                   "latents that fire most on the image")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--value", help="value(s) in activation units: one for all latents or one per latent")
    amount.add_argument("--strength", help="or in multiples of each latent's largest activation on one token of "
                        "the bundle's dataset, as the Steer page's strengths (needs --bundle)")
    p.add_argument("--top", type=positive_int, default=10, help="without --latent: how many latents to list")
    p.add_argument("--prompt", default=WHAT_IS_SHOWN, help="question (default: the paper's one-word prompt)")
    p.add_argument("--mode", choices=("set", "add"), default="set", help="set the latents to the values, or add them")
    p.add_argument("--keep-error", action="store_true",
                   help="keep the SAE's error term: h + decode(clamped) - decode(original) (default: dropped, as the paper)")
    p.add_argument("--patches", help="patch indices I,J,... (row-major, 0-based, CLS excluded) to clamp on; default all tokens")
    p.add_argument("--max-new-tokens", type=positive_int, default=5, help="length of each answer, in tokens")
    p.add_argument("--llava", help="the LLaVA to steer: a save_pretrained folder, a hub id or a spec such as llava:DIR "
                   "(default: the world's tiny LLaVA, the LLaVA the SAE was trained on, or llava-1.5-7b)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "4bit"),
                   help="auto: 4-bit on CUDA (fp32 for the world's tiny LLaVA), fp32 on CPU")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _warn(other_tower: str) -> None:
    print(f"steer: warning: {other_tower}; steer the LLaVA whose tower it was trained on (--llava), or train the "
          "SAE on that tower.", file=sys.stderr)


def run(args) -> int:
    import torch

    from sae_core.bundle import open_bundle
    from sae_core.steering import (SteeringSession, llava_spec, read_image_file, refuse_before_loading,
                                   refuse_latents_twice)

    torch.manual_seed(0)
    args.llava = llava_spec(args.llava)  # a folder or hub id as the app takes it (a spec prefix was required)
    if args.layer is not None and args.sae is None:
        raise UserError("--layer goes with --sae; a bundle's SAE is steered at the layer the bundle records.")
    listing = args.latent is None
    amount = "strength" if args.strength is not None else "value"
    if listing and (args.value is not None or args.strength is not None):
        raise UserError(f"--{amount} needs --latent: give the latent ids the {amount}s are for.")
    if args.strength is not None and args.bundle is None:
        raise UserError("--strength is in units of the bundle's activations; give --bundle, or raw --value with --sae.")
    latents = _numbers(args.latent, int, "latent")
    values = _numbers(args.value if amount == "value" else args.strength, float, amount)
    if not listing and not latents:
        raise UserError("--latent needs at least one latent id, e.g. --latent 12.")
    if not listing and not values:
        raise UserError("--latent needs --value (activation units) or --strength (with --bundle): what to clamp "
                        "the latents to, e.g. --value 40.")
    refuse_latents_twice(latents)
    if not listing and len(values) not in (1, len(latents)):
        raise UserError(f"--{amount} gives {counted(len(values), amount)} for {counted(len(latents), 'latent')}; "
                        f"give one {amount} or one per latent.")  # "for 1 latents" until 2026-12-06
    if listing and args.top < 1:
        raise UserError(f"--top {args.top} lists nothing; give at least 1.")
    patches = None
    if args.patches is not None:  # an empty list clamps nowhere; it used to mean every token
        patches = _numbers(args.patches, int, "patches")
        if not patches:
            raise UserError(f"--patches {args.patches!r} names no patch; give patch indices such as --patches 5,6, "
                            "or leave --patches out to clamp every token.")
    if not args.prompt.strip():
        raise UserError("--prompt is empty; give a question, or leave --prompt out for the paper's one-word prompt.")
    image = args.image
    # digits name a dataset image, but with --sae (no dataset) a file of that name is the image (until 2026-12-05
    # refused as a dataset index); with --bundle the index wins and the file is pointed to
    is_file = os.path.isfile(image)
    if integer_text(image) is not None and not (is_file and args.sae is not None):
        if is_file:
            print(f"steer: warning: --image {image} is read as image {integer_text(image)} of the bundle's dataset; "
                  f"a file of that name is here too: pass ./{image} to steer it.", file=sys.stderr)
        image = integer_text(image)
    elif not image.startswith("world:"):
        read_image_file(image)  # a missing or unreadable file is said before LLaVA loads, not after
    if args.sae is not None:
        if not isinstance(image, str) or image.startswith("world:"):
            raise UserError(f"--image {args.image} names an image of a bundle's dataset; with --sae pass an image "
                            "file, or give --bundle instead.")
        session = SteeringSession.from_paths(args.sae, args.llava, args.layer, latents=latents, device=args.device,
                                             precision=args.precision, note=_warn)
    else:
        bundle = open_bundle(args.bundle)
        refuse_before_loading(bundle, latents, image, patches, args.llava)
        session = SteeringSession.from_bundle(bundle, device=args.device, precision=args.precision,
                                              llava=args.llava, note=_warn)
    if listing:
        return _list_latents(session, image, args)
    values = values if len(values) > 1 else values * len(latents)
    if amount == "strength":  # --strength comes with --bundle, whose check above found each latent
        if unit_problem := session.bundle.strength_unit_problem():
            print(f"steer: warning: {unit_problem}; or pass --value for raw activations.", file=sys.stderr)
        units = session.bundle.strength_units()
        values = [s * float(units[k]) for k, s in zip(latents, values)]
    result = session.answers(image, latents, values, prompt=args.prompt,
                             keep_error=args.keep_error, patches=patches, mode=args.mode,
                             max_new_tokens=args.max_new_tokens)
    if args.json:
        print(strict_json({"image": str(args.image), **result.to_dict()}))
    else:
        # the model's words and the bundle's labels without a terminal's control characters (as `inspect`)
        print(terminal_text(f"prompt:   {result.prompt}\nclamp:    {result.clamp}\noriginal: {result.original}\n"
                            f"sae:      {result.sae}\nsteered:  {result.steered}"))
    return 0


def _list_latents(session, image, args) -> int:
    """The latents that fire most on the image, to choose --latent from: id, max and mean over its patches,
    the CLS activation where the model has one, and with a bundle the max in --strength units (the Steer
    page's "x token max") and the label."""
    found = session.latents_on_image(image, top=args.top)
    cls = found["cls"] or {}
    units = session.bundle.strength_units() if session.bundle is not None else None
    rows = [{"latent": k, "max": mx, "mean": mean, "cls": None if cls.get(k) is None else cls[k] + 0.0,  # no -0.0
             "strength": None if units is None else mx / float(units[k]), "label": label}
            for k, mx, mean, label in found["top"]]
    if args.json:
        print(strict_json({"image": str(args.image), "latents": rows}))
        return 0
    if not rows:
        print(f"no latent fires on {args.image}.")
        return 0
    print(f"latents that fire most on {args.image} (activations over its patches; pass some to --latent):")
    print(f"{'latent':>7} {'max':>9} {'mean':>9}" + (f" {'cls':>9}" if cls else "")
          + (f" {'strength':>9}" if units is not None else "") + "  label")
    for r in rows:
        print(f"{r['latent']:>7} {r['max']:>9.4g} {r['mean']:>9.4g}" + (f" {r['cls']:>9.4g}" if cls else "")
              + (f" {r['strength']:>9.4g}" if units is not None else "") + f"  {terminal_text(r['label'])}")
    return 0
