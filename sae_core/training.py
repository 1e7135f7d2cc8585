"""SAE training loop: scaled inputs, Adam with warm-up/decay, AuxK, resumable checkpoints, DDP."""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .activation_store import (ActivationStore, HeldOut, check_batch_size, held_out_split, last_rows_split,
                               shuffled_batch_index)
from .atomic import atomic_path, first_difference, remove_stale_temporaries, write_json_atomic
from .checkpoint import save_sae
from .distributed import DistInfo, barrier
from .errors import UserError, is_count, write_failure
from .metrics import MetricsAccumulator
from .precision import resolve_device
from .progress import progress_bar
from .sae import (K_ARCHS, THRESHOLD_ARCHS, TRAINABLE_ARCHS, SAEConfig, SparseAutoencoder, _all_reduce, _world_size,
                  default_lr, geometric_median)

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

LOG_COLUMNS = ["step", "tokens", "loss", "recon_loss", "aux_loss", "sparsity_loss", "fvu", "l0", "dead_fraction", "lr", "tokens_per_s"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train; everything that changes the resulting weights is in here (resume checks it)."""

    steps: int
    batch_size: int = 4096
    lr: float | None = None
    """None: 2e-4 / sqrt(width / 2^14)."""
    warmup: int | None = None
    """Linear warm-up steps; None: min(1000, steps // 20)."""
    decay_start: int | None = None
    """Step where a linear decay to 0 begins; None: 80% of the run; `steps` disables the decay."""
    seed: int = 0
    dtype: str = "float32"
    """Compute dtype of the dense encoder matmul (float32 or bfloat16); master weights stay fp32."""
    grad_clip: float = 1.0
    dead_window: int = 10_000_000
    """A latent is dead when it has not fired in this many tokens (or in the whole run so far)."""
    eval_rows: int | None = None
    """Held-out rows, whole images spread over the store (`held_out_split`); None: 5%, at most 65,536."""
    init_rows: int = 16_384
    """Rows used to estimate the input scale and the geometric median that starts b_dec."""

    def resolved(self, d_sae: int) -> "TrainConfig":
        if not (is_count(self.steps) and is_count(self.batch_size)):  # 2.5 was "does not split evenly"
            raise UserError(f"--steps ({self.steps}) and --batch-size ({self.batch_size}) must be whole numbers from 1.")
        if self.eval_rows is not None and not is_count(self.eval_rows):  # 0 was "too few to hold out 0 rows"
            raise UserError(f"eval_rows={self.eval_rows!r} must be a whole number of held-out rows from 1 (None: 5%).")
        if self.lr is not None and not (isinstance(self.lr, (int, float, np.floating)) and not isinstance(self.lr, bool)
                                        and math.isfinite(self.lr) and self.lr > 0):  # torch's ValueError, late
            raise UserError(f"--lr {self.lr!r} must be a number above 0.")
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not supported; use one of {', '.join(COMPUTE_DTYPES)}.")
        lr = self.lr if self.lr is not None else default_lr(d_sae)
        steps = int(self.steps)  # numbers of JSON's types from here, not numpy's: the run's config is saved
        warmup = int(self.warmup) if self.warmup is not None else min(1000, steps // 20)
        decay = int(self.decay_start) if self.decay_start is not None else int(0.8 * steps)
        return TrainConfig(**{**asdict(self), "steps": steps, "batch_size": int(self.batch_size), "lr": float(lr),
                              "warmup": warmup, "decay_start": decay,
                              "eval_rows": None if self.eval_rows is None else int(self.eval_rows)})

    def lr_at(self, step: int) -> float:
        scale = 1.0
        if self.warmup and step < self.warmup:
            scale = (step + 1) / self.warmup
        if step >= self.decay_start and self.steps > self.decay_start:
            scale *= max(0.0, (self.steps - step) / (self.steps - self.decay_start))
        return self.lr * scale


class _TrainingStep(nn.Module):
    """Wraps the SAE so that DDP sees the training forward as `forward`."""

    def __init__(self, sae: SparseAutoencoder, compute_dtype: torch.dtype):
        super().__init__()
        self.sae, self.compute_dtype = sae, compute_dtype

    def forward(self, x: Tensor, dead_mask: Tensor | None):
        return self.sae.training_forward(x, dead_mask, self.compute_dtype)


def finite_rows(rows: np.ndarray, row_ids: np.ndarray, store: ActivationStore) -> np.ndarray:
    """`rows` (store rows `row_ids`), or one sentence naming the first that holds NaN or inf: a single such
    row turns every weight of the SAE NaN within one step (and the metrics into invalid JSON)."""
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        raise UserError(f"activation row {int(row_ids[~finite].min())} of {store.path} holds NaN or infinite values "
                        f"({int((~finite).sum())} of {len(rows)} rows read together); extract the activations again "
                        "(float16 overflows past 65,504: extract in float32).")
    return rows


def _init_stats(store: ActivationStore, split: HeldOut, cfg: TrainConfig) -> tuple[float, Tensor]:
    """Input scale c with E||c x||^2 = d_in, and the geometric median of the scaled sample (training rows)."""
    rng = np.random.default_rng([cfg.seed, 1])
    idx = split.training_rows(np.sort(rng.choice(split.n_train, size=min(cfg.init_rows, split.n_train), replace=False)))
    sample = torch.from_numpy(finite_rows(store.take(idx), idx, store)).double()
    mean_sq = sample.pow(2).sum(1).mean().item()
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise UserError("the activations are all zero or not finite; check the extraction (layer, dtype overflow).")
    scale = math.sqrt(store.d / mean_sq)
    return scale, geometric_median(sample * scale)


class _Checkpoint:
    """Everything a resumed run needs, in `DIR/checkpoint/` (tensors in safetensors, the rest JSON).

    The JSON (step, tokens, scale, run config) travels inside the safetensors header, so that one rename
    publishes weights and step together: with two files, a kill between their renames paired new weights
    with the previous step, and the resumed run replayed steps on weights that had already taken them.
    `state.json` is a readable copy written after it.
    """

    def __init__(self, out_dir: Path):
        self.dir = out_dir / "checkpoint"
        self.tensors, self.meta = self.dir / "state.safetensors", self.dir / "state.json"

    def exists(self) -> bool:
        return self.tensors.exists() and (self.meta.exists() or self._embedded_meta() is not None)

    def _embedded_meta(self) -> dict | None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.tensors), "pt") as f:
                text = (f.metadata() or {}).get("meta")
        except Exception:  # unreadable: load() names it
            return None
        return json.loads(text) if text else None

    def read_meta(self) -> dict:
        """The step, tokens, scale and run config the weights belong to (a checkpoint written before the
        header carried them falls back to state.json)."""
        try:
            meta = self._embedded_meta()
            return meta if meta is not None else json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"the checkpoint in {self.dir} cannot be read ({e}); delete that folder to start the "
                            "run over.") from None

    def save(self, sae, opt, tracker: Tensor, meta: dict) -> None:
        tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
        params = dict(sae.named_parameters())
        for name, p in params.items():
            st = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    tensors[f"adam.{name}.{key}"] = torch.as_tensor(st[key]).detach().cpu().reshape(-1).contiguous()
        tensors["tokens_since_fired"] = tracker.cpu().contiguous()
        with atomic_path(self.tensors) as tmp:
            save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
        write_json_atomic(self.meta, meta)

    def load(self, sae, opt, device) -> Tensor:
        try:
            t = load_file(str(self.tensors))
        except Exception as e:
            raise UserError(f"the checkpoint in {self.dir} cannot be read ({e}); delete that folder to start the "
                            "run over.") from None
        sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
        for name, p in sae.named_parameters():
            if f"adam.{name}.exp_avg" in t:
                opt.state[p] = {
                    "step": t[f"adam.{name}.step"].reshape(()).clone(),
                    "exp_avg": t[f"adam.{name}.exp_avg"].reshape(p.shape).to(device),
                    "exp_avg_sq": t[f"adam.{name}.exp_avg_sq"].reshape(p.shape).to(device),
                }
        return t["tokens_since_fired"].to(device)


