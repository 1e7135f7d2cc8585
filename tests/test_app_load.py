"""Load: 20 concurrent clients x 25 neuron-page calls against `python -m app`, zero errors.

The clients speak Gradio's HTTP API (POST /gradio_api/call/neuron_page + its event stream, one
connection and one session each, as browser tabs do); gradio_client costs 30x more client CPU and would measure the
clients on these 2 cores rather than the server.

Latencies are printed (run with -s to see them); the speed figures live in `python -m benchmarks app_load`."""
import numpy as np
import pytest

from benchmarks.app_load import neuron_page_load


@pytest.mark.slow
def test_twenty_clients_twenty_five_neuron_pages_each(explorer_app):
    n = len(np.load(explorer_app.bundle / "neurons" / "ms.npy"))
    res = neuron_page_load(explorer_app.url, n, clients=20, calls=25)
    print(f"\nload: {res['calls']} calls, {len(res['errors'])} errors, p50 {res['p50_s'] * 1e3:.0f} ms, "
          f"p95 {res['p95_s'] * 1e3:.0f} ms, {res['per_s']:.1f} calls/s")
    assert res["calls"] == 500
    assert res["errors"] == [], res["errors"][:5]
