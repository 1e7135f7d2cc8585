"""SAE checkpoints: `sae.safetensors` (SAELens tensor names) + `config.json`; SAELens, sparsify and
dictionary_learning SAEs (local or on the Hub) loaded as the same computation; export to SAELens's layout."""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, read_json_object, write_json_atomic
from .errors import UserError
from .precision import resolve_device
from .sae import THRESHOLD_ARCHS, SAEConfig, SparseAutoencoder

WEIGHTS = "sae.safetensors"
CONFIG = "config.json"
SAELENS_CONFIG = "cfg.json"                 # also sparsify's config name
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"   # beside a SAELens training checkpoint: its input scaling factor
SAELENS_WHITENING = "activation_whitening.safetensors"   # beside it too: mean, matrix, inverse_matrix
DL_WEIGHTS, DL_PICKLE = "ae.safetensors", "ae.pt"   # dictionary_learning (beside its config.json)
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


def resolve_sae(spec: str | Path) -> Path:
    """The local folder of an SAE spec: a path, or `hf:OWNER/REPO[/FOLDER]` (fetched from the Hugging Face
    Hub into its cache, only the files an SAE folder holds; the one network access, when the user names it)."""
    text = str(spec)
    if not text.startswith("hf:"):
        return Path(text).expanduser()
    parts = [q for q in text[3:].split("/") if q]
    if len(parts) < 2:
        raise UserError(f"{text!r} does not name a Hub repository; write hf:OWNER/REPO or hf:OWNER/REPO/FOLDER.")
    repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
    sae_files = [CONFIG, WEIGHTS, SAELENS_CONFIG, SAELENS_WEIGHTS, DL_WEIGHTS]
    names = sae_files + ["metrics.json", SAELENS_SCALER, SAELENS_WHITENING]
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo, allow_patterns=[f"{folder}/{n}" if folder else n for n in names])
    except Exception as e:  # offline, unknown repo, no access: all end the same way for the user
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot fetch the SAE {text} from the Hugging Face Hub ({type(e).__name__}: {first}); "
                        "check the name and the network, or download the folder and give its path.") from None
    local = Path(root) / folder
    if not any((local / n).is_file() for n in sae_files):
        raise UserError(f"{text} has none of the files of an SAE folder ({', '.join(sae_files)}); check the folder "
                        "name inside the repository.")
    if (local / CONFIG).is_file() and not (local / WEIGHTS).is_file() and not (local / DL_WEIGHTS).is_file() \
            and "trainer" in _read_json(local / CONFIG):  # dictionary_learning's config, its weights not fetched
        raise UserError(f"{text} is a dictionary_learning SAE without {DL_WEIGHTS}; its weights are most likely "
                        f"{DL_PICKLE}, a pickle, which this tool neither fetches nor reads. Where you trust it, download "
                        f"the folder, convert it once ({_dl_conversion('FOLDER')}) and give the folder's path.")
    try:
        sae_format(local)
    except UserError as e:  # the user typed the spec, not the Hub cache's snapshot path
        raise UserError(str(e).replace(str(local), text)) from None
    return local


def layouts_in(path: Path) -> list[str]:
    """Every checkpoint layout whose files `path` holds, in the order `sae_format` prefers them (layouts share
    file names, so a folder of ours with cfg.json beside it also counts as sparsify's)."""
    has = lambda *names: all((path / n).is_file() for n in names)  # noqa: E731
    return [layout for layout, held in (("sae-lab", has(CONFIG, WEIGHTS)),
                                        ("saelens", has(SAELENS_CONFIG, SAELENS_WEIGHTS)),
                                        ("sparsify", has(SAELENS_CONFIG, WEIGHTS)),
                                        ("dictionary_learning", has(CONFIG, DL_WEIGHTS) or has(CONFIG, DL_PICKLE)))
            if held]


def sae_format(path: Path) -> str:
    """Which checkpoint layout a folder holds: "sae-lab" (ours), "saelens", "sparsify" or
    "dictionary_learning"; UserError if none."""
    if layouts := layouts_in(path):
        return layouts[0]
    if not path.exists():
        raise UserError(f"{path} does not exist; give the path of an SAE folder.")
    if path.is_file():
        raise UserError(f"{path} is a file; give the folder that holds it ({path.parent}).")
    if (path / "manifest.json").is_file() and (path / "sae").is_dir():  # a bundle keeps a copy of its SAE
        raise UserError(f"{path} is a bundle, not an SAE folder; its SAE is {path / 'sae'} (pass that), or give the "
                        "bundle itself where a command takes --bundle.")
    raise UserError(f"{path} is not a finished SAE directory (it needs {CONFIG} and {WEIGHTS} from `python -m "
                    f"precompute train`, or SAELens's {SAELENS_CONFIG} and {SAELENS_WEIGHTS}, or sparsify's "
                    f"{SAELENS_CONFIG} and {WEIGHTS}, or dictionary_learning's {CONFIG} and {DL_WEIGHTS}).")


WEIGHTS_OF = {"sae-lab": WEIGHTS, "saelens": SAELENS_WEIGHTS, "sparsify": WEIGHTS, "dictionary_learning": DL_WEIGHTS}


