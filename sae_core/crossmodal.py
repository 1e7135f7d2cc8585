"""Shared image-text features: an SAE on a LLaVA language model's residual stream, image and text tokens together.

Residuals are read with a forward hook on one Llama decoder layer (`lm_layer` L = hidden_states[L],
the output of decoder layer L-1) while LLaVA reads LLaVA-1.5's prompt with the image and a caption as
the answer: "USER: <image>\\nDescribe the image. ASSISTANT: a large red star on the left , ...".
Sequences are right-padded, so every real token sits at the position it has alone; with a causal
model the image tokens' residuals therefore do not depend on the caption that follows them.

Cross-modal score of latent f and concept c (colours, shapes, textures of the embedded world). In each
modality m the tokens that carry c are: image tokens whose patch shows c (an object of colour / shape
c covers >= 1/4 of the patch; a texture for patches that no object covers that much), and text tokens
that are the word c. With on_m / off_m = the latent's mean activation on tokens of modality m with /
without c:
    selectivity_m(f, c) = (on_m - off_m) / (on_m + off_m)    in [-1, 1] (0 when the latent is silent)
    score(f, c)         = min(selectivity_img, selectivity_txt), for latents that fire on at least
                          `min_support` tokens with c in each modality (else undefined)
A latent is cross-modal when its best concept's score reaches `threshold` (default 0.5: on average it
fires at least three times as strongly on c as on everything else, in both modalities). The coverage
of the concept is reported beside it: AUROC_m(f, c) of the activation separating c-tokens from the
others in modality m (2 AUROC - 1 is about the share of c-tokens it fires on minus the share of others).
The raw baseline is the same score of the residual stream's own dimensions, each split into its
positive and negative part (x+ and (-x)+, two non-negative units per dimension).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .adapters import Layer, TokenLayout, _hf_call, loads_a_model
from .errors import UserError
from .roc import auroc_columns

CAPTION_QUESTION = "Describe the image."
THRESHOLD = 0.5
MIN_SUPPORT = 20
PATCH_COVER = 0.25


def parse_lm_layer(name: str | int) -> int:
    """'lm:1' or 1 -> 1 (a hidden_states index of the language model, >= 1)."""
    s = str(name).strip()
    s = s[3:] if s.startswith("lm:") else s
    try:
        return int(s)
    except ValueError:
        raise UserError(f"language-model layer {name!r} is not 'lm:L' with an integer L.") from None


def check_lm_layer(lm_layer: int, n_layers: int) -> None:
    """Refuse a hidden_states index that a language model of `n_layers` decoder layers does not have."""
    if not 1 <= lm_layer <= n_layers:
        raise UserError(f"--lm-layer {lm_layer} does not exist: the language model has {n_layers} layers, "
                        f"so pass 1..{n_layers} (hidden_states index; L = output of decoder layer L-1).")


def lm_layer_count(llava_dir: str | Path) -> int:
    """Decoder layers of a saved LLaVA's language model, read from its config.json (no weights loaded)."""
    from transformers import AutoConfig

    config = _hf_call(f"the config of {llava_dir}", AutoConfig.from_pretrained, str(llava_dir))
    return int(config.text_config.num_hidden_layers)


