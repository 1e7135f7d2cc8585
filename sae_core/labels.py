"""Neuron labels: each neuron's best concept from a vocabulary, by CLIP text embedding against the mean
image embedding of its top images (the paper's steering reference), with the score and the method.

A label is a guess: CLIP-text labels of SAE features are known to be weak on natural images, so the
score and method string travel with it (bundle: neurons/labels.json, neurons/label_score.npy).

API
    Concept(name, prompt, kind)                  a vocabulary entry and the text that is embedded
    world_concepts(world_dir=None, kinds=("colour", "shape", "texture"), include_held_out=False)
        -> list[Concept]      the world's factor names in the prompts its CLIP was trained on:
                              "a photo of a {colour} object", "a photo of a {shape}", "{texture} background"
    file_concepts(path, template="a photo of a {}") -> list[Concept]
                              one concept per line; blank lines and lines starting with # skipped
    class_concepts(dataset, template="a photo of a {}") -> (list[Concept] | None, str)
                              the dataset's class names (folders; iNaturalist species; ImageNet WordNet ids
                              through LOC_synset_mapping.txt), or None and why there are none
    label_neurons(top_images (K, T), image_embeddings (N, E), text_embeddings (V, E), names (V,),
                  n_top=16, method="", chunk=4096, baseline=None) -> NeuronLabels
    label_with_text_embedder(top_images, image_embeddings, embedder: TextEmbedder, concepts, n_top=16,
                             centred=True, patch_top_images=None, source="") -> NeuronLabels
                              embeds the prompts, fills the method string; centred: rank by cosine
                              minus the concept's cosine with the dataset's mean image (see label_neurons);
                              patch_top_images: labels neurons without top images from these (labelling_gallery)
                              and every neuron from these too (.labels_by_patch)
    labelling_gallery(top_images (K, T), patch_top_images (K, T) | None) -> (ids (K, T), from_patch bool (K,))
                              each neuron's top images, or its top images by the max over patches where it
                              has none (a CLS-scored atlas's latents that fire on patches only)
    mean_direction(image_embeddings) -> (E,) float32   normalised mean image embedding
    NeuronLabels
        .labels list[str] (K,)   "" where a neuron has no top image
        .index  int64 (K,)       vocabulary index, -1 where no label
        .scores float32 (K,)     the ranking score of the label: cosine(mean top-image embedding, text
                                 embedding), minus the baseline's cosine when centred; NaN where no label
        .method str, .vocabulary list[str]
        .from_patch int64 (n,)   neurons labelled from their gallery by the max over patches
        .labels_by_patch list[str] (K,) | None, .scores_by_patch float32 (K,) | None   every neuron's label
                                 from its gallery by the max over patches (given patch_top_images)
        .to_json() -> {"method", "vocabulary", "labels", "from_patch_gallery"[, "labels_by_patch"]}
                                 (neurons/labels.json)
    world_factor_values(dataset) -> callable image_id -> set[str]
                              colours and shapes of every object of a world image, and its texture
    dominant_factors(top_images, values_of, n_top=16, allowed=None) -> DominantFactors
        .value list[str | None]  the value held by most of a neuron's top images (ties: the first
                                 in sorted order), .tied list[list[str]] all values with that count,
                                 .count int64 (K,), .n_images int64 (K,), .purity float64 (K,)
    label_accuracy(labels, dominant) -> float
        fraction of labelled neurons whose label is one of their most-shared factor values
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from .errors import UserError

DEFAULT_TEMPLATE = "a photo of a {}"


class Concept(NamedTuple):
    name: str
    """The label shown and stored."""
    prompt: str
    """The text that is embedded."""
    kind: str = "concept"


def world_concepts(world_dir: str | Path | None = None, kinds: Sequence[str] = ("colour", "shape", "texture"),
                   include_held_out: bool = False) -> list[Concept]:
    """The world's colours, shapes and textures, in the prompt formats its CLIP was trained on.

    Colour groups and shape families (warm, round, ...) are left out: no world caption uses those
    words, so the tiny CLIP's word-level tokenizer maps them to <unk>. With `world_dir`, the held-out
    (OOD) shape and colour are dropped unless `include_held_out`: the CLIP never saw them.
    """
    from .world.generator import COLOURS, SHAPES, TEXTURES
    from .world.text import colour_prompt, shape_prompt

    held_out: set[str] = set()
    if world_dir is not None and not include_held_out:
        from .world.dataset import read_world_json

        meta = read_world_json(world_dir)
        held_out = {meta.get("ood_shape"), meta.get("ood_colour")} - {None}
    out: list[Concept] = []
    for kind in kinds:
        if kind == "colour":
            out += [Concept(c, colour_prompt(c), kind) for c in COLOURS if c not in held_out]
        elif kind == "shape":
            out += [Concept(s, shape_prompt(s), kind) for s in SHAPES if s not in held_out]
        elif kind == "texture":
            out += [Concept(t, f"{t} background", kind) for t in TEXTURES]
        else:
            raise UserError(f"unknown world concept kind {kind!r}; use colour, shape or texture.")
    return out


def file_concepts(path: str | Path, template: str = DEFAULT_TEMPLATE) -> list[Concept]:
    """A vocabulary file: one concept per line (duplicates kept once), embedded as template.format(c)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"vocabulary {path} is a folder; pass a text file with one concept per line.")
    if not path.is_file():
        raise UserError(f"vocabulary file {path} does not exist; pass a text file with one concept per line.")
    if "{}" not in template:
        raise UserError(f"prompt template {template!r} needs a {{}} where the concept goes.")
    try:
        # -sig: Notepad and Excel start UTF-8 with a BOM, which stayed in the first concept until 2026-12-05
        # ("\ufeffred" matched no colour: a reviewer's label accuracy 0.663 -> 0.317)
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"vocabulary file {path} is not UTF-8 text (byte {e.start} is not); save it as UTF-8, one "
                        "concept per line.") from None
    seen: dict[str, None] = {}
    for line in text.splitlines():
        name = line.strip()
        if name and not name.startswith("#"):
            seen.setdefault(name)
    if not seen:
        raise UserError(f"vocabulary file {path} names no concepts; write one concept per line.")
    return [Concept(n, template.format(n)) for n in seen]


SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")
"""ImageNet's WordNet id -> names files ("n01440764 tench, Tinca tinca" per line), looked for beside the class
folders and one folder up (Kaggle's ILSVRC layout keeps LOC_synset_mapping.txt at the root, above train/)."""


def class_concepts(dataset, template: str = DEFAULT_TEMPLATE) -> tuple[list[Concept] | None, str]:
    """The dataset's own class names as a vocabulary, the atlas's default for data other than the world:
    class folder names with "_" read as spaces, iNaturalist folders by their species (the binomial), ImageNet's
    WordNet ids by the first name of SYNSET_FILES. Returns (concepts, what they are) or (None, why there are
    none): no classes, one class, names without a letter, WordNet ids without a names file."""
    names = sorted({lab for lab in (getattr(dataset, "labels", None) or []) if lab is not None})
    if len(names) < 2:
        return None, ("its images have no classes" if not names else f"its images have one class ({names[0]})")
    taxonomy = getattr(dataset, "taxonomy", None)
    if taxonomy:  # iNaturalist: the species, not "00042_Animalia_..._Corvus_corax"
        shown = {n: taxonomy[n][-1] for n in names}
        what = "the dataset's iNaturalist species (its class folders)"
    elif all(re.fullmatch(r"n\d{8}", n) for n in names):
        root = Path(getattr(dataset, "root", "."))
        found = next((f for d in (root, root.parent) for f in (d / n for n in SYNSET_FILES) if f.is_file()), None)
        if found is None:
            return None, (f"its class folders are WordNet ids ({names[0]}, ...) and no {' or '.join(SYNSET_FILES)} "
                          f"names them in {root} or {root.parent}")
        wordnet = {}
        for line in found.read_text(encoding="utf-8-sig", errors="replace").splitlines():
            wnid, _, words = line.strip().partition(" ")
            wordnet[wnid] = words.split(",")[0].strip()
        shown = {n: wordnet.get(n) or n for n in names}
        what = f"the dataset's WordNet classes, named by {found}"
    elif not any(re.search(r"[^\W\d_]", n) for n in names):  # "0", "1", ...: nothing for a text tower to read
        return None, f"its {len(names)} class names hold no letters ({names[0]}, ...)"
    else:
        shown = {n: n.replace("_", " ").strip() for n in names}
        what = "the dataset's class names"
    unique = dict.fromkeys(shown.values())  # two folders of one name are one concept
    return [Concept(n, template.format(n), "class") for n in unique], what


@dataclass
class NeuronLabels:
    labels: list
    index: np.ndarray
    scores: np.ndarray
    method: str
    vocabulary: list
    from_patch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    labels_by_patch: list | None = None
    """CLS-scored atlases: every neuron's label read from its gallery by the max over patches ("" where
    that gallery is empty), shown beside its label; `scores_by_patch` (K,) float32 are their scores."""
    scores_by_patch: np.ndarray | None = None

    def to_json(self) -> dict:
        by_patch = {} if self.labels_by_patch is None else {"labels_by_patch": list(self.labels_by_patch)}
        return {"method": self.method, "vocabulary": list(self.vocabulary), "labels": list(self.labels),
                "from_patch_gallery": [int(k) for k in self.from_patch], **by_patch}


