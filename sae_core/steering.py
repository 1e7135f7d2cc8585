"""Steering: clamp SAE latents inside a vision tower and let LLaVA answer from the changed features.

API (what the app calls; everything else here is internal)

    session = SteeringSession.from_bundle(bundle_or_path, device="auto", precision="auto", llava=None)
    session = SteeringSession.from_paths(sae_dir, llava=None, layer=None, device="auto", precision="auto")
        One LLaVA (world tiny LLaVA or llava-hf/llava-1.5-7b-hf: 4-bit on CUDA by default, fp32 on CPU)
        plus the SAE, checked to sit at the layer LLaVA reads with the tower's width (UserError
        naming both layers and widths otherwise). Thread-safe: share one session between requests.
    session.answers(image, latents=(k, ...), values=(v, ...), prompt=WHAT_IS_SHOWN, keep_error=False,
                    patches=None, mode="set", max_new_tokens=5) -> SteerResult
        .original (no SAE), .sae (SAE inserted, nothing clamped), .steered (clamped); greedy.
        image: PIL image, file path, "world:INDEX" / int (an image of the bundle's dataset).
        patches: patch indices (row-major in the grid, 0-based, CLS excluded); None = all tokens.
    session.sweep(image, latents, values_list, ...) -> [(values, answer)]   # one batched LM pass
    session.latents_on_image(image, top=10) -> {"top": [(k, max, mean, label)], "maps": {k: (rows, cols)},
                                               "grid": (rows, cols)}
    session.steering_score(word, latent) -> float   # CLIP cos(word text, mean of top-16 image embeddings)
    session.answer_batch(images, clamps, prompt, max_new_tokens) -> [str]   # eval path, batched
    sae_core.steering_eval.ConceptSteerer(session, "colour").clamp(image, "red", alpha=3.0) -> Clamp
        (world bundles) the swap that steer-eval measured best: move the colour latents by the difference
        of concept means; pass the Clamp to answer_batch.

Building blocks (usable on any torch module)

    Clamp(latents, values, mode="set"|"add", positions=None, keep_error=False)
    steer_hidden(h, sae, clamp) -> h'          # (B, T, D) -> (B, T, D), the pure map
    with intervene(module, sae, clamp): ...    # forward hook (prepend=True) that applies steer_hidden

The map: z = encode(h); z' = z with the chosen latents set to (or increased by) their values on the
chosen token positions; output decode(z') (error term dropped: the paper) or h + decode(z') - decode(z)
(error kept). An empty clamp with the error dropped is "SAE inserted, nothing clamped"; with the error
kept it is the identity.

Concurrency: a module gets at most one steering hook; each thread sees only the clamps it entered
itself (thread-local stack), so two requests steering the same model at once never see each other's
clamps, and a thread with no clamp gets the model's own output. The hook is removed when the last
context on that module exits, also after an exception. Re-captioning caches each image's hidden
states at the SAE's layer (the layer LLaVA reads), so a new clamp re-runs only the SAE, the projector
and the language model, never the vision tower.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .adapters import load_adapter, loads_a_model
from .errors import UserError, checked_index, integer_text, is_count
from .precision import resolve_device, warn_if_slow_half
from .world.text import WHAT_IS_SHOWN, llava_prompt

MODES = ("set", "add")
PROMPT_CACHE = 64
"""Prompts whose token ids a SteeringSession keeps (the least recently used goes first)."""
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16", "4bit")


def lighter_precisions(precision: str) -> str | None:
    """The precisions that hold LLaVA's weights in less memory than `precision`, in words ("4bit on a CUDA GPU or
    bf16"), or None for 4bit: bf16 takes half of fp32's memory, 4 bits a quarter of bf16's (and needs CUDA)."""
    if precision == "4bit":
        return None
    return "4bit on a CUDA GPU" + (" or bf16" if precision in ("auto", "fp32") else "")


# ----------------------------------------------------------------------------------------------
# The map h -> steered h
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Clamp:
    """Which latents to change, to what, where.

    values: one per latent (broadcast over tokens), or an array (T, n_latents) giving each token
    position of the layer its own value (T = tokens per image, positions ignored then).
    positions: token positions of the layer's output (0 = CLS where there is one); None = all.
    """

    latents: tuple[int, ...] = ()
    values: tuple[float, ...] | np.ndarray = ()
    mode: str = "set"
    positions: tuple[int, ...] | None = None
    keep_error: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"clamp mode {self.mode!r} is not one of {', '.join(MODES)}.")
        # whole ids, each once: int() took 1.7 for 1, and a latent twice kept one of its values (in add mode not
        # their sum); the latent's range is the session's to check (make_clamp), which knows the SAE
        lat = tuple(_latent_id(k) for k in self.latents)
        refuse_latents_twice(lat)
        object.__setattr__(self, "latents", lat)
        with np.errstate(over="ignore"):  # a value past float32 becomes inf here and is refused below
            vals = np.asarray(self.values, dtype=np.float32)
        if vals.ndim == 0 or (vals.ndim == 1 and len(vals) == 1 and len(lat) > 1):
            vals = np.full(len(lat), float(vals.reshape(-1)[0]) if vals.size else 0.0, np.float32)
        if vals.ndim > 2:  # steer_hidden's expand failed on it with torch's words
            raise UserError(f"clamp values of shape {vals.shape} have {vals.ndim} dimensions; give one value, one per "
                            "latent, or a (tokens, latents) array.")
        if vals.shape[-1:] != (len(lat),) and not (len(lat) == 0 and vals.size == 0):
            raise UserError(f"{len(lat)} latent(s) but {vals.shape[-1] if vals.ndim else 0} value(s); give one value per latent.")
        if not np.isfinite(vals).all():  # NaN, or past float32's range: every feature goes inf/NaN, the answer empty
            given = np.asarray(self.values, dtype=np.float64).reshape(-1)
            bad = given[~(np.abs(given) <= np.finfo(np.float32).max)][0]
            raise UserError(f"clamp value {bad:g} is not a finite number within float32's range (|v| < 3.4e38); "
                            "give smaller values (a latent's token_max tells its scale).")
        object.__setattr__(self, "values", vals)
        if self.positions is not None:  # (int() took position 2.5 for 2, in silence, until 2026-12-05)
            object.__setattr__(self, "positions", tuple(_position(p) for p in self.positions))

    @property
    def empty(self) -> bool:
        return len(self.latents) == 0

    def describe(self) -> dict:
        # rounded in float64: float32's round overflowed values past 3.4e34 to inf
        return {"latents": list(self.latents), "values": np.asarray(self.values, np.float64).round(4).tolist(),
                "mode": self.mode, "positions": None if self.positions is None else list(self.positions),
                "keep_error": self.keep_error}


