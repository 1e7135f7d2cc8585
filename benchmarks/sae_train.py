"""`python -m benchmarks sae_train`: training speed, held-out FVU, L0 and peak memory, ours vs SAELens.

One run prints one markdown table. Every row trains on the same planted-dictionary activations
(saved once as .npy, read by every row), with the same batches, steps, learning rate and schedule,
in a fresh subprocess (so that its RSS high-water mark is its own):

- ours: `batchtopk` and `matryoshka` through `sae_core.training.train_sae` (fp32), and `batchtopk`
  with `TrainConfig(dtype="bfloat16")` (bf16 encoder matmul, fp32 master weights);
- SAELens: `BatchTopKTrainingSAE.training_forward_pass` + Adam, fp32, run by
  `benchmarks/_saelens_runner.py` in its own virtual environment `.bench_venvs/saelens` (created
  with `python -m venv` + `pip install sae-lens` on first use), so it never touches ours.

Columns:
- tokens/s: steady state, the training steps after the first `--timing-skip` ones (evaluation and
  set-up excluded);
- FVU: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 pooled over the held-out rows (the `--eval-rows`
  rows our `train` holds out, spread evenly over the file by `held_out_split`; every row trains on the
  others and none on these), computed here by one numpy function from the
  reconstructions each SAE makes in its inference mode (ours: per-latent thresholds; SAELens:
  its BatchTopK SAE in eval mode, i.e. the JumpReLU with its learned threshold);
- L0: mean active latents per held-out token, in inference mode;
- FVU at L0 = k: the same pooled FVU with the training activation instead (BatchTopK: the k*B largest
  activations of each chunk of B held-out rows), so every row is compared at exactly the same L0
  whatever state its inference threshold is in;
- peak RSS: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the row's subprocess (whole process:
  data, training and evaluation); on CUDA also `torch.cuda.max_memory_allocated`;
- roofline: tokens/s * (2*d*n + 8*k*d) FLOP per token / the faster of the fp32 and bf16 matmul
  peaks measured at the start of this run (2048^3 and the encoder's own B x d x n shape);
- vs SAELens: tokens/s divided by SAELens's tokens/s from this run.

`--check-export` instead trains a small SAE with `python -m precompute train`, exports it with
`python -m precompute export --format saelens`, loads it with SAELens's `SAE.load_from_disk` and
prints the max abs difference of encode/decode against ours.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from precompute.args import nonnegative_int, positive_int
from sae_core.errors import UserError

from . import argument_parser

ROOT = Path(__file__).resolve().parent.parent
SAELENS_VENV = ROOT / ".bench_venvs" / "saelens"
RUNNER = Path(__file__).resolve().parent / "_saelens_runner.py"
DEFAULT_WORK = ROOT / "runs" / "bench_sae_train"

# The benchmark setting of issue 2: CLIP ViT-L/14 width, expansion 16, k 32.
D_IN, EXPANSION, K = 1024, 16, 32
# Planted dictionary: 8192 unit-norm atoms (half the SAE width, so a good SAE can hold all of them),
# 32 active per row (= k), coefficients in [1, 3], noise 0.05, offset 2.0 (planted_dictionary's defaults).
N_ATOMS, ACTIVE = 8192, 32


# ------------------------------------------------------------------------------------------- data
def make_activations(path: Path, n_rows: int, seed: int = 0) -> None:
    """Planted-dictionary rows x = s @ D + noise + offset (float32), written once to `path`."""
    from sae_core.activation_store import save_npy_atomic
    from sae_core.synthetic import planted_dictionary

    save_npy_atomic(path, planted_dictionary(n_rows, d=D_IN, n_atoms=N_ATOMS, active=ACTIVE, seed=seed).x)


def pooled_fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows (float64): the one FVU of every row."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def write_held_out_rows(data: Path, eval_rows: int, path: Path) -> np.ndarray:
    """The rows our trainer holds out of `data` (`held_out_split`), saved to `path` for the SAELens row,
    which trains on the others and is evaluated on these, as ours is. (The benchmark took the file's last
    rows until 2026-12-05, of which `train`, holding out rows spread over the file, had trained on 7 in 8.)"""
    from sae_core.activation_store import ActivationStore, held_out_split

    rows = held_out_split(ActivationStore(data), eval_rows).held_out_rows()
    np.save(path, rows)
    return rows


def write_init_stats(data: Path, eval_rows: int, path: Path) -> Path:
    """Our trainer's input scale and b_dec start (same rows, same seed), handed to the SAELens row.

    SAELens 6 starts b_dec at zero and has no data-dependent option; giving it the same geometric
    median as ours keeps the FVU comparison about the trainers rather than about the offset of the
    data (whose mean is 2.0 per dimension) after only a few dozen steps.
    """
    from sae_core.activation_store import ActivationStore, held_out_split
    from sae_core.training import TrainConfig, _init_stats

    store = ActivationStore(data)
    scale, b_dec = _init_stats(store, held_out_split(store, eval_rows), TrainConfig(steps=1))
    np.savez(path, scale=np.float64(scale), b_dec=b_dec.numpy())
    return path


# ----------------------------------------------------------------------------------- matmul peak
def matmul_peak(device: str, batch: int, d: int, n: int, reps: int = 5, dtypes=("float32", "bfloat16")) -> dict:
    """Best GFLOP/s of fp32 and bf16 matmuls: 2048^3 and the encoder's (B, d) @ (d, n)."""
    import torch

    out = {}
    for dtype in dtypes:
        best = 0.0
        for m, kk, nn in ((2048, 2048, 2048), (batch, d, n)):
            a = torch.randn(m, kk, device=device).to(getattr(torch, dtype))
            b = torch.randn(kk, nn, device=device).to(getattr(torch, dtype))
            a @ b  # warm-up
            for _ in range(reps):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                a @ b
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = max(best, 2 * m * kk * nn / (time.perf_counter() - t) / 1e9)
            del a, b
        out[dtype] = best
    return out


