"""Save and restore the running state of streaming accumulators, so that a killed pass resumes.

An accumulator lists the attributes that hold its running state in a class attribute `STATE`; the
values may be numpy arrays, tensors, numbers, strings, None, lists or tuples of those, or other
objects with a `STATE`. `save_state` writes the arrays of a dict of accumulators to one safetensors
file (atomically) with everything else, and each value's kind, as JSON in its metadata; `load_state`
puts the values back into freshly built accumulators of the same shapes. No pickle: the file holds
arrays and JSON only.

API
    save_state(path, objects: dict[str, object], info: dict) -> None
    read_info(path) -> dict | None            the `info` saved beside the state (None: no readable file)
    load_state(path, objects: dict[str, object]) -> dict   restores in place, returns `info`
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path


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


def _decode(desc: dict, arrays, current, device):
    """The value `desc` describes; objects are restored into `current` (the freshly built one)."""
    (kind, body), = desc.items()
    if kind == "tensor":
        return torch.from_numpy(arrays[body].copy()).to(current.device if isinstance(current, torch.Tensor) else device)
    if kind == "array":
        return arrays[body].copy()
    if kind in ("list", "tuple"):
        items = [_decode(d, arrays, None, device) for d in body]
        return items if kind == "list" else tuple(items)
    if kind == "object":
        dev = getattr(current, "device", device)
        for name, d in body.items():
            setattr(current, name, _decode(d, arrays, getattr(current, name), dev))
        return current
    return body


def save_state(path: str | Path, objects: dict[str, object], info: dict) -> None:
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    meta = {name: _encode(obj, name, arrays) for name, obj in objects.items()}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={"state": json.dumps(meta), "info": json.dumps(info)})


def read_info(path: str | Path) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return json.loads((f.metadata() or {})["info"])
    except Exception:  # absent, truncated, or not ours (safetensors' own error type): start over
        return None


def load_state(path: str | Path, objects: dict[str, object]) -> dict:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    arrays = load_file(str(path))
    state = json.loads(meta["state"])
    for name, obj in objects.items():
        _decode(state[name], arrays, obj, "cpu")
    return json.loads(meta["info"])