def steer_hidden(h: torch.Tensor, sae: nn.Module, clamp: Clamp | None) -> torch.Tensor:
    """(B, T, D) or (T, D) layer output -> the same shape and dtype, through the SAE with `clamp`.

    Computed in float32 on the SAE's device; returned on h's device and dtype.
    """
    squeeze = h.ndim == 2
    x = (h[None] if squeeze else h).to(sae.W_dec.device, torch.float32)
    B, T, D = x.shape
    z = sae.encode(x.reshape(B * T, D)).reshape(B, T, -1)
    clamp = clamp or Clamp()
    if clamp.empty:
        out = x if clamp.keep_error else sae.decode(z)
    else:
        lat = torch.as_tensor(clamp.latents, device=z.device, dtype=torch.long)
        if max(clamp.latents) >= z.shape[-1] or min(clamp.latents) < 0:
            raise UserError(f"latent ids {list(clamp.latents)} must lie in 0..{z.shape[-1] - 1}.")
        vals = torch.as_tensor(np.asarray(clamp.values), device=z.device, dtype=z.dtype)
        if vals.ndim == 2:  # one value per token position: every position
            if vals.shape[0] != T:
                raise UserError(f"per-token values have {vals.shape[0]} rows but the layer has {T} tokens.")
            pos = torch.arange(T, device=z.device)
        else:
            pos = torch.arange(T, device=z.device) if clamp.positions is None else \
                torch.as_tensor(clamp.positions, device=z.device, dtype=torch.long)
            if len(pos) and (int(pos.max()) >= T or int(pos.min()) < 0):
                raise UserError(f"token positions {clamp.positions} must lie in 0..{T - 1}.")
            vals = vals.expand(len(pos), len(lat))
        zc = z.clone()
        rows, cols = pos[:, None], lat[None, :]
        if clamp.mode == "set":
            zc[:, rows, cols] = vals
        else:
            zc[:, rows, cols] = zc[:, rows, cols] + vals
        # Error kept: h + decode(z') - decode(z) = h + (z' - z) W_dec (b_dec cancels; exact where z' = z).
        out = x + (zc - z) @ sae.W_dec if clamp.keep_error else sae.decode(zc)
    out = out.to(h.device, h.dtype)
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------------------------
# The hook
# ----------------------------------------------------------------------------------------------
_HOOK_ATTR = "_sae_steering_hook"
_INSTALL_LOCK = threading.Lock()  # guards installing/removing the one hook per module (no other state)


class _SharedHook:
    """The one steering hook of a module; each thread reads its own stack of (sae, clamp, token_dim)."""

    def __init__(self, module: nn.Module):
        self.local = threading.local()
        self.users = 0
        # prepend=True: run before transformers' own hidden-state recorder, or LLaVA reads the old tensor.
        self.handle = module.register_forward_hook(self, prepend=True)

    def stack(self) -> list:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def __call__(self, module, args, output):
        stack = getattr(self.local, "stack", None)
        if not stack:
            return None  # this thread steers nothing: the module's own output
        sae, clamp, token_dim = stack[-1]
        h = output[0] if isinstance(output, tuple) else output
        if token_dim != 1:
            h = h.transpose(0, 1)
        new = steer_hidden(h, sae, clamp)
        if token_dim != 1:
            new = new.transpose(0, 1)
        return (new, *output[1:]) if isinstance(output, tuple) else new


@contextmanager
def intervene(module: nn.Module, sae: nn.Module, clamp: Clamp | None = None, token_dim: int = 1) -> Iterator[None]:
    """While open, `module`'s output h (B, T, D) becomes steer_hidden(h, sae, clamp) for this thread.

    token_dim=0 for modules whose output is (T, B, D) (non-batch-first open_clip). Nested contexts on
    one module in one thread: the innermost wins. The hook goes when the last context exits.
    """
    entry = (sae, clamp, token_dim)
    with _INSTALL_LOCK:
        hook = module.__dict__.get(_HOOK_ATTR)
        if hook is None:
            hook = _SharedHook(module)
            module.__dict__[_HOOK_ATTR] = hook
        hook.users += 1
    stack = hook.stack()
    stack.append(entry)
    try:
        yield
    finally:
        for i in range(len(stack) - 1, -1, -1):  # remove this context's entry (by identity)
            if stack[i] is entry:
                del stack[i]
                break
        with _INSTALL_LOCK:
            hook.users -= 1
            if hook.users == 0:
                hook.handle.remove()
                module.__dict__.pop(_HOOK_ATTR, None)