def weights_file(path: str | Path) -> Path:
    """The safetensors file of an SAE folder, whatever its layout."""
    path = resolve_sae(path)
    return path / WEIGHTS_OF[sae_format(path)]


def load_sae(path: str | Path, d_in: int | None = None, device: str = "cpu") -> SparseAutoencoder:
    """Load an SAE folder (ours, SAELens's, sparsify's or dictionary_learning's; a path or
    hf:OWNER/REPO[/FOLDER]); with `d_in`, check that it fits a model whose activations have that width. A
    foreign SAE becomes the same computation in our architecture (see `read_saelens`, `read_sparsify`,
    `read_dictionary_learning`); `training_info["imported"]` says where it came from."""
    device = resolve_device(device, "device")  # "cuda" without a GPU was torch's error after the whole read
    spec, path = str(path), resolve_sae(path)
    fmt = sae_format(path)
    if fmt != "sae-lab":
        cfg, state, info = {"saelens": read_saelens, "sparsify": read_sparsify,
                            "dictionary_learning": read_dictionary_learning}[fmt](path)
        info["imported"]["from"] = spec if spec.startswith("hf:") else str(path.resolve())
    else:
        raw = _read_json(path / CONFIG)
        try:
            cfg = SAEConfig.from_dict(raw)
        except (TypeError, KeyError, ValueError) as e:  # missing or unknown fields
            raise UserError(f"{path / CONFIG} is not an SAE config this tool wrote ({e}); the SAE folder is "
                            "damaged.") from None
        state, info = read_safetensors(path / WEIGHTS), raw.get("training", {})
    if d_in is not None and d_in != cfg.d_in:
        raise UserError(
            f"the SAE in {path} expects activations of width {cfg.d_in} but the model gives width {d_in}; "
            "use an SAE trained on this model and layer."
        )
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.arch in THRESHOLD_ARCHS:
        expected["threshold"] = (cfg.d_sae,)
    weights = path / WEIGHTS_OF[fmt]
    for name, shape in expected.items():
        if name not in state:
            raise UserError(f"{weights} has no tensor {name!r}; the file is incomplete or from another tool: save or "
                            "download the SAE again.")
        if tuple(state[name].shape) != shape:
            raise UserError(
                f"{weights}: {name} has shape {tuple(state[name].shape)} but its config "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) needs {shape}; the weights and config do not belong together."
            )
        _check_finite(state[name], name, weights)  # what a conversion computed (the file itself is checked on reading)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(state[name])
        if "threshold" in state:
            sae.threshold.copy_(state["threshold"])
            sae.fired_ever.fill_(True)
    sae.training_info = info
    return sae.to(device).eval()


def _read_json(path: Path) -> dict:
    return read_json_object(path, "the SAE folder is damaged")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one sentence when it is truncated, empty or not safetensors, or
    when a tensor holds NaN or infinite values (checked here, under the file's own tensor names, since
    every layout is read through this and a fold would spread one NaN over a whole tensor)."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise UserError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e}); the file is damaged or "
                        "incomplete: copy or download it again.") from None
    for name, tensor in state.items():
        _check_finite(tensor, name, path)
    return state


def _check_finite(tensor: torch.Tensor, name: str, where) -> None:
    """One sentence for a tensor with NaN or infinite entries: a NaN latent wins every top-k and an
    infinite bias fires the same latents on every input, so such an SAE must not load at all."""
    if not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor)
    if bad.any():
        nan = int(tensor.isnan().sum())
        raise UserError(f"{name} in {where} holds NaN or infinite values ({int(bad.sum())} of {tensor.numel()} "
                        f"entries, {nan} NaN); the file is damaged or the training diverged: use an earlier "
                        "checkpoint or retrain.")