def label_neurons(top_images: np.ndarray, image_embeddings, text_embeddings, names: Sequence[str],
                  n_top: int = 16, method: str = "", chunk: int = 4096, baseline=None) -> NeuronLabels:
    """Best concept per neuron: argmax_v cos(m_k, text_v), m_k = the normalised mean of the unit
    embeddings of neuron k's top `n_top` images; the score stored is that cosine.

    top_images: (K, T) image ids, best first, -1 for empty slots (the first `n_top` are used).
    image_embeddings: (N, E) unit-norm rows (float16 memmap fine: only the needed rows are read).
    text_embeddings: (V, E) unit-norm rows (tensor or array), names: (V,) the labels they stand for.
    baseline: optional (E,) unit vector, the dataset's mean image direction (`mean_direction`); the
    ranking score becomes cos(m_k, text_v) - cos(baseline, text_v): how much better the concept fits
    the neuron's images than an average image. It removes prompts that are close to every image
    (see README: label accuracy in the world), and the stored score is this difference.
    """
    text = np.asarray(text_embeddings.detach().cpu() if isinstance(text_embeddings, torch.Tensor) else text_embeddings,
                      dtype=np.float32)
    if text.ndim != 2 or len(text) != len(names) or len(names) == 0:
        raise UserError(f"text embeddings of shape {text.shape} do not match the {len(names)} vocabulary entries.")
    if text.shape[1] != image_embeddings.shape[1]:
        raise UserError(f"text embeddings have dimension {text.shape[1]} but image embeddings {image_embeddings.shape[1]}; "
                        "label with the text tower of the embedder that made the image embeddings.")
    offset = np.zeros(len(text), np.float32)
    base = None
    if baseline is not None:
        base = np.asarray(baseline, np.float32).reshape(-1)
        base = base / max(float(np.linalg.norm(base)), 1e-12)
        offset = text @ base  # of the unit vector: the offset scaled with the length the caller passed
    top = np.asarray(top_images)[:, :n_top].astype(np.int64)
    K = top.shape[0]
    index = np.full(K, -1, np.int64)
    scores = np.full(K, np.nan, np.float32)
    ids = np.unique(top[top >= 0])
    emb = np.asarray(image_embeddings[ids], dtype=np.float32) if len(ids) else np.zeros((0, text.shape[1]), np.float32)
    row = np.searchsorted(ids, np.where(top >= 0, top, 0))
    valid = top >= 0
    for s in range(0, K, chunk):
        r, v = row[s:s + chunk], valid[s:s + chunk]
        mean = (emb[r] * v[..., None]).sum(1) if len(emb) else np.zeros((len(r), text.shape[1]), np.float32)
        norm = np.linalg.norm(mean, axis=1, keepdims=True)
        has = v.any(1) & (norm[:, 0] > 0)
        unit = mean / np.where(norm > 0, norm, 1)
        if base is not None:  # a gallery that is the whole dataset scores ~0 on every word: no concept to name
            has &= unit @ base < 1 - 1e-5
        cos = unit @ text.T - offset  # (chunk, V)
        best = cos.argmax(1)
        index[s:s + chunk] = np.where(has, best, -1)
        scores[s:s + chunk] = np.where(has, cos[np.arange(len(best)), best], np.nan)
    names = [str(n) for n in names]
    labels = [names[i] if i >= 0 else "" for i in index]
    return NeuronLabels(labels, index, scores, method, names)


def mean_direction(image_embeddings, chunk: int = 65536) -> np.ndarray:
    """(E,) unit vector: the normalised mean of all image embeddings (streamed in chunks)."""
    total = np.zeros(image_embeddings.shape[1], np.float64)
    for s in range(0, len(image_embeddings), chunk):
        total += np.asarray(image_embeddings[s:s + chunk], dtype=np.float64).sum(0)
    norm = np.linalg.norm(total)
    return (total / norm if norm > 0 else total).astype(np.float32)


