"""SAELens side of `python -m benchmarks sae_train`; runs ONLY under `.bench_venvs/saelens/bin/python`.

It imports nothing from this repository (the SAELens venv never sees our packages) and talks to the
benchmark through files:

    python _saelens_runner.py train SPEC.json   -> trains, writes RESULT.json and the held-out x_hat .npy
    python _saelens_runner.py export SPEC.json  -> loads our export with SAE.load_from_disk, writes z, x_hat
    python _saelens_runner.py make SPEC.json    -> saves random SAELens SAEs (save_model), writes their z, x_hat

API used (read from sae_lens 6.x source, sae_lens/saes/batchtopk_sae.py and training/sae_trainer.py):
`BatchTopKTrainingSAEConfig(k, d_in, d_sae, dtype, device)` with its defaults
(rescale_acts_by_decoder_norm=True, decoder_init_norm=0.1, aux_loss_coefficient=1.0,
topk_threshold_lr=0.01), `BatchTopKTrainingSAE.training_forward_pass(TrainStepInput(...))`, then what
`SAETrainer._train_step` does: backward, `clip_grad_norm_(params, 1.0)`, Adam step, zero_grad.
Inference: `save_inference_model` (BatchTopK -> JumpReLU with the learned threshold) and
`SAE.load_from_disk`, as a SAELens user would deploy it.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def batch_index(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Same rows as sae_core.activation_store.shuffled_batch_index(n_rows, batch_size, step, seed)."""
    per_epoch = n_rows // batch_size
    epoch, within = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    return perm[within * batch_size:(within + 1) * batch_size]


def lr_at(step: int, lr: float, steps: int, warmup: int, decay_start: int) -> float:
    """Same schedule as sae_core.training.TrainConfig.lr_at: linear warm-up, then linear decay to 0."""
    scale = 1.0
    if warmup and step < warmup:
        scale = (step + 1) / warmup
    if step >= decay_start and steps > decay_start:
        scale *= max(0.0, (steps - step) / (steps - decay_start))
    return lr * scale


def train(spec: dict) -> dict:
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    device = spec["device"]
    cuda = device.startswith("cuda")
    data = np.load(spec["data"], mmap_mode="r")
    held = np.load(spec["held_out_rows"])  # our trainer's held-out rows; SAELens trains on the others, as ours
    train_rows = np.setdiff1d(np.arange(data.shape[0]), held)  # = HeldOut.training_rows(arange(n_train))
    n_train = len(train_rows)
    init = np.load(spec["init_stats"])
    scale = float(init["scale"])  # the same input scale (E||x||^2 = d_in) and b_dec start as ours

    torch.manual_seed(spec["seed"])
    cfg = BatchTopKTrainingSAEConfig(k=spec["k"], d_in=data.shape[1], d_sae=spec["d_sae"], dtype="float32", device=device)
    sae = BatchTopKTrainingSAE(cfg).to(device)
    if spec.get("b_dec_init", "median") == "median":
        with torch.no_grad():
            sae.b_dec.copy_(torch.from_numpy(init["b_dec"]))
    opt = torch.optim.Adam(sae.parameters(), lr=spec["lr"], betas=(0.9, 0.999))
    # Dead latents: the same rule as our trainer (no firing within min(window, tokens so far)).
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.float64, device=device)
    tokens_seen, window = 0, spec.get("dead_window", 10_000_000)
    B = spec["batch_size"]

    step_times = []
    sae.train()
    for step in range(spec["steps"]):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        x = torch.from_numpy(data[train_rows[np.sort(batch_index(n_train, B, step, spec["seed"]))]]).to(device, torch.float32) * scale
        dead = since_fired >= min(window, tokens_seen) if tokens_seen > 0 else None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec["lr"], spec["steps"], spec["warmup"], spec["decay_start"])
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=step, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            fired = out.feature_acts.bool().any(0)
            since_fired += B
            since_fired[fired] = 0
        tokens_seen += B
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t)

    timed = step_times[spec["timing_skip"]:]
    result = {"tokens_per_s": B * len(timed) / sum(timed), "timed_steps": len(timed)}

    # BatchTopK mode (the training activation, k*B per chunk of B held-out rows): FVU at L0 = k.
    btk = []
    with torch.no_grad():
        for a in range(0, len(held), B):
            x = torch.from_numpy(np.asarray(data[held[a:a + B]])).to(device, torch.float32) * scale
            btk.append((sae.decode(sae.encode(x)) / scale).cpu().numpy())
    np.save(spec["x_hat_btk"], np.concatenate(btk))

    # Inference mode: the JumpReLU SAE SAELens saves for a trained BatchTopK SAE, loaded back.
    sae.eval()
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inf = SAE.load_from_disk(tmp, device=device)
    x_hat, active = [], 0
    with torch.no_grad():
        for a in range(0, len(held), 4096):
            x = torch.from_numpy(np.asarray(data[held[a:a + 4096]])).to(device, torch.float32) * scale
            z = inf.encode(x)
            active += int((z != 0).sum())
            x_hat.append((inf.decode(z) / scale).cpu().numpy())
    np.save(spec["x_hat"], np.concatenate(x_hat))
    result["l0"] = active / len(held)
    result["inference_architecture"] = inf.cfg.architecture()
    if cuda:
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def export(spec: dict) -> dict:
    """Load our SAELens export and encode/decode the given rows with SAELens."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(spec["export_dir"], device="cpu")
    x = torch.from_numpy(np.load(spec["x"])).float()
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z)
    np.save(spec["z_out"], z.numpy())
    np.save(spec["x_hat_out"], x_hat.numpy())
    return {"class": type(sae).__name__, "architecture": sae.cfg.architecture()}


def make(spec: dict) -> dict:
    """For each case, a SAELens SAE of that class with random weights (and thresholds), saved with
    `save_model` as a SAELens user would; its encode/decode of the given rows beside it."""
    import sae_lens

    x = torch.from_numpy(np.load(spec["x"])).float()
    out = {}
    for case in spec["cases"]:
        cls_name = {"standard": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE"}[case["class"]]
        cfg_kwargs = {"d_in": x.shape[1], "d_sae": case["d_sae"], "apply_b_dec_to_input": case["apply_b_dec_to_input"]}
        if case["class"] == "topk":
            cfg_kwargs["k"] = case["k"]
        sae = getattr(sae_lens, cls_name)(getattr(sae_lens, cls_name + "Config")(**cfg_kwargs))
        g = torch.Generator().manual_seed(case["seed"])
        with torch.no_grad():
            for name, p in sae.named_parameters():
                # thresholds near the pre-activations' spread (std about 4.8 here), so that they cut
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name != "threshold" else 3.0))
            if hasattr(sae, "threshold"):
                sae.threshold.abs_()
        folder = Path(spec["out_root"]) / case["name"]
        sae.save_model(folder)
        with torch.no_grad():
            z = sae.encode(x)
            x_hat = sae.decode(z)
        np.save(folder / "z.npy", z.numpy())
        np.save(folder / "x_hat.npy", x_hat.numpy())
        out[case["name"]] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                             "folder": str(folder)}
    return {"cases": out}


def main() -> int:
    mode, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = {"train": train, "export": export, "make": make}[mode](spec)
    import importlib.metadata

    result["sae_lens_version"] = importlib.metadata.version("sae-lens")
    result["torch_version"] = torch.__version__
    result["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