def _float_state(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors in float64 (bf16/fp16 checkpoints included), for exact folding."""
    return {k: v.double() for k, v in read_safetensors(path).items()}


def _dims(state: dict, name: str, file: Path, what: str) -> tuple[int, int]:
    """The two sizes of a weight matrix, or one sentence where the tensor is not a matrix."""
    shape = tuple(state[name].shape)
    if len(shape) != 2 or 0 in shape:
        raise UserError(f"{file}: {name} has shape {shape}, not a matrix; the file is damaged or not a {what}: "
                        "download or export it again.")
    return shape


def _check_shapes(state: dict, shapes: dict, file: Path, what: str) -> None:
    """One sentence for the first tensor whose shape does not fit the weight matrices', before any
    arithmetic on it (which would end in a traceback)."""
    for name, shape in shapes.items():
        if name in state and tuple(state[name].shape) != tuple(shape):
            raise UserError(f"{file}: {name} has shape {tuple(state[name].shape)} but the SAE's weight matrices need "
                            f"{tuple(shape)}; the file is damaged or not a {what}.")


def fold_decoder_norms(state: dict) -> None:
    """Fold n_j = ||W_dec[j]|| into the weights, in place: W_enc[:, j] *= n_j, b_enc[j] *= n_j, W_dec[j] /= n_j.

    SAELens's TopK family with `rescale_acts_by_decoder_norm` encodes TopK(pre * n) and decodes
    (z / n) @ W_dec; after the fold our plain TopK(pre') and z @ W_dec' compute exactly that, the same
    z included (SAELens's own `_fold_norm_topk`). In float64, so a bf16 decoder comes out with unit rows.
    The norms are clamped at 1e-8 as SAELens's `get_W_dec_norm` does."""
    n = state["W_dec"].norm(dim=1).clamp(min=1e-8)
    state["W_enc"] = state["W_enc"] * n
    state["b_enc"] = state["b_enc"] * n
    state["W_dec"] = state["W_dec"] / n[:, None]


# SAELens architectures whose config has `rescale_acts_by_decoder_norm` (TopKSAEConfig and the training
# configs built on it); the others' configs drop the key when SAELens loads them, so it means nothing there.
_RESCALING_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")
# SAELens's BatchTopK training checkpoints: their `save_inference_model` writes a jumprelu SAE from them.
_BATCHTOPK_TRAINING = {"batchtopk": "batchtopk", "matryoshka_batchtopk": "matryoshka"}


def read_saelens(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor], dict]:
    """SAELens's `cfg.json` + `sae_weights.safetensors` as our config, tensors and training info (the
    caller adds where it came from).

    standard -> relu, topk -> topk (SAELens before 6: standard with activation_fn "topk"), jumprelu ->
    jumprelu (ReLU(pre) where pre > threshold: how SAELens saves BatchTopK and Matryoshka SAEs for
    inference). The BatchTopK and Matryoshka training checkpoints (`save_model` during training, with a
    `topk_threshold`) become batchtopk and matryoshka with that threshold for every latent, as
    SAELens's `save_inference_model` converts them, the Matryoshka widths kept as our levels.
    `rescale_acts_by_decoder_norm` is folded into the weights (`fold_decoder_norms`),
    `apply_b_dec_to_input: false` into b_enc (our encoder always subtracts b_dec), an old
    `finetuning_scaling_factor` (before 3.x `scaling_factor`) into W_dec, a checkpoint's input scaling
    or whitening, from the files beside it, into the weights (`_saelens_input_map`). Run-time
    input normalisation, gated SAEs and head reshaping have no equivalent here and are refused with the
    reason.
    """
    raw = _read_json(path / SAELENS_CONFIG)
    meta = raw.get("metadata") or raw.get("meta") or {}          # SAELens 6 nests it; older versions do not
    if not isinstance(meta, dict):
        meta = {}

    def field(name):
        return meta.get(name) if meta.get(name) is not None else raw.get(name)

    arch = raw.get("architecture", "standard")
    kwargs = raw.get("activation_fn_kwargs") or {}
    fn = raw.get("activation_fn_str") or raw.get("activation_fn")
    if arch == "standard" and fn == "topk":
        arch = "topk"
    elif arch == "standard" and fn not in (None, "relu"):  # e.g. "tanh-relu": not a ReLU, do not read it as one
        raise UserError(f"{path} holds a SAELens standard SAE with activation {fn!r}; only relu and topk "
                        "activations can be loaded here.")
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", **_BATCHTOPK_TRAINING}.get(arch)
    if ours is None:
        raise UserError(f"{path} holds a SAELens {arch!r} SAE; only standard, topk and jumprelu SAEs (and "
                        "BatchTopK or Matryoshka training checkpoints) can be loaded here.")
    input_map = _saelens_input_map(raw, path)
    input_scale = input_map if isinstance(input_map, float) else None
    hook = field("hook_name") or field("hook_point")   # hook_point: SAELens before 6, renamed by its loader
    reshape = raw.get("reshape_activations")
    if reshape is None and "hook_z" in str(raw.get("hook_name") or raw.get("hook_point") or ""):
        # a cfg from before SAELens 6 (hook at the top level): SAELens >= 6 reads a hook_z SAE's as reshaping
        reshape = "hook_z"
    if (reshape or "none") != "none":
        raise UserError(f"{path} reshapes attention-head activations ({reshape!r}); only SAEs on whole token "
                        "vectors can be loaded here.")
    weights = path / SAELENS_WEIGHTS
    state = _float_state(weights)
    what = f"SAELens {arch} SAE"
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if ours == "jumprelu":
        needed.append("threshold" if "threshold" in state or "log_threshold" not in state else "log_threshold")
    if arch in _BATCHTOPK_TRAINING:
        needed.append("topk_threshold")
    missing = [n for n in needed if n not in state]
    if missing:
        raise UserError(f"{weights} has no tensor {missing[0]!r}, which a {what} needs; the file is incomplete or "
                        "from another tool: download or export it again.")
    scale = [n for n in ("finetuning_scaling_factor", "scaling_factor") if n in state]
    unknown = sorted(set(state) - set(needed) - set(scale))
    if unknown or len(scale) > 1:
        extra = unknown[0] if unknown else "scaling_factor"
        raise UserError(f"{weights} holds a tensor {extra!r} that a {what} does not have and this tool cannot "
                        "account for; the file is from another tool or another SAELens architecture.")
    d_in, d_sae = _dims(state, "W_enc", weights, what)
    if "topk_threshold" in state and state["topk_threshold"].numel() == 1:
        state["topk_threshold"] = state["topk_threshold"].reshape(())   # one number, however it was stored
    _check_shapes(state, {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,),
                          "log_threshold": (d_sae,), "topk_threshold": (), **{n: (d_sae,) for n in scale}}, weights, what)
    if "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()   # a JumpReLU training checkpoint's parametrisation
    rescale = arch in _RESCALING_ARCHS and raw.get("rescale_acts_by_decoder_norm", arch in _BATCHTOPK_TRAINING)
    if input_scale is not None:
        # the SAE saw x * s: SAELens's fold_activation_norm_scaling_factor, first, as its trainer does it
        # before save_inference_model folds the norms. pre(x * s) is then pre'(x); the decoder returns x
        state["W_enc"], state["W_dec"], state["b_dec"] = (state["W_enc"] * input_scale, state["W_dec"] / input_scale,
                                                          state["b_dec"] / input_scale)
        if rescale and "topk_threshold" in state:   # compared with pre * ||W_dec||, which the fold divides by s
            state["topk_threshold"] = state["topk_threshold"] / input_scale
    if rescale:
        fold_decoder_norms(state)   # (the training configs default it to true)
    if isinstance(input_map, dict):
        # the SAE saw w = (x - mean) @ M and returned x_hat = w_hat @ M^-1 + mean: SAELens's
        # fold_activation_whitening, after the norm fold as SAELens's TopK does it (the unwhitened decoder's
        # row norms would change a rescaling SAE's selection)
        _check_shapes(input_map, {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)},
                      path / SAELENS_WHITENING, "whitening of this SAE's inputs")
        state["W_enc"] = input_map["matrix"] @ state["W_enc"]
        if raw.get("apply_b_dec_to_input", True) is False:
            state["b_enc"] = state["b_enc"] - input_map["mean"] @ state["W_enc"]
        state["W_dec"] = state["W_dec"] @ input_map["inverse_matrix"]
        state["b_dec"] = state["b_dec"] @ input_map["inverse_matrix"] + input_map["mean"]
    if arch in _BATCHTOPK_TRAINING:
        # after the norm fold, the threshold is in the units of the folded pre-activations (SAELens's
        # BatchTopKTrainingSAE.process_state_dict_for_saving_inference)
        state["threshold"] = state.pop("topk_threshold").reshape(()).expand(d_sae).clone()
    if scale:  # decode: (z * factor) @ W_dec (SAELens drops an all-ones scaling_factor: the same)
        state["W_dec"] = state["W_dec"] * state.pop(scale[0])[:, None]
    if raw.get("apply_b_dec_to_input", True) is False:
        # x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
    k = raw.get("k", kwargs.get("k"))
    if ours == "topk" and _whole_k(k, d_sae) is None:
        raise UserError(f"{path / SAELENS_CONFIG} gives no whole number k between 1 and {d_sae} for its topk SAE "
                        f"(found {k!r}).")
    if ours == "matryoshka" and _levels(raw.get("matryoshka_widths"), d_sae) is None:
        raise UserError(f"{path / SAELENS_CONFIG}: matryoshka_widths {raw.get('matryoshka_widths')!r} are not "
                        f"increasing whole widths up to the SAE width {d_sae}; the config is damaged.")
    cfg = _exported_by_us(meta, ours, d_in, d_sae)
    if cfg is None and ours == "jumprelu" and meta.get("training_architecture") in _BATCHTOPK_TRAINING:
        # what save_inference_model wrote from a BatchTopK or Matryoshka SAE: its training config, kept in
        # the metadata, gives k and the levels back (the inference is the same thresholded form)
        cfg = _batchtopk_config(meta["training_architecture"], meta.get("training_architecture_details"), d_in, d_sae)
    if cfg is None and ours in ("batchtopk", "matryoshka"):
        cfg = _batchtopk_config(arch, raw, d_in, d_sae)
    if cfg is None:
        ours = "jumprelu" if ours in ("batchtopk", "matryoshka") else ours   # e.g. a fractional average k
        cfg = SAEConfig(arch=ours, d_in=d_in, d_sae=d_sae, k=_whole_k(k, d_sae) if ours == "topk" else 1)
    info = {"imported": {"format": "saelens", "architecture": arch, "model": field("model_name"), "hook": hook}}
    layer = layer_of_hook(hook)
    if layer is not None or "sae_lab_arch" in meta:
        info["activations"] = {"layer": layer, "tokens": meta.get("sae_lab_tokens")}
        if "sae_lab_arch" in meta:  # our export (before sae_lab_model, model_name was always our model spec)
            info["activations"]["model"] = {"spec": meta.get("sae_lab_model", meta.get("model_name"))}
    return cfg, {n: t.float() for n, t in state.items()}, info