class LanguageResidual:
    """A full LLaVA (transformers) and its processor; residual stream of the language model at one layer."""

    @loads_a_model
    def __init__(self, llava_dir: str, lm_layer: int = 1, device: str = "cpu"):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        llava = _hf_call(f"LLaVA {llava_dir}", LlavaForConditionalGeneration.from_pretrained, llava_dir)
        self.model = llava.eval().requires_grad_(False).to(device)
        self.processor = _hf_call(f"the processor of {llava_dir}", AutoProcessor.from_pretrained, llava_dir)
        self.processor.tokenizer.padding_side = "right"  # positions as in an unpadded sequence
        self.tokenizer = self.processor.tokenizer
        self.device = device
        layers = self.model.model.language_model.layers
        check_lm_layer(lm_layer, len(layers))
        self.lm_layer = lm_layer
        self.block = layers[lm_layer - 1]
        # transformers' last hidden_states entry is after the final norm, which the last layer's hook does not see
        # (until 2026-12-05 --lm-layer n_layers read the unnormed output: 3.1 apart on values up to 4.1, tiny LLaVA)
        self.final_norm = self.model.model.language_model.norm if lm_layer == len(layers) else None
        self.width = int(self.model.config.text_config.hidden_size)
        self.image_token_id = int(self.model.config.image_token_index)
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        self.grid = (side, side)

    @torch.inference_mode()
    def run(self, images: Sequence, answers: Sequence[str] | None = None, question: str = CAPTION_QUESTION):
        """(residual (B, S, D) float32, input_ids (B, S), attention_mask (B, S)) for the prompt with each
        image and (optionally) an answer after "ASSISTANT:"."""
        from .world.text import llava_prompt

        answers = answers or [""] * len(images)
        texts = [f"{llava_prompt(question)} {a}".strip() for a in answers]
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        sink = {}

        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            sink["h"] = (h if self.final_norm is None else self.final_norm(h)).detach()

        handle = self.block.register_forward_hook(hook)
        try:
            self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        finally:
            handle.remove()
        return sink["h"].float().cpu(), inputs["input_ids"], inputs["attention_mask"]


class LanguageImageAdapter:
    """Duck-typed `Adapter` for the atlas scan: `capture` returns the language model's residuals at the
    image tokens (B, n_patches, D) in the patch grid's row-major order (no CLS: n_prefix 0)."""

    backend = "world"

    def __init__(self, lm: LanguageResidual, spec: str):
        self.lm, self.spec, self.name = lm, spec, spec
        self.width = self.embed_dim = lm.width
        self.layout = TokenLayout(0, lm.grid, False)
        self.layer_name = f"lm:{lm.lm_layer}"
        self.image_size = (self.lm.model.config.vision_config.image_size,) * 2
        self.n_blocks = len(lm.model.model.language_model.layers)
        self.read_layer, self.read_tokens = None, None

    def resolve_layer(self, layer) -> Layer:
        if parse_lm_layer(layer) != self.lm.lm_layer:
            raise UserError(f"this adapter reads {self.layer_name}, not {layer}.")
        return Layer(self.layer_name, "block", self.lm.lm_layer - 1)

    def preprocess(self, images: Sequence):
        return list(images)  # the processor runs inside capture, with the prompt

    def capture(self, images, layers) -> dict:
        h, ids, _ = self.lm.run(images)
        pos = ids == self.lm.image_token_id
        n = self.layout.n_patches
        if not bool((pos.sum(1) == n).all()):
            raise UserError(f"the prompt holds {int(pos.sum(1)[0])} image tokens, expected {n}.")
        out = h[pos].reshape(len(images), n, -1)
        return {self.resolve_layer(lay if not isinstance(lay, Layer) else lay.name).name: out for lay in layers}

    def describe(self) -> dict:
        return {"spec": self.spec, "backend": "world", "name": self.spec, "n_blocks": self.n_blocks,
                "width": self.width, "embed_dim": self.width, "image_size": list(self.image_size),
                "token_layout": self.layout.to_dict(), "read_layer": None, "read_tokens": None,
                "note": f"language-model residual stream hidden_states[{self.lm.lm_layer}] at the image tokens "
                        f"of the prompt '{CAPTION_QUESTION}'"}


# ----------------------------------------------------------------------------------------------
# Token rows with their concepts
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenRows:
    """Residual rows of many sequences: image tokens and text tokens (BOS and padding dropped)."""

    x: np.ndarray
    """(R, D) float32 residuals."""
    is_image: np.ndarray
    """(R,) bool."""
    image: np.ndarray
    """(R,) int64 dataset index of the sequence's image."""
    patch: np.ndarray
    """(R,) int32 patch index of image tokens (-1 for text)."""
    word: np.ndarray
    """(R,) str: the token's word for text tokens, "" for image tokens."""


