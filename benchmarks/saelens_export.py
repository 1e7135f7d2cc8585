"""`python -m benchmarks saelens_export` (or `sae_train --check-export`): SAEs cross between SAELens and us.

Export: for each architecture, train a small SAE with `python -m precompute train` on planted-dictionary
data (d_in 64, 256 atoms, 4 active; width 256, k 8 but for relu, 50 steps), export it with
`python -m precompute export DIR --format saelens --out D2`, load D2 with SAELens's
`SAE.load_from_disk` in the SAELens venv, and compare its encode/decode with ours on 512 rows of the data.
Import: SAELens makes random SAEs of its inference classes (standard, topk, jumprelu; b_dec applied to
the input or not) and saves them with `save_model`; `sae_core.checkpoint.load_sae` loads each folder and
its encode/decode is compared with SAELens's own on the same rows.
Prints the max absolute differences; exits 1 if any exceeds 1e-4 or a load fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import argument_parser

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def train_args(arch: str, data: Path, out: Path) -> list[str]:
    """`python -m precompute` arguments of the export check's small SAE of architecture `arch`."""
    k = ["--k", "8"] if arch != "relu" else []  # train refuses --k for relu, which does not read it
    return ["train", "--activations", str(data), "--arch", arch, "--width", "256", *k, "--steps", "50",
            "--batch-size", "256", "--device", "cpu", "--out", str(out)]


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
    x_eval = x_all[-512:]  # any rows do for an equality of encode and decode
    np.save(work / "x.npy", x_eval)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows, ok = [], True
    for arch in archs:
        sae_dir, out = work / arch, work / f"{arch}_saelens"
        shutil.rmtree(sae_dir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        for cmd in (
            train_args(arch, data, sae_dir),
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
        (work / f"{arch}_spec.json").write_text(json.dumps(spec), encoding="utf-8")
        proc = subprocess.run([str(py), str(RUNNER), "export", str(work / f"{arch}_spec.json")], cwd=ROOT,
                              env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            ok = False
            last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            rows.append((arch, "load failed", last, "", ""))
            continue
        res = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
        dz, dx, same, passed = compare_codes(z_ours, x_hat_ours, np.load(spec["z_out"]), np.load(spec["x_hat_out"]))
        ok &= passed
        rows.append((arch, f"{res['class']} ({res['architecture']})", f"{dz:.2e}", f"{dx:.2e}", str(same)))
    print_codes_table(f"SAELens {saelens_version(py)}: SAE.load_from_disk on `python -m precompute export --format saelens`, "
           f"{len(x_eval)} rows, d_in 64, width 256", ["our arch", "loaded as"], rows)
    return 0 if ok else 1


def compare_codes(z, x_hat, z_ref, x_hat_ref) -> tuple[float, float, bool, bool]:
    """Max abs differences of codes and reconstructions, whether the active sets agree, and all within TOLERANCE."""
    dz, dx = float(np.abs(z - z_ref).max()), float(np.abs(x_hat - x_hat_ref).max())
    same = bool(((z != 0) == (z_ref != 0)).all())
    return dz, dx, same, dz <= TOLERANCE and dx <= TOLERANCE and same


def print_codes_table(title: str, first_columns: list[str], rows: list[tuple]) -> None:
    print(f"{title}\n")
    header = first_columns + ["max abs diff encode", "max abs diff decode(encode)", "same active set"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


IMPORT_CASES = [
    {"name": "standard", "class": "standard", "apply_b_dec_to_input": True},
    {"name": "standard_no_b_dec_in", "class": "standard", "apply_b_dec_to_input": False},
    {"name": "topk", "class": "topk", "apply_b_dec_to_input": True, "k": 8},
    {"name": "topk_no_b_dec_in", "class": "topk", "apply_b_dec_to_input": False, "k": 8},
    {"name": "jumprelu", "class": "jumprelu", "apply_b_dec_to_input": True},
    {"name": "jumprelu_no_b_dec_in", "class": "jumprelu", "apply_b_dec_to_input": False},
]


def check_import(work: Path) -> int:
    import torch

    from benchmarks.sae_train import RUNNER, _env, saelens_python, saelens_version
    from sae_core.checkpoint import load_sae

    py = saelens_python()
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    x_eval = (rng.standard_normal((512, 64)) * 2).astype(np.float32)
    np.save(work / "x_import.npy", x_eval)
    cases = [{**c, "d_sae": 256, "seed": i} for i, c in enumerate(IMPORT_CASES)]
    spec = {"x": str(work / "x_import.npy"), "out_root": str(work / "from_saelens"), "cases": cases,
            "result": str(work / "import_result.json")}
    shutil.rmtree(spec["out_root"], ignore_errors=True)
    (work / "import_spec.json").write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run([str(py), str(RUNNER), "make", str(work / "import_spec.json")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return 1
    made = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))["cases"]
    rows, ok = [], True
    for case in cases:
        info = made[case["name"]]
        folder = Path(info["folder"])
        try:
            sae = load_sae(folder)
        except Exception as e:  # noqa: BLE001 - the table reports any failure
            ok = False
            rows.append((case["name"], info["class"], "load failed", str(e)[:80], "", ""))
            continue
        with torch.no_grad():
            z = sae.encode(torch.from_numpy(x_eval))
            x_hat = sae.decode(z).numpy()
            z = z.numpy()
        dz, dx, same, passed = compare_codes(z, x_hat, np.load(folder / "z.npy"), np.load(folder / "x_hat.npy"))
        ok &= passed
        rows.append((case["name"], info["class"], sae.cfg.arch, f"{dz:.2e}", f"{dx:.2e}",
                     f"{same} ({(z != 0).mean():.3f} active)"))
    print_codes_table(f"\nSAELens {saelens_version(py)}: `save_model` of random SAEs, loaded with sae_core.checkpoint.load_sae, "
           f"{len(x_eval)} rows, d_in 64, width 256", ["SAELens SAE", "class", "loaded as"], rows)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argument_parser("saelens_export", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_sae_train" / "export_check")
    args = p.parse_args(argv)
    return check_export(args.work) | check_import(args.work)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