def run_difference(then: dict, now: dict) -> str | None:
    """The first setting in which two run configs differ, as "NAME: THEN there, NOW now", or None."""
    if isinstance(then.get("data"), dict) and isinstance(now.get("data"), dict):
        # a run recorded before the data's identity held a field (`content`, 2026-12-05) is held to the rest
        now = {**now, "data": {k: v for k, v in now["data"].items() if k in then["data"]}}
    found = first_difference(then, now)
    # the data's identity is a digest: say first that it is the activations that differ
    return f"other activations, {found}" if found and found.startswith("data.") else found


def finished_run_difference(config: dict, store: ActivationStore, sae_cfg: SAEConfig, cfg: TrainConfig) -> str | None:
    """How the finished SAE described by `config` (its config.json) was trained otherwise than this command
    would train it, as "NAME: THEN there, NOW now", or None. Settings the file does not record (an SAE from
    an older version, or imported) are not compared; the number of processes is not either, since it
    changes the weights only by rounding."""
    now_sae = sae_cfg.to_dict()
    now_train = {**asdict(cfg.resolved(sae_cfg.d_sae)), "data": store.identity()}
    then_train = config.get("training") or {}
    then = {**{k: config[k] for k in now_sae if k in config},
            **{k: then_train[k] for k in now_train if k in then_train}}
    now = json.loads(json.dumps({**now_sae, **{k: v for k, v in now_train.items() if k in then_train}}))
    return run_difference(then, {k: v for k, v in now.items() if k in then})


