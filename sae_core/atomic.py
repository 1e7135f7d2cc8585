"""Atomic file writes (a temporary name in the same directory, renamed over the target) and the JSON they hold."""
from __future__ import annotations

import json
import math
import os
import re
import stat
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .errors import UserError

# atomic_path's temporary for NAME is `.NAME.tmpPID`; a killed process leaves it behind.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>[0-9]+)")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`.

    A reader therefore sees either the old file or the complete new one, never half of it; on an
    exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # named as _TEMPORARY reads
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # a new file's: 0o666 less the umask
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        readable_as_new(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def readable_as_new(path: str | Path, mode: int | None = None) -> None:
    """Give `path` (a file, or every file under a folder) at least the permissions of a new file there (`mode`,
    else 0o666 less the umask, read by creating one): safetensors writes its files 0600, so a trained SAE, an
    export or the world's models were unreadable to a teammate or to an app running as another user, where
    every other file of the same folder was 0644."""
    path = Path(path)
    if mode is None:
        probe = (path if path.is_dir() else path.parent) / f".mode.tmp{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
        try:
            mode = stat.S_IMODE(os.stat(probe).st_mode)
        finally:
            probe.unlink()
    for f in path.rglob("*") if path.is_dir() else [path]:
        st = os.lstat(f)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & mode != mode:
            os.chmod(f, stat.S_IMODE(st.st_mode) | mode)


def json_safe(obj):
    """`obj` with every NaN or infinite number as None: JSON has no NaN (json.dumps writes a bare NaN that
    JSON.parse and strict readers refuse)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj, **dumps_kwargs) -> str:
    """json.dumps of `obj` with NaN and infinities as null (json_safe): what every JSON file and --json line
    of this project is, so that jq and JSON.parse read them."""
    return json.dumps(json_safe(obj), allow_nan=False, **dumps_kwargs)


def read_json_object(path: str | Path, fix: str) -> dict:
    """The JSON object in `path`; UserError (one sentence ending in `fix`, what to do) when the file cannot be read,
    is not JSON (a copy cut short), or holds another JSON value than an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # JSON or UTF-8 decoding; nested deeper than json reads
        raise UserError(f"{path} cannot be read as JSON ({e}); {fix}.") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {json_kind(value)}, not an object; {fix}.")
    return value


def json_kind(value) -> str:
    """The JSON name of a parsed value's type ("null", not Python's "NoneType")."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as JSON at `path` (strict_json)."""
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(obj, indent=2) + "\n", encoding="utf-8")


