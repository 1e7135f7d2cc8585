"""Model adapters: one interface over open_clip, transformers CLIP/DINOv2/SigLIP, LLaVA's vision tower
and the embedded world's models.

An adapter knows how to load a model from a command-line spec, how the model itself preprocesses an
image (taken from its saved processor or transform config, never re-typed here), which modules are its
residual blocks, how its tokens are laid out (CLS and register tokens, then a row-major patch grid), how
to compute the image embedding used for the Monosemanticity Score, and which layer and tokens a
downstream model (LLaVA) reads. Extraction (precompute) and steering (app) both stand on it.

Specs
    open_clip:NAME[/PRETRAINED]   open_clip model; PRETRAINED is a tag (openai, laion2b_...) or a local
                                  checkpoint file (``open_clip:ViT-B-32//abs/path.pt``); none = random
    hf:ID_OR_DIR                  transformers CLIPVisionModel(WithProjection), CLIPModel (vision side), Dinov2Model,
                                  SiglipVisionModel/SiglipModel, or a LLaVA checkpoint (as llava:)
    llava:[ID_OR_DIR]             the vision tower of LlavaForConditionalGeneration
                                  (default llava-hf/llava-1.5-7b-hf)
    world:DIR[:clip|:llava]       the embedded world: DIR/clip (default) or DIR/llava's vision tower

Layer numbering (`resolve_layer`)
    L >= 0      the output of block L, counted from 0 (the paper's 22 for ViT-L/14)
    L < 0       ``hidden_states[L]`` as transformers and LLaVA index it: hidden_states has one entry
                per block plus the embeddings in front, so -1 is the last block's output, -2 the
                one before (what LLaVA-1.5 reads; equal to 22 for a 24-block tower) and -(blocks+1)
                the embeddings that enter block 0
    embed       the final image embedding (one vector per image; the MS embedding)
"""
from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .datasets import WORLD_MODELS, absolute_spec
from .errors import UserError, unknown_world_part
from .folders import refuse_bundle_as_world
from .progress import transformers_bars_as_lines

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"
BACKENDS = ("open_clip", "hf", "llava", "world")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

MODEL_LOADING = threading.RLock()
"""Held by every model loader in sae_core (`loads_a_model`), so that a process loading models from several
threads (the explorer's requests and its background warm-up) loads one at a time: transformers imports its
classes lazily, and a thread importing one while another thread's import of the package was under way
failed with "cannot import name 'AutoProcessor' from 'transformers'". One at a time also keeps the peak
memory of two loads from adding up. Re-entrant: a steering session loads its adapter inside its own load."""


def loads_a_model(fn):
    """`fn`, run holding MODEL_LOADING."""
    @functools.wraps(fn)
    def holding_the_lock(*args, **kwargs):
        with MODEL_LOADING:
            return fn(*args, **kwargs)
    return holding_the_lock


# ----------------------------------------------------------------------------------------------
# Token layout, layers and token selection
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """A block's output sequence: `n_prefix` tokens (CLS first, then registers), then the patch grid."""

    n_prefix: int
    grid: tuple[int, int]
    has_cls: bool

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    def patch_rc(self, position: int) -> tuple[int, int] | None:
        """(row, column) of a token position in the patch grid; None for CLS/register tokens."""
        if position < self.n_prefix:
            return None
        return divmod(position - self.n_prefix, self.grid[1])

    def to_dict(self) -> dict:
        return {"n_prefix": self.n_prefix, "grid": list(self.grid), "has_cls": self.has_cls,
                "n_tokens": self.n_tokens}


@dataclass(frozen=True)
class Layer:
    """A resolved layer: what the user typed, and where in the model it is read."""

    name: str
    """As given on the command line: "22", "-2" or "embed"; also the store's directory suffix."""
    kind: str
    """"block" (output of `block`), "input" (input of block 0 = hidden_states[0]) or "embed"."""
    block: int = -1

    def same_place(self, other: "Layer") -> bool:
        """Whether both are read at one place of the model, however typed ("22" and "-2" of 24 blocks)."""
        return (self.kind, self.block) == (other.kind, other.block)

    def describe(self, n_blocks: int) -> str:
        if self.kind == "embed":
            return "final image embedding"
        if self.kind == "input":
            return f"embeddings entering block 0 (hidden_states[0]) of {n_blocks}"
        return f"output of block {self.block} (0-based) of {n_blocks} = hidden_states[{self.block + 1}]"