def collect_rows(lm: LanguageResidual, dataset, ids: Sequence[int], batch_size: int = 64, progress=None) -> TokenRows:
    """Run the caption prompt ("... ASSISTANT: <caption>") for each image of a WorldDataset and keep every
    image and text token's residual."""
    parts = {k: [] for k in ("x", "is_image", "image", "patch", "word")}
    ids = list(ids)
    for a in range(0, len(ids), batch_size):
        chunk = ids[a:a + batch_size]
        h, tok, mask = lm.run([dataset[i] for i in chunk], [dataset.caption(i) for i in chunk])
        for r, i in enumerate(chunk):
            real = mask[r].bool().clone()
            real[0] = False  # BOS: an attention sink with a huge norm, not a concept carrier
            t = tok[r][real]
            img = (t == lm.image_token_id).numpy()
            parts["x"].append(h[r][real].numpy())
            parts["is_image"].append(img)
            parts["image"].append(np.full(len(t), i, np.int64))
            patch = np.full(len(t), -1, np.int32)
            patch[img] = np.arange(int(img.sum()))
            parts["patch"].append(patch)
            words = np.asarray(lm.tokenizer.convert_ids_to_tokens(t.tolist()), dtype=object)
            words[img] = ""
            parts["word"].append(words.astype(str))
        if progress:
            progress(min(a + batch_size, len(ids)))
    return TokenRows(*(np.concatenate(parts[k]) for k in ("x", "is_image", "image", "patch", "word")))


def patch_concepts(factors: dict, masks: np.ndarray, grid: tuple[int, int], concepts: Sequence[str],
                   cover: float = PATCH_COVER) -> np.ndarray:
    """(n_patches, C) bool: patch p shows concept c when an object of colour or shape c covers at least
    `cover` of its pixels; patches no object covers that much show the background texture."""
    H, W = masks.shape[1:]
    gr, gc = grid
    ph, pw = H // gr, W // gc
    index = {c: j for j, c in enumerate(concepts)}
    out = np.zeros((gr * gc, len(concepts)), bool)
    cov = masks.reshape(masks.shape[0], gr, ph, gc, pw).mean(axis=(2, 4)).reshape(masks.shape[0], -1)  # (n_obj, P)
    for o, obj in enumerate(factors["objects"]):
        on = cov[o] >= cover
        for key in ("colour", "shape"):
            if obj[key] in index:
                out[on, index[obj[key]]] = True
    bg = (cov < cover).all(0) if len(cov) else np.ones(gr * gc, bool)
    tex = factors["background"]["texture"]
    if tex in index:
        out[bg, index[tex]] = True
    return out