def first_difference(then, now, path: str = "") -> str | None:
    """The first setting in which two recorded sets of settings (JSON values) differ, as "NAME: THEN there,
    NOW now" with NAME a dotted path into nested dicts, or None when they are equal."""
    if isinstance(then, dict) and isinstance(now, dict):
        for key in list(now) + [k for k in then if k not in now]:
            found = first_difference(then.get(key), now.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if then == now else f"{path}: {then!r} there, {now!r} now"


def remove_stale_temporaries(folder: str | Path, names=None, dead_writers_only: bool = False) -> int:
    """Delete the temporaries killed atomic writes left: every one below `folder`, or with `names`
    only those of the files so named directly in it. Returns how many were deleted.

    Call it before a run starts writing: a concurrent writer's temporary looks the same. Where writers share
    a folder without a lock (the probe commands' feature cache), `dead_writers_only` keeps the temporaries
    whose writer (the process id in the name) is still running on this machine.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    wanted = None if names is None else {str(n) for n in names}
    found = folder.rglob(".*.tmp*") if wanted is None else folder.glob(".*.tmp*")
    n = 0
    for p in found:
        m = _TEMPORARY.fullmatch(p.name)
        if m and (wanted is None or m["name"] in wanted) and p.is_file():
            if dead_writers_only and _running(int(m["pid"])):
                continue
            p.unlink(missing_ok=True)
            n += 1
    return n


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's process (alive); a number no pid can be:
        return True  # left alone, not ours to judge
    return True


LOCK_FILE = ".lock"
_HELD: dict[Path, int] = {}  # lock files this process holds -> depth (the demo's atlas writes the folder the demo holds)


def lock_holder(folder: str | Path) -> str | None:
    """Who holds `folder`'s writer_lock ("pid N on HOST, since ..."), or None when no other process does.

    It probes with a shared flock held for an instant: a writer that starts in that instant is refused as if the
    folder were busy (rerunning it works), so call it every few seconds at most."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return None
    folder = Path(folder).resolve()
    if folder / LOCK_FILE in _HELD:
        return None
    try:
        f = open(folder / LOCK_FILE, encoding="utf-8")
    except OSError:  # no lock file: nobody writes there
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: free unless a writer holds it
        except BlockingIOError:
            return f.read().strip() or "a process that has not written its name yet"
        except OSError:  # a file system without locks: nobody can hold one
            return None
        return None


@contextmanager
def writer_lock(folder: str | Path):
    """Hold FOLDER/.lock (an exclusive flock) while this process writes FOLDER, creating FOLDER (removed again
    where the block left it empty: see _made_folder).

    A second process writing the same folder (a command started twice, two app starts building the default
    bundle, a job array given one --out) is refused in one sentence naming the holder, instead of both writing
    the same files (each one's cleanup of stale temporaries deletes the other's). The kernel drops the lock of a
    killed process, so a killed job resumes at once; the file goes when the lock does. Re-entrant within a
    process. Where fcntl is missing (Windows) or the file system has no locks it only creates FOLDER.
    """
    folder = Path(folder).resolve()
    with _made_folder(folder), _exclusive_lock(folder / LOCK_FILE, lambda holder: f"{folder} is being written by "
                                               f"another process ({holder}); wait for it to finish, or give another --out."):
        yield


@contextmanager
def output_lock(path: str | Path):
    """writer_lock for a command whose output is one named file (and companions named after it) in a folder that
    other runs may share: `ms --out DIR/a.npy` beside `ms --out DIR/b.npy`, the probe commands' files in
    BUNDLE/probes. It holds DIR/.NAME.lock, so a second run writing the same output is refused while runs writing
    other files there go on. Creates DIR (removed again where the block left it empty)."""
    path = Path(path).resolve()
    with _made_folder(path.parent), _exclusive_lock(path.with_name(f".{path.name}.lock"), lambda holder: f"{path} is "
                                                    f"being written by another process ({holder}); wait for it to "
                                                    "finish, or name another output."):
        yield


@contextmanager
def _made_folder(folder: Path):
    """`folder`, created with its missing parents for the block, and those it created removed after it where they
    are still empty: a command refused after taking its lock (bad data found in the first batch, say) left an
    empty --out behind, and its parents."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # the deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for p in created:
            try:
                p.rmdir()
            except OSError:  # the command wrote there (or another process did): kept
                break


@contextmanager
def _exclusive_lock(path: Path, busy):
    """Hold the lock file `path` (exclusive flock, re-entrant within a process); UserError(busy(holder)) when
    another process holds it. The file names its holder and is unlinked as the lock goes."""
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    import socket
    import time

    while True:
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise UserError(busy(holder)) from None
        except OSError:  # pragma: no cover - a file system without locks (some network mounts)
            f.close()
            yield
            return
        try:  # the holder before us unlinks the file as it ends: a lock on that orphan guards nothing
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    _HELD[path] = 1
    try:  # the holder's name inside the try: on a full disk its write failed and left the file (and the --out)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        del _HELD[path]
        path.unlink(missing_ok=True)  # before the lock goes: a newcomer then locks a file of its own
        f.close()


def rank_zero_writer_lock(folder: str | Path):
    """`writer_lock` for a command torchrun may start once per rank: rank 0 holds it (a plain run is rank 0), the
    other ranks write under rank 0's lock; a second launch's rank 0 is refused before any of its ranks writes."""
    return writer_lock(folder) if os.environ.get("RANK", "0") == "0" else nullcontext()