# ----------------------------------------------------------------------------------------------
# LLaVA for steering
# ----------------------------------------------------------------------------------------------
def llava_load_options(spec: str, device: str, precision: str) -> tuple[dict, str]:
    """from_pretrained kwargs and the compute precision for a LLaVA spec on a device.

    auto: 4-bit (bitsandbytes NF4, fp16 compute) on CUDA for hub-sized models, fp32 for the world's
    tiny LLaVA and on CPU. The vision tower, projector and lm_head stay unquantized: the SAE was
    trained on unquantized activations, and they are a small part of the weights.
    """
    if precision not in PRECISION_CHOICES:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISION_CHOICES)}.")
    cuda = device.startswith("cuda")
    if precision == "auto":
        precision = "4bit" if cuda and not spec.startswith("world:") else "fp32"
    if not cuda and precision in ("4bit", "fp16"):
        raise UserError(f"precision {precision} needs a CUDA device; on CPU use fp32 or bf16.")
    if precision == "4bit":
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UserError("4-bit loading needs bitsandbytes and accelerate; `pip install bitsandbytes accelerate` "
                            "or pass --precision fp16.") from e
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
                               llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
        return {"quantization_config": q, "device_map": {"": device}, "dtype": torch.float16}, "fp16"
    if cuda:
        return {"device_map": {"": device}, "dtype": {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                      "fp16": torch.float16}[precision]}, precision
    return {}, precision


def _latent_id(k) -> int:
    """`k` as a latent id of no SAE in particular (a whole number from 0); UserError otherwise."""
    try:
        return checked_index(k, "latent", 2 ** 62, "")
    except UserError:
        raise UserError(f"latent {k!r} is not a latent id; give a whole number from 0.") from None


def _position(p) -> int:
    """`p` as a token position of no layer in particular (a whole number from 0); UserError otherwise."""
    try:
        return checked_index(p, "token position", 2 ** 62, "")
    except UserError:
        raise UserError(f"token position {p!r} is not a position; give a whole number from 0 (0 is the CLS token "
                        "where there is one).") from None


def refuse_latents_twice(ids) -> None:
    """UserError for a latent given twice: one clamp per latent, so a second would be dropped in silence, not added
    (`precompute steer` says so before LLaVA loads)."""
    twice = next((k for k in ids if list(ids).count(k) > 1), None)
    if twice is not None:
        raise UserError(f"latent {twice} is chosen twice; give each latent once (in add mode, with the sum "
                        f"of its values).")


def _other_layer(recorded, given) -> UserError:
    return UserError(f"the SAE records that it was trained on layer {recorded}, but layer {given} was "
                     f"given; an SAE steers only its own layer, so leave the layer out or give that one.")


def layer_mismatch(sae_layer: str | int, sae_width: int, adapter) -> str | None:
    """None if an SAE at `sae_layer` of width `sae_width` sits where the LLaVA of `adapter` reads,
    else the one sentence that says why not."""
    read = adapter.read_layer
    try:
        sae_block = adapter.resolve_layer(sae_layer)
    except UserError:
        sae_block = None
    read_block = adapter.resolve_layer(read)
    same_layer = sae_block is not None and sae_block.same_place(read_block)
    if same_layer and int(sae_width) == int(adapter.width):
        return None
    where = sae_block.describe(adapter.n_blocks) if sae_block is not None else "not a layer of this tower"
    return (f"the SAE was trained on layer {sae_layer} ({where}) with width {sae_width}, but {adapter.spec} "
            f"reads layer {read} ({read_block.describe(adapter.n_blocks)}) with width {adapter.width}; "
            "steer with an SAE trained on the layer LLaVA reads, at the tower's width.")


@dataclass
class SteerResult:
    """Three greedy answers to one prompt about one image, and how long the call took."""

    original: str
    sae: str
    steered: str
    clamp: dict
    prompt: str
    elapsed_ms: float = 0.0
    """Wall time of the call in milliseconds (named so beside the Monosemanticity Score, MS)."""
    cached: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"original": self.original, "sae": self.sae, "steered": self.steered, "clamp": self.clamp,
                "prompt": self.prompt, "elapsed_ms": round(self.elapsed_ms, 2), "cached": self.cached, **self.extra}


ORIGINAL = "original"  # a row of answer_batch that bypasses the SAE


def is_original(clamp) -> bool:
    """Whether `clamp` is ORIGINAL: by value, as a string read from JSON or built is not the same object."""
    return isinstance(clamp, str) and clamp == ORIGINAL


def read_image_file(image):
    """An image file as an RGB PIL image, upright by its EXIF orientation as the explorer's uploads are (a phone
    photo's pixels are often stored sideways); UserError (one sentence) for an empty name, a missing file or no image."""
    from .datasets import ImageReadError, load_rgb

    if not str(image).strip():  # Path("") is ".", which read as "image . does not exist"
        raise UserError("no image given; pass an image file, or world:INDEX for a bundle image.")
    path = Path(str(image))
    if path.is_dir():
        raise UserError(f"image {path} is a folder; pass one image file in it, or world:INDEX for a bundle image.")
    if not path.is_file():
        raise UserError(f"image {path} does not exist; pass an image file, or world:INDEX for a bundle image.")
    try:
        return load_rgb(path, upright=True)
    except ImageReadError as e:
        raise UserError(f"cannot read image {path} ({e}); pass a PNG or JPEG file.") from None


def _array_image(a: np.ndarray):
    """An (H, W), (H, W, 3) or (H, W, 4) uint8 array as a PIL image; UserError (one sentence) for another array."""
    from PIL import Image

    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise UserError(f"an image array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), not {a.dtype} "
                        f"{a.shape}; convert it first (floats in [0, 1]: (a * 255).round().astype(np.uint8)).")
    return Image.fromarray(np.ascontiguousarray(a))


