"""ActivationStore: read sharded, memory-mapped activation rows without loading them into RAM.

A store is a directory with `manifest.json` (written last, so a directory without one is unfinished)
and `.npy` shards listed as `shards: [{"path": ..., "rows": ...}, ...]` with `d` and `dtype`.
A single `.npy` file of shape (N, d) is read as a one-shard store.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import UserError

MANIFEST = "manifest.json"


class ActivationStore:
    """Rows of one layer's activations, float16 or float32 on disk, in dataset order."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        if path.is_dir():
            manifest_path = path / MANIFEST
            if not manifest_path.exists():
                raise UserError(
                    f"{path} has no {MANIFEST}, so it is not a finished activation store; "
                    "run (or resume) `python -m precompute extract` to complete it."
                )
            self.manifest = json.loads(manifest_path.read_text())
            shard_paths = [path / s["path"] for s in self.manifest["shards"]]
        elif path.suffix == ".npy" and path.exists():
            self.manifest = {"source": str(path)}
            shard_paths = [path]
        else:
            raise UserError(
                f"{path} is neither an activation store directory nor a .npy file; "
                "pass the --out directory of `python -m precompute extract` or an (N, d) .npy array."
            )
        self.shards: list[np.ndarray] = []
        for p in shard_paths:
            try:
                arr = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read activation shard {p} ({e}); re-run the extraction.") from e
            if arr.ndim != 2:
                raise UserError(f"{p} has shape {arr.shape}, expected (rows, d); pass a 2-D activation array.")
            if arr.dtype not in (np.float16, np.float32, np.float64):
                raise UserError(f"{p} has dtype {arr.dtype}; activations must be float16 or float32.")
            self.shards.append(arr)
        if not self.shards:
            raise UserError(f"{path} lists no shards; re-run the extraction.")
        dims = {a.shape[1] for a in self.shards}
        if len(dims) != 1:
            raise UserError(f"shards of {path} disagree on the width d ({sorted(dims)}); re-run the extraction.")
        self.d = dims.pop()
        if "d" in self.manifest and self.manifest["d"] != self.d:
            raise UserError(f"{path}: manifest says d={self.manifest['d']} but the shards hold d={self.d}.")
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Contiguous rows [start, stop) as one array (copied out of the memory maps)."""
        return self.take(np.arange(start, min(stop, len(self))))

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows at `index` (any order, repeats allowed), returned in that order: (len(index), d)."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.d), dtype=self.shards[0].dtype)
        # Reading in sorted order keeps the page cache and the disk head moving forward.
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[order[sel]] = self.shards[s][sorted_idx[sel] - self.offsets[s]]
        return out


def shuffled_batch_index(
    n_rows: int, batch_size: int, step: int, seed: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """Row ids of this rank's part of global batch `step`: a pure function of its arguments.

    Rows are visited in a seeded permutation per epoch; global batch `step` is a window of it, and
    rank r takes the r-th of `world_size` equal slices. So a resumed run reads exactly what an
    uninterrupted one would, and N ranks together read exactly the one-process batch.
    """
    if batch_size % world_size:
        raise UserError(f"batch size {batch_size} does not split evenly over {world_size} processes.")
    per_epoch = n_rows // batch_size
    if per_epoch == 0:
        raise UserError(f"batch size {batch_size} is larger than the {n_rows} training rows; lower --batch-size.")
    epoch, within = divmod(step, per_epoch)
    perm = _epoch_permutation(n_rows, seed, epoch)
    batch = perm[within * batch_size : (within + 1) * batch_size]
    part = batch_size // world_size
    return batch[rank * part : (rank + 1) * part]


@lru_cache(maxsize=2)
def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: a permutation of millions of rows is too slow to redo at every step.
    return np.random.default_rng([seed, epoch]).permutation(n_rows)