def _saelens_input_map(raw: dict, path: Path) -> float | dict | None:
    """How an SAE's inputs were mapped in training: the factor s of inputs x * s (`normalize_activations`
    expected_average_only_in, s from the activation_scaler.json SAELens's trainer writes beside a
    checkpoint), the whitening (x - mean) @ matrix as {"mean", "matrix", "inverse_matrix"} in float64
    (covariance_whitening, from the activation_whitening.safetensors beside it), None for plain inputs;
    one sentence for what cannot be folded here."""
    norm = raw.get("normalize_activations") or "none"
    if norm is True or norm == "expected_average_only_in":  # True: before SAELens 3, read by it as the other
        scaler = _read_json(path / SAELENS_SCALER) if (path / SAELENS_SCALER).is_file() else {}
        input_scale = scaler.get("scaling_factor")   # null until the trainer has estimated it
        if not (isinstance(input_scale, (int, float)) and not isinstance(input_scale, bool)
                and math.isfinite(input_scale) and input_scale > 0):
            raise UserError(f"{path} was trained on inputs scaled by a constant that is not in its weights "
                            f"(normalize_activations {norm!r}) and no {SAELENS_SCALER} beside it gives that factor; "
                            "fold it in with SAELens's `sae.fold_activation_norm_scaling_factor(factor)` (a "
                            "pretrained SAE's is in SAELens's registry), save the SAE again and load that.")
        return float(input_scale)
    if norm == "covariance_whitening":
        if not (path / SAELENS_WHITENING).is_file():
            raise UserError(f"{path} was trained on whitened inputs (normalize_activations {norm!r}) and has no "
                            f"{SAELENS_WHITENING} beside it; fold the whitening in with SAELens's "
                            "`sae.fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)`, save the SAE "
                            "again and load that.")
        whitening = _float_state(path / SAELENS_WHITENING)
        missing = [n for n in ("mean", "matrix", "inverse_matrix") if n not in whitening]
        if missing:
            raise UserError(f"{path / SAELENS_WHITENING} has no tensor {missing[0]!r}; the file is incomplete.")
        return whitening   # (its shapes are checked once the SAE's width is known)
    if norm != "none":
        raise UserError(f"{path} normalises each input by its own norm or statistics at run time "
                        f"(normalize_activations {norm!r}), which no fixed weights can express; use an SAE trained "
                        "with normalize_activations 'none'.")
    return None