def concept_labels(rows: TokenRows, dataset, grid, concepts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(image-token labels (R_img, C), text-token labels (R_txt, C)) in the order of the rows of each modality."""
    img_rows = np.flatnonzero(rows.is_image)
    per_image = {}
    lab_img = np.zeros((len(img_rows), len(concepts)), bool)
    for n, r in enumerate(img_rows):
        i = int(rows.image[r])
        if i not in per_image:
            per_image[i] = patch_concepts(dataset.factors(i), dataset.masks(i), grid, concepts)
        lab_img[n] = per_image[i][rows.patch[r]]
    words = rows.word[~rows.is_image]
    lab_txt = np.stack([words == c for c in concepts], axis=1)
    return lab_img, lab_txt


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------
@dataclass
class CrossModalScores:
    concepts: list
    mean_image: np.ndarray
    """(K, C, 2) mean activation on image tokens with / without the concept."""
    mean_text: np.ndarray
    """(K, C, 2) mean activation on text tokens that are / are not the word."""
    support_image: np.ndarray
    """(K, C) number of image tokens with the concept on which the unit is > 0."""
    support_text: np.ndarray
    auroc_image: np.ndarray
    """(K, C) AUROC among image tokens (NaN: concept absent from a side)."""
    auroc_text: np.ndarray
    min_support: int = MIN_SUPPORT

    @staticmethod
    def selectivity(means: np.ndarray) -> np.ndarray:
        on, off = means[..., 0], means[..., 1]
        tot = on + off
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tot > 0, (on - off) / np.where(tot > 0, tot, 1.0), 0.0)

    @property
    def score(self) -> np.ndarray:
        """(K, C) min(selectivity_img, selectivity_txt); NaN where the concept is missing from a side or the
        unit fires on fewer than `min_support` of its tokens in a modality."""
        s = np.minimum(self.selectivity(self.mean_image), self.selectivity(self.mean_text))
        ok = ((self.support_image >= self.min_support) & (self.support_text >= self.min_support)
              & np.isfinite(self.mean_image[..., 0]) & np.isfinite(self.mean_text[..., 0]))
        return np.where(ok, s, np.nan)

    @property
    def coverage(self) -> np.ndarray:
        """(K, C) min(2 AUROC_img - 1, 2 AUROC_txt - 1)."""
        return np.minimum(2 * self.auroc_image - 1, 2 * self.auroc_text - 1)

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """(best concept index (K,), its score (K,)); -1 / NaN where no concept is defined."""
        s = self.score
        ok = np.isfinite(s).any(1)
        idx = np.where(ok, np.argmax(np.where(np.isfinite(s), s, -np.inf), axis=1), -1)
        val = np.where(ok, s[np.arange(len(s)), np.maximum(idx, 0)], np.nan)
        return idx, val


def _means(acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    lab = labels.astype(np.float64)
    n1 = lab.sum(0)
    n0 = len(lab) - n1
    on = acts.T.astype(np.float64) @ lab  # (K, C)
    total = acts.sum(0, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([on / n1, (total - on) / n0], axis=-1)


def cross_modal_scores(acts_image: np.ndarray, labels_image: np.ndarray, acts_text: np.ndarray,
                       labels_text: np.ndarray, concepts: Sequence[str], min_support: int = MIN_SUPPORT) -> CrossModalScores:
    """acts_* (R_m, K) non-negative unit activations on the tokens of each modality; labels_* (R_m, C) bool."""
    def support(acts, labels):
        return (acts > 0).T.astype(np.float64) @ labels.astype(np.float64)

    return CrossModalScores(list(concepts), _means(acts_image, labels_image), _means(acts_text, labels_text),
                            support(acts_image, labels_image), support(acts_text, labels_text),
                            auroc_columns(acts_image, labels_image), auroc_columns(acts_text, labels_text), min_support)


def summary(scores: CrossModalScores, threshold: float = THRESHOLD, top: int = 20) -> dict:
    """Count of cross-modal units, per concept, and the best `top` units with their figures."""
    idx, val = scores.best()
    hit = np.isfinite(val) & (val >= threshold)
    per_concept = {c: int(((idx == j) & hit).sum()) for j, c in enumerate(scores.concepts)}
    order = [int(k) for k in np.argsort(-np.where(np.isfinite(val), val, -np.inf), kind="stable") if hit[k]][:top]
    examples = []
    for k in order:
        j = int(idx[k])
        examples.append({"unit": k, "concept": scores.concepts[j], "score": round(float(val[k]), 4),
                         "support_image": int(scores.support_image[k, j]), "support_text": int(scores.support_text[k, j]),
                         "auroc_image": round(float(scores.auroc_image[k, j]), 4),
                         "auroc_text": round(float(scores.auroc_text[k, j]), 4),
                         "mean_image": [round(float(v), 4) for v in scores.mean_image[k, j]],
                         "mean_text": [round(float(v), 4) for v in scores.mean_text[k, j]]})
    cov = scores.coverage[np.arange(len(idx)), np.maximum(idx, 0)]
    return {"n_units": int(len(val)), "n_cross_modal": int(hit.sum()), "threshold": threshold,
            "n_cross_modal_and_covering": int((hit & (cov >= threshold)).sum()),
            "best_score": float(np.nanmax(val)) if np.isfinite(val).any() else None,
            "per_concept": per_concept, "examples": examples}
