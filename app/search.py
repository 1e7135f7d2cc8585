"""Search neurons by text: the query's CLIP text embedding against each neuron's direction in image space."""
from __future__ import annotations

import threading

import numpy as np

from sae_core.errors import UserError

from .explorer import Explorer

N_TOP = 16
"""Top images per neuron averaged into its direction (as the labels do)."""
MIN_IMAGES = 8
"""Neurons with fewer top images are left out: the mean of one or two embeddings is as close to a
text as a single image is, so rare neurons would crowd the top without being about the concept."""


class NeuronSearch:
    """A FAISS index over the K neuron directions m_k = normalised mean of the unit embeddings of neuron
    k's top images (the bundle's images/embeddings.npy), queried with the text tower of the bundle's
    embedder. Ranking by cos(text, m_k) is the score the labels use, so "red" finds the neurons whose
    best images look red. Built on the first query (K x E floats)."""

    def __init__(self, explorer: Explorer):
        self.ex = explorer
        self._lock = threading.Lock()
        self._embedder = None
        self._index = None
        self._alive = None

    @classmethod
    def for_bundle(cls, explorer: Explorer) -> "NeuronSearch | None":
        b = explorer.bundle
        if not b.has("images/embeddings.npy") or not (b.manifest.get("embedder") or {}).get("spec"):
            return None
        return cls(explorer)

    def _ready(self):
        with self._lock:
            if self._index is None:
                from sae_core.labels import labelling_gallery
                from sae_core.search_index import build_index
                from sae_core.text_encoders import load_text_embedder

                b = self.ex.bundle
                emb = b.array("images/embeddings.npy")
                # the images the labels describe: the top images, or the patch gallery of a latent without any
                top, _ = labelling_gallery(b.array("top_images"),
                                           b.array("patch_top_images") if b.has("patch_top_images") else None)
                top = top[:, :N_TOP]
                dirs = np.zeros((len(top), emb.shape[1]), np.float32)
                for k, ids in enumerate(top):
                    ids = ids[ids >= 0]
                    if len(ids):
                        dirs[k] = np.asarray(emb[np.sort(ids)], dtype=np.float32).mean(0)
                norms = np.linalg.norm(dirs, axis=1, keepdims=True)
                self._alive = (norms[:, 0] > 0) & ((top >= 0).sum(1) >= min(MIN_IMAGES, top.shape[1]))
                dirs = dirs / np.maximum(norms, 1e-12)
                self._embedder = load_text_embedder(b.manifest["embedder"]["spec"])
                if self._embedder.dim != dirs.shape[1]:
                    raise UserError(f"the embedder's text tower gives {self._embedder.dim}-d vectors but the bundle's "
                                    f"image embeddings are {dirs.shape[1]}-d; rebuild the bundle.")
                self._index = build_index(dirs)
        return self._embedder, self._index

    def by_text(self, query: str, top: int = 20) -> tuple[list[int], list[float]]:
        """Neuron ids (best first) and their cosine with the query; neurons with < MIN_IMAGES top images left out."""
        if not query:
            raise UserError("the text query is empty; type a concept such as 'a red object'.")
        embedder, index = self._ready()
        q = embedder([query]).numpy().astype(np.float32)
        ids, scores = index.search(q, self.ex.n_neurons)  # K is small next to the images; filter after
        out = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and self._alive[i]][:top]
        return [i for i, _ in out], [round(s, 4) for _, s in out]
