"""ActivationStore: read sharded, memory-mapped activation rows without loading them into RAM.

A store is a directory with `manifest.json` (written last, so a directory without one is unfinished)
and `.npy` shards listed as `shards: [{"path": ..., "rows": ...}, ...]` with `d` and `dtype`.
A single `.npy` file of shape (N, d) is read as a one-shard store.

Stores written by `python -m precompute extract` also list, per shard, an `index` file of shape
(rows, 2) int64 holding each row's [image index, token position] (position -1 = a pooled row such as
the mean or the image embedding), and carry the model, layer, token choice, dataset and skipped
images in the manifest. The writer side (`save_npy_atomic`, `write_json_atomic`) lives here too.
"""
from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import atomic_path, read_json_object, write_json_atomic  # noqa: F401  (write_json_atomic: for the writer)
from .errors import UserError

MANIFEST = "manifest.json"
RUN_FILE = "extract.json"  # an extraction output directory: one store per layer below it


def save_npy_atomic(path: str | Path, arr: np.ndarray) -> None:
    """np.save under a temporary name, fsync, rename: a reader never sees a half-written shard."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        # numpy writes the data through a C stream of its own and loses a short write when it closes that stream:
        # on a full disk (or past ulimit -f) a small array was renamed into place cut short, in silence (until
        # 2026-12-05); the file's size against numpy's own position tells
        if (written := os.fstat(f.fileno()).st_size) != f.tell():
            raise OSError(f"{f.tell()} requested and {written} written")


_WHAT_A_STORE_IS = "pass the --out directory of `python -m precompute extract` or an (N, d) .npy array"


def _read_json(path: Path) -> dict:
    return read_json_object(path, "rerun the extraction that wrote it")


def _store_manifest(path: Path) -> dict:
    """The manifest of the store folder `path`, checked to list its shards."""
    manifest = _read_json(path / MANIFEST)
    if "schema_version" in manifest and "shards" not in manifest:  # the manifest of an atlas bundle
        raise UserError(f"{path} is a bundle (written by `python -m precompute atlas` or `demo`), not an activation "
                        f"store; {_WHAT_A_STORE_IS} (the demo keeps its stores in BUNDLE/.work/acts).")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in shards):
        raise UserError(f"{path / MANIFEST} does not list shards as an activation store's does; {_WHAT_A_STORE_IS}.")
    return manifest


def _resolve_store_dir(path: Path) -> Path:
    """An extraction --out directory holding exactly one layer's store stands for that store."""
    run = path / RUN_FILE
    if (path / MANIFEST).exists() or not run.exists():
        return path
    layers = _read_json(run).get("layers", [])
    if len(layers) == 1:
        return path / f"layer_{layers[0]}"
    raise UserError(
        f"{path} holds activation stores for layers {', '.join(map(str, layers))}; "
        f"pass one of them, e.g. {path / f'layer_{layers[0]}'}."
    )


