"""`python -m precompute steer`: three greedy answers about one image: the original LLaVA, the SAE
inserted with nothing clamped, and the SAE with the chosen latents clamped."""
from __future__ import annotations

import json

from sae_core.errors import UserError


def _numbers(text: str | None, cast, what: str) -> list:
    if text is None or text == "":
        return []
    try:
        return [cast(x) for x in str(text).split(",") if x.strip() != ""]
    except ValueError:
        raise UserError(f"--{what} {text!r} is not a comma-separated list of numbers, e.g. --{what} 3,17.") from None


def add_arguments(p) -> None:
    from sae_core.world.text import WHAT_IS_SHOWN

    p.add_argument("--bundle", required=True, help="bundle directory (its SAE, and the LLaVA that reads its layer)")
    p.add_argument("--image", required=True, help="image file, or world:INDEX / INDEX for an image of the bundle's dataset")
    p.add_argument("--latent", required=True, help="latent id(s) to clamp: K or K1,K2,...")
    p.add_argument("--value", required=True, help="value(s): one for all latents or one per latent")
    p.add_argument("--prompt", default=WHAT_IS_SHOWN, help="question (default: the paper's one-word prompt)")
    p.add_argument("--mode", choices=("set", "add"), default="set", help="set the latents to the values, or add them")
    p.add_argument("--keep-error", action="store_true",
                   help="keep the SAE's error term: h + decode(clamped) - decode(original) (default: dropped, as the paper)")
    p.add_argument("--patches", help="patch indices I,J,... (row-major, 0-based, CLS excluded) to clamp on; default all tokens")
    p.add_argument("--max-new-tokens", type=int, default=5)
    p.add_argument("--llava", help="LLaVA spec to steer (default: the world's tiny LLaVA, the bundle's LLaVA, or llava-1.5-7b)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16", "4bit"),
                   help="auto: 4-bit on CUDA (fp32 for the world's tiny LLaVA), fp32 on CPU")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import torch

    from sae_core.precision import warn_if_slow_half
    from sae_core.steering import SteeringSession

    torch.manual_seed(0)
    latents = _numbers(args.latent, int, "latent")
    values = _numbers(args.value, float, "value")
    if not latents:
        raise UserError("--latent needs at least one latent id, e.g. --latent 12.")
    if len(values) not in (1, len(latents)):
        raise UserError(f"--value gives {len(values)} values for {len(latents)} latents; give one value or one per latent.")
    patches = _numbers(args.patches, int, "patches") if args.patches else None
    image = args.image
    if image.isdigit():
        image = int(image)
    warn_if_slow_half(args.device, args.precision, "--precision fp32")
    session = SteeringSession.from_bundle(args.bundle, device=args.device, precision=args.precision, llava=args.llava)
    result = session.answers(image, latents, values if len(values) > 1 else values * len(latents), prompt=args.prompt,
                             keep_error=args.keep_error, patches=patches, mode=args.mode,
                             max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"image": str(args.image), **result.to_dict()}))
    else:
        print(f"prompt:   {result.prompt}")
        print(f"clamp:    {result.clamp}")
        print(f"original: {result.original}")
        print(f"sae:      {result.sae}")
        print(f"steered:  {result.steered}")
    return 0