class SteeringSession:
    """One LLaVA and one SAE at the layer it reads; answers steered prompts (see the module docstring)."""

    @loads_a_model
    def __init__(self, sae, llava_spec: str, sae_layer: str | int, device: str = "auto", precision: str = "auto",
                 bundle=None, cache_mb: float = 256, recorded_layer: str | int | None = None):
        from transformers import AutoProcessor

        device = resolve_device(device)
        kwargs, compute = llava_load_options(llava_spec, device, precision)
        warn_if_slow_half(device, compute, "--precision fp32")  # after the refusals: fp16 off CUDA is one sentence
        self.adapter = load_adapter(llava_spec, full_llava=kwargs or True)
        self.adapter.to(device, compute)  # a model placed by from_pretrained only records device and dtype
        if self.adapter.read_layer is None:
            raise UserError(f"{llava_spec} is not a LLaVA model; steering needs a llava:, hf: LLaVA or world:DIR:llava spec.")
        if recorded_layer is not None and str(recorded_layer).strip() != str(sae_layer).strip():
            # another block than the recorded one is refused as such before layer_mismatch, which took the
            # given layer for the one the SAE "was trained on" (--layer 0 of an SAE of -2)
            try:  # a given layer that is no block of this tower (7 of 4) is not the layer it "was trained on"
                given = self.adapter.resolve_layer(sae_layer)
            except UserError:
                raise _other_layer(recorded_layer, sae_layer) from None
            try:
                own = self.adapter.resolve_layer(recorded_layer)
            except UserError:  # recorded on a deeper tower: layer_mismatch says which layer this one reads
                own = None
            if own is not None and not given.same_place(own):
                raise _other_layer(recorded_layer, sae_layer)
        problem = layer_mismatch(sae_layer, sae.cfg.d_in, self.adapter)
        if problem:
            raise UserError(problem)
        self.llava = self.adapter.llava
        self.device = self.adapter.device
        self.sae = sae.to(self.device).eval().requires_grad_(False)
        self.layer = str(sae_layer)
        self.block = self.adapter.layer_module(self.adapter.read_layer)
        self.layout = self.adapter.layout
        self.processor = AutoProcessor.from_pretrained(self.adapter.name)
        self.tokenizer = self.processor.tokenizer
        self.bundle = bundle
        self.image_token_id = int(self.llava.config.image_token_id)
        eos = self.llava.generation_config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = int(cache_mb * 2**20)  # LLaVA-1.5: 577 x 1024 fp16 = 1.2 MB an image; world: 4 KB
        # the last PROMPT_CACHE prompts' ids: a typed question is any text, and a plain dict kept every one for the
        # process's life (+1.6 MB per 1,000 new questions on a reviewer's soak of the explorer; until 2026-12-05)
        self._prompt_ids: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompt_lock = threading.Lock()
        self._text = None

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle, device: str = "auto", precision: str = "auto", llava: str | None = None,
                    note=None, **kwargs) -> "SteeringSession":
        """The bundle's SAE and the LLaVA that reads its layer: the world's tiny LLaVA for world bundles,
        the bundle's own model for LLaVA bundles, `llava` (default llava-hf/llava-1.5-7b-hf) otherwise.
        `note(line)`, where given, hears other_tower_warning's warning before LLaVA loads."""
        from .bundle import Bundle, open_bundle

        b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        model = b.manifest["model"]
        spec = llava or bundle_llava_spec(b)
        if note is not None and (warning := other_tower_warning(b.local_spec(model.get("spec") or ""), spec)):
            note(warning)
        return cls(b.load_sae(), spec, model["layer"], device=device, precision=precision, bundle=b, **kwargs)

    @classmethod
    def from_paths(cls, sae_dir: str | Path, llava: str | None = None, layer: str | int | None = None,
                   latents=(), note=None, **kwargs) -> "SteeringSession":
        """An SAE folder (ours, SAELens's, sparsify's, dictionary_learning's, or hf:OWNER/REPO[/FOLDER]) and
        a LLaVA spec `llava` (default: the LLaVA the SAE was trained on, see `llava_for_model`); the layer defaults
        to the one the SAE records. `latents`, those the caller will clamp, are checked against the SAE before
        LLaVA loads (as refuse_before_loading does with a bundle), and `note` as in from_bundle."""
        from .checkpoint import load_sae, no_layer_reason, trained_on

        sae = load_sae(sae_dir)
        for k in latents:
            checked_latent(k, sae.cfg.d_sae)
        trained = trained_on(sae)
        recorded = trained["layer"]
        if layer is None:
            layer = recorded
            if layer is None:
                raise UserError(f"{no_layer_reason(sae, sae_dir)}; pass the layer it was trained on.")

        # a layer given beside the recorded one must be the same block: before the model loads where the
        # names alone settle it (the same sign, or "embed"), after it (in __init__) where only the tower's depth
        # can (-2 and 22)
        def parsed(x):
            try:
                return int(str(x).strip())
            except ValueError:
                return str(x).strip()

        given_name, own_name = parsed(layer), parsed(recorded)
        if recorded is not None and given_name != own_name:
            ints = [v for v in (given_name, own_name) if isinstance(v, int)]
            if ((len(ints) == 2 and (given_name < 0) == (own_name < 0))
                    or (len(ints) == 1 and "embed" in (given_name, own_name))):
                raise _other_layer(recorded, layer)
        llava = llava or llava_for_model(trained["model"])
        if note is not None and (warning := other_tower_warning(trained["model"], llava)):
            note(warning)
        return cls(sae, llava, layer, recorded_layer=recorded, **kwargs)

    # --- images and the hidden-state cache ----------------------------------------------------
    def load_image(self, image):
        """PIL image, path, "world:INDEX" or int (an image of the bundle's dataset) -> (PIL RGB, cache key)."""
        from PIL import Image

        if isinstance(image, np.ndarray):  # it went on as a file name, "File name too long"
            image = _array_image(image)
        if isinstance(image, Image.Image):
            im = image.convert("RGB")
            digest = hashlib.sha1(im.tobytes()).hexdigest()
            return im, ("pil", im.size, digest)
        idx = dataset_image_index(image)
        if idx is not None:
            if self.bundle is None:
                raise UserError(f"image {image!r} names a dataset image, but this session has no bundle; pass a file.")
            idx = checked_dataset_image(self.bundle, idx)
            return self.bundle.dataset()[idx], ("idx", idx)
        if not isinstance(image, (str, Path)):
            raise UserError(f"an image of type {type(image).__name__} cannot be read; pass a PIL image, an (H, W, 3) "
                            "uint8 array, a file path, or world:INDEX for a bundle image.")
        path = Path(str(image))
        return read_image_file(image), ("path", str(path.resolve()), path.stat().st_mtime_ns)

    @torch.inference_mode()
    def hidden(self, images: Sequence) -> tuple[torch.Tensor, int]:
        """Hidden states at the SAE's layer, (B, T, D) in the model's dtype, from the cache where possible;
        returns them and the number of images the tower had to run on."""
        loaded = [self.load_image(im) for im in images]
        with self._lock:
            got = [self._cache.get(key) for _, key in loaded]
            for _, key in loaded:
                if key in self._cache:
                    self._cache.move_to_end(key)
        todo = [i for i, g in enumerate(got) if g is None]
        if todo:
            pixels = self.adapter.preprocess([loaded[i][0] for i in todo])
            h = self.adapter.capture(pixels, [self.adapter.read_layer])[str(self.adapter.read_layer)]
            with self._lock:
                for j, i in enumerate(todo):
                    got[i] = h[j].clone()
                    if loaded[i][1] not in self._cache:
                        self._cache[loaded[i][1]] = got[i]
                        self._cache_bytes += got[i].numel() * got[i].element_size()
                while self._cache_bytes > self._cache_limit and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.numel() * old.element_size()
        return torch.stack(got), len(todo)

    # --- clamps -------------------------------------------------------------------------------
    def make_clamp(self, latents=(), values=(), mode: str = "set", patches=None, keep_error: bool = False) -> Clamp:
        """A Clamp from user-facing arguments; patches are patch indices (row-major, CLS excluded)."""
        if isinstance(latents, str):  # list("12") steered latents 1 and 2
            raise UserError(f"latents {latents!r} is text; give a latent id or a list of them, e.g. [12].")
        # one id given bare, whatever it is, so checked_latent names it (list(2.5) was "'float' object is not iterable")
        latents = list(latents) if hasattr(latents, "__iter__") else [latents]
        values = [values] if isinstance(values, (int, float, np.floating, np.integer)) else values
        ids = [self.check_latent(k) for k in latents]
        refuse_latents_twice(ids)
        positions = None
        if patches is not None:
            patches = checked_patches(patches, self.layout.n_patches, self.layout.grid)
            positions = tuple(self.layout.n_prefix + p for p in patches)
        return Clamp(tuple(ids), values, mode, positions, keep_error)

    def check_latent(self, k) -> int:
        """`k` as a latent of this SAE; UserError (one sentence) for a fraction, text or out of range."""
        return checked_latent(k, self.sae.cfg.d_sae)

    # --- generation ---------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """(1, L) input ids of LLaVA-1.5's prompt format with the image placeholder expanded."""
        with self._prompt_lock:
            ids = self._prompt_ids.get(prompt)
            if ids is not None:
                self._prompt_ids.move_to_end(prompt)
                return ids
        from PIL import Image

        self.check_prompt(prompt)
        blank = Image.new("RGB", self.adapter.image_size, (255, 255, 255))
        ids = self.processor(images=[blank], text=[llava_prompt(prompt)], return_tensors="pt")["input_ids"]
        with self._prompt_lock:
            self._prompt_ids[prompt] = ids
            while len(self._prompt_ids) > PROMPT_CACHE:
                self._prompt_ids.popitem(last=False)
        return ids

    def check_prompt(self, prompt: str) -> None:
        """Refuse a prompt that holds LLaVA's image placeholder: the processor would count a second image
        and raise (a traceback where a question was typed)."""
        token = getattr(self.processor, "image_token", None) or "<image>"
        if token in prompt:
            raise UserError(f"the prompt contains {token}, LLaVA's image placeholder; remove it (the image is "
                            "placed before the prompt already).")

    def check_answer_length(self, prompt_len: int, max_new_tokens) -> None:
        """UserError (one sentence) for an answer length that is not a whole number of tokens from 1, or that
        runs past the language model's positions after the prompt (`prompt_len` tokens, the image's included):
        generation went on past the context the model was trained on (rotary positions raise nothing), for as
        many tokens as asked (the `steer` command's --max-new-tokens has no other bound)."""
        if not is_count(max_new_tokens):
            raise UserError(f"the answer length {max_new_tokens!r} is not a whole number of tokens from 1.")
        limit = getattr(self.llava.config.text_config, "max_position_embeddings", None)
        if limit and prompt_len >= limit:
            raise UserError(f"the prompt's {prompt_len} tokens (the image's included) fill the language model's {limit} "
                            "positions, leaving none for an answer; shorten the prompt.")
        if limit and prompt_len + max_new_tokens > limit:
            raise UserError(f"an answer of {max_new_tokens} tokens after the prompt's {prompt_len} (the image's "
                            f"included) runs past the language model's {limit} positions; ask for at most "
                            f"{limit - prompt_len}.")

    @torch.inference_mode()
    def features(self, h: torch.Tensor, clamps: Sequence) -> torch.Tensor:
        """Rows of the layer output LLaVA will read, one per clamp (ORIGINAL = unchanged): (B, T, D).
        UserError for a clamp whose row overflowed (`_check_finite`)."""
        rows = []
        for hi, c in zip(h, clamps):
            if is_original(c):
                rows.append(hi)
                continue
            if c is not None and not isinstance(c, Clamp):  # was "'str' object has no attribute 'empty'"
                raise UserError(f"clamp {c!r} is neither a Clamp nor {ORIGINAL!r} (the model without the SAE); give "
                                "Clamp(latents, values) or session.make_clamp(...), or None for the SAE unclamped.")
            row = _check_finite(steer_hidden(hi, self.sae, c), c)
            # the language model's norms square each token of its input in float32: past float32's range that
            # is inf, the norm's output 0, and the image reads as blank, every module's output still finite (the
            # tiny world answered the unsteered answer at 1e25), so a token whose square sum overflows is refused
            if not bool(torch.isfinite(self.project(row[None]).float().pow(2).sum(-1)).all()):
                raise UserError(f"clamping latents {list(c.latents)} to {_shown_values(c)} makes the image's "
                                "tokens too large for the language model (their squares overflow float32, and its "
                                "norms would blank them); give smaller values (a latent's token_max tells its scale).")
            rows.append(row)
        return torch.stack(rows)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T', E) what LLaVA's projector makes of layer outputs h (B, T, D): the tokens LLaVA reads, in the
        model's compute dtype (steer-eval's learned strategy passes float32 layer outputs, which a bf16 or fp16
        LLaVA refused: "expected m1 and m2 to have the same dtype")."""
        feats = h[:, self.layout.n_prefix:] if self.adapter.read_tokens == "patches" else h
        return self.llava.model.multi_modal_projector(feats.to(self.adapter.dtype))

    def prompt_embeddings(self, h: torch.Tensor, prompt: str) -> torch.Tensor:
        """(B, L, E) input embeddings of `prompt` with the image placeholders filled by the projected
        features of layer outputs h (B, T, D). Differentiable (no inference mode): steer-eval's learned
        strategy backpropagates through it."""
        proj = self.project(h)
        ids = self.prompt_ids(prompt).to(self.device).expand(h.shape[0], -1)
        emb = self.llava.get_input_embeddings()(ids)
        mask = (ids == self.image_token_id)[..., None]
        return emb.masked_scatter(mask, proj.to(emb.dtype))

    def first_token_logprobs(self, h: torch.Tensor, prompt: str) -> torch.Tensor:
        """(B, V) log-probabilities of the answer's first token given layer outputs h (B, T, D), in
        float32; differentiable in h. The greedy answer's first token is their argmax."""
        out = self.llava.model.language_model(inputs_embeds=self.prompt_embeddings(h, prompt))
        return torch.log_softmax(self.llava.lm_head(out.last_hidden_state[:, -1]).float(), -1)

    @torch.inference_mode()
    def generate_from_hidden(self, h: torch.Tensor, prompt: str, max_new_tokens: int,
                             min_new_tokens: int = 0) -> list[str]:
        """Greedy answers from layer outputs h (B, T, D): projector + language model only.

        Same computation as LlavaForConditionalGeneration.generate (features of the read tokens,
        projected, scattered into the image placeholders, KV-cached greedy decoding)."""
        from transformers import DynamicCache

        llava = self.llava
        B = h.shape[0]
        emb = self.prompt_embeddings(h, prompt)
        self.check_answer_length(emb.shape[1], max_new_tokens)
        lm = llava.model.language_model
        cache = DynamicCache(config=llava.config.text_config)
        out = lm(inputs_embeds=emb, cache=cache, use_cache=True)  # `cache`: transformers >= 5.24 (was past_key_values)
        done = torch.zeros(B, dtype=torch.bool, device=emb.device)
        eos = torch.tensor(sorted(self.eos_ids), device=emb.device) if self.eos_ids else None
        tokens = []
        for step in range(max_new_tokens):
            logits = llava.lm_head(out.last_hidden_state[:, -1])
            if step < min_new_tokens and eos is not None:
                logits[:, eos] = -float("inf")
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens.append(nxt)
            if eos is not None:
                done |= torch.isin(nxt, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            out = lm(inputs_embeds=llava.get_input_embeddings()(nxt[:, None]), cache=cache, use_cache=True)
        seqs = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(B)]
        return [self.tokenizer.decode(s, skip_special_tokens=True).strip() for s in seqs]

    @torch.inference_mode()
    def generate_full(self, images: Sequence, prompt: str, max_new_tokens: int, clamp=ORIGINAL,
                      min_new_tokens: int = 0) -> list[str]:
        """The uncached path: the whole LLaVA through `generate`, the SAE hooked into the tower
        (ORIGINAL: no hook). What the cache is measured against."""
        self.check_prompt(prompt)
        pil = [self.load_image(im)[0] for im in images]
        inputs = self.processor(images=pil, text=[llava_prompt(prompt)] * len(pil), return_tensors="pt",
                                padding=True).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.adapter.dtype)
        self.check_answer_length(inputs["input_ids"].shape[1], max_new_tokens)
        kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                  pad_token_id=self.pad_id)
        if is_original(clamp):
            out = self.llava.generate(**inputs, **kw)
        else:
            with intervene(self.block, self.sae, clamp):
                out = self.llava.generate(**inputs, **kw)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [a.strip() for a in self.processor.batch_decode(new, skip_special_tokens=True)]

    # --- the API ------------------------------------------------------------------------------
    def answer_batch(self, images: Sequence, clamps: Sequence, prompt: str = WHAT_IS_SHOWN,
                     max_new_tokens: int = 5, min_new_tokens: int = 0) -> list[str]:
        """One answer per (image, clamp) pair, in one batched pass (ORIGINAL = no SAE)."""
        if len(images) != len(clamps):
            raise ValueError("answer_batch needs one clamp per image")
        if not len(images):
            return []
        h, _ = self.hidden(images)
        return self.generate_from_hidden(self.features(h, clamps), prompt, max_new_tokens, min_new_tokens)

    def answers(self, image, latents=(), values=(), prompt: str = WHAT_IS_SHOWN, keep_error: bool = False,
                patches=None, mode: str = "set", max_new_tokens: int = 5, min_new_tokens: int = 0) -> SteerResult:
        """Original, SAE-inserted and clamped answers to `prompt` about `image` (one batched pass)."""
        t0 = time.perf_counter()
        clamp = self.make_clamp(latents, values, mode, patches, keep_error)
        h, ran = self.hidden([image])
        rows = self.features(h.expand(3, -1, -1), [ORIGINAL, Clamp(keep_error=False), clamp])
        orig, sae, steered = self.generate_from_hidden(rows, prompt, max_new_tokens, min_new_tokens)
        # the patches as the user gave them beside the token positions the clamp holds (CLS first, where there is one)
        echo = {**clamp.describe(), "patches": None if clamp.positions is None else
                [p - self.layout.n_prefix for p in clamp.positions]}
        return SteerResult(orig, sae, steered, echo, prompt, (time.perf_counter() - t0) * 1e3, cached=ran == 0)

    def sweep(self, image, latents, values_list: Sequence, prompt: str = WHAT_IS_SHOWN, keep_error: bool = False,
              patches=None, mode: str = "set", max_new_tokens: int = 5) -> list[tuple]:
        """[(values, answer)] for each entry of values_list (a scalar or one value per latent)."""
        clamps = [self.make_clamp(latents, v, mode, patches, keep_error) for v in values_list]
        if not clamps:
            return []
        h, _ = self.hidden([image])
        answers = self.generate_from_hidden(self.features(h.expand(len(clamps), -1, -1), clamps), prompt, max_new_tokens)
        return list(zip(values_list, answers))

    @torch.inference_mode()
    def latents_on_image(self, image, top: int = 10) -> dict:
        """The latents that fire most on an image: [(k, max over patches, mean over patches, label)] and
        each one's activation map over the patch grid (rows, cols), float32."""
        if not is_count(top):  # top=-1 sliced all but one, 2.5 was a TypeError
            raise UserError(f"top={top!r} must be a whole number of latents from 1.")
        h, _ = self.hidden([image])
        labels = self.bundle.labels["labels"] if self.bundle is not None else None
        return latents_firing(self.sae.encode(h[0].float()).cpu(), self.layout, top, labels)

    def steering_score(self, word: str, latent: int, top: int = 16) -> float:
        """The paper's score: cosine between the CLIP text embedding of `word` and the mean CLIP image
        embedding of the latent's top images (bundle embeddings; needs a bundle)."""
        return float(self.scorer().score([word], [self.check_latent(latent)], top)[0])  # -1 read the last one

    def scorer(self):
        from .steering_eval import ClipScorer

        if self.bundle is None:
            raise UserError("the CLIP steering score needs a bundle (its image embeddings and embedder).")
        with self._lock:
            if self._text is None:
                self._text = ClipScorer(self.bundle)
        return self._text