def _whole_k(k, d_sae: int) -> int | None:
    """k as an int where it is a whole number between 1 and d_sae (SAELens's BatchTopK k is a float)."""
    ok = isinstance(k, (int, float)) and not isinstance(k, bool) and math.isfinite(k) and int(k) == k and 1 <= k <= d_sae
    return int(k) if ok else None


def _levels(widths, d_sae: int) -> tuple[int, ...] | None:
    """Our Matryoshka group sizes from SAELens's `matryoshka_widths` (prefix widths; SAELens adds the
    full width where the list stops short of it), None where they are not increasing whole widths."""
    if not (isinstance(widths, list) and widths and all(isinstance(w, int) and not isinstance(w, bool) for w in widths)):
        return None
    widths = widths + [d_sae] if widths[-1] != d_sae else widths
    if not all(a < b for a, b in zip([0] + widths, widths)) or widths[-1] != d_sae:
        return None
    return tuple(b - a for a, b in zip([0] + widths, widths))


def _batchtopk_config(arch: str, details, d_in: int, d_sae: int) -> SAEConfig | None:
    """Our batchtopk or matryoshka config from a SAELens BatchTopK / Matryoshka training config (`arch`
    batchtopk or matryoshka_batchtopk); None where k is not a whole number or the widths do not fit."""
    details = details if isinstance(details, dict) else {}
    k = _whole_k(details.get("k"), d_sae)
    groups = _levels(details.get("matryoshka_widths"), d_sae) if arch == "matryoshka_batchtopk" else ()
    if k is None or groups is None:
        return None
    return SAEConfig(arch=_BATCHTOPK_TRAINING[arch], d_in=d_in, d_sae=d_sae, k=k, group_sizes=groups)


def layer_of_hook(hook) -> str | None:
    """The layer, in our numbering (sae_core.adapters), that a SAELens hook name reads where it names a
    block's output: our export's `layer_L` (and `layer_embed`, the image embedding), and TransformerLens /
    ViT-Prisma's `blocks.L.hook_resid_post`
    (block L's output) and `blocks.L.hook_resid_pre` for L >= 1 (block L-1's output). None otherwise:
    MLP or attention outputs are not the residual stream the adapters read, and block 0's input has
    an index only once the model's depth is known."""
    m = re.fullmatch(r"layer_(-?\d+|embed)|blocks\.(\d+)\.hook_resid_(post|pre)", str(hook or ""))
    if m is None:
        return None
    if m.group(1) is not None:
        return m.group(1)
    block = int(m.group(2)) - (m.group(3) == "pre")
    return str(block) if block >= 0 else None


def _trained_activations(sae: SparseAutoencoder) -> dict:
    return (getattr(sae, "training_info", None) or {}).get("activations") or {}


def trained_on(sae: SparseAutoencoder) -> dict:
    """What an SAE records of the activations it was trained on: {"layer", "tokens", "model"} (the model
    as a spec string; `trained_model` gives its whole record), None where unknown."""
    act = _trained_activations(sae)
    model = act.get("model")
    return {"layer": act.get("layer"), "tokens": act.get("tokens"),
            "model": model.get("spec") if isinstance(model, dict) else model}


def trained_model(sae: SparseAutoencoder) -> dict:
    """The extraction's record of the model an SAE was trained on (`spec`, `name`: the hub id or folder it loaded,
    ...), as `precompute train` stores it; {} where the SAE records none (imported, or a plain .npy)."""
    model = _trained_activations(sae).get("model")
    return model if isinstance(model, dict) else {}


