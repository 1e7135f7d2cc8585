"""`python -m precompute export DIR --format saelens --out D2`: write a trained SAE in another library's layout."""
from sae_core.checkpoint import export_saelens


def add_arguments(p):
    p.add_argument("sae_dir", help="a directory written by `python -m precompute train`")
    p.add_argument("--format", choices=["saelens"], default="saelens")
    p.add_argument("--out", required=True)


def run(args) -> int:
    out = export_saelens(args.sae_dir, args.out)
    print(f"wrote {out}/cfg.json and {out}/sae_weights.safetensors")
    return 0