def why_not_npy(path, error: Exception) -> str:
    """Why np.load failed on `path`, in a user's words: numpy takes any file without the .npy header for a
    pickle ("This file contains pickled (object) data ... allow_pickle=", said of a text file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:  # unreadable: numpy's own words
        return str(error).rstrip(".") or type(error).__name__
    if not head:
        return "the file is empty"
    if head != b"\x93NUMPY":
        return "it has no .npy header"
    if "pickle" in str(error) or "Python objects" in str(error):
        return "it holds pickled Python objects"
    return str(error).rstrip(".") or type(error).__name__


class ActivationStore:
    """Rows of one layer's activations, float16 or float32 on disk, in dataset order."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = _resolve_store_dir(path)
        self.path = path
        self._index_paths: list[Path] | None = None
        if path.is_dir():
            manifest_path = path / MANIFEST
            if not manifest_path.exists():
                raise UserError(
                    f"{path} has no {MANIFEST}, so it is not a finished activation store; "
                    "run (or resume) `python -m precompute extract` to complete it."
                )
            self.manifest = _store_manifest(path)
            shard_paths = [path / s["path"] for s in self.manifest["shards"]]
            if all("index" in s for s in self.manifest["shards"]):
                self._index_paths = [path / s["index"] for s in self.manifest["shards"]]
        elif path.suffix == ".npy" and path.exists():
            self.manifest = {"source": str(path)}
            shard_paths = [path]
        else:
            raise UserError(f"{path} is neither an activation store directory nor a .npy file; {_WHAT_A_STORE_IS}.")
        # a store's shards are redone by rerunning its extraction; a plain array is the user's own file
        fix = "rerun the same extraction command to redo it" if path.is_dir() else "save the (N, d) array again"
        listed_rows = [s.get("rows") for s in self.manifest.get("shards", [{}])]
        self.shards: list[np.ndarray] = []
        for p, listed in zip(shard_paths, listed_rows):
            try:
                arr = np.load(p, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
                raise UserError(f"cannot read activation shard {p} ({why_not_npy(p, e)}); {fix}.") from e
            if listed is not None and arr.ndim == 2 and arr.shape[0] != listed:
                # rows would be matched to the wrong images by the index files and the manifest's counts
                raise UserError(f"activation shard {p} holds {arr.shape[0]} rows but {path / MANIFEST} lists "
                                f"{listed}; {fix}.")
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
            raise UserError(f"{path}: its manifest.json gives the width d {self.manifest['d']} but the shards hold "
                            f"{self.d}; the store is damaged: extract it again.")
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.shards])
        self._index: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype

    # Metadata written by the extraction (None for a plain .npy).
    model = property(lambda self: self.manifest.get("model"))
    layer = property(lambda self: self.manifest.get("layer"))
    tokens = property(lambda self: self.manifest.get("tokens"))
    dataset = property(lambda self: self.manifest.get("dataset"))
    skipped = property(lambda self: self.manifest.get("skipped", []))

    def identity(self) -> dict:
        """What tells these rows from other rows of the same shape (a training checkpoint is only resumed on
        them): width, dtype, what the extraction recorded, a digest of the first, middle and last rows, and of
        every row (`content`, the sum of the shards' `rows_digest`) where the manifest lists them. No path (a moved
        or copied store is still the same data) and no shard grid (the number of processes and --shard-images
        change it, not the rows)."""
        n = len(self)
        sample = self.take(np.array(sorted({0, n // 2, n - 1}), dtype=np.int64)) if n else np.zeros((0, self.d))
        spec = lambda v: v.get("spec") if isinstance(v, dict) else v  # noqa: E731
        identity = {"rows": n, "d": self.d, "dtype": str(self.dtype), "layer": self.layer,
                    "tokens": self.manifest.get("tokens"), "model": spec(self.model),
                    "dataset": spec(self.manifest.get("dataset")),
                    "sample": hashlib.sha1(np.ascontiguousarray(sample).tobytes()).hexdigest()[:16]}
        digests = [s.get("rows_digest") for s in self.manifest.get("shards", [{}])]
        if all(isinstance(d, str) for d in digests):  # every row, where the extraction digested its shards (since
            # 2026-12-05: stores that differed in one image's rows had one identity, and training took one for the other)
            identity["content"] = f"{sum(int(d, 16) for d in digests) % _DIGEST_MOD:064x}"[:32]
        return identity

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Contiguous rows [start, stop) as one array (copied out of the memory maps); negative or too large bounds
        as a Python slice takes them (rows(-10, len(store)) is the last ten rows)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        if stop <= start:
            return np.empty((0, self.d), dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        parts, s = [], first
        while s < len(self.shards) and self.offsets[s] < stop:
            a, b = max(start, self.offsets[s]) - self.offsets[s], min(stop, self.offsets[s + 1]) - self.offsets[s]
            parts.append(self.shards[s][a:b])
            s += 1
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows at `index` (any order, repeats allowed), returned in that order: (len(index), d)."""
        return _take(self.shards, self.offsets, index, self.d)

    def row_index(self, index: np.ndarray | None = None) -> np.ndarray:
        """[image index, token position] of rows `index` (all rows if None): (n, 2) int64."""
        if self._index is None:
            if self._index_paths is None:
                raise UserError(f"{self.path} records no image index per row; re-extract it with `python -m precompute extract`.")
            files = []
            for p, n in zip(self._index_paths, np.diff(self.offsets)):
                try:
                    a = np.load(p, mmap_mode="r")
                except (OSError, ValueError, EOFError) as e:
                    raise UserError(f"cannot read the row index {p} ({e or 'the file is empty'}); rerun the same "
                                    "extraction command to redo it.") from e
                if a.shape != (n, 2):
                    raise UserError(f"the row index {p} has shape {a.shape}, not ({n}, 2) as its shard; rerun the "
                                    "same extraction command to redo it.")
                files.append(a)
            self._index = files
        if index is None:
            return np.concatenate([np.asarray(a) for a in self._index])
        return _take(self._index, self.offsets, index, 2)

    def image_index(self, index: np.ndarray | None = None) -> np.ndarray:
        """The dataset index of the image each row came from."""
        return self.row_index(index)[:, 0]

    def token_position(self, index: np.ndarray | None = None) -> np.ndarray:
        """The token position each row came from (0 = CLS, prefix then row-major patches; -1 pooled)."""
        return self.row_index(index)[:, 1]

    def iter_batches(self, batch_size: int, seed: int = 0, start_step: int = 0, stop_step: int | None = None,
                     rank: int = 0, world_size: int = 1, prefetch: int = 4,
                     held_out: "HeldOut | None" = None) -> Iterator[np.ndarray]:
        """Shuffled batches `shuffled_batch_index(n, ...)` for steps start_step, start_step+1, ...

        Over all rows by default; with `held_out` (a `HeldOut`, e.g. the trainer's `held_out_split(store,
        eval_rows)`) over its training rows only, exactly the trainer's batches.

        A background thread reads up to `prefetch` batches ahead, so the page faults of the memory
        maps overlap with the caller's compute (numpy copies release the GIL).
        """
        if held_out is not None and held_out.n_rows != len(self):
            raise UserError(f"the held-out split is of a store of {held_out.n_rows} rows, not of this one's {len(self)}.")
        n = len(self) if held_out is None else held_out.n_train
        steps = iter(range(start_step, stop_step)) if stop_step is not None else _count(start_step)
        q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()

        def work():
            try:
                for step in steps:
                    if stop.is_set():
                        return
                    idx = shuffled_batch_index(n, batch_size, step, seed, rank, world_size)
                    q.put(self.take(idx if held_out is None else held_out.training_rows(idx)))
                q.put(None)
            except BaseException as e:  # hand the error to the consumer
                q.put(e)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.01)


@dataclass(frozen=True)
class HeldOut:
    """The rows of a store that `train` holds out for its metrics.json, and the others, which it trains on.

    Held out: `n_blocks` blocks of `block` consecutive rows (one image's rows, so no image is split
    between the two), the last block of every `period` blocks, so spread evenly over the store. The
    store's rows are in dataset order, and a folder sorted by class (ImageNet, iNaturalist) would
    otherwise lend every held-out row to its last classes, which the SAE would then never see.
    `period` 0 is the rule of checkpoints written before, the last n_blocks * block rows, kept so that
    such a run resumes as it began.
    """
    n_rows: int
    block: int
    n_blocks: int
    period: int

    @property
    def n_eval(self) -> int:
        return self.block * self.n_blocks

    @property
    def n_train(self) -> int:
        return self.n_rows - self.n_eval

    def training_rows(self, i: np.ndarray) -> np.ndarray:
        """Store rows of training rows `i` (0 <= i < n_train, in store order), as int64."""
        i = np.asarray(i, dtype=np.int64)
        if self.period == 0:
            return i
        b = i // self.block  # the training block; before it, min(b // (period - 1), n_blocks) held-out ones
        return i + np.minimum(b // (self.period - 1), self.n_blocks) * self.block

    def held_out_rows(self) -> np.ndarray:
        """The held-out store rows, ascending: (n_eval,) int64."""
        if self.period == 0:
            return np.arange(self.n_train, self.n_rows, dtype=np.int64)
        starts = (np.arange(self.n_blocks, dtype=np.int64) * self.period + self.period - 1) * self.block
        return (starts[:, None] + np.arange(self.block)).ravel()

    def to_dict(self) -> dict:
        return asdict(self)


def _eval_rows(n_rows: int, eval_rows: int | None) -> int:
    """The held-out rows asked for: `eval_rows`, or by default 5% of the rows, at most 65,536."""
    return eval_rows if eval_rows is not None else max(1, min(65_536, n_rows // 20))


def held_out_split(store: ActivationStore, eval_rows: int | None = None) -> HeldOut:
    """`train`'s held-out rows: `eval_rows` (None: 5% of the rows, at most 65,536), rounded up to whole
    images, spread over the store (see HeldOut). An image's rows are the run of rows sharing the first
    row's image in the row index, as `extract` writes every image; rows are held out one by one in a plain
    .npy, and in a store whose first 65,536 rows hold images of different row counts (an image may then have
    rows on both sides)."""
    n = len(store)
    n_eval = _eval_rows(n, eval_rows)
    block = 1
    if store._index_paths is not None and n:
        images = store.image_index(np.arange(min(n, 65_536)))
        starts = np.flatnonzero(images[1:] != images[:-1]) + 1
        runs = np.diff(starts, prepend=0)  # the whole runs of the sample (its last may be cut short)
        block = int(runs[0]) if len(runs) else len(images)
        if (runs != block).any():
            block = 1
    n_blocks = math.ceil(n_eval / block) if n_eval > 0 else 0
    period = (n // block) // n_blocks if n_blocks else 0
    if n_eval < 1 or period < 2:
        what = f"{n_eval} rows" + (f" ({n_blocks} images of {block} rows)" if block > 1 else "")
        raise UserError(f"the store has {n} rows, too few to hold out {what} for evaluation and train on the "
                        "rest; extract more activations or set a smaller --eval-rows.")
    return HeldOut(n, block, n_blocks, period)


def last_rows_split(n_rows: int, eval_rows: int | None = None) -> HeldOut:
    """The held-out rule of checkpoints written before `held_out_split`: the store's last rows."""
    return HeldOut(n_rows, _eval_rows(n_rows, eval_rows), 1, 0)


def _count(start: int):
    while True:
        yield start
        start += 1


_DIGEST_MOD = 1 << 256


def rows_digest(acts: np.ndarray, index: np.ndarray) -> str:
    """A digest of rows (n, d) and their [image, position] index (n, 2) that adds over any split of a store's images:
    the sum, modulo 2^256, of sha256(image id, that image's rows in order) over its images. So the store's digest
    (the sum of its shards') does not depend on the shard grid, which the number of processes and --shard-images
    set while the rows stay the same. (Meant to tell data apart by accident, not against an adversary.)"""
    image = np.asarray(index)[:, 0]
    if len(image) > 1 and (image[1:] < image[:-1]).any():
        order = np.argsort(image, kind="stable")
        acts, image = acts[order], image[order]
    starts = np.flatnonzero(np.r_[True, image[1:] != image[:-1]]) if len(image) else np.zeros(0, np.int64)
    total = 0
    for a, b in zip(starts, np.r_[starts[1:], len(image)]):
        h = hashlib.sha256(int(image[a]).to_bytes(8, "little", signed=True))
        h.update(np.ascontiguousarray(acts[a:b]).data)
        total += int.from_bytes(h.digest(), "big")
    return f"{total % _DIGEST_MOD:064x}"


def _take(shards: list[np.ndarray], offsets: np.ndarray, index, width: int) -> np.ndarray:
    index = np.asarray(index)
    # 1.9 was row 1 in silence (take's until 2026-12-05, row_index's and token_position's until that night), and a
    # bare 5 or a 2-D array was numpy's "len() of unsized object" / "object too deep"
    if index.ndim != 1:
        raise UserError(f"row indices must be a 1-D array, not of shape {index.shape}; pass e.g. [5] for row 5.")
    if index.dtype.kind not in "iu" and index.size:
        raise UserError(f"row indices must be integers, not {index.dtype}; pass an integer array.")
    index = index.astype(np.int64, copy=False)
    n = int(offsets[-1])
    if len(index) and (index.min() < 0 or index.max() >= n):
        raise IndexError(f"row index out of range 0..{n - 1}")
    out = np.empty((len(index), width), dtype=shards[0].dtype)
    # Reading in sorted order keeps the page cache and the disk head moving forward.
    order = np.argsort(index, kind="stable")
    sorted_idx = index[order]
    shard_of = np.searchsorted(offsets, sorted_idx, side="right") - 1
    bounds = np.searchsorted(shard_of, np.arange(len(shards) + 1), side="left")
    for s in range(len(shards)):
        a, b = bounds[s], bounds[s + 1]
        if a < b:
            out[order[a:b]] = shards[s][sorted_idx[a:b] - offsets[s]]
    return out


def check_batch_size(n_rows: int, batch_size: int, world_size: int = 1) -> None:
    """UserError (one sentence) for a global batch that shuffled_batch_index cannot read: larger than the rows,
    or not split evenly over the processes."""
    if batch_size % world_size:
        raise UserError(f"batch size {batch_size} does not split evenly over {world_size} processes; give a "
                        f"--batch-size that is a multiple of {world_size}.")
    if batch_size > n_rows:
        raise UserError(f"batch size {batch_size} is larger than the {n_rows} training rows; lower --batch-size.")


def shuffled_batch_index(
    n_rows: int, batch_size: int, step: int, seed: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """Row ids of this rank's part of global batch `step`: a pure function of its arguments.

    Rows are visited in a seeded permutation per epoch; global batch `step` is a window of it, and
    rank r takes the r-th of `world_size` equal slices. So a resumed run reads exactly what an
    uninterrupted one would, and N ranks together read exactly the one-process batch.
    """
    check_batch_size(n_rows, batch_size, world_size)
    per_epoch = n_rows // batch_size
    epoch, within = divmod(step, per_epoch)
    perm = _epoch_permutation(n_rows, seed, epoch)
    batch = perm[within * batch_size : (within + 1) * batch_size]
    part = batch_size // world_size
    return batch[rank * part : (rank + 1) * part]


@lru_cache(maxsize=2)
def _epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: a permutation of millions of rows is too slow to redo at every step. Shuffling an int32
    # range draws what permutation(n_rows) draws (the same permutation) in half the memory: two cached
    # epochs of an all-tokens ImageNet store (738M rows) held 11.8 GB per process in int64.
    rng = np.random.default_rng([seed, epoch])
    if n_rows >= 2**31:
        return rng.permutation(n_rows)
    perm = np.arange(n_rows, dtype=np.int32)
    rng.shuffle(perm)
    return perm