def no_layer_reason(sae: SparseAutoencoder, where) -> str:
    """The sentence for an SAE that does not record the layer it reads (the caller adds what to pass)."""
    hook = ((sae.training_info or {}).get("imported") or {}).get("hook")
    if hook:
        return (f"the SAE in {where} reads {hook!r}, which names no block output (residual stream) this tool "
                "can find by itself")
    return f"the SAE in {where} does not record its layer"


def _exported_by_us(meta: dict, ours: str, d_in: int, d_sae: int) -> SAEConfig | None:
    """The BatchTopK or Matryoshka config that `export_saelens` saved as a JumpReLU SAE (the same
    inference), from the metadata it wrote beside it, so the round trip keeps k and the Matryoshka
    levels; None for any other SAE, or where the metadata does not fit the weights."""
    arch, k, groups = meta.get("sae_lab_arch"), meta.get("sae_lab_k"), meta.get("sae_lab_group_sizes") or []
    if ours != "jumprelu" or arch not in ("batchtopk", "matryoshka") or not isinstance(k, int) or k < 1:
        return None
    if arch == "matryoshka" and not (all(isinstance(g, int) and g > 0 for g in groups) and sum(groups) == d_sae):
        return None
    return SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k, group_sizes=tuple(groups) if arch == "matryoshka" else ())