# --------------------------------------------------------------------------------- our trainer
def run_ours(spec: dict) -> dict:
    """One of our rows, inside its own subprocess: train, then reconstruct the held-out rows."""
    import torch

    from sae_core.activation_store import ActivationStore
    from sae_core.checkpoint import load_sae
    from sae_core.sae import SAEConfig, batchtopk_codes, matryoshka_group_sizes
    from sae_core.sparse_ops import dense_codes
    from sae_core.training import TrainConfig, train_sae

    store = ActivationStore(spec["data"])
    d_sae = spec["d_sae"]
    groups = matryoshka_group_sizes(None, d_sae) if spec["arch"] == "matryoshka" else ()
    sae_cfg = SAEConfig(arch=spec["arch"], d_in=store.d, d_sae=d_sae, k=spec["k"], group_sizes=groups)
    cfg = TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"], warmup=spec["warmup"],
                      decay_start=spec["decay_start"], seed=spec["seed"], dtype=spec["dtype"], eval_rows=spec["eval_rows"])
    out_dir = Path(spec["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)
    train_sae(store, sae_cfg, cfg, out_dir, device=spec["device"], log_every=1, progress=False,
              checkpoint_seconds=float("inf"))
    # Steady-state speed from the per-step log (log_every=1: each row times exactly one step).
    with open(out_dir / "train_log.csv", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) > spec["timing_skip"]]
    tokens = sum(spec["batch_size"] for _ in rows)
    seconds = sum(spec["batch_size"] / float(r["tokens_per_s"]) for r in rows)

    sae = load_sae(out_dir, device=spec["device"])  # the saved (raw-input, inference-mode) SAE
    held = np.load(spec["held_out_rows"])
    x_hat, active = [], 0
    with torch.no_grad():
        for a in range(0, len(held), 4096):
            x = torch.from_numpy(store.take(held[a:a + 4096])).to(spec["device"], torch.float32)
            z = sae.encode(x)
            active += int((z != 0).sum())
            x_hat.append(sae.decode(z).cpu().numpy())
    np.save(spec["x_hat"], np.concatenate(x_hat))
    # BatchTopK mode (the training activation, k*B per chunk of B held-out rows): FVU at L0 = k.
    btk = []
    with torch.no_grad():
        for a in range(0, len(held), spec["batch_size"]):
            x = torch.from_numpy(store.take(held[a:a + spec["batch_size"]])).to(spec["device"], torch.float32)
            acts = sae.pre_acts(x).clamp_min_(0)
            codes, _ = batchtopk_codes(acts, sae.cfg.k, distributed=False)
            btk.append(sae.decode(dense_codes(acts[codes.row, codes.col], codes, sae.cfg.d_sae)).cpu().numpy())
    np.save(spec["x_hat_btk"], np.concatenate(btk))
    result = {"tokens_per_s": tokens / seconds, "timed_steps": len(rows), "l0": active / len(held)}
    if spec["device"].startswith("cuda"):
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = run_ours(spec)
    result["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------- SAELens
def saelens_python(quiet: bool = False) -> Path:
    """The SAELens venv's python, creating the venv and installing sae-lens on first use."""
    py = SAELENS_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import sae_lens"], capture_output=True).returncode == 0
    if not ok:
        print(f"installing sae-lens into {SAELENS_VENV} (first run only) ...", file=sys.stderr)
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(SAELENS_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "sae-lens"], check=True,
                       stdout=subprocess.DEVNULL if quiet else None)
    return py


def saelens_version(py: Path) -> str:
    return subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('sae-lens'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return env


def run_row(kind: str, spec: dict, work: Path, py_saelens: Path | None) -> dict:
    """Run one row in a fresh subprocess and return its result JSON."""
    name = spec["name"]
    spec = {**spec, "result": str(work / f"{name}.json"), "x_hat": str(work / f"{name}.xhat.npy"),
            "x_hat_btk": str(work / f"{name}.xhat_btk.npy"),
            "out_dir": str(work / name)}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    if kind == "ours":
        cmd = [sys.executable, "-m", "benchmarks.sae_train", "--worker", str(spec_path)]
    else:
        cmd = [str(py_saelens), str(RUNNER), "train", str(spec_path)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env() if kind == "saelens" else {**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"row {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - t
    result["x_hat_path"], result["x_hat_btk_path"] = spec["x_hat"], spec["x_hat_btk"]
    return result


# ---------------------------------------------------------------------------------------- table
def _fmt_mem(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def print_table(results: list[dict], peak: dict, flop_per_token: float, base: str, gpu: bool) -> None:
    peak_best = max(peak.values())
    base_tps = next((r["tokens_per_s"] for r in results if r["name"] == base), None)
    head = ["trainer", "dtype", "tokens/s", "held-out FVU", "L0", "FVU at L0 = k", "peak RSS"]
    if gpu:
        head.append("GPU peak")
    head += ["roofline", "vs SAELens"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * len(head)) + "|")
    for r in results:
        cells = [r["label"], r["dtype"], f"{r['tokens_per_s']:,.0f}", f"{r['fvu']:.4f}", f"{r['l0']:.1f}",
                 f"{r['fvu_btk']:.4f}", _fmt_mem(r["maxrss_bytes"])]
        if gpu:
            cells.append(_fmt_mem(r.get("gpu_peak_bytes", float("nan"))))
        cells.append(f"{r['tokens_per_s'] * flop_per_token / (peak_best * 1e9):.1%}")
        cells.append(f"{r['tokens_per_s'] / base_tps:.2f}x" if base_tps else "n/a")
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argument_parser("sae_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=positive_int, help="training steps per row (default 40 on CPU, 1000 on CUDA)")
    p.add_argument("--batch-size", type=positive_int, default=4096)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rows", type=positive_int, help="activation rows in the .npy, held-out rows included "
                   "(default 65,536 + eval rows on CPU, 262,144 + eval rows on CUDA)")
    p.add_argument("--eval-rows", type=positive_int, default=8192, help="held-out rows, spread over the file as `precompute train` holds them out")
    p.add_argument("--timing-skip", type=nonnegative_int, help="first steps left out of tokens/s (default max(3, steps/10))")
    p.add_argument("--lr", type=float, default=2e-4, help="same for every row (default: our default_lr at width 16,384)")
    p.add_argument("--expansion", type=positive_int, default=EXPANSION)
    p.add_argument("--k", type=positive_int, default=K)
    p.add_argument("--only", help="comma-separated subset of rows: batchtopk,matryoshka,batchtopk_bf16,saelens")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder for the data, SAEs and row results")
    p.add_argument("--check-export", action="store_true",
                   help="instead: check that our SAELens export loads in SAELens and matches our encode/decode")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if args.check_export:
        from benchmarks.saelens_export import check_export

        return check_export(args.work / "export_check")

    gpu = args.device == "cuda"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available here; use --device cpu.")
    steps = args.steps or (1000 if gpu else 40)
    skip = args.timing_skip if args.timing_skip is not None else max(3, steps // 10)
    # refused in benchmarks' one "error:" line, and before the data is written (the rows' check came after it)
    if skip >= steps:
        raise UserError(f"--timing-skip {skip} leaves no timed steps out of --steps {steps}; give a --timing-skip "
                        f"below {steps}.")
    n_rows = args.rows or ((262_144 if gpu else 65_536) + args.eval_rows)
    if n_rows - args.eval_rows < args.batch_size:
        raise UserError(f"--rows {n_rows} leaves {max(n_rows - args.eval_rows, 0)} training rows after the "
                        f"--eval-rows {args.eval_rows}, fewer than one batch of {args.batch_size}; give more --rows "
                        "or a smaller --batch-size.")
    d_sae = D_IN * args.expansion
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"planted_d{D_IN}_a{N_ATOMS}_s{ACTIVE}_n{n_rows}.npy"
    if not data.exists():
        print(f"writing {n_rows:,} planted-dictionary rows to {data} ...", file=sys.stderr)
        make_activations(data, n_rows)

    held_path = work / f"{data.stem}_held_out_{args.eval_rows}.npy"
    held_rows = write_held_out_rows(data, args.eval_rows, held_path)
    common = {"data": str(data), "held_out_rows": str(held_path), "d_sae": d_sae, "k": args.k, "steps": steps, "batch_size": args.batch_size,
              "lr": args.lr, "warmup": min(1000, steps // 20), "decay_start": int(0.8 * steps), "seed": 0,
              "eval_rows": args.eval_rows, "timing_skip": skip, "device": args.device}
    plan = [
        ("batchtopk", "ours", "ours batchtopk", {"arch": "batchtopk", "dtype": "float32"}),
        ("matryoshka", "ours", "ours matryoshka", {"arch": "matryoshka", "dtype": "float32"}),
        ("batchtopk_bf16", "ours", "ours batchtopk", {"arch": "batchtopk", "dtype": "bfloat16"}),
        ("saelens", "saelens", "SAELens BatchTopK", {"arch": "batchtopk", "dtype": "float32"}),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        plan = [row for row in plan if row[0] in wanted]
    import torch

    from sae_core.precision import slow_half_reason

    bf16_note = slow_half_reason(args.device, torch.bfloat16)
    if bf16_note and not args.only:
        plan = [row for row in plan if row[3]["dtype"] != "bfloat16"]
        print(f"skipping the bf16 row: {bf16_note}; `--only batchtopk_bf16` runs it anyway.", file=sys.stderr)
    py_saelens = saelens_python() if any(kind == "saelens" for _, kind, _, _ in plan) else None
    version = saelens_version(py_saelens) if py_saelens else None
    if py_saelens:
        common["init_stats"] = str(write_init_stats(data, args.eval_rows, work / "init_stats.npz"))

    print(f"measuring the matmul peak on {args.device} ...", file=sys.stderr)
    bf16_rows = any(row[3]["dtype"] == "bfloat16" for row in plan)
    peak = matmul_peak(args.device, args.batch_size, D_IN, d_sae,
                       dtypes=("float32",) if bf16_note and not bf16_rows else ("float32", "bfloat16"))
    held_out = np.load(data, mmap_mode="r")[held_rows]
    results = []
    for name, kind, label, extra in plan:
        print(f"row {name}: {steps} steps of {args.batch_size} ...", file=sys.stderr)
        r = run_row(kind, {**common, **extra, "name": name}, work, py_saelens)
        r["fvu"] = pooled_fvu(np.asarray(held_out), np.load(r["x_hat_path"]))
        r["fvu_btk"] = pooled_fvu(np.asarray(held_out), np.load(r["x_hat_btk_path"]))
        r.update(name=name, label=label + (f" {version}" if kind == "saelens" else ""), dtype=extra["dtype"])
        results.append(r)
        print(f"  {r['tokens_per_s']:,.0f} tokens/s, FVU {r['fvu']:.4f}, L0 {r['l0']:.1f}, "
              f"FVU at L0 = k {r['fvu_btk']:.4f}, "
              f"wall {r['wall_s']:.0f} s", file=sys.stderr)

    flop = 2 * D_IN * d_sae + 8 * args.k * D_IN
    print(f"\nSAE training on {args.device}: d_in {D_IN}, width {d_sae:,}, k {args.k}, batch {args.batch_size:,}, "
          f"{steps} steps (tokens/s over steps {skip + 1}..{steps}), lr {args.lr:g} with warm-up {common['warmup']} "
          f"and linear decay from step {common['decay_start']}, Adam (0.9, 0.999), grad clip 1.0.")
    print(f"Data: {n_rows - args.eval_rows:,} training + {args.eval_rows:,} held-out planted-dictionary rows "
          f"({N_ATOMS} unit-norm atoms, {ACTIVE} active, coefficients U[1,3], noise 0.05, offset 2), {data.name}.")
    bf16_peak = f"{peak['bfloat16']:,.0f} GFLOP/s" if "bfloat16" in peak else f"not measured ({bf16_note})"
    print(f"Matmul peak: fp32 {peak['float32']:,.0f} GFLOP/s, bf16 {bf16_peak}; roofline = "
          f"tokens/s x {flop / 1e6:.1f} MFLOP/token (2dn + 8kd) / {max(peak.values()):,.0f} GFLOP/s.\n")
    print_table(results, peak, flop, "saelens", gpu)
    loose = [r["label"] for r in results if r["l0"] > 2 * args.k]
    if loose:
        print(f"\nL0 above 2k for {', '.join(loose)}: its inference threshold has not converged in {steps} steps "
              "(SAELens: one global threshold, an EMA with rate 0.01 of each batch's smallest kept activation, "
              "starting at 0), so its FVU is that of a much denser code.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