def _check_finite(row: torch.Tensor, clamp: Clamp) -> torch.Tensor:
    """`row`, or UserError for a clamp whose steered features overflowed (finite values, but so large that
    the decoded layer output is inf/NaN): LLaVA would answer nothing, which reads as a steering result."""
    if not bool(torch.isfinite(row).all()):
        raise UserError(f"clamping latents {list(clamp.latents)} to {_shown_values(clamp)} "
                        "overflows the layer's output (inf/NaN); give smaller values (a latent's token_max tells "
                        "its scale).")
    return row


def _shown_values(clamp: Clamp) -> list[float]:
    """A clamp's first 4 values for a message, to float32's 6 significant digits (1e22, not 9.999999778e21)."""
    return [float(f"{v:.6g}") for v in np.asarray(clamp.values, dtype=np.float64).reshape(-1)[:4]]


def checked_latent(k, d_sae: int) -> int:
    """`k` as a latent of an SAE of `d_sae` latents; UserError (one sentence) for a fraction, text or out of range."""
    return checked_index(k, "latent", d_sae, "this SAE has latents")


def dataset_image_index(image) -> int | None:
    """The dataset index an image argument names (an int, or "world:INDEX"), None for anything else (a file, a
    picture); UserError for "world:" without an integer."""
    if isinstance(image, (int, np.integer)):
        return image  # as given: checked_index refuses True
    if isinstance(image, str) and image.startswith("world:"):
        idx = integer_text(image.split(":", 1)[1])
        if idx is None:
            raise UserError(f"image {image!r} is not world:INDEX with an integer INDEX.")
        return idx
    return None


