"""Shared fixtures, and the order that lets the tiny world build while other tests run."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SESSION_TMP = Path(tempfile.mkdtemp(prefix="sae_tests_"))
"""The session's temporary folder, for this process and its children (TMPDIR): gradio_client leaves an
empty folder in the temp folder for every file it downloads and the app helpers a log per server, so
they land here and go with it when every test passed (kept, and named, after a failure)."""
tempfile.tempdir = str(SESSION_TMP)
os.environ["TMPDIR"] = str(SESSION_TMP)
WORLD_FIXTURES = {"tiny_world", "tiny_bundle"}
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
"""Environment of the precompute commands the fixtures run: one thread each, no progress bars."""
_background = {}  # the one background build of the tiny world and bundle: process, dir, world, bundle, out, logs


def _needs_world(item) -> bool:
    return bool(WORLD_FIXTURES & set(getattr(item, "fixturenames", ())))


def _given(var: str, marker: str):
    path = os.environ.get(var)
    return Path(path) if path and (Path(path) / marker).is_file() else None


APP_FILES = {"tests/test_app_api.py", "tests/test_app_e2e.py", "tests/test_app_load.py", "tests/test_app_probes.py",
             "tests/test_probes.py"}
"""The files whose tests share the session's app server, browser and probe outputs: one worker runs them all under
`-n 2`, so each of those is built once (the other worker takes every other test, one at a time)."""
BUILD_ENV = "SAE_TESTS_TINY_BUILD"
"""Under pytest-xdist: the folder of the controller's background build, for the workers (build.json, build.rc)."""


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _is_controller(config) -> bool:
    return not _is_worker(config) and bool(getattr(config.option, "numprocesses", None))