def labelling_gallery(top_images: np.ndarray, patch_top_images: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(K, T) image ids each neuron is described by (labels, text search) and (K,) bool, True where they
    are its top images by the max over patches: used only where the neuron has no top image of its own
    score, as a CLS-scored atlas's latents that fire on patches only."""
    top = np.asarray(top_images)
    from_patch = np.zeros(len(top), bool)
    if patch_top_images is None:
        return top, from_patch
    patch = np.asarray(patch_top_images)
    if patch.shape != top.shape:
        raise UserError(f"the patch gallery has shape {patch.shape} but the top images {top.shape}; rebuild the bundle.")
    from_patch = ~(top >= 0).any(1) & (patch >= 0).any(1)
    return np.where(from_patch[:, None], patch, top), from_patch


def label_with_text_embedder(top_images: np.ndarray, image_embeddings, embedder, concepts: Sequence[Concept],
                             n_top: int = 16, centred: bool = True, patch_top_images: np.ndarray | None = None,
                             source: str = "") -> NeuronLabels:
    """Embed the concepts' prompts with `embedder` (sae_core.text_encoders) and label the neurons;
    `centred` ranks by the cosine minus the concept's cosine with the dataset's mean image; neurons
    without top images are labelled from `patch_top_images` where given (labelling_gallery); `source`, where
    the vocabulary came from, goes into the method string."""
    concepts = list(concepts)
    gallery, from_patch = labelling_gallery(top_images, patch_top_images)
    text = embedder([c.prompt for c in concepts])
    prompts = {c.kind: c.prompt.replace(c.name, "{}") for c in concepts}  # one template per kind, for the record
    baseline = mean_direction(image_embeddings) if centred else None
    score = ("cosine minus the concept's cosine with the mean image of the dataset" if centred else "cosine")
    method = (f"clip-text: {score}, between the mean unit image embedding of each neuron's top-{n_top} images and "
              f"the text embedding of each concept's prompt ({'; '.join(f'{k}: {p!r}' for k, p in sorted(prompts.items()))}); "
              f"embedder {embedder.spec}; vocabulary of {len(concepts)} concepts{f' ({source})' if source else ''}; "
              "best concept kept")
    if from_patch.any():
        method += (f"; the {int(from_patch.sum())} neurons without a top image by the atlas's score are labelled "
                   f"from their top-{n_top} images by the max over patches")
    if patch_top_images is not None:
        method += f"; every neuron is also labelled from its top-{n_top} images by the max over patches (labels_by_patch)"
    names = [c.name for c in concepts]
    out = label_neurons(gallery, image_embeddings, text, names, n_top=n_top, method=method, baseline=baseline)
    out.from_patch = np.flatnonzero(from_patch)
    if patch_top_images is not None:  # the two galleries of a latent can show different things
        by_patch = label_neurons(patch_top_images, image_embeddings, text, names, n_top=n_top, baseline=baseline)
        out.labels_by_patch, out.scores_by_patch = by_patch.labels, by_patch.scores
    return out


# ----------------------------------------------------------------------------------------------
# Ground truth in the world
# ----------------------------------------------------------------------------------------------
def world_factor_values(dataset) -> Callable[[int], set]:
    """image id -> {colour and shape of each object, background texture} for a world dataset
    (sae_core.datasets.WorldImages or sae_core.world.dataset.WorldDataset)."""

    def values(i: int) -> set:
        f = dataset.factors(int(i))
        out = {o[k] for o in f["objects"] for k in ("colour", "shape")}
        out.add(f["background"]["texture"])
        return out

    return values


@dataclass
class DominantFactors:
    value: list
    tied: list
    count: np.ndarray
    n_images: np.ndarray

    @property
    def purity(self) -> np.ndarray:
        """Fraction of a neuron's top images that hold its dominant value (NaN without images)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n_images > 0, self.count / np.maximum(self.n_images, 1), np.nan)


def dominant_factors(top_images: np.ndarray, values_of: Callable[[int], set], n_top: int = 16,
                     allowed: Sequence[str] | None = None) -> DominantFactors:
    """For each neuron, the factor value shared by most of its top `n_top` images.

    `values_of(i)`: the set of factor values image i holds; `allowed` restricts the candidates (e.g.
    to the labelling vocabulary, so that label accuracy can reach 1). Each image is looked up once.
    """
    top = np.asarray(top_images)[:, :n_top].astype(np.int64)
    allow = set(allowed) if allowed is not None else None
    cache: dict[int, set] = {}
    K = top.shape[0]
    value, tied = [], []
    count = np.zeros(K, np.int64)
    n_images = np.zeros(K, np.int64)
    for k in range(K):
        c: Counter = Counter()
        ids = [int(i) for i in top[k] if i >= 0]
        for i in ids:
            if i not in cache:
                v = set(values_of(i))
                cache[i] = v if allow is None else v & allow
            c.update(cache[i])
        n_images[k] = len(ids)
        if not c:
            value.append(None)
            tied.append([])
            continue
        best = max(c.values())
        winners = sorted(v for v, n in c.items() if n == best)
        value.append(winners[0])
        tied.append(winners)
        count[k] = best
    return DominantFactors(value, tied, count, n_images)


def label_accuracy(labels: Sequence[str], dominant: DominantFactors) -> float:
    """Fraction of neurons with a label and a dominant value whose label is a most-shared value."""
    hits = [lab in ties for lab, ties in zip(labels, dominant.tied) if lab and ties]
    return float(np.mean(hits)) if hits else float("nan")
