"""Activation store read throughput: shuffled trainer batches from the page cache and from cold files.

    python -m benchmarks store_read [--rows 1000000] [--d 768] [--batch-size 4096] [--seconds 5] [--dir DIR]

Writes a float16 store of random rows (shards of --shard-mb), then times `ActivationStore.take` on
`shuffled_batch_index` batches (what the trainer reads) with the files in the page cache ("warm"),
after evicting them with posix_fadvise(DONTNEED) ("cold": every batch faults in random pages from
disk), the prefetching `iter_batches` reader, and a sequential scan with `rows`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from precompute.args import positive_float, positive_int
from sae_core.activation_store import ActivationStore, save_npy_atomic, shuffled_batch_index, write_json_atomic

from . import argument_parser


def write_store(path: Path, rows: int, d: int, shard_mb: int) -> float:
    (path / "shards").mkdir(parents=True, exist_ok=True)
    per = max(1, (shard_mb << 20) // (d * 2))
    rng = np.random.default_rng(0)
    shards, t0 = [], time.perf_counter()
    for k, a in enumerate(range(0, rows, per)):
        n = min(per, rows - a)
        save_npy_atomic(path / "shards" / f"{k:05d}.npy", rng.standard_normal((n, d), dtype=np.float32).astype(np.float16))
        shards.append({"path": f"shards/{k:05d}.npy", "rows": n})
    write_json_atomic(path / "manifest.json", {"shards": shards, "d": d, "dtype": "float16"})
    return time.perf_counter() - t0


def evict(path: Path) -> bool:
    """Drop the store's files from the page cache; False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in path.glob("shards/*.npy"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def warm(path: Path) -> None:
    for f in path.glob("shards/*.npy"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def time_batches(store: ActivationStore, batch_size: int, seconds: float, start_step: int, max_batches: int | None = None):
    n, t0, step = 0, time.perf_counter(), start_step
    while time.perf_counter() - t0 < seconds and (max_batches is None or n < max_batches):
        store.take(shuffled_batch_index(len(store), batch_size, step, seed=0))
        n, step = n + 1, step + 1
    return n, time.perf_counter() - t0


def scan_rows(store, chunk: int = 65536) -> int:
    """Read every row of `store` in order, `chunk` rows at a time; the rows read (the last chunk is short: counted as
    a full one until 2026-12-05, 31% more rows than read for a store of 200,000)."""
    return sum(len(store.rows(s, s + chunk)) for s in range(0, len(store), chunk))


def main(argv=None) -> int:
    p = argument_parser("store_read", description=__doc__)
    p.add_argument("--rows", type=positive_int, default=1_000_000)
    p.add_argument("--d", type=positive_int, default=768)
    p.add_argument("--batch-size", type=positive_int, default=4096)
    p.add_argument("--shard-mb", type=positive_int, default=256)
    p.add_argument("--seconds", type=positive_float, default=5.0)
    p.add_argument("--dir", help="where to write the store (default: a temporary folder, removed after)")
    a = p.parse_args(argv)
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="store_bench_"))
    path = root / "store"
    try:
        wt = write_store(path, a.rows, a.d, a.shard_mb)
        gb = a.rows * a.d * 2 / 1e9
        print(f"store: {a.rows:,} rows x d={a.d} float16 = {gb:.2f} GB in {len(list(path.glob('shards/*.npy')))} shards; "
              f"written in {wt:.1f} s ({gb / wt:.2f} GB/s incl. random generation)")
        row_mb = a.d * 2 / 1e6
        results = []
        store = ActivationStore(path)
        shuffled_batch_index(len(store), a.batch_size, 0, 0)  # build the epoch permutation outside the timing

        warm(path)
        n, t = time_batches(store, a.batch_size, a.seconds, 0)
        results.append(("shuffled take, page cache", n, t))

        del store
        cold_ok = evict(path)
        store = ActivationStore(path)
        n, t = time_batches(store, a.batch_size, a.seconds, 10_000, max_batches=max(1, a.rows // a.batch_size // 4))
        results.append(("shuffled take, cold files" + ("" if cold_ok else " (eviction unsupported)"), n, t))

        warm(path)
        it = store.iter_batches(a.batch_size, seed=0, prefetch=4)
        next(it)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            next(it)
            n += 1
        it.close()
        results.append(("iter_batches (prefetch 4), page cache", n, time.perf_counter() - t0))

        del store, it
        evict(path)
        store = ActivationStore(path)
        t0 = time.perf_counter()
        n = scan_rows(store)
        t = time.perf_counter() - t0
        results.append(("sequential rows() scan, cold (65,536-row chunks)", n / a.batch_size, t))

        print(f"batch {a.batch_size}\n\n| read | batches/s | rows/s | MB/s |\n| --- | ---: | ---: | ---: |")
        for name, n, t in results:
            print(f"| {name} | {n / t:.1f} | {n * a.batch_size / t:,.0f} | {n * a.batch_size * row_mb / t:.0f} |")
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