def parse_layers(text: str | Sequence) -> list[str]:
    """ "11,22,-2,embed" -> ["11", "22", "-2", "embed"] (checked for syntax only)."""
    items = [str(x).strip() for x in (text.split(",") if isinstance(text, str) else text)]
    items = [x for x in items if x]
    if not items:
        raise UserError("no layer given; pass --layer L[,L2,...] with block numbers, negative hidden_states indices or embed.")
    for x in items:
        if x != "embed":
            try:
                int(x)
            except ValueError:
                raise UserError(f"layer {x!r} is not an integer or 'embed'; pass e.g. --layer 22 or --layer -2,embed.") from None
    if len(set(items)) != len(items):
        raise UserError(f"layer list {','.join(items)} names a layer twice; list each once.")
    return items


@dataclass(frozen=True)
class TokenSpec:
    """Which tokens of each image become rows: cls | mean | all | patches | random:K."""

    kind: str
    k: int = 0

    @classmethod
    def parse(cls, text: str) -> "TokenSpec":
        text = text.strip()
        if text in ("cls", "mean", "all", "patches"):
            return cls(text)
        if text.startswith("random:"):
            try:
                k = int(text.split(":", 1)[1])
            except ValueError:
                k = 0
            if k > 0:
                return cls("random", k)
        raise UserError(f"--tokens {text!r} is not one of cls, mean, all, patches, random:K (K >= 1).")

    def __str__(self) -> str:
        return f"random:{self.k}" if self.kind == "random" else self.kind

    def check(self, layout: TokenLayout, model: str) -> None:
        if self.kind == "cls" and not layout.has_cls:
            raise UserError(f"{model} has no CLS token; use --tokens mean, patches, all or random:K.")
        if self.kind == "random" and self.k > layout.n_tokens:
            raise UserError(f"--tokens random:{self.k} asks for more tokens than the {layout.n_tokens} each image has.")

    def rows_per_image(self, layout: TokenLayout) -> int:
        return {"cls": 1, "mean": 1, "all": layout.n_tokens, "patches": layout.n_patches,
                "random": self.k}[self.kind]

    def positions(self, layout: TokenLayout, image: int, seed: int) -> np.ndarray:
        """Token positions taken from image `image` (-1 = a pooled row, as for mean)."""
        if self.kind == "cls":
            return np.zeros(1, np.int64)
        if self.kind == "mean":
            return np.full(1, -1, np.int64)
        if self.kind == "all":
            return np.arange(layout.n_tokens, dtype=np.int64)
        if self.kind == "patches":
            return np.arange(layout.n_prefix, layout.n_tokens, dtype=np.int64)
        # A pure function of (seed, image index): any batching, any number of processes, same tokens.
        rng = np.random.default_rng([int(seed), int(image)])
        return np.sort(rng.choice(layout.n_tokens, size=self.k, replace=False)).astype(np.int64)


def select_tokens(
    h: torch.Tensor, spec: TokenSpec, image_ids: np.ndarray, layout: TokenLayout, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """Rows of one batch: (R, d) float32 and (R, 2) int64 [image index, token position], image-major.

    `h` is a block output (B, T, d), or an embedding (B, d) which gives one row per image at
    position -1 whatever the token choice.
    """
    image_ids = np.asarray(image_ids, dtype=np.int64)
    h = h.float()
    if h.ndim == 2:
        return h, np.stack([image_ids, np.full_like(image_ids, -1)], 1)
    if h.shape[1] != layout.n_tokens:
        raise RuntimeError(f"block output has {h.shape[1]} tokens, the layout says {layout.n_tokens}")
    if len(image_ids) == 0:
        return h.new_zeros((0, h.shape[-1])), np.zeros((0, 2), np.int64)
    if spec.kind == "mean":
        rows = h[:, layout.n_prefix:].mean(dim=1)
        pos = np.full((len(image_ids), 1), -1, np.int64)
    else:
        pos = np.stack([spec.positions(layout, i, seed) for i in image_ids])  # (B, k)
        idx = torch.from_numpy(pos).to(h.device)
        rows = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[2])).reshape(-1, h.shape[2])
    img = np.repeat(image_ids, pos.shape[1])
    return rows, np.stack([img, pos.reshape(-1)], 1)


# ----------------------------------------------------------------------------------------------
# The adapter interface
# ----------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by a hook once the last wanted block has run: the rest of the model is skipped."""