def _open_logger(kind: str | None, out_dir: Path, run_config: dict):
    """W&B or TensorBoard only when asked for; returns a function (step, dict) -> None."""
    if kind is None:
        return lambda step, row: None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log tensorboard needs the tensorboard package; run `pip install tensorboard`.") from None
        writer = SummaryWriter(str(out_dir / "tensorboard"))
        return lambda step, row: [writer.add_scalar(k, v, step) for k, v in row.items()]
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise UserError("--log wandb needs the wandb package; run `pip install wandb`.") from None
        run = wandb.init(project="sae-lab", config=run_config, dir=str(out_dir))
        return lambda step, row: run.log(row, step=step)
    raise UserError(f"--log {kind!r} is not supported; use wandb or tensorboard.")


def _log_rows_until(path: Path, step: int) -> None:
    """Keep only CSV rows up to `step`, so that a resumed run does not log steps twice."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def train_sae(
    store: ActivationStore,
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    dist_info: DistInfo = DistInfo(0, 1, 0),
    device: str = "cpu",
    checkpoint_every: int | None = None,
    checkpoint_seconds: float = 300.0,
    log_every: int = 10,
    logger: str | None = None,
    training_info: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume training) an SAE on `store`; write sae.safetensors, config.json, metrics.json.

    Returns the held-out metrics. Under torchrun each process reads its slice of every global batch.
    """
    out_dir = Path(out_dir)
    device = resolve_device(device, "device")  # "cuda" without a GPU was torch's error at the first step
    if sae_cfg.arch not in TRAINABLE_ARCHS:
        raise UserError(f"a {sae_cfg.arch} SAE cannot be trained here; choose one of {', '.join(TRAINABLE_ARCHS)}.")
    cfg = cfg.resolved(sae_cfg.d_sae)
    if cfg.dtype != "float32" and sae_cfg.arch not in K_ARCHS:  # as the command refuses --dtype (until 2026-12-05
        # a library caller's relu trained in float32 while its config.json said bfloat16)
        raise UserError(f"dtype {cfg.dtype} applies to the {' / '.join(K_ARCHS)} SAEs, not {sae_cfg.arch}, which "
                        "trains in float32; train it with dtype float32.")
    if sae_cfg.d_in != store.d:
        raise UserError(f"the SAE expects d_in={sae_cfg.d_in} but the activations have width {store.d}.")
    ckpt = _Checkpoint(out_dir)
    meta = ckpt.read_meta() if ckpt.exists() else None
    held = meta["run_config"].get("held_out") if meta is not None else None
    if meta is not None and (held is None or held.get("period") == 0):
        # a checkpoint from before the spread split, or one a resumed such run wrote: it resumes as it began
        # (the second resume of one was refused until 2026-12-05, its checkpoint recording period 0)
        split = last_rows_split(len(store), cfg.eval_rows)
    else:
        split = held_out_split(store, cfg.eval_rows)
    # before the statistics pass, the progress bar and the log file (it was found at the first batch, after them)
    check_batch_size(split.n_train, cfg.batch_size, dist_info.world_size)
    run_config = {"sae": sae_cfg.to_dict(), "train": asdict(cfg), "world_size": dist_info.world_size, "rows": len(store),
                  "data": store.identity(), "held_out": split.to_dict()}
    compute_dtype = COMPUTE_DTYPES[cfg.dtype]

    sae = SparseAutoencoder(sae_cfg, seed=cfg.seed).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    tracker = torch.zeros(sae_cfg.d_sae, dtype=torch.float64, device=device)  # tokens since each latent fired
    start, tokens_seen = 0, 0
    if meta is not None:
        # compared before anything is loaded: another width's tensors do not fit this SAE
        now = json.loads(json.dumps(run_config))
        for key in ("data", "held_out"):  # a checkpoint from before these were recorded
            if key not in meta["run_config"]:
                now.pop(key)
        differs = run_difference(meta["run_config"], now)
        if differs:
            raise UserError(
                f"{out_dir} holds a checkpoint of a different run ({differs}); use the same arguments and data to "
                "resume, a new --out directory, or delete its checkpoint/ folder to start over."
            )
        tracker = ckpt.load(sae, opt, device)
        start, tokens_seen, scale = meta["step"], meta["tokens"], meta["scale"]
    else:
        scale, b_dec = _init_stats(store, split, cfg)
        with torch.no_grad():
            sae.b_dec.copy_(b_dec)
    step_module = _TrainingStep(sae, compute_dtype)
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, broadcast_buffers=False)

    log_path = out_dir / "train_log.csv"
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _log_rows_until(log_path, start)
    remote_log = _open_logger(logger, out_dir, run_config) if dist_info.is_main else (lambda s, r: None)

    global_batch = cfg.batch_size

    def load_batch(step: int) -> Tensor:
        idx = split.training_rows(shuffled_batch_index(split.n_train, global_batch, step, cfg.seed, dist_info.rank,
                                                       dist_info.world_size))
        rows = finite_rows(store.take(idx), idx, store)  # in the reader thread, before a step
        return torch.from_numpy(rows).to(device=device, dtype=torch.float32)

    bar = progress_bar(total=cfg.steps, initial=start, desc=f"train {sae_cfg.arch}", unit="step",
                       disable=not (progress and dist_info.is_main), dynamic_ncols=True)
    last_ckpt_time, window_t0, window_tokens = time.monotonic(), time.perf_counter(), 0
    checkpoint_failed = False  # said once
    pool = ThreadPoolExecutor(max_workers=1)  # reads the next batch while this one trains
    pending = pool.submit(load_batch, start) if start < cfg.steps else None
    log_file = open(log_path, "a", newline="", encoding="utf-8") if dist_info.is_main else None
    writer = csv.DictWriter(log_file, fieldnames=LOG_COLUMNS) if log_file else None
    if writer and log_path.stat().st_size == 0:
        writer.writeheader()
    sae.train()
    try:
        for step in range(start, cfg.steps):
            x = pending.result() * scale
            pending = pool.submit(load_batch, step + 1) if step + 1 < cfg.steps else None
            dead_mask = tracker >= min(cfg.dead_window, tokens_seen) if tokens_seen > 0 else None
            out = step_module(x, dead_mask)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
            lr = cfg.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            sae.normalize_decoder()
            with torch.no_grad():
                fired = _all_reduce(out.fired.to(torch.float32), torch.distributed.ReduceOp.MAX) > 0
                tracker += global_batch
                tracker[fired] = 0
            tokens_seen += global_batch
            window_tokens += global_batch
            bar.update(1)

            done = step + 1
            if done % log_every == 0 or done == cfg.steps:
                row = _log_row(x, out, done, tokens_seen, tracker, cfg, lr, window_tokens / (time.perf_counter() - window_t0))
                window_t0, window_tokens = time.perf_counter(), 0
                if writer:
                    writer.writerow(row)
                    log_file.flush()
                    remote_log(done, row)
                bar.set_postfix(tok_s=f"{row['tokens_per_s']:.0f}", fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}",
                                dead=f"{100 * row['dead_fraction']:.1f}%", refresh=False)  # drawn by the next update
            due = (checkpoint_every and done % checkpoint_every == 0) or (
                time.monotonic() - last_ckpt_time > checkpoint_seconds)
            # on the training device: NCCL, torchrun's backend on CUDA, reduces CUDA tensors only
            due_tensor = _all_reduce(torch.tensor(float(bool(due)), device=device), torch.distributed.ReduceOp.MAX)
            if due_tensor.item() > 0 and done < cfg.steps:
                if dist_info.is_main:
                    try:
                        ckpt.save(sae, opt, tracker, {"step": done, "tokens": tokens_seen, "scale": scale,
                                                      "run_config": run_config})
                    except Exception as e:  # a full disk ended the run, and its steps since the last checkpoint,
                        said = write_failure(e)  # until 2026-12-05: the last one written stays, the next is tried
                        if said is None:
                            raise
                        if not checkpoint_failed:
                            bar.write(f"could not save the checkpoint at step {done} ({said}); training goes on and "
                                      "tries again at the next one (a kill meanwhile resumes from the last one saved)",
                                      file=sys.stderr)
                        checkpoint_failed = True
                barrier(dist_info)
                last_ckpt_time = time.monotonic()
    finally:
        bar.close()
        pool.shutdown(wait=True)
        if log_file:
            log_file.close()
            if start == 0 and not ckpt.exists() and len(log_path.read_text(encoding="utf-8").splitlines()) <= 1:
                log_path.unlink()  # a header alone: stopped before its first row, the --out holds nothing else

    sae.eval()
    metrics = {}
    if dist_info.is_main:
        if sae_cfg.arch in THRESHOLD_ARCHS:  # thresholds from the final weights, on unseen batch ids
            n_cal = min(16, max(1, math.ceil(65_536 / global_batch)))
            sae.calibrate_thresholds(
                torch.from_numpy(store.take(split.training_rows(
                    shuffled_batch_index(split.n_train, global_batch, cfg.steps + i, cfg.seed))))
                .to(device=device, dtype=torch.float32) * scale for i in range(n_cal))
        sae.fold_input_scale(scale)
        # NaN where undefined (no variance in the held-out rows): metrics.json holds null there (strict_json)
        metrics = evaluate_on_rows(sae, store, split.held_out_rows(), device)
        info = {**(training_info or {}), **run_config["train"], "input_scale": scale, "world_size": dist_info.world_size,
                "held_out_rows": split.n_eval, "training_rows": split.n_train, "held_out": run_config["held_out"],
                "tokens": tokens_seen, "data": run_config["data"]}
        # metrics first: save_sae's config.json marks the SAE finished, and a kill between the two left a
        # finished SAE whose metrics.json never came back
        write_json_atomic(out_dir / "metrics.json", metrics)
        save_sae(sae, out_dir, training=info)
        if ckpt.dir.exists():  # the finished SAE supersedes the checkpoint
            for f in (ckpt.meta, ckpt.tensors):
                f.unlink(missing_ok=True)
            remove_stale_temporaries(ckpt.dir)  # a killed checkpoint write's leftovers would keep the folder
            ckpt.dir.rmdir()
    barrier(dist_info)
    return metrics


