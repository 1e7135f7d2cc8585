"""Search the bundle by text or by image: neurons (by their top images' mean direction) and images (FAISS)."""
from __future__ import annotations

import threading

import numpy as np

from sae_core.errors import UserError

from .explorer import Explorer
from .uploads import UploadLimits, load_upload

N_TOP = 16
"""Top images per neuron averaged into its direction (as the labels do)."""
MIN_IMAGES = 8
"""Neurons with fewer top images are left out: the mean of one or two embeddings is as close to a
text as a single image is, so rare neurons would crowd the top without being about the concept."""
N_IMAGES = 24
"""Images an image search returns: three rows of the gallery's eight columns."""


def load_bundle_model(spec: str, what: str):
    """The model a bundle's manifest names, on the CPU; a failure is one sentence for the explorer's user, who cannot
    pass another model (the loader's own advice, "pass a directory written by save_pretrained", was all it said
    until 2026-12-05, for a model folder moved after the bundle was built)."""
    from sae_core.adapters import load_adapter

    try:
        return load_adapter(spec, device="cpu")
    except UserError as e:
        said = getattr(e, "problem", None) or str(e).rstrip(".")  # a loader's advice is for a command line
        raise UserError(f"{what} {spec} cannot be loaded, so searching by text or by image is off (the other pages "
                        f"work): {said}; put the model back where the bundle records it, or rebuild the bundle with "
                        "`python -m precompute atlas`.") from e


class BundleEmbedder:
    """The model that embedded the bundle's images (its manifest's `embedder`), both towers, loaded on
    first use and shared by the neuron and image searches: one copy of a CLIP in memory, not two."""

    def __init__(self, spec: str):
        self.spec = spec
        self._lock = threading.Lock()
        self._adapter = None
        self._text = None

    @classmethod
    def for_bundle(cls, explorer: Explorer) -> "BundleEmbedder | None":
        spec = (explorer.bundle.manifest.get("embedder") or {}).get("spec")
        ok = spec and explorer.bundle.has("images/embeddings.npy")
        return cls(explorer.bundle.local_spec(spec)) if ok else None  # a copied bundle carries its world

    def _loaded(self):
        with self._lock:
            if self._adapter is None:
                self._adapter = load_bundle_model(self.spec, "the bundle's embedder")
            return self._adapter

    @property
    def text_loaded(self) -> bool:
        return self._text is not None

    def texts(self, texts: list[str]) -> np.ndarray:
        """(Q, E) float32 unit-norm text embeddings; UserError for an embedder without a text tower."""
        adapter = self._loaded()
        with self._lock:
            if self._text is None:
                from sae_core.text_encoders import text_embedder_for

                self._text = text_embedder_for(adapter)
        return self._text(texts).numpy().astype(np.float32)

    def images(self, pils: list) -> np.ndarray:
        """(n, E) float32 unit-norm image embeddings of PIL RGB images, as the atlas embedded the bundle's."""
        adapter = self._loaded()
        return adapter.embed(adapter.preprocess(pils), normalize=True).cpu().numpy().astype(np.float32)


class BundleCoder:
    """The bundle's own model at its layer and its SAE, loaded on first use: which latents fire on an image, as the
    atlas read the dataset's. The Neurons page's search by image used the steering session until 2026-12-05, so
    on a bundle of a CLIP it loaded (or failed to load) LLaVA-1.5-7b for a question the bundle's model answers."""

    def __init__(self, explorer: Explorer, embedder: BundleEmbedder | None = None):
        self.ex = explorer
        self.spec = explorer.bundle.local_spec(explorer.bundle.manifest["model"].get("spec") or "")
        self.embedder = embedder if embedder is not None and embedder.spec == self.spec else None  # one copy
        self._lock = threading.Lock()
        self._loaded = None

    def _load(self):
        with self._lock:
            if self._loaded is None:
                adapter = self.embedder._loaded() if self.embedder else load_bundle_model(self.spec, "the bundle's model")
                layer = adapter.resolve_layer(str(self.ex.bundle.manifest["model"]["layer"]))
                self._loaded = adapter, layer, self.ex.bundle.load_sae(device="cpu")
            return self._loaded

    def latents(self, pil, top: int) -> dict:
        """sae_core.steering.latents_firing of a PIL RGB image under the bundle's model and SAE."""
        import torch

        from sae_core.steering import latents_firing

        adapter, layer, sae = self._load()
        with torch.inference_mode():
            h = adapter.capture(adapter.preprocess([pil]), [layer])[layer.name][0].float()
            return latents_firing(sae.encode(h).cpu(), adapter.layout, top, self.ex.bundle.labels["labels"])