class Adapter:
    """One vision encoder behind a uniform interface. Subclasses set the attributes in __init__."""

    spec: str
    backend: str
    name: str
    model: nn.Module
    """The whole loaded module (moved by `to`); for LLaVA the tower, with `.llava` the full model."""
    blocks: Sequence[nn.Module]
    width: int
    embed_dim: int
    layout: TokenLayout
    image_size: tuple[int, int]
    read_layer: int | None = None
    """hidden_states index a downstream model reads (LLaVA's vision_feature_layer), else None."""
    read_tokens: str | None = None
    """Which tokens it reads at that layer: "patches" (LLaVA's "default": CLS dropped) or "all"."""
    preprocessor: "ImageTransform"
    """Picklable image -> tensor transform (what data-loading workers get; never the model)."""

    # --- loading and preprocessing -----------------------------------------------------------
    def to(self, device: str | torch.device = "cpu", precision: str = "fp32") -> "Adapter":
        if precision not in PRECISIONS:
            raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
        self.model.to(device=device, dtype=PRECISIONS[precision])
        self.device, self.dtype = torch.device(device), PRECISIONS[precision]
        return self

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def transform(self, image) -> torch.Tensor:
        """One PIL RGB image -> (3, H, W) float tensor, exactly as the model's own processor does."""
        return self.preprocessor(image)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL RGB images -> (B, 3, H, W), in one processor call where the processor batches."""
        return self.preprocessor.batch(images)

    @property
    def view(self) -> dict | None:
        """The part of an image the model sees, read from its transform (`sae_core.image_view.read_view`)."""
        from .image_view import read_view

        return read_view(self.preprocessor.processor, self.preprocessor.per_image)

    # --- layers ------------------------------------------------------------------------------
    def resolve_layer(self, layer: int | str) -> Layer:
        name = str(layer).strip()
        if name == "embed":
            return Layer("embed", "embed")
        try:
            i = int(name)
        except ValueError:
            raise UserError(f"layer {name!r} is not an integer or 'embed'.") from None
        n = self.n_blocks
        if i >= n or i < -(n + 1):
            raise UserError(
                f"layer {i} does not exist in {self.spec}: it has {n} blocks, so pass 0..{n - 1} "
                f"(block outputs), -1..-{n + 1} (hidden_states indices) or embed."
            )
        if i >= 0:
            return Layer(name, "block", i)
        h = n + 1 + i  # index into hidden_states
        return Layer(name, "input", -1) if h == 0 else Layer(name, "block", h - 1)

    def layer_module(self, layer: int | str) -> nn.Module:
        """The block whose output is `layer` (hook it with ``register_forward_hook(..., prepend=True)``
        so a downstream model such as LLaVA reads what the hook returns)."""
        lay = self.resolve_layer(layer)
        if lay.kind != "block":
            raise UserError(f"layer {layer} of {self.spec} is not the output of a block; pick a block layer.")
        return self.blocks[lay.block]

    def read_layer_block(self) -> int | None:
        return None if self.read_layer is None else self.resolve_layer(self.read_layer).block

    # --- running -----------------------------------------------------------------------------
    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Run the model on preprocessed pixels; return the image embedding (B, embed_dim)."""
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        e = self._forward(pixels.to(self.device, self.dtype, non_blocking=True)).float()
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e

    @contextmanager
    def hooks(self, layers: Sequence[Layer], sink: dict, stop_early: bool = True) -> Iterator[None]:
        """Record the given layers into `sink[name]` while the context is open; hooks are always
        removed on exit, also after an error. With `stop_early`, the forward pass stops after the
        last block needed (only when no embedding is asked for). Only this thread's forward passes are
        recorded or stopped: another thread may run the same model meanwhile."""
        handles = []
        only_here = _only_in(threading.get_ident())
        blocks = [lay.block for lay in layers if lay.kind == "block"]
        last = max(blocks) if blocks else None
        want_embed = any(lay.kind == "embed" for lay in layers)
        try:
            for lay in layers:
                if lay.kind == "block":
                    handles.append(self.blocks[lay.block].register_forward_hook(
                        only_here(_output_hook(sink, lay.name)), prepend=True))
                elif lay.kind == "input":
                    handles.append(self.blocks[0].register_forward_pre_hook(
                        only_here(_input_hook(sink, lay.name)), with_kwargs=True, prepend=True))
            if stop_early and not want_embed:
                if last is not None:
                    handles.append(self.blocks[last].register_forward_hook(only_here(_stop_hook)))
                elif layers:  # only the embeddings entering block 0: stop before it runs
                    handles.append(self.blocks[0].register_forward_pre_hook(only_here(_stop_pre_hook)))
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def capture(self, pixels: torch.Tensor, layers: Sequence[Layer | str | int],
                stop_early: bool = True) -> dict[str, torch.Tensor]:
        """One forward pass; {layer name: (B, T, width) block output, or (B, embed_dim) for embed}."""
        layers = [lay if isinstance(lay, Layer) else self.resolve_layer(lay) for lay in layers]
        sink: dict[str, torch.Tensor] = {}
        with self.hooks(layers, sink, stop_early=stop_early):
            try:
                emb = self._forward(pixels.to(self.device, self.dtype, non_blocking=True))
            except _StopForward:
                emb = None
        for lay in layers:
            if lay.kind == "embed":
                sink[lay.name] = emb
            elif self.batch_dim == 1:
                sink[lay.name] = sink[lay.name].transpose(0, 1)
        return sink

    batch_dim = 0  # open_clip transformers that are not batch-first set 1

    def describe(self) -> dict:
        return {"spec": self.spec, "backend": self.backend, "name": self.name, "n_blocks": self.n_blocks,
                "width": self.width, "embed_dim": self.embed_dim, "image_size": list(self.image_size),
                "token_layout": self.layout.to_dict(), "read_layer": self.read_layer,
                "read_tokens": self.read_tokens}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec!r}: {self.n_blocks} blocks, width {self.width}, "
                f"{self.layout.n_tokens} tokens)")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _only_in(owner: int):
    """Wraps a hook so it acts only in thread `owner`: the hooks sit on modules every thread shares, and
    another thread's forward pass (a second request on the same model) must be neither recorded into
    this sink nor stopped."""
    def wrap(hook):
        def guarded(*args):
            return hook(*args) if threading.get_ident() == owner else None
        return guarded
    return wrap


