"""`python -m benchmarks saelens_export` (or `sae_train --check-export`): does our SAELens export load in SAELens?

For each architecture: train a small SAE with `python -m precompute train` on planted-dictionary data
(d_in 64, 256 atoms, 4 active; width 256, k 8, 50 steps), export it with
`python -m precompute export DIR --format saelens --out D2`, load D2 with SAELens's
`SAE.load_from_disk` in the SAELens venv, and compare its encode/decode with ours on held-out rows.
Prints the max absolute differences; exits 1 if any exceeds 1e-4 or a load fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def check_export(work: Path, archs: tuple[str, ...] = ("batchtopk", "matryoshka", "topk", "relu")) -> int:
    import torch

    from benchmarks.sae_train import RUNNER, _env, saelens_python, saelens_version
    from sae_core.checkpoint import load_sae
    from sae_core.synthetic import planted_dictionary

    py = saelens_python()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "planted_d64.npy"
    x_all = planted_dictionary(4096, d=64, n_atoms=256, active=4, seed=0).x
    np.save(data, x_all)
    x_eval = x_all[-512:]  # train holds out the last 5% (204 rows); these include them and more
    np.save(work / "x.npy", x_eval)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows, ok = [], True
    for arch in archs:
        sae_dir, out = work / arch, work / f"{arch}_saelens"
        shutil.rmtree(sae_dir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        for cmd in (
            ["train", "--activations", str(data), "--arch", arch, "--width", "256", "--k", "8", "--steps", "50",
             "--batch-size", "256", "--device", "cpu", "--out", str(sae_dir)],
            ["export", str(sae_dir), "--format", "saelens", "--out", str(out)],
        ):
            subprocess.run([sys.executable, "-m", "precompute", *cmd], cwd=ROOT, env=env, check=True,
                           capture_output=True, text=True)
        sae = load_sae(sae_dir)
        with torch.no_grad():
            x = torch.from_numpy(x_eval)
            z_ours = sae.encode(x).numpy()
            x_hat_ours = sae.decode(sae.encode(x)).numpy()
        spec = {"export_dir": str(out), "x": str(work / "x.npy"), "z_out": str(work / f"{arch}_z.npy"),
                "x_hat_out": str(work / f"{arch}_xhat.npy"), "result": str(work / f"{arch}_result.json")}
        (work / f"{arch}_spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([str(py), str(RUNNER), "export", str(work / f"{arch}_spec.json")], cwd=ROOT,
                              env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            ok = False
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            rows.append((arch, "load failed", last, "", ""))
            continue
        res = json.loads(Path(spec["result"]).read_text())
        dz = float(np.abs(np.load(spec["z_out"]) - z_ours).max())
        dx = float(np.abs(np.load(spec["x_hat_out"]) - x_hat_ours).max())
        same_support = bool(((np.load(spec["z_out"]) != 0) == (z_ours != 0)).all())
        ok &= dz <= TOLERANCE and dx <= TOLERANCE and same_support
        rows.append((arch, f"{res['class']} ({res['architecture']})", f"{dz:.2e}", f"{dx:.2e}", str(same_support)))
    print(f"SAELens {saelens_version(py)}: SAE.load_from_disk on `python -m precompute export --format saelens`, "
          f"{len(x_eval)} rows, d_in 64, width 256\n")
    print("| our arch | loaded as | max abs diff encode | max abs diff decode(encode) | same active set |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks saelens_export", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_sae_train" / "export_check")
    args = p.parse_args(argv)
    return check_export(args.work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