def _start_background() -> None:
    """Start building whatever of the tiny world and bundle SAE_TINY_WORLD / SAE_TINY_BUNDLE do not give, in
    one background process (`precompute demo --preset tiny`); build.rc holds its exit status once it ends."""
    import threading

    world, bundle = _given("SAE_TINY_WORLD", "report.json"), _given("SAE_TINY_BUNDLE", "manifest.json")
    if world and bundle:
        return
    root = Path(tempfile.mkdtemp(prefix="sae_tiny_"))
    if bundle:  # only the world is missing
        world = root / "world"
        argv, out = ["world", "--out", str(world), "--preset", "tiny"], world
    else:
        world = world or root / "world"
        out = root / "bundle"
        argv = ["demo", "--out", str(out), "--preset", "tiny", "--world", str(world), "--threads", "1", "--quiet"]
    logs = [open(root / "build.out", "w"), open(root / "build.err", "w")]  # files: a full pipe would block it
    proc = subprocess.Popen([sys.executable, "-m", "precompute", *argv], cwd=REPO, stdout=logs[0], stderr=logs[1],
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    paths = {"world": str(world), "bundle": None if bundle else str(out), "out": str(out)}
    (root / "build.json").write_text(json.dumps(paths))

    def note_the_end():  # what a worker waits for: the status written last, under a name it polls
        rc = proc.wait()
        (root / ".build.rc").write_text(str(rc))
        os.replace(root / ".build.rc", root / "build.rc")

    threading.Thread(target=note_the_end, daemon=True).start()
    _background.update(process=proc, dir=root, logs=logs, **{k: v and Path(v) for k, v in paths.items()})
    os.environ[BUILD_ENV] = str(root)  # before the workers start: they inherit it


def pytest_configure(config):
    if _is_controller(config):  # the workers collect; the build starts once, here
        _start_background()


def pytest_xdist_make_scheduler(config, log):
    """APP_FILES as one unit of work, every other test its own (xdist's --dist loadgroup marks do not reach
    its scheduler with pytest 9: xdist 3.8 renames a test by an attribute pytest 9 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class AppFilesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "apps" if nodeid.split("::")[0] in APP_FILES else nodeid

    return AppFilesTogether(config, log)


def pytest_collection_modifyitems(session, config, items):
    """Tests that need the tiny world run last (stable order otherwise), and the world and its bundle
    start building at once in one background process (`precompute demo --preset tiny`, about 90 s on
    one core), so the tests that need neither (515 of 681) run meanwhile (under `-n 2`, as make test runs
    the suite, the controller starts that build, see pytest_configure)."""
    items.sort(key=_needs_world)
    if not _is_worker(config) and any(map(_needs_world, items)):
        _start_background()


def pytest_sessionfinish(session, exitstatus):
    session.config._sae_failed = exitstatus not in (0, 5)  # 5: no tests collected
    proc = _background.get("process")
    if proc is not None:
        if proc.poll() is None:  # no test waited for it (deselected, -x stopped early): do not leave it running
            proc.kill()
            proc.wait()
        for f in _background["logs"]:
            f.close()
        shutil.rmtree(_background["dir"], ignore_errors=True)


def pytest_unconfigure(config):
    if getattr(config, "_sae_failed", False):
        print(f"\nthe tests' temporary files are kept in {SESSION_TMP}")
    else:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)


def _wait_for_background() -> dict:
    """The background build, finished; its last stdout line is the command's JSON summary. A worker waits for
    the controller's build through its folder (BUILD_ENV)."""
    import time

    if _background.get("process") is not None:
        _background["process"].wait(timeout=600)
    elif os.environ.get(BUILD_ENV):
        root = Path(os.environ[BUILD_ENV])
        deadline = time.monotonic() + 600
        while not (root / "build.rc").exists():
            assert time.monotonic() < deadline, f"the tiny world's build in {root} did not end within 600 s"
            time.sleep(0.5)
        paths = json.loads((root / "build.json").read_text())
        _background.update(dir=root, **{k: v and Path(v) for k, v in paths.items()})
    else:
        raise RuntimeError("the tiny world fixtures were requested but no background build was started")
    root = _background["dir"]
    rc = (root / "build.rc").read_text() if (root / "build.rc").exists() else str(_background["process"].returncode)
    assert rc == "0", (root / "build.err").read_text()[-3000:]
    summary = json.loads((root / "build.out").read_text().strip().splitlines()[-1])
    assert summary["out"] == str(_background["out"].resolve())
    return _background


@pytest.fixture(scope="session")
def tiny_world():
    """The embedded world's `tiny` preset (world.json, taxonomy.json, clip/, llava/, report.json), built
    once per session in the background (see pytest_collection_modifyitems).
    Set SAE_TINY_WORLD to an existing tiny world to reuse it across sessions."""
    given = _given("SAE_TINY_WORLD", "report.json")
    return given or _wait_for_background()["world"]


@pytest.fixture(scope="session")
def tiny_bundle():
    """A bundle of the `tiny` demo preset on the tiny world (`python -m precompute demo --preset tiny`),
    built once per session in the background with the world.
    Set SAE_TINY_BUNDLE to an existing finished bundle to reuse it."""
    given = _given("SAE_TINY_BUNDLE", "manifest.json")
    return given or _wait_for_background()["bundle"]


@pytest.fixture(scope="session")
def tiny_crossmodal_bundle(tiny_world, tmp_path_factory):
    """A cross-modal bundle of the tiny world (`python -m precompute crossmodal --preset tiny`; about 10 s),
    built once per session. Returns a namespace: path (the bundle) and summary (the command's JSON line)."""
    from types import SimpleNamespace

    out = tmp_path_factory.mktemp("tiny_crossmodal") / "cm"
    proc = subprocess.run([sys.executable, "-m", "precompute", "crossmodal", "--world", str(tiny_world), "--out",
                           str(out), "--preset", "tiny", "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=CHILD_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(path=out, summary=json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="session")
def probe_outputs(tiny_bundle, tmp_path_factory):
    """The real outputs of the `ood`, `ontology` and `probes` commands on a copy of the tiny bundle (the
    shared fixture stays untouched), in their default place BUNDLE/probes/; the three run at once, once
    per session, for the command tests and the app's probe panels alike.
    Returns a namespace: bundle (the copy), and ood, ontology, probes (each command's JSON line)."""
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("probe_bundle") / "bundle"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("probes"))
    # what kills inside atomic writes leave: a dead writer's (gone after the runs) and a live one's (this process,
    # kept: the three commands share the feature cache); test_probes' test_a_killed_probe_runs_temporaries_go
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for rel in (f".ood.json.tmp{dead.stdout.strip()}", f".ood.html.tmp{dead.stdout.strip()}",
                f".features/.0123456789abcdef.npz.tmp{dead.stdout.strip()}", f".features/.live.npz.tmp{os.getpid()}"):
        (root / "probes" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "probes" / rel).write_bytes(b"cut short")
    argv = {"ood": ["--fit-images", "800", "--max-images", "200", "--cal-images", "150"],
            "ontology": ["--max-images", "200", "--permutations", "10"],
            "probes": ["--fit-images", "1500"]}
    procs = {name: subprocess.Popen([sys.executable, "-m", "precompute", name, "--bundle", str(root), *args, "--json",
                                     "--no-cache"], cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, args in argv.items()}
    lines = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        lines[name] = json.loads(out.strip().splitlines()[-1])
    return SimpleNamespace(bundle=root, **lines)


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


@pytest.fixture
def hold_lock_elsewhere():
    """hold(lock_call) starts a process that enters `lock_call`, a lock of sae_core.atomic written as a call
    ("writer_lock('/some/folder')"), and waits inside it; returns the process once it holds the lock. Every one
    still running is killed at teardown (SIGKILL: as a killed job, whose lock the kernel drops)."""
    held = []

    def hold(lock_call: str) -> subprocess.Popen:
        code = f"import time\nfrom sae_core.atomic import *\nwith {lock_call}:\n    print('held', flush=True)\n" \
               "    time.sleep(600)"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
        held.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in held:
        proc.kill()
        proc.wait()
        proc.stdout.close()
