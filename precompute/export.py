"""`python -m precompute export DIR --format saelens|sae-lab --out D2`: write an SAE in another layout."""
from sae_core.checkpoint import export_saelens, load_sae, save_sae


def add_arguments(p):
    p.add_argument("sae_dir", help="an SAE folder (ours from `python -m precompute train`, SAELens's, sparsify's or "
                                   "dictionary_learning's) or hf:OWNER/REPO[/FOLDER]")
    p.add_argument("--format", choices=["saelens", "sae-lab"], default="saelens",
                   help="saelens: SAELens's cfg.json + sae_weights.safetensors; sae-lab: ours (an import)")
    p.add_argument("--out", required=True)


def run(args) -> int:
    if args.format == "sae-lab":
        sae = load_sae(args.sae_dir)
        save_sae(sae, args.out, training=sae.training_info)
        print(f"wrote {args.out}/sae.safetensors and {args.out}/config.json")
        return 0
    out = export_saelens(args.sae_dir, args.out)
    print(f"wrote {out}/cfg.json and {out}/sae_weights.safetensors")
    return 0
