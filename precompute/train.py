"""`python -m precompute train`: train an SAE on an activation store or a plain (N, d) .npy file."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from sae_core.activation_store import ActivationStore
from sae_core.atomic import rank_zero_writer_lock, remove_stale_temporaries, strict_json
from sae_core.checkpoint import CONFIG, WEIGHTS, sae_format
from sae_core.distributed import finish_distributed, init_distributed, local_device
from sae_core.errors import UserError
from sae_core.folders import folder_kind
from sae_core.precision import resolve_device, warn_if_slow_half
from sae_core.sae import K_ARCHS, TRAINABLE_ARCHS, SAEConfig, matryoshka_group_sizes
from sae_core.training import TrainConfig, finished_run_difference, train_sae

from .args import command_line, nonnegative_float, nonnegative_int, out_folder, positive_float, positive_int


def add_arguments(p):
    p.add_argument("--activations", required=True, help="activation store directory or (N, d) .npy file")
    p.add_argument("--arch", required=True, choices=TRAINABLE_ARCHS,
                   help="relu (L1 penalty), topk, batchtopk, or matryoshka (BatchTopK with nested groups)")
    width = p.add_mutually_exclusive_group(required=True)
    width.add_argument("--expansion", type=positive_float, help="SAE width as a multiple of d_in")
    width.add_argument("--width", type=positive_int, help="SAE width (number of latents)")
    p.add_argument("--k", type=positive_int, help=f"active latents per token (TopK family; default {SAEConfig.k})")
    p.add_argument("--steps", type=positive_int, required=True, help="optimiser steps of --batch-size tokens")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="global batch, split over torchrun processes")
    p.add_argument("--lr", type=positive_float, help="default 2e-4 / sqrt(width / 2^14)")
    p.add_argument("--warmup", type=nonnegative_int, help="linear warm-up steps (default min(1000, steps/20))")
    p.add_argument("--decay-start", type=nonnegative_int, help="step where linear decay to 0 starts (default 80%% of steps; = steps disables)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the init and of the batch order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu | cuda | cuda:N (under torchrun, cuda = this process's GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype of the encoder matmul")
    p.add_argument("--groups", help="matryoshka group sizes or fractions of the width (default: "
                                     "0.0625,0.0625,0.125,0.25,0.5, each prefix twice the one before)")
    p.add_argument("--l1-coeff", type=nonnegative_float, help=f"relu only (default {SAEConfig.l1_coeff})")
    p.add_argument("--aux-coeff", type=nonnegative_float,
                   help=f"weight of the auxiliary loss that revives dead latents (TopK family; default "
                        f"{SAEConfig.aux_coeff})")
    p.add_argument("--aux-k", type=positive_int, help="dead latents the auxiliary loss uses (TopK family; default d_in/2)")
    p.add_argument("--dead-window", type=positive_int, default=TrainConfig.dead_window, help="tokens without firing that make a latent dead")
    p.add_argument("--eval-rows", type=positive_int, help="held-out rows for metrics.json, whole images spread over the store (default 5%%, at most 65,536)")
    p.add_argument("--checkpoint-every", type=positive_int, help="steps between checkpoints (default: every 5 minutes)")
    p.add_argument("--log", choices=["wandb", "tensorboard"], help="also log to W&B or TensorBoard")
    p.add_argument("--out", required=True, help="output directory (re-running the same command resumes)")


def finished(out: Path) -> bool:
    """Whether `out` holds an SAE this command finished (its config written, its checkpoint removed): what a rerun,
    the demo and `crossmodal` skip the training by, and what `inspect` reports as done."""
    return (out / CONFIG).is_file() and not (out / "checkpoint").exists()


ARCH_OPTIONS = {"k": K_ARCHS, "aux_k": K_ARCHS, "aux_coeff": K_ARCHS, "l1_coeff": ("relu",),
                "groups": ("matryoshka",)}
"""The options only some architectures read, and those: given to another, one was silently ignored."""


def check_arch_options(args) -> None:
    """UserError (one sentence) for an option the chosen --arch does not read (`--arch relu --k 4` trained a relu
    SAE with no k, while the command line said 4)."""
    for name, archs in ARCH_OPTIONS.items():
        if getattr(args, name) is not None and args.arch not in archs:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} applies to --arch {' / '.join(archs)}, not {args.arch}; leave it out or pick "
                            f"another --arch.")
    if args.dtype != "float32" and args.arch not in K_ARCHS:  # relu's forward is fp32 throughout (its config said bf16)
        raise UserError(f"--dtype {args.dtype} applies to --arch {' / '.join(K_ARCHS)}, not {args.arch}, which trains "
                        "in float32; leave it out or pick another --arch.")


def run(args) -> int:
    check_arch_options(args)
    store = ActivationStore(args.activations)
    d_sae = args.width if args.width else int(round(args.expansion * store.d))
    if d_sae < 1:  # was "SAE sizes must be positive, got d_in=16, d_sae=0", naming no option
        raise UserError(f"--expansion {args.expansion:g} of the activations' width {store.d} is {d_sae} latents; give "
                        f"--expansion {1 / store.d:.3g} or more, or --width.")
    groups = matryoshka_group_sizes(args.groups, d_sae) if args.arch == "matryoshka" else ()
    given = lambda v, default: default if v is None else v  # noqa: E731
    sae_cfg = SAEConfig(arch=args.arch, d_in=store.d, d_sae=d_sae, k=given(args.k, SAEConfig.k),
                        l1_coeff=given(args.l1_coeff, SAEConfig.l1_coeff), group_sizes=groups, aux_k=args.aux_k,
                        aux_coeff=given(args.aux_coeff, SAEConfig.aux_coeff))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      decay_start=args.decay_start, seed=args.seed, dtype=args.dtype,
                      dead_window=args.dead_window, eval_rows=args.eval_rows)
    args.device = resolve_device(args.device)
    warn_if_slow_half(args.device, args.dtype, "--dtype float32")
    out = out_folder(Path(args.out), "the SAE", writes=("sae", "training"))
    if folder_kind(out) == "sae" and (layout := sae_format(out)) != "sae-lab":  # ours would shadow it
        raise UserError(f"--out {out} holds an SAE in {layout}'s layout; give a new folder for the SAE.")
    # under torchrun every rank runs this and rank 0 writes `out`: it holds the lock, so a second launch into the
    # same folder is refused while this one runs (both wrote the checkpoint, and each removed the other's temporaries)
    with rank_zero_writer_lock(out):
        return _train(args, store, sae_cfg, cfg, out)


def _train(args, store: ActivationStore, sae_cfg: SAEConfig, cfg: TrainConfig, out: Path) -> int:
    """run's writing half: resume or finish the run in `out` (rank 0 holds its lock)."""
    # what a killed write left (the last run's log or metrics half-written); the names this command writes
    remove_stale_temporaries(out, ["train_log.csv", "metrics.json", CONFIG, WEIGHTS])
    if finished(out):
        try:
            done = json.loads((out / CONFIG).read_text(encoding="utf-8"))
        except ValueError:
            done = None
        if not (isinstance(done, dict) and {"arch", "d_sae"} <= done.keys()):
            # e.g. a dictionary_learning SAE's config.json: neither a finished run of ours nor ours to replace
            raise UserError(f"{out / CONFIG} is not the config of an SAE this command trained; give a new --out.")
        # a rerun with other options must not end in "nothing to do" beside an SAE trained without them
        differs = finished_run_difference(done, store, sae_cfg, cfg)
        if differs:
            raise UserError(f"{out} already holds a finished SAE trained otherwise ({differs}); give a new --out, "
                            f"or delete {out} to train it again.")
        print(f"{out} already holds a finished SAE ({done['arch']}, width {done['d_sae']}); nothing to do.")
        return 0
    info = init_distributed(args.device)
    try:
        training_info = {
            "activations": {"path": str(args.activations), **{k: store.manifest.get(k) for k in ("model", "layer", "tokens", "dataset")}},
            "command": command_line(args),
            "versions": {"python": platform.python_version(), "torch": torch.__version__},
        }
        metrics = train_sae(store, sae_cfg, cfg, out, info, device=local_device(args.device, info),
                            checkpoint_every=args.checkpoint_every, logger=args.log, training_info=training_info)
        if info.is_main:
            print(strict_json({k: v for k, v in metrics.items() if not isinstance(v, list)}))
    finally:
        finish_distributed(info)
    return 0
