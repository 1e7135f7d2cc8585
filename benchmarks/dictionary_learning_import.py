"""`python -m benchmarks dictionary_learning_import`: do dictionary_learning's SAEs load here as the same computation?

dictionary_learning is the library the Matryoshka SAE paper (Pach et al. 2025) trained with. On its first run
this installs dictionary-learning 0.1.0 and einops with `pip install --no-deps --target
.bench_venvs/dictionary_learning` (its SAE classes need only torch and einops; our torch is used). For each
class we load (MatryoshkaBatchTopKSAE, BatchTopKSAE, AutoEncoderTopK, AutoEncoder) it builds the library's own
module with random weights and a threshold that cuts, saves its state dict as `ae.safetensors` beside the
`config.json` its trainer writes, loads the folder with `sae_core.checkpoint.load_sae`, and compares encode
and decode(encode) with the library's on 512 rows. Prints the table; exits 1 if a difference exceeds 1e-4 (saelens_export's TOLERANCE).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from . import argument_parser

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / ".bench_venvs" / "dictionary_learning"
VERSION = "0.1.0"
D_IN, D_SAE, K = 64, 256, 8


def library_path() -> Path:
    """The folder holding dictionary_learning and einops, installed on first use."""
    if not (TARGET / "dictionary_learning" / "dictionary.py").is_file() or not (TARGET / "einops").is_dir():
        print(f"installing dictionary-learning {VERSION} and einops into {TARGET} (first run only) ...", file=sys.stderr)
        shutil.rmtree(TARGET, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(TARGET),
                        f"dictionary-learning=={VERSION}", "einops"], check=True)
    return TARGET


def check(work: Path) -> int:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import types

    # The package's __init__ imports nnsight (for its activation buffer), which the SAE classes never use:
    # register the package without running it, so that only the modules below are imported.
    root = library_path()
    sys.path.insert(0, str(root))
    for name in ("dictionary_learning", "dictionary_learning.trainers"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = pkg
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    from benchmarks.saelens_export import compare_codes, print_codes_table
    from sae_core.checkpoint import load_sae

    modules = {
        "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKSAE(D_IN, D_SAE, K, group_sizes=[32, 32, 64, 128]),
        "BatchTopKSAE": lambda: BatchTopKSAE(D_IN, D_SAE, K),
        "AutoEncoderTopK": lambda: AutoEncoderTopK(D_IN, D_SAE, K),
        "AutoEncoder": lambda: AutoEncoder(D_IN, D_SAE),
    }
    shutil.rmtree(work, ignore_errors=True)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((512, D_IN)).astype(np.float32) * 2)
    rows, ok = [], True
    for i, (name, make) in enumerate(modules.items()):
        torch.manual_seed(i)
        ae = make()
        with torch.no_grad():
            for p in ae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
            if hasattr(ae, "threshold"):
                ae.threshold.fill_(2.0)  # the pre-activations' spread is about 4.8: this cuts some
            z_ref = ae.encode(x)
            x_hat_ref = ae.decode(z_ref)
        folder = work / name
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(folder / "ae.safetensors"))
        (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": name, "k": K}}), encoding="utf-8")
        sae = load_sae(folder)
        with torch.no_grad():
            z = sae.encode(x)
            x_hat = sae.decode(z)
        dz, dx, same, passed = compare_codes(z.numpy(), x_hat.numpy(), z_ref.numpy(), x_hat_ref.numpy())
        ok &= passed
        rows.append((name, f"{sae.cfg.arch}" + (f" {list(sae.cfg.group_sizes)}" if sae.cfg.group_sizes else ""),
                     f"{dz:.2e}", f"{dx:.2e}", f"{same} ({float((z != 0).float().mean()):.3f} active)"))
    print_codes_table(f"dictionary_learning {VERSION}: random SAEs saved as ae.safetensors + config.json, loaded "
                      f"with sae_core.checkpoint.load_sae, {len(x)} rows, d_in {D_IN}, width {D_SAE}, k {K}",
                      ["dictionary_learning class", "loaded as"], rows)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argument_parser("dictionary_learning_import", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_dictionary_learning")
    return check(p.parse_args(argv).work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