def checked_dataset_image(bundle, idx) -> int:
    """`idx` as an image of the bundle's dataset; UserError (one sentence) otherwise."""
    return checked_index(idx, "image", len(bundle.dataset()), "the bundle's dataset has images")


def latents_firing(z: torch.Tensor, layout, top: int, labels=None) -> dict:
    """(T, K) SAE codes of one image's tokens (`layout`: the model's TokenLayout) -> the `top` latents by their max
    over the patches: {"top": [(k, max, mean over patches, label)], "maps": {k: (rows, cols) float32}, "grid",
    "cls": {k: CLS activation} or None, "n_firing": how many latents fire on a patch, listed or not}."""
    patches = z[layout.n_prefix:]
    mx, mean = patches.max(0).values, patches.mean(0)
    order = torch.argsort(mx, descending=True)[:top]
    out = [(int(k), float(mx[k]), float(mean[k]), labels[k] if labels else "") for k in order if mx[k] > 0]
    maps = {k: patches[:, k].reshape(layout.grid).numpy() for k, *_ in out}
    return {"top": out, "maps": maps, "grid": layout.grid,
            "cls": {k: float(z[0, k]) for k, *_ in out} if layout.has_cls else None, "n_firing": int((mx > 0).sum())}


def checked_patches(patches, n_patches: int, grid) -> list[int]:
    """Patch indices (row-major, the prefix tokens not counted) of a `grid` of `n_patches`; UserError naming the
    first that is not one."""
    if isinstance(patches, (str, int, np.integer)) or not hasattr(patches, "__iter__"):
        raise UserError(f"patches {patches!r} is not a list of patch indices; give e.g. [5, 6].")
    out = []
    for p in patches:  # as latents are checked: int() took 2.5 for patch 2 and said nothing useful of "x"
        try:
            out.append(checked_index(p, "patch", n_patches, "the image has patches"))
        except UserError as e:
            raise UserError(f"{str(e).rstrip('.')} (a {grid[0]}x{grid[1]} grid, row-major).") from None
        if out.count(out[-1]) > 1:  # a patch is clamped once however often named; twice is likely a typo (5,5 for 5,6)
            raise UserError(f"patch {out[-1]} is chosen twice; give each patch once.")
    return out


