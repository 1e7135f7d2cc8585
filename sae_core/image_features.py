"""Per-image features of a bundle's model and SAE: pooled raw activations, pooled SAE codes, reconstruction error.

Images are pooled the way the bundle's atlas scored them (manifest model.tokens: the CLS token, or the
max or mean over patch tokens), for the SAE codes and for the layer's raw units alike, so the probes,
the OOD detectors and the atlas speak of the same numbers. Results can be cached (`cached_features`):
one .npz file (no pickle) per SAE and dataset, checked against a fingerprint of the dataset's files.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .datasets import FileListDataset, WorldImages, image_files_digest, open_dataset
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
                     progress: Callable[[int], None] | None = None, first: int = 0) -> ImageFeatures:
    """One pass over images `first` .. `n_images` - 1 of `dataset` (all by default). `progress(n)` gets
    the index reached (first + images done), so a bar over the first n_images ends full."""
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
    done = first
    for ids, images, bad in iter_batches(dataset, N, batch_size, first=first):
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
        if first > 0:  # extending a cached extraction: these images may all be unreadable
            width = sae.cfg.d_in
            return ImageFeatures(np.zeros(0, np.int64), np.zeros((0, width), np.float32),
                                 np.zeros((0, sae.W_dec.shape[0]), np.float32),
                                 *(np.zeros(0, np.float32) for _ in range(3)))
        raise UserError("no image of the dataset could be read; check the dataset spec.")
    return ImageFeatures(*(np.concatenate(parts[f]) for f in FIELDS))


# ----------------------------------------------------------------------------------------------
# Which images a dataset holds: identity, per-image keys, fingerprint
# ----------------------------------------------------------------------------------------------
def _world_images(ds) -> str:
    """A world's images are a function of its spec (seed, size, mixture, held-out values), not of its folder: a
    copy of a world (the one a bundle carries), or a world of the same spec with other split sizes, holds the
    same image at the same split and index. A digest of that spec."""
    spec = ds.world.spec.to_json()
    spec.pop("splits")
    return "world:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def dataset_identity(ds) -> str:
    """What a dataset is, whatever its spec's spelling (a trailing slash, `..`, `~`, $VARS, a symlink):
    world: its images' spec, the split and its size (a copy of the world is the same set; until 2026-12-04 the
    folder's path was, so a bundle's copy of its world was "another" set); image folders and file lists: the
    real root folder and a digest of the image list (two lists in one folder differ)."""
    if isinstance(ds, WorldImages):
        return f"{_world_images(ds)}:{ds.split}:{len(ds)}"
    if isinstance(ds, FileListDataset):
        items = hashlib.sha256("\n".join(ds.paths).encode()).hexdigest()[:16]
        return f"files:{os.path.realpath(ds.root)}:{len(ds.paths)}:{items}"
    return f"spec:{ds.spec}"


def image_keys(ds, n: int | None = None) -> list[str]:
    """A key per image (the first `n`) that two datasets share exactly when they hold the same image:
    the file's absolute path (real root folder + item), or the world's images' spec, split and index."""
    n = len(ds) if n is None else min(int(n), len(ds))
    if isinstance(ds, WorldImages):
        base = f"{_world_images(ds)}:{ds.split}/"
        return [base + str(i) for i in range(n)]
    if isinstance(ds, FileListDataset):
        root = os.path.realpath(ds.root)
        return [os.path.normpath(os.path.join(root, ds.paths[i])) for i in range(n)]
    return [f"{ds.spec}#{i}" for i in range(n)]


def dataset_fingerprint(ds, n: int | None = None) -> str:
    """Changes when the first `n` images may have: image folders and file lists hash their whole image
    list (identity) and the path, size and mtime_ns of each of the first n files (one stat each, so a
    large folder costs the images used); a world hashes its world.json (the images are rendered from it)."""
    n = len(ds) if n is None else min(int(n), len(ds))
    files = image_files_digest(ds, n) or f"{ds.spec}\0{len(ds)}"
    return hashlib.sha256(f"{dataset_identity(ds)}\0{n}\0{files}".encode()).hexdigest()[:32]


def cache_file(source: FeatureSource, ds, cache_dir: str | Path) -> Path:
    """The cache file of a dataset's features: one per SAE/model/layer/pooling and dataset identity."""
    tag = hashlib.sha256(json.dumps([source.key, dataset_identity(ds)]).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{tag}.npz"


def _read_cache(path: Path, ds):
    """(features, images covered) of a cache file whose images are unchanged, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            n = int(z["n_images"])
            if str(z["fingerprint"]) != dataset_fingerprint(ds, n):
                return None
            return ImageFeatures(*(z[f] for f in FIELDS)), n
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # missing or damaged: extract again
        return None


def cached_features(source: FeatureSource, spec: str, cache_dir: str | Path | None, n_images: int | None = None,
                    batch_size: int = 128, progress: Callable[[int], None] | None = None,
                    write: bool = True) -> ImageFeatures:
    """`extract_features` of the first `n_images` of `open_dataset(spec)`, through a cache in `cache_dir`
    when given: a cached extraction of at least as many images of the same files serves the request
    (its rows are in dataset order), a shorter one is extended by the images it lacks. With `write`
    False the cache is only read; a cache that cannot be written is skipped with a note on stderr."""
    from .atomic import atomic_path

    ds = open_dataset(spec)
    n = len(ds) if n_images is None else min(int(n_images), len(ds))
    if cache_dir is None:
        return extract_features(source, ds, n, batch_size=batch_size, progress=progress)
    path = cache_file(source, ds, cache_dir)
    got = _read_cache(path, ds) if path.is_file() else None
    if got is not None and got[1] >= n:
        return got[0].subset(got[0].ids < n)
    fingerprint = dataset_fingerprint(ds, n)  # before extracting: a file changed meanwhile is not trusted later
    if got is not None:
        feats = ImageFeatures.concat([got[0], extract_features(source, ds, n, batch_size=batch_size,
                                                               progress=progress, first=got[1])])
    else:
        feats = extract_features(source, ds, n, batch_size=batch_size, progress=progress)
    if write:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # one file: fields and fingerprint agree
                np.savez(fh, **{f: getattr(feats, f) for f in FIELDS}, n_images=np.int64(n),
                         fingerprint=np.str_(fingerprint), spec=np.str_(spec))
        except OSError as e:
            print(f"note: features not cached ({path.parent}: {e.strerror or e}); pass --no-cache to skip the cache.",
                  file=sys.stderr)
    return feats
