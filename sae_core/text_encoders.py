"""Text towers of the embedders that have one: texts -> unit-norm embeddings in the image embedding space.

Used for neuron labels (text embedding against the mean image embedding of a neuron's top images)
and for search by text. The specs are the adapters' specs (sae_core.adapters.load_adapter), so one
spec names both towers and they come from the same loaded model:

    world:DIR[:clip]            the embedded world's tiny CLIP (transformers CLIPModel + its tokenizer)
    hf:ID_OR_DIR                a transformers CLIPModel (or SiglipModel) with its tokenizer
    open_clip:NAME[/PRETRAINED] open_clip's encode_text with open_clip.get_tokenizer(NAME)

Vision-only models (world:DIR:llava, llava:, DINOv2, CLIPVisionModel) have no text tower: UserError.

API
    TextEmbedder
        .spec, .dim
        __call__(texts: Sequence[str], batch=256) -> torch.Tensor (V, dim) float32, unit-norm rows, CPU
    load_text_embedder(spec, device="cpu", precision="fp32") -> TextEmbedder
    text_embedder_for(adapter) -> TextEmbedder      shares the weights of an adapter already loaded
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .adapters import Adapter, _hf_call, load_adapter, loads_a_model
from .errors import UserError

TWO_TOWER_HF = ("clip", "siglip")


class TextEmbedder:
    """Texts -> (V, dim) unit-norm float32 embeddings, comparable with the adapter's image embeddings."""

    def __init__(self, spec: str, dim: int, encode: Callable[[list[str]], torch.Tensor]):
        self.spec, self.dim, self._encode = spec, int(dim), encode

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str], batch: int = 256) -> torch.Tensor:
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, self.dim)
        parts = [self._encode(texts[s:s + batch]).float().cpu() for s in range(0, len(texts), batch)]
        return F.normalize(torch.cat(parts), dim=-1)


def _features(out) -> torch.Tensor:
    """transformers returns a tensor or, in some versions, an output object with pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _no_tokenizer(adapter: Adapter, cause: BaseException) -> UserError:
    said = str(cause).splitlines()[0] if str(cause) else ""
    return UserError(f"{adapter.spec} has a text tower, but its tokenizer cannot be loaded ({type(cause).__name__}: "
                     f"{said}); save the tokenizer beside the model (tokenizer.save_pretrained) or pass an embedder "
                     "saved with its tokenizer.")


@loads_a_model
def text_embedder_for(adapter: Adapter) -> TextEmbedder:
    """The text side of a loaded two-tower adapter (open_clip, or a transformers CLIP/SigLIP model)."""
    if adapter.backend == "open_clip":
        import open_clip

        model = adapter.model
        if not hasattr(model, "encode_text"):
            raise UserError(f"{adapter.spec} has no text tower; pick a CLIP-style model for labels and text search.")
        try:  # a SigLIP's tokenizer comes from the hub, weights local or not (OSError offline: a traceback until 2026-12-05)
            tokenizer = open_clip.get_tokenizer(adapter.name)
        except Exception as e:
            raise _no_tokenizer(adapter, e) from e

        def encode(texts):
            return model.encode_text(tokenizer(texts).to(adapter.device))

        return TextEmbedder(adapter.spec, adapter.embed_dim, encode)
    if getattr(adapter, "model_type", None) in TWO_TOWER_HF:
        from transformers import AutoTokenizer

        try:
            tokenizer = _hf_call(f"the tokenizer of {adapter.name}", AutoTokenizer.from_pretrained, adapter.name)
        except Exception as e:  # the model loaded, text tower and all: the tokenizer is what is missing (any error:
            # a missing library's ImportError was a traceback after the atlas' scan until 2026-12-05)
            raise _no_tokenizer(adapter, e.__cause__ if isinstance(e, UserError) and e.__cause__ else e) from e
        model = adapter.model
        # SigLIP was trained on texts padded to the full length; CLIP pools at the end token.
        padding = "max_length" if adapter.model_type == "siglip" else True

        def encode(texts):
            enc = tokenizer(texts, padding=padding, truncation=True, return_tensors="pt").to(adapter.device)
            return _features(model.get_text_features(**enc))

        return TextEmbedder(adapter.spec, adapter.embed_dim, encode)
    raise UserError(
        f"{adapter.spec} is a vision-only model with no text tower; use a CLIP embedder such as world:DIR, "
        "hf:openai/clip-vit-large-patch14 or open_clip:ViT-B-32/openai for labels and text search."
    )


def load_text_embedder(spec: str, device: str = "cpu", precision: str = "fp32") -> TextEmbedder:
    """Load the model a spec names (both towers) and return its text side."""
    return text_embedder_for(load_adapter(spec, device=device, precision=precision))