def refuse_before_loading(bundle, latents=(), image=None, patches=None, llava: str | None = None) -> None:
    """Refuse what the bundle alone can tell is wrong, before a SteeringSession loads LLaVA (minutes for a 7B
    model, which a typo then wasted): a latent its SAE lacks, an image index (int or "world:INDEX") its dataset
    lacks, and with the bundle's own model steering (`llava` None and the bundle's model a LLaVA) a patch outside
    its grid. The session checks the same again with what it loaded."""
    for k in latents:
        checked_latent(k, bundle.n_neurons)
    idx = dataset_image_index(image)
    if idx is not None:
        checked_dataset_image(bundle, idx)
    model = bundle.manifest["model"]
    if patches is not None and llava is None and bundle_llava_spec(bundle) == bundle.local_spec(model["spec"]):
        checked_patches(patches, model["n_patches"], model["grid"])


def llava_spec(value: str | None) -> str | None:
    """A user's LLaVA as a model spec: a spec (`llava:`, `hf:`, `world:DIR:llava`, ...) as given; a folder written by
    save_pretrained as `llava:` and its absolute path; any other word as `llava:` it (a hub id, or a path the load
    then says is not there). Until 2026-12-05 only specs were taken, and a folder was the spec-prefix sentence."""
    from .adapters import BACKENDS
    from .datasets import absolute_spec

    if value is None or not str(value).strip():
        return None
    value = str(value).strip()
    if value.partition(":")[0] in BACKENDS and ":" in value:
        return value
    return absolute_spec(f"llava:{value}")  # a local folder recorded as the manifests record one


