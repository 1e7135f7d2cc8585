"""Extraction speed: images/s of the model forward alone and of the whole `extract` job, fp32 vs bf16
(the bf16 rows are skipped, with the reason, on a CPU that emulates bf16).

    python -m benchmarks extract [--images 128] [--batch-size 64] [--world DIR] [--models SPEC,SPEC]

Default model: a random open_clip ViT-B-32 (pretrained=None, the real architecture). With --world DIR,
the embedded world's tiny CLIP (world:DIR) and tiny LLaVA tower (world:DIR:llava) on world:DIR images.
"forward" times `Adapter.capture` on a preprocessed batch (layer -2 plus the embedding); "extract" runs
the full job (decode, preprocess, forward, token selection, float16 shards) on --images images.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from precompute.args import positive_int

from . import argument_parser


def _synthetic_images(root: Path, n: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    d = root / "images" / "x"
    d.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return f"imagefolder:{root / 'images'}"


def main(argv=None) -> int:
    p = argument_parser("extract", description=__doc__)
    p.add_argument("--images", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--world", help="a built world directory: also time its CLIP and LLaVA tower")
    p.add_argument("--models", default="open_clip:ViT-B-32", help="comma-separated model specs")
    p.add_argument("--precisions", help="comma-separated (default fp32,bf16; bf16 only where this machine "
                   "computes it natively)")
    p.add_argument("--repeats", type=positive_int, default=3, help="forward timings per row (best is reported)")
    a = p.parse_args(argv)

    import torch

    from precompute.extract import ExtractConfig, extract
    from sae_core.adapters import load_adapter
    from sae_core.datasets import open_dataset

    from benchmarks import precisions_to_run

    precisions = precisions_to_run(a.precisions, "cpu")

    root = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    try:
        jobs = [(m, None) for m in a.models.split(",") if m]
        if a.world:
            jobs += [(f"world:{a.world}{which}", f"world:{a.world}:train") for which in ("", ":llava")
                     if (Path(a.world) / (which[1:] or "clip") / "config.json").exists()]
        images = None
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch_size}, {a.images} images")
        print("\n| model | precision | forward img/s | extract img/s | job incl. model load |\n| --- | --- | ---: | ---: | ---: |")
        for spec, dataset in jobs:
            if dataset is None:
                images = images or _synthetic_images(root, a.images)
                dataset = images
            ds = open_dataset(dataset)
            pil = [ds[i] for i in range(min(a.batch_size, len(ds)))]
            for prec in precisions:
                adapter = load_adapter(spec, precision=prec)
                px = adapter.preprocess(pil)
                adapter.capture(px[:2], ["-2", "embed"])  # warm-up
                best = float("inf")
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    adapter.capture(px, ["-2", "embed"])
                    best = min(best, time.perf_counter() - t0)
                del adapter
                out = root / f"out_{len(list(root.iterdir()))}"
                t0 = time.perf_counter()
                summary = extract(ExtractConfig(model=spec, dataset=dataset, out=str(out), layers=["-2", "embed"],
                                                tokens="cls", batch_size=a.batch_size, limit=a.images, precision=prec))
                total = time.perf_counter() - t0
                job = summary["last_session"]["images_per_s"]
                print(f"| {spec} | {prec} | {len(pil) / best:.1f} | {job:.1f} | {total:.1f} s |")
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