def read_sparsify(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor], dict]:
    """EleutherAI sparsify's `cfg.json` + `sae.safetensors` (a TopK SAE: encoder.weight [d_sae, d_in],
    encoder.bias, W_dec, b_dec) as our topk config, tensors and training info. Transcoders, skip
    connections and activations other than topk are refused."""
    raw = _read_json(path / SAELENS_CONFIG)
    if raw.get("transcode"):
        raise UserError(f"{path} holds a sparsify transcoder (it maps one layer to another); only SAEs can be "
                        "loaded here.")
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise UserError(f"{path} uses sparsify's {activation!r} activation; only topk SAEs can be loaded here.")
    weights = path / WEIGHTS
    state = _float_state(weights)
    if raw.get("skip_connection") or "W_skip" in state:
        raise UserError(f"{path} has a skip connection (W_skip), which this SAE form cannot express; train or export "
                        "one without it.")
    missing = [n for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if n not in state]
    if missing:
        raise UserError(f"{weights} has no tensor {missing[0]!r}; the file is incomplete or not a sparsify SAE: "
                        "download or save it again.")
    d_sae, d_in = _dims(state, "encoder.weight", weights, "sparsify SAE")
    _check_shapes(state, {"encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}, weights, "sparsify SAE")
    k = raw.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
        raise UserError(f"{path / SAELENS_CONFIG} gives no k between 1 and {d_sae} for its topk SAE (found {k!r}).")
    cfg = SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k)
    state = {"W_enc": state["encoder.weight"].t().contiguous(), "b_enc": state["encoder.bias"],
             "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    info = {"imported": {"format": "sparsify", "architecture": "topk"}}
    return cfg, {n: t.float() for n, t in state.items()}, info


# dictionary_learning's classes: ours, and whether its tensors are nn.Linear's (encoder.weight [d_sae, d_in],
# decoder.weight [d_in, d_sae]) or named as SAELens's (W_enc [d_in, d_sae], W_dec [d_sae, d_in])
_DL_CLASSES = {"MatryoshkaBatchTopKSAE": ("matryoshka", False), "BatchTopKSAE": ("batchtopk", True),
               "AutoEncoderTopK": ("topk", True), "AutoEncoder": ("relu", True), "JumpReluAutoEncoder": ("jumprelu", False)}


def read_dictionary_learning(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor], dict]:
    """dictionary_learning's `config.json` ({"trainer": {"dict_class", ...}}) + `ae.safetensors` (its
    `ae.pt` state dict saved as safetensors; a pickle is never read here) as our config, tensors and
    training info. This is the library the Matryoshka SAE paper (Pach et al. 2025) trained with.

    MatryoshkaBatchTopKSAE -> matryoshka (its group sizes and k), BatchTopKSAE -> batchtopk: both infer
    ReLU(pre) where it exceeds one threshold, which becomes every latent's threshold; AutoEncoderTopK ->
    topk; AutoEncoder -> relu (`bias` is b_dec); JumpReluAutoEncoder -> jumprelu (ReLU(pre) where pre
    exceeds its latent's threshold, with pre = x @ W_enc + b_enc: b_dec is not subtracted from the
    input, which is folded into b_enc). nn.Linear weights are transposed to our layout. Gated and
    cross-coder dictionaries are refused.
    """
    if not (path / DL_WEIGHTS).is_file():
        raise UserError(f"{path} holds dictionary_learning's {DL_PICKLE}, a pickle, which this tool does not read; "
                        f"where you trust the file, convert it once: {_dl_conversion(path)}")
    trainer = _read_json(path / CONFIG).get("trainer")
    if not isinstance(trainer, dict):
        shown = json.dumps(trainer)  # as the file has it: "found NoneType" for a null until 2026-12-06
        raise UserError(f"{path / CONFIG} has no \"trainer\" object (its \"trainer\" is "
                        f"{shown if len(shown) <= 40 else shown[:37] + '...'}), which dictionary_learning writes; the "
                        "config is damaged or from another tool: export the SAE from dictionary_learning again.")
    dict_class = trainer.get("dict_class")
    if dict_class not in _DL_CLASSES:
        raise UserError(f"{path / CONFIG} names dictionary_learning's {dict_class!r}; only "
                        f"{', '.join(_DL_CLASSES)} can be loaded here.")
    ours, linear = _DL_CLASSES[dict_class]
    weights, what = path / DL_WEIGHTS, f"dictionary_learning {dict_class}"
    raw = _float_state(weights)
    if linear:
        names = ("encoder.weight", "encoder.bias", "decoder.weight", "bias" if ours == "relu" else "b_dec")
        # AutoEncoderTopK's threshold is unused at inference; older releases kept k as a plain attribute,
        # not a buffer, so it is read from the trainer's config when the file has none
        names += {"relu": (), "topk": ("k",) if trainer.get("k") is None else (), "batchtopk": ("threshold", "k")}[ours]
    else:
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold") + (("k", "group_sizes") if ours == "matryoshka" else ())
    missing = [n for n in names if n not in raw]
    if missing:
        raise UserError(f"{weights} has no tensor {missing[0]!r}, which dictionary_learning's {dict_class} saves; "
                        "the file is incomplete or from another class.")
    if linear:
        d_sae, d_in = _dims(raw, "encoder.weight", weights, what)
        _check_shapes(raw, {"encoder.bias": (d_sae,), "decoder.weight": (d_in, d_sae), "b_dec": (d_in,),
                            "bias": (d_in,)}, weights, what)
        state = {"W_enc": raw["encoder.weight"].t().contiguous(), "b_enc": raw["encoder.bias"],
                 "W_dec": raw["decoder.weight"].t().contiguous(), "b_dec": raw["bias" if ours == "relu" else "b_dec"]}
    else:
        d_in, d_sae = _dims(raw, "W_enc", weights, what)
        _check_shapes(raw, {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}, weights, what)
        state = {n: raw[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    k = 1
    if ours in ("topk", "batchtopk", "matryoshka"):
        found = raw["k"] if "k" in raw else trainer.get("k")
        if isinstance(found, torch.Tensor):
            found = found.item() if found.numel() == 1 else found.tolist()
        k = _whole_k(found, d_sae)
        if k is None:
            raise UserError(f"{weights} and {path / CONFIG} give no whole number k between 1 and {d_sae} for the "
                            f"{dict_class} (found {found!r}); the folder is damaged.")
    groups = ()
    if ours == "matryoshka":
        sizes = raw["group_sizes"]
        groups = tuple(int(g) for g in sizes.tolist()) if sizes.ndim == 1 else ()
        if not groups or min(groups) < 1 or sum(groups) != d_sae or not all(float(g) == int(g) for g in sizes.tolist()):
            raise UserError(f"{weights}: group_sizes {sizes.tolist()} are not positive whole sizes summing to the "
                            f"width {d_sae}; the file is damaged.")
    if ours in ("matryoshka", "batchtopk"):
        # one threshold for all latents; -1 (never set: the run stopped before thresholds started) means 0
        if raw["threshold"].numel() != 1 and tuple(raw["threshold"].shape) != (d_sae,):
            raise UserError(f"{weights}: threshold has shape {tuple(raw['threshold'].shape)} but a {dict_class} "
                            f"has one threshold (or one per latent, {d_sae}); the file is damaged.")
        state["threshold"] = raw["threshold"].reshape(-1).expand(d_sae).clone()
    if ours == "jumprelu":
        _check_shapes(raw, {"threshold": (d_sae,)}, weights, what)
        state["threshold"] = raw["threshold"]
        # its encoder does not subtract b_dec (apply_b_dec_to_input, never saved, is False):
        # x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        state["b_enc"] = state["b_enc"] + state["b_dec"] @ state["W_enc"]
    cfg = SAEConfig(arch=ours, d_in=d_in, d_sae=d_sae, k=k, group_sizes=groups)
    info = {"imported": {"format": "dictionary_learning", "architecture": dict_class,
                         "model": trainer.get("lm_name"), "hook": trainer.get("submodule_name"),
                         "layer": trainer.get("layer")}}
    return cfg, {n: t.float() for n, t in state.items()}, info


def _dl_conversion(folder) -> str:
    """The one command that saves a dictionary_learning folder's `ae.pt` as `ae.safetensors`."""
    return (f"python -c \"import torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, v in "
            f"torch.load('{Path(folder) / DL_PICKLE}', map_location='cpu', weights_only=True).items()}}, "
            f"'{Path(folder) / DL_WEIGHTS}')\"")


def _refuse_overwriting_another_layout(out_dir: Path, layout: str) -> None:
    """One sentence when `out_dir` holds an SAE of another layout. Layouts share file names (sparsify's weights
    are our sae.safetensors, dictionary_learning's config is our config.json), so writing one over another
    destroys it; written beside it, the folder holds two SAEs of which `sae_format` loads one, not
    necessarily the new one (until 2026-12-05 only a shared file name was refused)."""
    there = [other for other in layouts_in(out_dir) if other != layout]
    if there:
        raise UserError(f"{out_dir} holds a {there[0]} SAE; writing the {layout} layout there would replace it or "
                        "leave two SAEs in one folder, of which only one loads; give another folder for the output.")


def _refuse_the_source(src: Path, out_dir: Path) -> None:
    if out_dir.resolve() == src.resolve():
        raise UserError(f"--out {out_dir} is the SAE folder being exported; give another folder (the export would "
                        "write over the source's files).")


def copy_sae(spec: str | Path, out_dir: str | Path, sae: SparseAutoencoder | None = None) -> None:
    """Put an SAE into a bundle's `sae/` in our layout: our files copied byte for byte (with metrics.json),
    a foreign SAE written from its loaded form (`sae`, or loaded here)."""
    src, out_dir = resolve_sae(spec), Path(out_dir)
    _refuse_overwriting_another_layout(out_dir, "sae-lab")
    if "sae-lab" in layouts_in(out_dir):
        # an SAE of ours is replaced: its config (the mark of a finished folder) goes first, so a kill below leaves
        # an unfinished folder rather than new weights under the old config; its metrics.json goes too (it
        # stayed beside an imported SAE, which has none, and `inspect` showed the old SAE's figures)
        for name in (CONFIG, "metrics.json"):
            (out_dir / name).unlink(missing_ok=True)
    if sae_format(src) != "sae-lab":
        sae = sae if sae is not None else load_sae(spec)
        save_sae(sae, out_dir, training=sae.training_info)
        return
    for name in (WEIGHTS, "metrics.json", CONFIG):  # config.json last, as save_sae writes it
        if (src / name).is_file():
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(src / name, tmp)


def export_saelens(path: str | Path, out_dir: str | Path) -> Path:
    """Write SAELens's layout (`cfg.json` + `sae_weights.safetensors`) for `SAE.load_from_disk`.

    relu -> "standard", topk -> "topk" (with k), batchtopk, matryoshka and jumprelu -> "jumprelu" with
    our per-latent thresholds (SAELens itself saves BatchTopK SAEs for inference that way). The layer,
    the tokens, k and the Matryoshka groups go into the metadata, so `load_sae` of the export restores
    the SAE we saved (`_exported_by_us`, `layer_of_hook`).
    """
    out_dir = Path(out_dir)
    _refuse_the_source(resolve_sae(path), out_dir)
    _refuse_overwriting_another_layout(out_dir, "saelens")
    sae = load_sae(path)
    cfg = sae.cfg
    arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu",
            "jumprelu": "jumprelu"}[cfg.arch]
    act = trained_on(sae)
    # an imported SAE keeps its own model and hook (a hook such as blocks.9.hook_mlp_out names no layer of ours)
    imported = (sae.training_info or {}).get("imported") or {}
    hook = imported.get("hook") or (f"layer_{act['layer']}" if act["layer"] is not None else None)
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
            # SAELens >= 6 reads a cfg without this as a pre-6.0 one and rebuilds metadata from top-level keys
            # only, which drops every key below (the model and the hook too)
            "sae_lens_version": "6.0.0",
            "model_name": act["model"] or imported.get("model"),
            "hook_name": hook,
            "sae_lab_arch": cfg.arch,
            "sae_lab_tokens": act["tokens"],
            "sae_lab_model": act["model"],   # our model spec, where model_name may be an imported SAE's own
            **({"sae_lab_k": cfg.k} if cfg.arch in ("batchtopk", "matryoshka") else {}),
            **({"sae_lab_group_sizes": list(cfg.group_sizes)} if cfg.arch == "matryoshka" else {}),
        },
    }
    if arch == "topk":
        saelens_cfg["k"] = cfg.k
    # SAELens 5.x reads top-level keys instead (its SAEConfig requires the first six) and SAELens 6 ignores
    # them: with both, SAELens 5.11.0 and 6.54.12 load the same SAE (equal codes and decodes). 5.x calls
    # string methods on the hook, so an unknown one is "", and picks its activation by name.
    layer = str(act["layer"] if act["layer"] is not None else "")
    block = re.match(r"blocks\.(\d+)\.", hook or "")  # an imported SAE's own hook
    saelens_cfg.update({
        "model_name": saelens_cfg["metadata"]["model_name"] or "", "hook_name": hook or "",
        # the hook's own block where it names one: ours is the block's output, so blocks.3.hook_resid_pre's
        # layer is 2 while SAELens runs the model up to hook_layer 3 (it was given 2 until 2026-12-05)
        "hook_layer": int(block[1]) if block else int(layer) if layer.lstrip("-").isdigit() else 0,
        "hook_head_index": None,
        "context_size": None, "dataset_path": None,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if arch == "topk" else {},
    })
    with atomic_path(out_dir / "sae_weights.safetensors") as tmp:
        save_file(sae_state(sae), str(tmp))
    write_json_atomic(out_dir / "cfg.json", saelens_cfg)
    return out_dir


def export_sae_lab(path: str | Path, out_dir: str | Path) -> Path:
    """Write our layout (an import of a foreign SAE; a copy of one of ours, metrics.json included)."""
    out_dir = Path(out_dir)
    _refuse_the_source(resolve_sae(path), out_dir)
    copy_sae(path, out_dir)
    return out_dir
