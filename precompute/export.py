"""`python -m precompute export DIR --format saelens|sae-lab --out D2`: write an SAE in another layout."""
from sae_core.checkpoint import export_sae_lab, export_saelens


def add_arguments(p):
    p.add_argument("sae_dir", help="an SAE folder (ours from `python -m precompute train`, SAELens's, sparsify's or "
                                   "dictionary_learning's) or hf:OWNER/REPO[/FOLDER]")
    p.add_argument("--format", choices=["saelens", "sae-lab"], default="saelens",
                   help="saelens: cfg.json + sae_weights.safetensors for SAE.load_from_disk of SAELens "
                        "5 or 6; sae-lab: ours (an import)")
    p.add_argument("--out", required=True, help="folder to write the exported SAE to")


def run(args) -> int:
    if args.format == "sae-lab":
        out = export_sae_lab(args.sae_dir, args.out)
        print(f"wrote {out}/sae.safetensors and {out}/config.json")
        return 0
    out = export_saelens(args.sae_dir, args.out)
    print(f"wrote {out}/cfg.json and {out}/sae_weights.safetensors")
    return 0
