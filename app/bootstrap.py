"""First start: build the default demo bundle by running the precompute command as a process."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from sae_core.atomic import lock_holder
from sae_core.bundle import MANIFEST, refuse_another_folder
from sae_core.errors import UserError

from .settings import REPO, AppSettings


WAIT_POLL_S = 2.0
"""How often a start that waits for another start's build looks again (the demo build takes minutes)."""


def demo_command(out: Path, preset: str) -> list[str]:
    """The command README.md and the Dockerfile use to build the demo bundle."""
    return [sys.executable, "-m", "precompute", "demo", "--out", str(out), "--preset", preset]


def ensure_bundle(settings: AppSettings) -> Path:
    """The bundle to serve. A missing default bundle is built first (its progress bars stream to this
    terminal, and a killed build resumes on the next start); a missing bundle named by the user is an error."""
    path = settings.bundle
    if (path / MANIFEST).is_file():
        return path
    if path.exists() and not path.is_dir():  # it said "does not exist", or built a demo into a file's place
        raise UserError(f"bundle {path} is a file, not a bundle's folder; give the folder `python -m precompute "
                        "atlas` or `demo` wrote (its --out).")
    if path.is_dir():
        refuse_another_folder(path)  # an SAE folder or a store, named as such (not "build a demo into it")
    if not settings.uses_default_bundle and path.is_dir():  # a build of the user's that stopped, of any command
        raise UserError(f"bundle {path} is unfinished (no {MANIFEST}: its build stopped or is still running); "
                        f"`python -m precompute inspect {path}` says how far it got and the command that resumes it.")
    if not settings.uses_default_bundle:
        raise UserError(f"bundle {path} does not exist; build it with `python -m precompute demo --out {path}` or "
                        "leave out --bundle and SAE_APP_BUNDLE to serve the default one.")
    holder = lock_holder(path)
    if holder:  # another start is building it: wait for that build instead of failing on its lock
        print(f"[app] {path} is being built by another process ({holder}); waiting for it to finish (Ctrl-C stops "
              "this start, not that build)", file=sys.stderr, flush=True)
        while lock_holder(path) and not (path / MANIFEST).is_file():
            time.sleep(WAIT_POLL_S)
    if (path / MANIFEST).is_file():  # built by another start meanwhile (else it stopped: resumed below)
        return path
    cmd = demo_command(path, settings.preset)
    print(f"[app] no bundle at {path}: building the {settings.preset} bundle first (one time; "
          f"progress below)\n[app] $ python {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.time()
    # stdout and stderr are inherited: the command's tqdm bars show here as they run.
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0 or not (path / MANIFEST).is_file():
        raise UserError(f"building the demo bundle failed (exit status {rc}); read the messages above, fix the "
                        "cause and start again (finished stages are kept).")
    print(f"[app] bundle built in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return path
