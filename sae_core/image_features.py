"""Per-image features of a bundle's model and SAE: pooled raw activations, pooled SAE codes, reconstruction error.

Images are pooled the way the bundle's atlas scored them (manifest model.tokens: the CLS token, or the
max or mean over patch tokens), for the SAE codes and for the layer's raw units alike, so the probes,
the OOD detectors and the atlas speak of the same numbers. Results can be cached as .npy files
(no pickle) keyed by the dataset spec, the image count and the SAE weights.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UserError

FIELDS = ("ids", "raw", "codes", "recon_mean", "recon_max", "resid_max")


@dataclass
class ImageFeatures:
    """Features of N images (rows in dataset order, unreadable images dropped)."""

    ids: np.ndarray
    """(N,) int64 dataset indices."""
    raw: np.ndarray
    """(N, d) float32 pooled raw activations of the layer."""
    codes: np.ndarray
    """(N, K) float32 pooled SAE codes."""
    recon_mean: np.ndarray
    """(N,) float32 mean over the image's tokens of ||x - x_hat||^2 / ||x||^2."""
    recon_max: np.ndarray
    """(N,) float32 the same, max over the patch tokens."""
    resid_max: np.ndarray
    """(N,) float32 max over the patch tokens of the residual norm ||x - x_hat|| (not divided by ||x||)."""

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows) -> "ImageFeatures":
        return ImageFeatures(*(getattr(self, f)[rows] for f in FIELDS))

    @staticmethod
    def concat(parts: "list[ImageFeatures]") -> "ImageFeatures":
        return ImageFeatures(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))


@dataclass(frozen=True)
class FeatureSource:
    """What turns images into features: the bundle's model at its layer, its SAE and image score."""

    adapter: object
    sae: torch.nn.Module
    layer: str
    score: str
    key: str
    """Digest of the SAE weights, model spec, layer and score (cache key)."""


def bundle_source(bundle, device: str = "cpu") -> FeatureSource:
    """The model, layer, SAE and image score of a bundle (as its atlas used them)."""
    from .adapters import load_adapter

    model = bundle.manifest["model"]
    spec, layer, score = model["spec"], str(model.get("layer", bundle.manifest.get("layer"))), model.get("tokens", "max")
    adapter = load_adapter(bundle.local_spec(spec), device=device)  # a copied bundle carries its world
    sae = bundle.load_sae(device=device)
    h = hashlib.sha256()
    h.update((bundle.root / "sae" / "sae.safetensors").read_bytes())
    h.update(json.dumps([model["spec"], layer, score]).encode())
    return FeatureSource(adapter, sae, layer, score, h.hexdigest()[:16])


@torch.no_grad()
def extract_features(source: FeatureSource, dataset, n_images: int | None = None, batch_size: int = 128,
                     progress: Callable[[int], None] | None = None) -> ImageFeatures:
    """One pass over the first `n_images` of `dataset` (all by default)."""
    from .atlas import iter_batches, pool_tokens

    adapter, sae = source.adapter, source.sae
    layer = adapter.resolve_layer(source.layer)
    if layer.kind == "embed":
        raise UserError("image features need a block layer with tokens, not embed.")
    if sae.cfg.d_in != adapter.width:
        raise UserError(f"the SAE expects width {sae.cfg.d_in} but {adapter.spec} has width {adapter.width}; "
                        "use the bundle's own model.")
    N = len(dataset) if n_images is None else min(int(n_images), len(dataset))
    n_prefix = adapter.layout.n_prefix
    dev = next(sae.parameters()).device
    parts = {f: [] for f in FIELDS}
    done = 0
    for ids, images, bad in iter_batches(dataset, N, batch_size):
        done += len(ids) + len(bad)
        if len(ids):
            h = adapter.capture(adapter.preprocess(images), [layer])[layer.name].float()  # (n, T, d)
            n, T, d = h.shape
            x = h.reshape(n * T, d).to(dev)
            z = sae.encode(x)
            sq = ((x - sae.decode(z)) ** 2).sum(1)
            err = (sq / (x ** 2).sum(1).clamp_min(1e-12)).reshape(n, T).cpu()
            resid = sq.sqrt().reshape(n, T).cpu()
            codes, _, _ = pool_tokens(z.reshape(n, T, -1).cpu(), n_prefix, source.score)
            raw, _, _ = pool_tokens(h.cpu(), n_prefix, source.score)
            parts["ids"].append(ids)
            parts["raw"].append(raw.numpy().astype(np.float32))
            parts["codes"].append(codes.numpy().astype(np.float32))
            parts["recon_mean"].append(err.mean(1).numpy().astype(np.float32))
            parts["recon_max"].append(err[:, n_prefix:].max(1).values.numpy().astype(np.float32))
            parts["resid_max"].append(resid[:, n_prefix:].max(1).values.numpy().astype(np.float32))
        if progress:
            progress(done)
    if not parts["ids"]:
        raise UserError("no image of the dataset could be read; check the dataset spec.")
    return ImageFeatures(*(np.concatenate(parts[f]) for f in FIELDS))


def cached_features(source: FeatureSource, spec: str, cache_dir: str | Path | None, n_images: int | None = None,
                    batch_size: int = 128, progress: Callable[[int], None] | None = None) -> ImageFeatures:
    """`extract_features` of `open_dataset(spec)`, read from / written to `cache_dir` when given."""
    from .atomic import atomic_path
    from .datasets import open_dataset

    ds = open_dataset(spec)
    n = len(ds) if n_images is None else min(int(n_images), len(ds))
    folder = None
    if cache_dir is not None:
        tag = hashlib.sha256(json.dumps([source.key, spec, n]).encode()).hexdigest()[:16]
        folder = Path(cache_dir) / tag
        if all((folder / f"{f}.npy").is_file() for f in FIELDS):
            return ImageFeatures(*(np.load(folder / f"{f}.npy", allow_pickle=False) for f in FIELDS))
    feats = extract_features(source, ds, n, batch_size=batch_size, progress=progress)
    if folder is not None:
        for f in FIELDS:
            with atomic_path(folder / f"{f}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, getattr(feats, f), allow_pickle=False)
        (folder / "spec.json").write_text(json.dumps({"spec": spec, "n_images": n, "source": source.key}))
    return feats