def _output_hook(sink: dict, name: str):
    def hook(module, args, output):
        sink[name] = _first(output).detach()
    return hook


def _input_hook(sink: dict, name: str):
    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        sink[name] = x.detach()
    return hook


def _stop_hook(module, args, output):
    raise _StopForward


def _stop_pre_hook(module, args):
    raise _StopForward


# ----------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------
def _refuse_unknown_open_clip(open_clip, name: str, pretrained: str | None) -> None:
    """One sentence for a model name or pretrained tag open_clip does not know, with the nearest names or the
    model's tags: open_clip's own error listed all of its ~150 model names in one line, and for a tag it logged
    an ERROR line of its own beside a sentence that listed none."""
    import difflib

    if name.startswith(("hf-hub:", "local-dir:")):  # their configs are read from the hub or the folder
        return
    known = open_clip.list_models()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        raise UserError(f"open_clip has no model {name!r}" + (f"; the nearest names are {', '.join(near)}" if near else "")
                        + f" (open_clip.list_models() lists all {len(known)}).")
    if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(name, pretrained):
        # get_pretrained_cfg, not the tag list: it takes "OpenAI" and "laion2b-s34b-b79k" as open_clip does
        tags = open_clip.list_pretrained_tags_by_model(name)
        listed = ", ".join(tags[:10]) + (f" and {len(tags) - 10} more" if len(tags) > 10 else "")
        raise UserError(f"open_clip has no pretrained weights {pretrained!r} for {name}; "
                        + (f"its tags are {listed}" if tags else "it has no pretrained tags")
                        + ", or pass a local checkpoint file.")


@contextmanager
def _open_clip_logs_silenced():
    """open_clip's own log records (`logging.error` on the root logger) left out while it runs: a failed download
    was an "ERROR:root:..." line before the one sentence that says the same."""
    import logging

    def not_open_clips(record) -> bool:
        return "open_clip" not in record.pathname

    root = logging.getLogger()
    root.addFilter(not_open_clips)
    try:
        yield
    finally:
        root.removeFilter(not_open_clips)