def _log_row(x, out, step, tokens, tracker, cfg, lr, tokens_per_s) -> dict:
    """The log's figures of the global batch. Under torchrun each process holds an equal slice of it: sums are
    added over the processes and the per-row means averaged (until 2026-12-05 the log gave rank 0's slice)."""
    with torch.no_grad():
        x64 = x.double()
        means = torch.tensor([out.loss.item(), out.recon_loss.item(), out.aux_loss.item(), out.sparsity_loss.item(),
                              out.l0], dtype=torch.float64, device=x.device)
        sums = _all_reduce(torch.cat([x64.sum(0), x64.pow(2).sum().reshape(1),
                                      (x64 - out.x_hat.double()).pow(2).sum().reshape(1), means]))
        world = _world_size()
        n = x.shape[0] * world
        total, sq, err = sums[:x.shape[1]], sums[-7].item(), sums[-6].item()
        loss, recon, aux, sparsity, l0 = (sums[-5:] / world).tolist()
        var = sq - total.pow(2).sum().item() / n  # the spread about the global batch's mean
        dead = (tracker >= min(cfg.dead_window, tokens)).double().mean().item()
    return {"step": step, "tokens": tokens, "loss": loss, "recon_loss": recon, "aux_loss": aux,
            "sparsity_loss": sparsity, "fvu": err / var if var > 0 else float("nan"), "l0": l0,
            "dead_fraction": dead, "lr": lr, "tokens_per_s": tokens_per_s}


