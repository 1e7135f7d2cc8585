"""Load: 20 concurrent clients x 6 neuron-page calls against `python -m app`, zero errors (25 each until
2026-12-06: 32 s of the suite for the same 20 calls in flight at once; the benchmark keeps 25).

The clients speak Gradio's HTTP API (POST /gradio_api/call/neuron_page + its event stream, one
connection and one session each, as browser tabs do); gradio_client costs 30x more client CPU and would measure the
clients on these 2 cores rather than the server.

Latencies are printed (run with -s to see them); the speed figures live in `python -m benchmarks app_load`."""
import httpx
import numpy as np
import pytest

from benchmarks.app_load import HttpCaller, neuron_page_load


@pytest.mark.slow
def test_twenty_clients_six_neuron_pages_each(explorer_app):
    n = len(np.load(explorer_app.bundle / "neurons" / "ms.npy"))
    res = neuron_page_load(explorer_app.url, n, clients=20, calls=6)
    print(f"\nload: {res['calls']} calls, {len(res['errors'])} errors, p50 {res['p50_s'] * 1e3:.0f} ms, "
          f"p95 {res['p95_s'] * 1e3:.0f} ms, {res['per_s']:.1f} calls/s")
    assert res["calls"] == 120
    assert res["errors"] == [], res["errors"][:5]


def test_sessions_beyond_the_bound_are_dropped_and_answer_again(tiny_bundle, tmp_path):
    """SAE_APP_SESSIONS bounds the sessions Gradio keeps (each a copy of every block's config); a dropped
    session's next call gets the same answer as before (the explorer keeps nothing per session). And the
    server sweeps its cache from the start: an upload of a past run unused for the age is gone."""
    import os
    import time

    from app.server import spawn

    upload = tmp_path / ("d" * 64) / "photo.png"
    upload.parent.mkdir()
    upload.write_bytes(b"x")
    os.utime(upload, (time.time() - 7200, time.time() - 7200))
    proc, url = spawn(tiny_bundle, cache=tmp_path, extra_env={"SAE_APP_SESSIONS": "3", "OMP_NUM_THREADS": "1",
                                                             "SAE_APP_CACHE_HOURS": "1"})
    try:
        assert not upload.parent.exists()
        caller = HttpCaller(url)
        answers = {}
        for i in range(6):
            caller.session = f"session-{i}"
            answers[i] = caller.predict(1, api_name="/neuron_json")
        assert all(a == answers[0] for a in answers.values()) and answers[0][0]["neuron"] == 1

        def kept(i: int) -> bool:  # Gradio's deep-link route answers "" for a session it does not hold
            r = httpx.get(f"{url}/gradio_api/deep_link", params={"session_hash": f"session-{i}"}, timeout=30)
            return r.raise_for_status().json() != ""

        assert [kept(i) for i in range(6)] == [False] * 3 + [True] * 3
        caller.session = "session-0"
        assert caller.predict(1, api_name="/neuron_json") == answers[0]
    finally:
        proc.terminate()
        proc.wait(30)
