"""Save and restore the running state of streaming accumulators, so that a killed pass resumes.

An accumulator lists the attributes that hold its running state in a class attribute `STATE`; the
values may be numpy arrays, tensors, numbers, strings, None, lists or tuples of those, or other
objects with a `STATE`. `save_state` writes the arrays of a dict of accumulators to one safetensors
file (atomically) with everything else, and each value's kind, as JSON in its metadata; `load_state`
puts the values back into freshly built accumulators of the same shapes. No pickle: the file holds
arrays and JSON only. Both stream array by array (the format is a JSON header and the raw bytes), so
neither needs a second copy of the state in memory: a 1 GiB state saved with 0 MiB of extra peak and
loaded with 1,024 MiB (the restored arrays themselves); the safetensors library reads the files.

API
    save_state(path, objects: dict[str, object], info: dict) -> None
    read_info(path) -> dict | None            the `info` saved beside the state (None: no readable file)
    load_state(path, objects: dict[str, object]) -> dict   restores in place, returns `info`
    Journal(path, settings)                   results of a job's finished units (JSON lines), for jobs
                                              made of many small steps rather than one accumulator
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path, first_difference, json_safe


def _encode(value, key: str, arrays: dict[str, np.ndarray]):
    """The JSON description of `value`; its arrays go into `arrays` under names starting with `key`."""
    if isinstance(value, torch.Tensor):
        arrays[key] = value.detach().cpu().contiguous().numpy()
        return {"tensor": key}
    if isinstance(value, np.ndarray):
        arrays[key] = np.ascontiguousarray(value)
        return {"array": key}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, f"{key}.{i}", arrays) for i, v in enumerate(value)]}
    if hasattr(value, "STATE"):
        return {"object": {name: _encode(getattr(value, name), f"{key}.{name}", arrays) for name in value.STATE}}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot save a {type(value).__name__} as accumulator state ({key})")


def _decode(desc: dict, get_array, current, device):
    """The value `desc` describes; objects are restored into `current` (the freshly built one).
    `get_array(name)` reads one array from the file (a new, writable array each time)."""
    (kind, body), = desc.items()
    if kind == "tensor":
        return torch.from_numpy(get_array(body)).to(current.device if isinstance(current, torch.Tensor) else device)
    if kind == "array":
        return get_array(body)
    if kind in ("list", "tuple"):
        items = [_decode(d, get_array, None, device) for d in body]
        return items if kind == "list" else tuple(items)
    if kind == "object":
        dev = getattr(current, "device", device)
        for name, d in body.items():
            setattr(current, name, _decode(d, get_array, getattr(current, name), dev))
        return current
    return body


_DTYPES = {np.dtype(t): name for t, name in (
    (np.bool_, "BOOL"), (np.uint8, "U8"), (np.int8, "I8"), (np.uint16, "U16"), (np.int16, "I16"), (np.uint32, "U32"),
    (np.int32, "I32"), (np.uint64, "U64"), (np.int64, "I64"), (np.float16, "F16"), (np.float32, "F32"),
    (np.float64, "F64"))}


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The safetensors format written array by array (safetensors' own save_file first copies every
    array into one bytes object: twice the state in memory, gigabytes at the paper's size)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in sorted(arrays):
        a = arrays[name]
        header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in sorted(arrays):
            f.write(np.ascontiguousarray(arrays[name]).astype(arrays[name].dtype.newbyteorder("<"), copy=False).data)


def save_state(path: str | Path, objects: dict[str, object], info: dict) -> None:
    arrays: dict[str, np.ndarray] = {}
    meta = {name: _encode(obj, name, arrays) for name, obj in objects.items()}
    with atomic_path(path) as tmp:
        _write_safetensors(tmp, arrays, {"state": json.dumps(meta), "info": json.dumps(info)})


def _read_header(path: Path) -> tuple[dict, int]:
    """(the header, where the data starts); ValueError unless the file is a whole safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 30:
            raise ValueError("not a safetensors file")
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if path.stat().st_size != 8 + n + max(ends, default=0):
        raise ValueError("truncated")
    return header, 8 + n


def read_info(path: str | Path) -> dict | None:
    try:
        header, _ = _read_header(Path(path))
        return json.loads(header["__metadata__"]["info"])
    except (OSError, ValueError, KeyError, TypeError):  # absent, truncated, or not ours: start over
        return None


def load_state(path: str | Path, objects: dict[str, object]) -> dict:
    path = Path(path)
    header, start = _read_header(path)
    names = {v: k for k, v in _DTYPES.items()}

    def get_array(name: str) -> np.ndarray:  # read straight into a new array: the peak is the state, not twice it
        entry = header[name]
        dtype = names[entry["dtype"]].newbyteorder("<")
        a, b = entry["data_offsets"]
        return np.fromfile(path, dtype=dtype, count=(b - a) // dtype.itemsize, offset=start + a).reshape(entry["shape"])

    meta = header["__metadata__"]
    state = json.loads(meta["state"])
    for name, obj in objects.items():
        _decode(state[name], get_array, obj, "cpu")
    return json.loads(meta["info"])


class Journal:
    """The results of a long job's finished units, one JSON line each, appended and synced as each unit
    ends, so that a rerun with the same settings skips them (steer-eval: hundreds of runs of LLaVA).

    The first line holds the settings; a file written with other settings, or not by a Journal, is started
    over, and `restarted` says why (the first setting that changed). A line cut short by a kill (the last
    one) is dropped: its unit runs again. Values are given back as JSON gives them (tuples as lists), on the
    first run too, so a resumed job computes from exactly the values an uninterrupted one held.
    """

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(json_safe(settings)))  # as the file will give it back
        self.done: dict[str, object] = {}
        self.restarted: str | None = None
        lines, whole = self._read_lines()
        if lines and lines[0].get("settings") == self.settings:
            self.done = {d["key"]: d["value"] for d in lines[1:] if "key" in d and "value" in d}
            if whole:
                return
        elif lines or not whole:
            ours = lines and isinstance(lines[0].get("settings"), dict)
            self.restarted = first_difference(lines[0]["settings"], self.settings) if ours else "not a journal of this job"
            lines = []
        # a new file, or the whole lines of one a kill cut short (the next line must not join the cut one)
        with atomic_path(self.path) as tmp:
            text = "".join(json.dumps(d, allow_nan=False) + "\n" for d in lines or [{"settings": self.settings}])
            tmp.write_text(text, encoding="utf-8")

    def _read_lines(self) -> tuple[list[dict], bool]:
        """The file's JSON-object lines up to the first that is not one, and whether that was all of it."""
        if not self.path.exists():
            return [], True
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return [], False
        lines = []
        for line in text.splitlines(keepends=True):
            try:
                d = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                d = None
            if not isinstance(d, dict):  # cut short by a kill: nothing after it was written
                return lines, False
            lines.append(d)
        return lines, True

    def run(self, key: str, compute):
        """The value of unit `key`: the recorded one, or compute() recorded now."""
        if key in self.done:
            return self.done[key]
        value = compute()
        # NaN as null (json_safe), as every JSON file here: steer-eval's undefined collateral kept is NaN
        line = json.dumps({"key": key, "value": json_safe(value)}, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = json.loads(line)["value"]  # what a resumed run would read
        return self.done[key]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
