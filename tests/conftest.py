"""Shared fixtures only."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The embedded world's `tiny` preset, built once per session through the command line.

    Returns the world directory (world.json, taxonomy.json, clip/, llava/, report.json).
    Set SAE_TINY_WORLD to an existing tiny world to reuse it across sessions.
    """
    given = os.environ.get("SAE_TINY_WORLD")
    if given and (Path(given) / "report.json").is_file():
        return Path(given)
    out = tmp_path_factory.mktemp("tiny_world") / "world"
    proc = subprocess.run([sys.executable, "-m", "precompute", "world", "--out", str(out), "--preset", "tiny"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["out"] == str(out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(request, tmp_path_factory):
    """A bundle of the `tiny` demo preset on the tiny world, built once per session through the
    command line (`python -m precompute demo --preset tiny --world tiny_world`; about 30 s).

    Returns the bundle directory. Set SAE_TINY_BUNDLE to an existing finished bundle to reuse it.
    """
    given = os.environ.get("SAE_TINY_BUNDLE")
    if given and (Path(given) / "manifest.json").is_file():
        return Path(given)
    tiny_world = request.getfixturevalue("tiny_world")  # only built when no bundle is given
    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    proc = subprocess.run([sys.executable, "-m", "precompute", "demo", "--out", str(out), "--preset", "tiny",
                           "--world", str(tiny_world), "--threads", "1", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["out"] == str(out.resolve())
    return out


@pytest.fixture(scope="session")
def tiny_crossmodal_bundle(tiny_world, tmp_path_factory):
    """A cross-modal bundle of the tiny world (`python -m precompute crossmodal --preset tiny`; about 10 s),
    built once per session. Returns a namespace: path (the bundle) and summary (the command's JSON line)."""
    from types import SimpleNamespace

    out = tmp_path_factory.mktemp("tiny_crossmodal") / "cm"
    proc = subprocess.run([sys.executable, "-m", "precompute", "crossmodal", "--world", str(tiny_world), "--out",
                           str(out), "--preset", "tiny", "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(path=out, summary=json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="session")
def explorer_app(tiny_bundle, tmp_path_factory):
    """`python -m app` serving the tiny bundle in a child process for the whole session.

    Returns a namespace: url, bundle (path), cache (the app's generated-files folder)."""
    from types import SimpleNamespace

    from app.server import spawn

    cache = tmp_path_factory.mktemp("app_cache")
    proc, url = spawn(tiny_bundle, cache=cache, extra_env={"OMP_NUM_THREADS": "1"})
    yield SimpleNamespace(url=url, bundle=Path(tiny_bundle), cache=cache)
    proc.terminate()
    proc.wait(30)