@torch.no_grad()
def evaluate_on_rows(sae: SparseAutoencoder, store: ActivationStore, rows: np.ndarray, device: str = "cpu",
                     batch_size: int = 4096) -> dict:
    """Pooled metrics of the (raw-input) SAE on store rows `rows`; Matryoshka adds `prefix_fvu`."""
    acc = MetricsAccumulator(sae.cfg.d_sae)
    bounds = sae.group_bounds.tolist()[1:] if sae.cfg.arch == "matryoshka" else []
    prefix_accs = [MetricsAccumulator(b) for b in bounds]
    rows = np.asarray(rows, dtype=np.int64)
    for a in range(0, len(rows), batch_size):
        ids = rows[a:a + batch_size]
        x = torch.from_numpy(finite_rows(store.take(ids), ids, store)).to(device=device, dtype=torch.float32)
        z = sae.encode(x)
        acc.update(x, sae.decode(z), z)
        for b, pacc in zip(bounds, prefix_accs):
            zp = z[:, :b]
            pacc.update(x, zp @ sae.W_dec[:b] + sae.b_dec, zp)
    metrics = acc.compute()
    if prefix_accs:
        metrics["prefix_sizes"] = bounds
        metrics["prefix_fvu"] = [p.compute()["fvu"] for p in prefix_accs]
    return metrics
