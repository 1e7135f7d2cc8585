"""`python -m benchmarks app_load`: concurrent neuron-page calls and steering calls against the explorer.

Starts `python -m app` as a child process on a bundle (default: the demo bundle runs/demo_bundle), then
CLIENTS gradio_client clients each call /neuron_page CALLS times on random neurons at once; prints
p50/p95/max latency, throughput and errors, then sequential /steer calls (p50, p95). The first call
of each neuron renders its gallery, later ones read cached PNGs: both are in the sample, as in use.
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def neuron_page_load(url: str, n_neurons: int, clients: int = 20, calls: int = 25, seed: int = 0) -> dict:
    """Run clients x calls /neuron_page requests concurrently; latencies in seconds and error messages."""
    from gradio_client import Client

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(i: int):
        rng = np.random.default_rng(seed + i)
        try:
            client = Client(url, verbose=False, download_files=False)
        except Exception as e:  # counted, never raised: the figure is the error count
            with lock:
                errors.append(f"connect: {e}")
            start.wait()
            return
        start.wait()
        for _ in range(calls):
            k = int(rng.integers(0, n_neurons))
            t0 = time.perf_counter()
            try:
                out = client.predict(k, api_name="/neuron_page")
                ok = int(out[0]) == k and out[1].startswith(f"### Neuron {k}\n")
                err = None if ok else f"neuron {k}: wrong page"
            except Exception as e:
                err = f"neuron {k}: {type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                if err:
                    errors.append(err)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) if lat else np.zeros(1)
    return {"calls": len(lat), "errors": errors, "wall_s": wall, "p50_s": float(np.percentile(a, 50)),
            "p95_s": float(np.percentile(a, 95)), "max_s": float(a.max()), "per_s": len(lat) / wall}


def steer_latency(url: str, image: int, latent: int, n: int = 10, sweep: bool = True) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    client.predict(image_index=image, upload=None, latent_1=latent, value_1=4.0, sweep=sweep, api_name="/steer")  # loads the model
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        client.predict(image_index=image + i, upload=None, latent_1=latent, value_1=4.0, sweep=sweep, api_name="/steer")
        lat.append(time.perf_counter() - t0)
    a = np.asarray(lat)
    return {"calls": n, "p50_s": float(np.percentile(a, 50)), "p95_s": float(np.percentile(a, 95))}


def main(argv=None) -> int:
    from app.settings import DEFAULT_BUNDLE

    p = argparse.ArgumentParser(prog="python -m benchmarks app_load", description=__doc__)
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle to serve (default runs/demo_bundle)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--calls", type=int, default=25, help="neuron-page calls per client")
    p.add_argument("--steer-calls", type=int, default=10)
    args = p.parse_args(argv)

    from app.server import spawn

    # The server runs as its own process (`python -m app`), so the 20 clients do not share its GIL.
    proc, url = spawn(args.bundle, extra_env={"OMP_NUM_THREADS": "1"})
    try:
        from sae_core.bundle import open_bundle

        b = open_bundle(args.bundle)
        load = neuron_page_load(url, b.n_neurons, args.clients, args.calls)
        steer = steer_latency(url, 0, int(np.argmax(np.asarray(b.array("support")))), args.steer_calls)
        steer1 = steer_latency(url, 0, int(np.argmax(np.asarray(b.array("support")))), args.steer_calls, sweep=False)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"bundle {args.bundle}: {b.n_neurons} neurons, {b.n_images} images")
    print("| measurement | calls | errors | p50 ms | p95 ms | max ms | calls/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| /neuron_page, {args.clients} clients x {args.calls} at once | {load['calls']} | {len(load['errors'])} | "
          f"{load['p50_s'] * 1e3:.0f} | {load['p95_s'] * 1e3:.0f} | {load['max_s'] * 1e3:.0f} | {load['per_s']:.1f} |")
    print(f"| /steer (3 answers + 6-step sweep + score), one client | {steer['calls']} | 0 | {steer['p50_s'] * 1e3:.0f} | "
          f"{steer['p95_s'] * 1e3:.0f} | | |")
    print(f"| /steer (3 answers + score, no sweep), one client | {steer1['calls']} | 0 | {steer1['p50_s'] * 1e3:.0f} | "
          f"{steer1['p95_s'] * 1e3:.0f} | | |")
    for e in load["errors"][:5]:
        print("error:", e)
    return 1 if load["errors"] else 0
