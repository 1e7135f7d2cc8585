"""`python -m precompute export DIR --format saelens|sae-lab --out D2`: write an SAE in another layout."""
from pathlib import Path

from sae_core.checkpoint import export_sae_lab, export_saelens
from sae_core.errors import UserError

from .args import out_folder


def add_arguments(p):
    p.add_argument("sae_dir", nargs="?", help="an SAE folder (ours from `python -m precompute train`, SAELens's, "
                                              "sparsify's or dictionary_learning's) or hf:OWNER/REPO[/FOLDER]")
    p.add_argument("--sae", help="the same as SAE_DIR, as `atlas` and `steer` take it")
    p.add_argument("--format", choices=["saelens", "sae-lab"], default="saelens",
                   help="saelens: cfg.json + sae_weights.safetensors for SAE.load_from_disk of SAELens "
                        "5 or 6; sae-lab: ours (an import)")
    p.add_argument("--out", required=True, help="folder to write the exported SAE to")


def run(args) -> int:
    if (args.sae_dir is None) == (args.sae is None):
        raise UserError("give the SAE to export once: `export DIR --out D2` or `export --sae DIR --out D2`" +
                        ("" if args.sae is None else f", not both ({args.sae_dir} and {args.sae})") + ".")
    sae = args.sae if args.sae is not None else args.sae_dir
    # an earlier export (an SAE folder) may be replaced; the SAE went beside an extraction's stores or into a
    # world's or a training run's folder before
    out_folder(Path(args.out), "the exported SAE", writes=("sae",))
    if args.format == "sae-lab":
        out = export_sae_lab(sae, args.out)
        print(f"wrote {out}/sae.safetensors and {out}/config.json")
        return 0
    out = export_saelens(sae, args.out)
    print(f"wrote {out}/cfg.json and {out}/sae_weights.safetensors")
    return 0