class NeuronSearch:
    """A FAISS index over the K neuron directions m_k = normalised mean of the unit embeddings of neuron
    k's top images (the bundle's images/embeddings.npy), queried with the text tower of the bundle's
    embedder. Ranking by cos(text, m_k) is the score the labels use, so "red" finds the neurons whose
    best images look red. Built on the first query (K x E floats)."""

    def __init__(self, explorer: Explorer, embedder: BundleEmbedder):
        self.ex = explorer
        self.embedder = embedder
        self._lock = threading.Lock()
        self._index = None
        self._alive = None

    @classmethod
    def for_bundle(cls, explorer: Explorer, embedder: BundleEmbedder | None = None) -> "NeuronSearch | None":
        embedder = embedder or BundleEmbedder.for_bundle(explorer)
        return None if embedder is None else cls(explorer, embedder)

    def _ready(self):
        with self._lock:
            if self._index is None:
                from sae_core.labels import labelling_gallery
                from sae_core.search_index import build_index

                b = self.ex.bundle
                emb = b.array("images/embeddings.npy")
                # the images the labels describe: the top images, or the patch gallery of a latent without any
                top, _ = labelling_gallery(b.array("top_images"),
                                           b.array("patch_top_images") if b.has("patch_top_images") else None)
                import scipy.sparse

                top = np.asarray(top[:, :N_TOP])
                valid = top >= 0
                # the sum of each neuron's gallery embeddings (its direction is the mean's) as one sparse product,
                # the images read once, a slice at a time: a loop over neurons took 3.3-5.1 s of the first search's
                # wait at K 65,536 and 50,000 images, this 0.9 s
                gallery = scipy.sparse.csc_matrix((np.ones(int(valid.sum()), np.float32),
                                                   (np.nonzero(valid)[0], top[valid])), shape=(len(top), len(emb)))
                dirs = np.zeros((len(top), emb.shape[1]), np.float32)
                for a in range(0, len(emb), 16384):
                    dirs += gallery[:, a:a + 16384] @ np.asarray(emb[a:a + 16384], dtype=np.float32)
                norms = np.linalg.norm(dirs, axis=1, keepdims=True)
                self._alive = (norms[:, 0] > 0) & ((top >= 0).sum(1) >= min(MIN_IMAGES, top.shape[1]))
                self._index = build_index(dirs / np.maximum(norms, 1e-12))
        return self._index

    @property
    def ready(self) -> bool:
        """Whether a search by text will answer at once (index built and text tower loaded)."""
        return self._index is not None and self.embedder.text_loaded

    def warm(self) -> None:
        """Build the index and load the text tower, which the first search by text otherwise waited for
        (5 to 11 s on a CPU, behind nothing but Gradio's spinner)."""
        self._ready()
        self.embedder.texts(["a photo"])

    def by_text(self, query: str, top: int = 20) -> tuple[list[int], list[float]]:
        """Neuron ids (best first) and their cosine with the query; neurons with < MIN_IMAGES top images left out."""
        if not query:
            raise UserError("the text query is empty; type a concept such as 'a red object'.")
        index = self._ready()
        q = _checked(self.embedder.texts([query]), self.ex, "text tower")
        ids, scores = index.search(q, self.ex.n_neurons)  # K is small next to the images; filter after
        out = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and self._alive[i]][:top]
        return [i for i, _ in out], [round(s, 4) for _, s in out]


class ImageSearch:
    """The bundle's images nearest a text, an uploaded image or one of its own images, through the
    bundle's FAISS index (images/index.faiss over images/embeddings.npy: exact below 100,000 images,
    IVF-PQ re-ranked exactly above), by cosine in the embedder's space."""

    def __init__(self, explorer: Explorer, embedder: BundleEmbedder, limits: UploadLimits = UploadLimits()):
        self.ex, self.embedder, self.limits = explorer, embedder, limits
        # images the atlas could not read keep a zero embedding in the index: never a result
        self.skipped = frozenset(int(s["index"]) for s in explorer.bundle.manifest.get("skipped") or [])

    @classmethod
    def for_bundle(cls, explorer: Explorer, embedder: BundleEmbedder | None = None,
                   limits: UploadLimits = UploadLimits()) -> "ImageSearch | None":
        embedder = embedder or BundleEmbedder.for_bundle(explorer)
        if embedder is None or not explorer.bundle.has("images/index.faiss"):
            return None
        return cls(explorer, embedder, limits)

    @property
    def kind(self) -> str:
        return self.ex.bundle.search_index().kind

    def _search(self, q: np.ndarray, top: int, leave_out: int | None = None) -> tuple[list[int], list[float]]:
        dropped = self.skipped | ({leave_out} if leave_out is not None else set())
        ids, scores = self.ex.bundle.search_index().search(q, min(self.ex.n_images, top + len(dropped)))
        out = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and i not in dropped][:top]
        return [i for i, _ in out], [round(s, 4) for _, s in out]

    def by_text(self, query: str, top: int = N_IMAGES) -> tuple[list[int], list[float]]:
        """Image ids (best first) and their cosine with the query's text embedding."""
        if not query:
            raise UserError("the text query is empty; type what the images should show, such as 'a red star'.")
        return self._search(_checked(self.embedder.texts([query]), self.ex, "text tower"), top)

    def by_upload(self, path, top: int = N_IMAGES) -> tuple[list[int], list[float]]:
        """Image ids (best first) and their cosine with an uploaded image (checked as every upload is)."""
        pil = load_upload(path, self.limits)
        return self._search(_checked(self.embedder.images([pil]), self.ex, "image tower"), top)

    def like(self, image, top: int = N_IMAGES) -> tuple[list[int], list[float]]:
        """The images nearest dataset image `image`, itself left out."""
        i = self.ex.check_image(image, "image index")
        if i in self.skipped:
            raise UserError(f"image {i} could not be read when the atlas was built, so it has no embedding; pick "
                            "another image.")
        q = np.asarray(self.ex.bundle.array("images/embeddings.npy")[i:i + 1], dtype=np.float32)
        return self._search(q / max(float(np.linalg.norm(q)), 1e-12), top, leave_out=i)


def _checked(q: np.ndarray, ex: Explorer, tower: str) -> np.ndarray:
    """A query embedding of the bundle's width, or one sentence saying the bundle needs rebuilding."""
    d = ex.bundle.array("images/embeddings.npy").shape[1]
    if q.shape[1] != d:
        raise UserError(f"the embedder's {tower} gives {q.shape[1]}-d vectors but the bundle's image embeddings "
                        f"are {d}-d; rebuild the bundle with this embedder.")
    return q
