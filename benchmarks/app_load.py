"""`python -m benchmarks app_load`: concurrent neuron-page calls and steering calls against the explorer.

Starts `python -m app` as a child process on a bundle (default: the demo bundle runs/demo_bundle), then
CLIENTS clients each call /neuron_page CALLS times on random neurons at once (first over plain HTTP,
then as gradio_client clients); prints
p50/p95/max latency, throughput and errors, then sequential /steer calls (p50, p95). The first call
of each neuron renders its gallery, later ones read cached PNGs: both are in the sample, as in use.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from precompute.args import positive_int

from . import argument_parser


class HttpCaller:
    """One client speaking Gradio's HTTP API directly (POST /gradio_api/call/NAME, then read the event
    stream), on its own connection and with its own session like a browser tab: about 2 ms of client
    CPU a call against about 60 ms for gradio_client, so on a small machine the clients do not starve
    the server they measure. The session hash matters: a call without one opens a new Gradio session,
    which copies the config of every block of the app (a `/neuron_json` call took 34.5 ms without a
    session and 17.1 ms with one, demo bundle)."""

    def __init__(self, url: str):
        import uuid

        import httpx

        self.url, self.http, self.session = url, httpx.Client(timeout=120), uuid.uuid4().hex

    def predict(self, *data, api_name: str):
        import json

        name = api_name.strip("/")
        r = self.http.post(f"{self.url}/gradio_api/call/{name}", json={"data": list(data), "session_hash": self.session})
        r.raise_for_status()
        event = None
        with self.http.stream("GET", f"{self.url}/gradio_api/call/{name}/{r.json()['event_id']}") as s:
            for line in s.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    payload = json.loads(line[5:])
                    if event == "error":
                        raise RuntimeError(f"{api_name}: {payload}")
                    return payload
        raise RuntimeError(f"{api_name}: the event stream ended without a result")


def neuron_page_load(url: str, n_neurons: int, clients: int = 20, calls: int = 25, seed: int = 0,
                     client: str = "http") -> dict:
    """Run clients x calls /neuron_page requests concurrently; latencies in seconds and error messages.

    client: "http" (HttpCaller) or "gradio_client" (one gradio_client.Client per simulated user)."""
    from gradio_client import Client

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(i: int):
        rng = np.random.default_rng(seed + i)
        try:
            caller = HttpCaller(url) if client == "http" else Client(url, verbose=False, download_files=False)
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
                out = caller.predict(k, api_name="/neuron_page")
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

    p = argument_parser("app_load", description=__doc__)
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="bundle to serve (default runs/demo_bundle)")
    p.add_argument("--clients", type=positive_int, default=20)
    p.add_argument("--calls", type=positive_int, default=25, help="neuron-page calls per client")
    p.add_argument("--steer-calls", type=positive_int, default=10)
    args = p.parse_args(argv)

    from pathlib import Path

    from app.bootstrap import demo_command
    from app.server import spawn
    from sae_core.bundle import MANIFEST
    from sae_core.errors import UserError

    if not (Path(args.bundle) / MANIFEST).is_file():  # the app would build it, unseen, past spawn's timeout
        raise UserError(f"bundle {args.bundle} does not exist or is unfinished; build it first with "
                        f"`python {' '.join(demo_command(Path(args.bundle), 'demo')[1:])}` or pass the --bundle of a "
                        "finished one.")

    # The server runs as its own process (`python -m app`), so the 20 clients do not share its GIL.
    proc, url = spawn(args.bundle, extra_env={"OMP_NUM_THREADS": "1"})
    try:
        from sae_core.bundle import open_bundle

        b = open_bundle(args.bundle)
        load = neuron_page_load(url, b.n_neurons, args.clients, args.calls)
        load_gc = neuron_page_load(url, b.n_neurons, args.clients, args.calls, seed=1000, client="gradio_client")
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
    print(f"| same, each client a gradio_client.Client in this process | {load_gc['calls']} | {len(load_gc['errors'])} | "
          f"{load_gc['p50_s'] * 1e3:.0f} | {load_gc['p95_s'] * 1e3:.0f} | {load_gc['max_s'] * 1e3:.0f} | {load_gc['per_s']:.1f} |")
    print(f"| /steer (3 answers + 6-step sweep + score), one client | {steer['calls']} | 0 | {steer['p50_s'] * 1e3:.0f} | "
          f"{steer['p95_s'] * 1e3:.0f} | | |")
    print(f"| /steer (3 answers + score, no sweep), one client | {steer1['calls']} | 0 | {steer1['p50_s'] * 1e3:.0f} | "
          f"{steer1['p95_s'] * 1e3:.0f} | | |")
    for e in load["errors"][:5] + load_gc["errors"][:5]:  # the clients' too (counted, never shown until 2026-12-05)
        print("error:", e)
    return 1 if load["errors"] or load_gc["errors"] else 0