class OpenClipAdapter(Adapter):
    backend = "open_clip"

    def __init__(self, spec: str, name: str, pretrained: str | None):
        import open_clip

        self.spec, self.name, self.pretrained = spec, name, pretrained
        if pretrained and not os.path.isfile(pretrained) and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))):
            raise _load_failure(f"open_clip checkpoint file {pretrained} does not exist", "pass an existing file or a pretrained tag")
        _refuse_unknown_open_clip(open_clip, name, pretrained)
        try:
            # no weights named: the same random weights at every load (seed 0, the caller's RNG untouched), so
            # extract, train, the atlas and the app read one model; each load drew its own until 2026-12-05 (an
            # atlas FVU of 1.13 for an SAE that held out 0.20)
            with _open_clip_logs_silenced(), torch.random.fork_rng(devices=[]):  # it logs a failed download, then raises
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
        except Exception as e:  # no network, a bad checkpoint (an unknown name or tag is refused above)
            said = str(e).splitlines()[0] if str(e) else ""
            if "download" in said.lower():  # a known tag whose weights are neither cached nor reachable
                raise _load_failure(f"cannot load open_clip model {name!r} with pretrained={pretrained!r}: its weights "
                                    "are not in this machine's cache and could not be downloaded (no network, or "
                                    "HF_HUB_OFFLINE=1)", "fetch them once where the hub is reachable, or pass a "
                                    "local checkpoint file") from e
            raise _load_failure(
                f"cannot load open_clip model {name!r} with pretrained={pretrained!r} ({type(e).__name__}: {said})",
                "pass an open_clip checkpoint file of that model, or a tag from open_clip.list_pretrained()"
            ) from e
        self.model = model.eval().requires_grad_(False)
        self.preprocessor = ImageTransform(preprocess)
        visual = model.visual
        size = visual.image_size if hasattr(visual, "image_size") else None
        if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
            self.blocks = visual.transformer.resblocks
            self.width = int(visual.transformer.width)
            self.layout = TokenLayout(1, tuple(visual.grid_size), True)
            self.batch_dim = 0 if getattr(visual.transformer, "batch_first", True) else 1
        elif hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):  # timm towers (SigLIP, ...)
            trunk = visual.trunk
            self.blocks = trunk.blocks
            self.width = int(trunk.embed_dim)
            n_prefix = int(getattr(trunk, "num_prefix_tokens", 0))
            has_cls = bool(getattr(trunk, "cls_token", None) is not None)
            self.layout = TokenLayout(n_prefix, tuple(trunk.patch_embed.grid_size), has_cls)
            size = trunk.patch_embed.img_size
        else:
            raise UserError(f"open_clip model {name} has no transformer blocks (not a ViT); pick a ViT model.")
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.to("cpu")
        dim = getattr(visual, "output_dim", None)
        if not dim:  # timm towers do not say; one blank image does
            with torch.inference_mode():
                dim = self._forward(torch.zeros(1, 3, *self.image_size)).shape[-1]
        self.embed_dim = int(dim)

    def _forward(self, pixels):
        return self.model.encode_image(pixels)


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------
def _load_failure(problem: str, advice: str) -> UserError:
    """A model that cannot be loaded, as one sentence "problem; advice."; `problem` is kept on the error for a
    caller whose user cannot follow the advice (the explorer's `app.search.load_bundle_model`, which until
    2026-12-05 cut the sentence at the wording of one of them)."""
    error = UserError(f"{problem}; {advice}.")
    error.problem = problem
    return error