def bundle_llava_spec(bundle) -> str:
    """Which LLaVA steers a bundle's SAE: the tiny LLaVA of the world the bundle carries or names, the
    bundle's own LLaVA, or LLaVA-1.5."""
    if bundle.world_dir is not None:
        return f"world:{bundle.world_dir}:llava"
    return llava_for_model(bundle.manifest["model"]["spec"])


LLAVA_1_5_TOWER = ("hf:openai/clip-vit-large-patch14-336", "open_clip:ViT-L-14-336/openai")
"""The CLIP that LLaVA-1.5's vision tower is (kept frozen in its training), as a user names it: an SAE trained on
it steers LLaVA-1.5."""


def _tower(spec: str) -> tuple[str, str]:
    """Which vision tower a model spec names, comparable across the spellings of one tower."""
    from .adapters import DEFAULT_LLAVA

    kind, _, rest = (spec if ":" in spec else f"hf:{spec}").partition(":")  # a bare hub id (SAELens's model_name)
    if kind in ("hf", "llava") and rest.startswith("/"):  # a folder named as the hub id it holds, `--local-dir
        # openai/clip-vit-large-patch14-336`, recorded absolute since 2026-12-05 (absolute_spec): that id
        rest = next((i for i in (LLAVA_1_5_TOWER[0].partition(":")[2], DEFAULT_LLAVA) if rest.endswith("/" + i)), rest)
    if kind == "world":
        root = rest.removesuffix(":clip").removesuffix(":llava")  # the world's LLaVA reads its CLIP's tower
        return "world", str(Path(os.path.expanduser(root)).resolve())
    if f"{kind}:{rest}" in LLAVA_1_5_TOWER or (kind in ("llava", "hf") and (rest or DEFAULT_LLAVA) == DEFAULT_LLAVA):
        return "llava", DEFAULT_LLAVA
    return kind, rest


def _same_tower(a: tuple[str, str], b: tuple[str, str]) -> bool:
    if a[0] == b[0] == "world" and a != b:
        # a world copied elsewhere (with a bundle moved to another machine) is the same world; one whose folder is
        # not here cannot be told apart
        wa, wb = (Path(t[1]) / "world.json" for t in (a, b))
        return not (wa.is_file() and wb.is_file()) or wa.read_bytes() == wb.read_bytes()
    return a == b


def other_tower_warning(model_spec: str | None, llava_spec: str) -> str | None:
    """A warning, as a clause for the caller's advice to follow, where an SAE trained on activations of
    `model_spec` is to be steered in the vision tower of `llava_spec`, another model: its latents are directions
    of that model's activations and mean nothing here, even where the widths agree (a DINOv2 SAE steered the
    world's LLaVA, and listed "the latents that fire" on its images, without a word until 2026-12-05). None
    where they are one tower, or no model is recorded."""
    if not model_spec or _same_tower(_tower(model_spec), _tower(llava_spec)):
        return None
    return (f"the SAE was trained on activations of {model_spec}, not of the vision tower of {llava_spec}, so its "
            "latents may mean nothing there")


def llava_for_model(spec: str | None) -> str:
    """Which LLaVA steers an SAE trained on model `spec`: that LLaVA, the world's tiny LLaVA for a world
    model, or LLaVA-1.5 (for any other model, or none recorded)."""
    from .adapters import DEFAULT_LLAVA

    spec = spec or ""
    if spec.startswith("llava:"):
        return spec
    if spec.startswith("world:"):
        root = spec[len("world:"):]
        root = root[: -len(":clip")] if root.endswith(":clip") else root
        root = root[: -len(":llava")] if root.endswith(":llava") else root
        return f"world:{root}:llava"
    return f"llava:{DEFAULT_LLAVA}"
