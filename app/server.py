"""Build the explorer for a bundle and launch it with narrow file access, no analytics and no share link."""
from __future__ import annotations

import os
import re
from pathlib import Path

from sae_core.errors import UserError

from .settings import AppSettings

NEURON_CONCURRENCY = 4
"""Neuron pages, tables and plots served at once (they read memory-mapped arrays and cached PNGs)."""


def _gradio_env(cache: Path) -> None:
    """Gradio reads these when it is imported, so they are set first."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"the app's cache folder {cache} cannot be made ({e.strerror or e}); set SAE_APP_CACHE "
                        "to a folder this user can write.") from None
    # Generated pictures live inside Gradio's cache folder, so Gradio serves them without hashing and
    # copying each file on every response (48 files per neuron page).
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


CACHE_SWEEP_EVERY_S = 600.0
_UPLOAD_FOLDER = re.compile(r"^[0-9a-f]{64}$")  # Gradio's: the sha256 of an upload's content
_UPLOAD_LEFTOVER = re.compile(r"^tmp[a-z0-9_]{8}$")  # the empty file tempfile names beside it (tmp + 8 characters)


def sweep_cache(cache: Path, max_age_s: float, now: float | None = None, max_bytes: float = 0) -> int:
    """Delete the files in `cache` that the app and Gradio wrote there and nobody used for `max_age_s` (0: none by
    age), then, while they hold more than `max_bytes` (0: no bound), the least recently used: uploads (Gradio's
    <sha256>/ folders, and the empty tmpXXXXXXXX file its upload route leaves beside them for each one) and generated
    pictures and exports (`generated/*/`, touched on every use; uploads on every use too). Only those names, and
    those leftovers only when empty: SAE_APP_CACHE may be any folder (until 2026-12-05 any file named tmp* went,
    "tmp_notes.txt" included). A file used after it was listed (a page served meanwhile) is kept, and one this user
    may not delete (another's, in a shared cache) is passed over; either stopped the sweep or went before.
    Until 2026-12-05 each upload and its pictures stayed for good (10 uploads of 3 MB: 32 MB), and then, for a day,
    whatever a script walking every neuron made (1.3 MB a page at the paper's size). Returns the files deleted."""
    import time

    def folders(root: Path, match) -> list[Path]:
        return [e for e in root.iterdir() if e.is_dir() and not e.is_symlink() and match(e.name)] if root.is_dir() else []

    def files(folder: Path) -> list[Path]:
        return [e for e in folder.iterdir() if e.is_file() and not e.is_symlink()]

    uploads = folders(cache, _UPLOAD_FOLDER.match)
    generated = folders(cache / "generated", lambda name: True) if not (cache / "generated").is_symlink() else []
    candidates = [e for e in files(cache) if _UPLOAD_LEFTOVER.match(e.name) and e.stat().st_size == 0] \
        if cache.is_dir() else []
    for folder in uploads + generated:
        candidates += files(folder)
    cutoff = (time.time() if now is None else now) - max_age_s if max_age_s > 0 else float("-inf")
    deleted = 0
    kept = []
    for path in candidates:
        try:
            st = path.lstat()
            if st.st_mtime < cutoff:
                path.unlink()
                deleted += 1
            else:
                kept.append((st.st_mtime, st.st_size, path))
        except FileNotFoundError:  # another sweep, or Gradio, took it first
            pass
        except PermissionError:  # another user's file in a shared cache
            kept.append((st.st_mtime, st.st_size, path))
    held = sum(size for _, size, _ in kept)
    for mtime, size, path in sorted(kept, key=lambda k: k[0]):  # the least recently used first
        if not max_bytes or held <= max_bytes:
            break
        try:
            if path.lstat().st_mtime != mtime:  # used since it was listed: a page just served shows it
                continue
            path.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
        except PermissionError:
            continue  # it stays, and counts
        held -= size
    for folder in uploads:
        try:
            folder.rmdir()  # an upload's folder, once empty
        except OSError:
            pass
    return deleted


def _sweep_cache_in_background(settings: AppSettings) -> None:
    """A daemon thread running `sweep_cache` every CACHE_SWEEP_EVERY_S (none for SAE_APP_CACHE_HOURS=0 with
    SAE_APP_CACHE_GB=0)."""
    import threading
    import time

    if settings.cache_hours <= 0 and settings.cache_gb <= 0:
        return

    def loop():
        while True:
            try:
                sweep_cache(settings.cache, settings.cache_hours * 3600, max_bytes=settings.cache_gb * 1e9)
            except OSError as e:  # a folder removed or made unreadable meanwhile: try again next time
                print(f"[app] warning: the cache sweep of {settings.cache} failed ({e})", flush=True)
            time.sleep(CACHE_SWEEP_EVERY_S)

    threading.Thread(target=loop, name="cache-sweep", daemon=True).start()


def create_app(settings: AppSettings):
    """(gr.Blocks, launch keyword arguments) for the bundle of `settings` (which must exist)."""
    _gradio_env(settings.cache)
    import gradio as gr

    from sae_core.bundle import open_bundle

    from . import ui
    from .explorer import Explorer
    from .search import BundleCoder, BundleEmbedder, ImageSearch, NeuronSearch
    from .steer import SteerService

    bundle = open_bundle(settings.bundle)
    # refused here in validate's one sentence, as `inspect` refuses it: until 2026-12-05 damage such as a short
    # array was a traceback at the start, or numpy's text on a page (it reads array headers and the small arrays)
    bundle.validate()
    explorer = Explorer(bundle, settings.cache)
    _sweep_cache_in_background(settings)
    embedder = BundleEmbedder.for_bundle(explorer)  # one copy of the embedder for both searches (and the coder's)
    steer = None if explorer.steer_off_reason() else SteerService(
        explorer, device=settings.steering_device(), precision=settings.steering_precision, limits=settings.limits,
        llava=settings.llava, coder=BundleCoder(explorer, embedder))
    demo = ui.build(explorer, steer=steer, searcher=NeuronSearch.for_bundle(explorer, embedder),
                    image_search=ImageSearch.for_bundle(explorer, embedder, settings.limits))
    demo.queue(default_concurrency_limit=NEURON_CONCURRENCY, max_size=256)
    allowed = [str(explorer.images.root)]  # generated pictures only; bundle thumbnails are re-rendered there
    # The same folder as static: its files are written once under a hash of their key and never change,
    # and Gradio then skips, for each of the 20 files of a neuron page, its allow-list checks and cache
    # bookkeeping (path resolutions against every allowed and blocked folder).
    gr.set_static_paths(allowed)
    from starlette.middleware import Middleware

    from .guard import RequestGuard

    launch = dict(
        app_kwargs={"middleware": [Middleware(RequestGuard)]},  # bounded bodies, no file fetched by URL
        server_name=settings.host, server_port=settings.port, share=False, allowed_paths=allowed,
        blocked_paths=[str(bundle.root / "sae"), str(bundle.root / "manifest.json")],
        # show_error=False: our sentences are gr.Error, shown whatever this says; True also sent Gradio's internal
        # errors, object addresses included ("[<gradio.components.number.Number object at 0x7fc3...>]" for a call
        # with too few values; until 2026-12-05)
        max_file_size=settings.limits.max_bytes, show_error=False, footer_links=["api"],
        css=ui.CSS, theme=ui.theme(), enable_monitoring=False, mcp_server=False, ssr_mode=False,
        state_session_capacity=settings.sessions,
    )
    return demo, launch


def serve(settings: AppSettings) -> None:
    """Build the default bundle if needed, then serve until interrupted."""
    from .bootstrap import ensure_bundle

    settings_bundle = ensure_bundle(settings)
    demo, launch = create_app(settings)
    try:
        demo.launch(prevent_thread_lock=True, **launch)
    except OSError as e:  # Gradio's "Cannot find empty port" also stands for an address this machine lacks
        raise UserError(f"cannot serve on {settings.host}:{settings.port} ({e}); the port may be in use or the "
                        "address not this machine's: pass another --port (SAE_APP_PORT) or --host.") from None
    host = "localhost" if settings.host in ("127.0.0.1", "0.0.0.0") else settings.host
    print(f"[app] serving {settings_bundle} at http://{host}:{settings.port}", flush=True)
    demo.block_thread()


def start(bundle: str | Path, port: int = 0, cache: str | Path | None = None, **overrides):
    """Launch in this process without blocking (tests, benchmarks): returns (demo, url)."""
    import tempfile

    settings = AppSettings.from_env(bundle=Path(bundle), port=port or _free_port(), host="127.0.0.1",
                                    cache=Path(cache) if cache else Path(tempfile.mkdtemp(prefix="sae_app_")),
                                    **overrides)
    demo, launch = create_app(settings)
    demo.launch(prevent_thread_lock=True, quiet=True, **launch)
    return demo, demo.local_url.rstrip("/")


def spawn(bundle: str | Path, port: int | None = None, cache: str | Path | None = None, timeout: float = 120,
          extra_env: dict | None = None):
    """Run `python -m app --bundle B --port P` as a child process (tests, benchmarks) and wait until it
    answers HTTP 200; returns (process, url). The caller terminates the process."""
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    from .settings import REPO

    port = port or _free_port()
    env = {**os.environ, "SAE_APP_CACHE": str(cache or tempfile.mkdtemp(prefix="sae_app_")), **(extra_env or {})}
    log = tempfile.NamedTemporaryFile(prefix="sae_app_", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "app", "--bundle", str(bundle), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    said = Path(log.name).read_text(encoding="utf-8")[-3000:]
    raise RuntimeError(f"the app did not start within {timeout:.0f} s:\n" + said)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
