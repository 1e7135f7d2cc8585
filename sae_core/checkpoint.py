"""SAE checkpoints: `sae.safetensors` (SAELens tensor names) + `config.json`; export to SAELens's layout."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_json_atomic
from .errors import UserError
from .sae import THRESHOLD_ARCHS, SAEConfig, SparseAutoencoder

WEIGHTS = "sae.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def sae_state(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The saved tensors: W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold where it applies."""
    state = {n: getattr(sae, n).detach().float().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.cfg.arch in THRESHOLD_ARCHS:
        state["threshold"] = sae.threshold.detach().float().cpu().contiguous()
    return state


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite the header's metadata in key order, in place. safetensors writes metadata keys in an order
    that changes from process to process (a Rust HashMap), so equal weights gave files that differ in
    their header bytes; sorted, equal weights give equal files."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > n:  # never the case for the same keys and values; keep the file as written then
            return
        f.seek(8)
        f.write(text.ljust(n))  # safetensors pads its header with spaces too


def save_sae(sae: SparseAutoencoder, out_dir: str | Path, training: dict | None = None) -> None:
    """Write weights then config (the config last: a directory without it is unfinished)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / WEIGHTS) as tmp:
        save_file(sae_state(sae), str(tmp), metadata={"format": "sae-lab", "version": str(FORMAT_VERSION)})
        _sort_safetensors_metadata(Path(tmp))
    config = {"format_version": FORMAT_VERSION, **sae.cfg.to_dict(), "training": training or {}}
    write_json_atomic(out_dir / CONFIG, config)


def load_sae(path: str | Path, d_in: int | None = None, device: str = "cpu") -> SparseAutoencoder:
    """Load an SAE directory; with `d_in`, check that it fits a model whose activations have that width."""
    path = Path(path)
    if not (path / CONFIG).exists() or not (path / WEIGHTS).exists():
        raise UserError(f"{path} is not a finished SAE directory (it needs {CONFIG} and {WEIGHTS}); train one with `python -m precompute train`.")
    raw = json.loads((path / CONFIG).read_text())
    cfg = SAEConfig.from_dict(raw)
    if d_in is not None and d_in != cfg.d_in:
        raise UserError(
            f"the SAE in {path} expects activations of width {cfg.d_in} but the model gives width {d_in}; "
            "use an SAE trained on this model and layer."
        )
    state = load_file(str(path / WEIGHTS))
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.arch in THRESHOLD_ARCHS:
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in state:
            raise UserError(f"{path / WEIGHTS} has no tensor {name!r}; the file is incomplete or from another tool.")
        if tuple(state[name].shape) != shape:
            raise UserError(
                f"{path / WEIGHTS}: {name} has shape {tuple(state[name].shape)} but {CONFIG} "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}; the weights and config do not belong together."
            )
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(state[name])
        if "threshold" in state:
            sae.threshold.copy_(state["threshold"])
            sae.fired_ever.fill_(True)
    sae.training_info = raw.get("training", {})
    return sae.to(device).eval()


def export_saelens(path: str | Path, out_dir: str | Path) -> Path:
    """Write SAELens's layout (`cfg.json` + `sae_weights.safetensors`) for `SAE.load_from_disk`.

    relu -> "standard", topk -> "topk" (with k), batchtopk and matryoshka -> "jumprelu" with our
    per-latent thresholds (SAELens itself saves BatchTopK SAEs for inference that way).
    """
    sae = load_sae(path)
    out_dir = Path(out_dir)
    cfg = sae.cfg
    arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}[cfg.arch]
    info = sae.training_info
    act = info.get("activations", {})
    saelens_cfg = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": act.get("model"),
            "hook_name": f"layer_{act.get('layer')}" if act.get("layer") is not None else None,
            "sae_lab_arch": cfg.arch,
            "sae_lab_tokens": act.get("tokens"),
        },
    }
    if arch == "topk":
        saelens_cfg["k"] = cfg.k
    with atomic_path(out_dir / "sae_weights.safetensors") as tmp:
        save_file(sae_state(sae), str(tmp))
    write_json_atomic(out_dir / "cfg.json", saelens_cfg)
    return out_dir