def _hf_call(what: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, a transformers loader of `args[0]`: its failure one sentence, its bars lines in a log."""
    advice = "pass a directory written by save_pretrained or a hub id this machine can download"
    source = str(args[0]) if args and isinstance(args[0], (str, Path)) else ""
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        # transformers would try it as a hub id and say "Repo id must use alphanumeric chars ..."
        raise _load_failure(f"cannot load {what}: {source} does not exist (a path, not a hub id)", advice)
    try:
        with transformers_bars_as_lines():
            return fn(*args, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise _load_failure(f"cannot load {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                            advice) from e


class ImageTransform:
    """An image transform with a batched form: torchvision-style (per image) or a transformers
    image processor (one call for the whole batch, about 3x faster per image)."""

    def __init__(self, per_image: Callable | None = None, processor=None):
        self.per_image, self.processor = per_image, processor

    def __call__(self, image) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return self.per_image(image)

    def batch(self, images: Sequence) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return torch.stack([self.per_image(im) for im in images])


def _hf_image_transform(source: str) -> ImageTransform:
    from transformers import AutoImageProcessor

    proc = _hf_call(f"the image processor of {source}", AutoImageProcessor.from_pretrained, source)
    return ImageTransform(processor=proc)


def _fixed_image_size(preprocessor: ImageTransform, source: str, side: int) -> tuple[int, int]:
    """(H, W) of the pixels the processor makes of any image; UserError where that depends on the image's shape.

    The token layout, the batches and the stores all take one size: a processor that keeps the image's aspect
    (shortest_edge without its centre crop) made a wide image 64x213 next to 64x64, and extraction ended in
    torch.stack's traceback, or, one image a batch, in "block output has 61 tokens, the layout says 17",
    after writing its plan."""
    from PIL import Image

    sizes = [tuple(preprocessor.batch([Image.new("RGB", wh)]).shape[-2:])
             for wh in ((side, side), (side * 10 // 3, side), (side, side * 10 // 3))]
    other = next((s for s in sizes[1:] if s != sizes[0]), None)
    if other is not None:
        raise UserError(f"the image processor of {source} gives pictures of different sizes for images of different "
                        f"shapes ({sizes[0][0]}x{sizes[0][1]} for a square one, {other[0]}x{other[1]} for another), "
                        "and the token layout needs one size; give it a fixed size (do_center_crop with crop_size, "
                        "or size with height and width, in its preprocessor_config.json).")
    return sizes[0]


def _hf_blocks(tower: nn.Module) -> nn.ModuleList:
    enc = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    for attr in ("layers", "layer"):
        blocks = getattr(enc, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise UserError(f"{type(tower).__name__} has no encoder blocks this adapter knows; use a CLIP, SigLIP or DINOv2 vision model.")


def _hf_layout(cfg, model_type: str, size: tuple[int, int]) -> TokenLayout:
    """Tokens of a transformers tower fed (H, W) = `size` pixels."""
    grid = (size[0] // cfg.patch_size, size[1] // cfg.patch_size)
    if model_type.startswith("siglip"):
        return TokenLayout(0, grid, False)
    n_reg = int(getattr(cfg, "num_register_tokens", 0) or 0)
    return TokenLayout(1 + n_reg, grid, True)


class HFVisionAdapter(Adapter):
    """transformers CLIPVisionModel / CLIPModel / Dinov2Model / Siglip(Vision)Model."""

    backend = "hf"
    SUPPORTED = ("clip", "clip_vision_model", "dinov2", "dinov2_with_registers", "siglip", "siglip_vision_model")

    def __init__(self, spec: str, source: str, backend: str = "hf"):
        from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

        self.spec, self.name, self.backend = spec, source, backend
        cfg = _hf_call(f"the config of {source}", AutoConfig.from_pretrained, source)
        mt = cfg.model_type
        if mt not in self.SUPPORTED:
            raise UserError(f"{source} is a model of type {mt!r}; hf: supports {', '.join(self.SUPPORTED)} (and llava "
                            "via llava:).")
        vcfg = cfg.vision_config if mt in ("clip", "siglip") else cfg
        self.preprocessor = _hf_image_transform(source)
        # what the processor feeds the model, not the config's image_size: DINOv2's config says 518 while its
        # processor crops 224 (the model interpolates its position embeddings), a 16x16 grid, not 37x37; found
        # before the weights are loaded, as a processor without one size is refused
        size = vcfg.image_size
        side = size[0] if isinstance(size, (list, tuple)) else size
        self.image_size = _fixed_image_size(self.preprocessor, source, side)
        # AutoModel builds a CLIPVisionModel of a CLIPVisionModelWithProjection checkpoint and drops its
        # visual_projection (transformers only reports it UNEXPECTED): embed was the unprojected pooled output
        self.projected = mt == "clip_vision_model" and "CLIPVisionModelWithProjection" in (cfg.architectures or ())
        model_class = CLIPVisionModelWithProjection if self.projected else AutoModel
        model, loaded = _hf_call(f"model {source}", model_class.from_pretrained, source, output_loading_info=True)
        # weights the checkpoint lacks are random (transformers only reports them): a CLIPForImageClassification
        # checkpoint built as a CLIPModel embedded with a random visual_projection
        missing = sorted(k for k in loaded["missing_keys"] if not k.endswith("position_ids"))
        if missing:
            raise UserError(f"{source} ({', '.join(cfg.architectures or [mt])}) lacks {len(missing)} weights of the "
                            f"{type(model).__name__} hf: builds of it (e.g. {missing[0]}), which would be random; pass "
                            "a CLIP, SigLIP or DINOv2 checkpoint saved with its own model class.")
        self.model = model.eval().requires_grad_(False)
        self.model_type = mt
        if mt in ("clip", "siglip") or self.projected:  # use the vision side and the projection
            self.tower = model.vision_model
            self.embed_dim = int(getattr(cfg, "projection_dim", 0) or vcfg.hidden_size)
        else:
            self.tower = model
            self.embed_dim = int(vcfg.hidden_size)
        self.blocks = _hf_blocks(self.tower)
        self.width = int(vcfg.hidden_size)
        self.layout = _hf_layout(vcfg, mt, self.image_size)
        self.to("cpu")

    def _forward(self, pixels):
        if self.model_type == "clip" or self.projected:
            return self.model.visual_projection(self.tower(pixel_values=pixels).pooler_output)
        if self.model_type == "siglip":
            return self.tower(pixel_values=pixels).pooler_output
        return self.model(pixel_values=pixels).pooler_output


class LlavaAdapter(Adapter):
    """The vision tower of a LlavaForConditionalGeneration, at the layer and tokens LLaVA reads.

    `full=False` (extraction) loads only the tower's weights from the checkpoint (0.3 B of the 7 B
    parameters of LLaVA-1.5); `full=True` (steering) loads the whole model with from_pretrained, and
    `.llava` is it, with the tower at `.llava.model.vision_tower`. `full` may also be a dict of
    from_pretrained keyword arguments (e.g. ``{"quantization_config": BitsAndBytesConfig(...),
    "device_map": "cuda:0"}``); a quantized or device-mapped model is then left where it was loaded.
    """

    backend = "llava"

    def __init__(self, spec: str, source: str, full: bool | dict = False, backend: str = "llava"):
        from transformers import AutoConfig

        self.spec, self.name, self.backend = spec, source, backend
        cfg = _hf_call(f"the config of {source}", AutoConfig.from_pretrained, source)
        if cfg.model_type != "llava":  # hf: was offered for any type (e.g. 'opt', which hf: refuses) until 2026-12-06
            other = (f"use hf:{source} for it" if cfg.model_type in HFVisionAdapter.SUPPORTED else
                     f"llava: reads LLaVA checkpoints and hf: the vision towers {', '.join(HFVisionAdapter.SUPPORTED)}")
            raise UserError(f"{source} is a model of type {cfg.model_type!r}, not LLaVA; {other}.")
        self.config = cfg
        self.preprocessor = _hf_image_transform(source)
        _fixed_image_size(self.preprocessor, source, cfg.vision_config.image_size)  # before 7B of weights are read
        if full:
            from transformers import LlavaForConditionalGeneration

            kwargs = full if isinstance(full, dict) else {}
            # where from_pretrained placed it itself; transformers sets hf_device_map only for a map over several
            # devices, so a {"": "cuda"} map looked unplaced: a 7B model went to the CPU in fp32 (7e9 x 4 bytes) and back
            self._placed = "device_map" in kwargs or "quantization_config" in kwargs
            self.llava = _hf_call(f"LLaVA {source}", LlavaForConditionalGeneration.from_pretrained, source, **kwargs)
            self.llava.eval().requires_grad_(False)
            tower = self.llava.model.vision_tower
        else:
            self.llava, self._placed = None, False
            tower = _load_llava_tower(source, cfg)
        self.model = self.tower = tower.eval().requires_grad_(False)
        vcfg = cfg.vision_config
        self.blocks = _hf_blocks(tower)
        self.width = self.embed_dim = int(vcfg.hidden_size)
        self.image_size = (vcfg.image_size, vcfg.image_size)  # LLaVA's CLIP: its processor crops to this size
        self.layout = _hf_layout(vcfg, vcfg.model_type, self.image_size)
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise UserError(f"{source} reads several vision layers ({layer}); only a single vision_feature_layer is supported.")
        # an index into hidden_states, which our layers >= 0 are not (block numbers): as its negative twin, LLaVA-1.5's
        # -2 form (until 2026-12-05 a vision_feature_layer of 1 was read, extracted and steered at block 1's output,
        # hidden_states[2], one block deeper than LLaVA reads)
        self.read_layer = layer - (len(self.blocks) + 1) if layer >= 0 else layer
        self.read_tokens = "patches" if cfg.vision_feature_select_strategy == "default" else "all"
        self.to("cpu")

    def to(self, device="cpu", precision="fp32"):
        placed = self.llava is not None and (self._placed or getattr(self.llava, "is_quantized", False)
                                             or getattr(self.llava, "hf_device_map", None))
        if not placed:
            super().to(device, precision)
            if self.llava is not None:
                self.llava.to(device=device, dtype=PRECISIONS[precision])
        else:  # quantized / device-mapped by from_pretrained: feed pixels where the tower is, as it is
            tower = next(self.tower.parameters())
            self.device, self.dtype = tower.device, tower.dtype
        return self

    def _forward(self, pixels):
        return self.tower(pixel_values=pixels).pooler_output


def _load_llava_tower(source: str, cfg) -> nn.Module:
    """Build the vision tower from the LLaVA config and load only its weights from the checkpoint."""
    import json

    from safetensors import safe_open
    from transformers import AutoModel
    from transformers.utils import cached_file

    tower = AutoModel.from_config(cfg.vision_config)
    index = cached_file(source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
        names = sorted({f for k, f in weight_map.items() if "vision_tower." in k})
    else:
        names = ["model.safetensors"]
    target = tower.state_dict()
    state = {}
    for fname in names:
        path = _hf_call(f"weights {fname} of {source}", cached_file, source, fname)
        if path is None:
            raise UserError(f"{source} has no {fname}; LLaVA checkpoints must be saved as safetensors.")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if "vision_tower." not in key:
                    continue
                k = key.split("vision_tower.", 1)[1]
                for cand in (k, k.removeprefix("vision_model."), "vision_model." + k):
                    if cand in target:
                        state[cand] = f.get_tensor(key)
                        break
    missing = [k for k in target if k not in state and not k.endswith("position_ids")]
    if missing:
        raise UserError(f"the checkpoint of {source} lacks {len(missing)} vision tower weights (e.g. {missing[0]}); it is not a complete LLaVA checkpoint.")
    tower.load_state_dict(state, strict=False)
    return tower


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------
@loads_a_model
def load_adapter(spec: str, device: str = "cpu", precision: str = "fp32", full_llava: bool | dict = False) -> Adapter:
    """Load the model a spec names (see the module docstring) onto `device` at `precision`.

    `full_llava`: for LLaVA specs, load the whole LlavaForConditionalGeneration (`adapter.llava`), not
    only its vision tower; a dict is passed to its from_pretrained (quantization, device_map, ...)."""
    # a local path as the manifests record it: `hf:~/clip` called from Python took "~/clip" for a hub id
    # until 2026-12-05 (the commands already passed their specs through absolute_spec)
    spec = absolute_spec(spec)
    backend, sep, rest = spec.partition(":")
    if not sep or backend not in BACKENDS:
        raise UserError(
            f"model spec {spec!r} does not start with one of {', '.join(b + ':' for b in BACKENDS)}; "
            "e.g. open_clip:ViT-B-32/openai, hf:openai/clip-vit-large-patch14, llava:, world:DIR."
        )
    if backend == "open_clip":
        if rest.startswith(("hf-hub:", "local-dir:")):
            name, pretrained = rest, None
        else:
            name, _, pretrained = rest.partition("/")
        if not name:
            raise UserError("open_clip: needs a model name, e.g. open_clip:ViT-B-32/openai.")
        adapter: Adapter = OpenClipAdapter(spec, name, pretrained or None)
    elif backend == "hf":
        if not rest:
            raise UserError("hf: needs a hub id or a local directory, e.g. hf:openai/clip-vit-large-patch14-336.")
        adapter = _hf_or_llava(spec, rest, full_llava, "hf")
    elif backend == "llava":
        adapter = LlavaAdapter(spec, rest or DEFAULT_LLAVA, full=full_llava)
    else:
        adapter = _world_adapter(spec, rest, full_llava)
    return adapter.to(device, precision)


def _hf_or_llava(spec: str, source: str, full_llava: bool | dict, backend: str) -> Adapter:
    from transformers import AutoConfig

    cfg = _hf_call(f"the config of {source}", AutoConfig.from_pretrained, source)
    if cfg.model_type == "llava":
        return LlavaAdapter(spec, source, full=full_llava, backend=backend)
    return HFVisionAdapter(spec, source, backend=backend)


def world_model_dir(rest: str) -> tuple[Path, str]:
    """ "DIR", "DIR:clip" or "DIR:llava" -> (model directory, which)."""
    root, which = rest, "clip"
    head, sep, tail = rest.rpartition(":")
    if sep and tail in WORLD_MODELS:
        root, which = head, tail
    if not root:
        raise UserError("world: needs the world directory, e.g. world:assets/world or world:assets/world:llava.")
    if not Path(os.path.expandvars(os.path.expanduser(root))).is_dir():
        unknown_world_part(root, WORLD_MODELS, "model")  # world:W:clipp, where W exists
    root = Path(os.path.expandvars(os.path.expanduser(root)))
    refuse_bundle_as_world(root)
    sub = root / which
    if not (sub / "config.json").exists():
        raise _load_failure(f"{sub} has no saved model (config.json)", f"build the world with `python -m precompute world --out {root}`")
    return sub, which


def _world_adapter(spec: str, rest: str, full_llava: bool | dict) -> Adapter:
    sub, which = world_model_dir(rest)
    if which == "llava":
        return LlavaAdapter(spec, str(sub), full=full_llava, backend="world")
    return HFVisionAdapter(spec, str(sub), backend="world")
