"""Steering latency: re-captioning from cached hidden states against the whole LLaVA run every time.

    python -m benchmarks steer --bundle BUNDLE [--calls 30] [--tokens 12] [--precisions fp32,bf16] [--device cpu]

Each call steers one image with a new clamp value and decodes exactly --tokens tokens (EOS masked), greedy.
Rows: "cached" = SteeringSession.answers / answer_batch (the image's layer output comes from the cache: SAE,
projector and language model only); "uncached" = LlavaForConditionalGeneration.generate on the pixels with
the SAE hooked into the tower (vision tower + everything, every call); "cold" = answers() on an image not
seen before (tower once, then cached). p50/p95 in ms over --calls calls; speed-up against the uncached
three-answer row measured in the same run. Goal (world LLaVA on CPU): p50 <= 150 ms for a 12-token answer.
"""
from __future__ import annotations

import platform
import time

import numpy as np

from precompute.args import positive_int

from . import argument_parser


def _times(fn, n: int) -> np.ndarray:
    fn(0)  # warm-up (allocations, first-call paths)
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i + 1)
        out.append((time.perf_counter() - t) * 1e3)
    return np.array(out)


def main(argv=None) -> int:
    p = argument_parser("steer", description=__doc__)
    p.add_argument("--bundle", required=True, help="a bundle whose SAE sits at the layer its LLaVA reads (e.g. a demo bundle)")
    p.add_argument("--calls", type=positive_int, default=30)
    p.add_argument("--tokens", type=positive_int, default=12)
    p.add_argument("--precisions", help="comma-separated (default fp32,bf16; bf16 only where the device computes it natively)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--prompt", default="Describe the image.")
    a = p.parse_args(argv)

    import torch

    from benchmarks import precisions_to_run
    from sae_core.steering import ORIGINAL, Clamp, SteeringSession

    torch.set_num_threads(a.threads)
    precisions = precisions_to_run(a.precisions, a.device)
    rows = []
    for precision in precisions:
        s = SteeringSession.from_bundle(a.bundle, device=a.device, precision=precision)
        latent = int(np.nanargmax(np.asarray(s.bundle.array("max_act"))))
        value = lambda i: 1.0 + i % 7  # noqa: E731  a new clamp value every call
        image = 0
        T = a.tokens
        kw = dict(max_new_tokens=T, min_new_tokens=T)
        s.answers(image, [latent], [1.0], prompt=a.prompt, **kw)  # fills the cache
        cached3 = _times(lambda i: s.answers(image, [latent], [value(i)], prompt=a.prompt, **kw), a.calls)
        cached1 = _times(lambda i: s.answer_batch([image], [s.make_clamp([latent], [value(i)])], a.prompt, T, T), a.calls)
        full1 = _times(lambda i: s.generate_full([image], a.prompt, T, s.make_clamp([latent], [value(i)]), T), a.calls)

        def full3(i):
            s.generate_full([image], a.prompt, T, ORIGINAL, T)
            s.generate_full([image], a.prompt, T, Clamp(), T)
            s.generate_full([image], a.prompt, T, s.make_clamp([latent], [value(i)]), T)

        uncached3 = _times(full3, a.calls)
        # images 2..n_cold + 1 (image 1 warms up), each new to the cache; it timed one call fewer, none for
        # --calls 1 (np.percentile's IndexError), until 2026-12-05
        n_cold = max(0, min(a.calls, len(s.bundle.dataset()) - 2))  # none for a dataset of 2 images or fewer
        cold = (_times(lambda i: s.answers(1 + i, [latent], [2.0], prompt=a.prompt, **kw), n_cold) if n_cold
                else np.zeros(0))
        base = float(np.median(uncached3))
        for name, t in (("cached: 3 answers (original, SAE, clamped), one batch", cached3),
                        ("cached: 1 clamped answer", cached1),
                        ("cold: 3 answers on a new image (tower once, then cached)", cold),
                        ("uncached: 1 clamped answer (generate, SAE hooked in the tower)", full1),
                        ("uncached: 3 answers (3 generate calls)", uncached3)):
            if len(t):  # no cold row without a third image
                rows.append((precision, name, np.median(t), np.percentile(t, 95), base / np.median(t)))
    dev = a.device if a.device != "cpu" else f"CPU ({platform.processor() or platform.machine()}, {a.threads} thread(s))"
    fewer = (f" ({n_cold} for the cold row: the dataset's other images)" if 0 < n_cold < a.calls else
             " (no cold row: the dataset has no third image)" if not n_cold else "")
    print(f"steering latency, {a.tokens} new tokens, prompt {a.prompt!r}, {a.calls} calls per row{fewer}, on {dev}")
    print("| precision | call | p50 ms | p95 ms | speed-up vs uncached 3 answers |")
    print("| --- | --- | ---: | ---: | ---: |")
    for prec, name, p50, p95, ratio in rows:
        print(f"| {prec} | {name} | {p50:.1f} | {p95:.1f} | {ratio:.1f}x |")
    best = min(r[2] for r in rows if r[1].startswith("cached: 3"))
    print(f"goal p50 <= 150 ms for the cached three-answer call: {'met' if best <= 150 else 'NOT met'} ({best:.1f} ms)")
    return 0
