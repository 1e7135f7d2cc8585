"""What a folder of the pipeline holds (a bundle, an activation store, an extraction, an SAE, a training run),
told from its files alone: for `inspect`, and for refusing one step's folder where another's goes."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

FOLDER_KINDS = {"bundle": "a bundle (precompute atlas or demo)", "store": "an activation store",
                "extraction": "an extraction's activation stores (precompute extract)",
                "sae": "an SAE", "training": "an SAE's training run (its checkpoint/)",
                "world": "an embedded world (precompute world)"}


def folder_kind(path: Path) -> str | None:
    """What a folder of this pipeline holds, from its files alone: a key of FOLDER_KINDS, or None."""
    from .checkpoint import sae_format

    if not path.is_dir():
        return None
    if (path / "manifest.json").is_file():  # a bundle's or a store's (a damaged one: the bundle reader names it)
        try:
            return "store" if "shards" in json.loads((path / "manifest.json").read_text(encoding="utf-8")) else "bundle"
        except (OSError, ValueError, TypeError, RecursionError):
            return "bundle"
    if (path / "extract.json").is_file():
        return "extraction"
    if (path / "world.json").is_file() and (path / "taxonomy.json").is_file():  # a bundle's world.json has no taxonomy
        return "world"
    try:
        sae_format(path)
        return "sae"
    except UserError:
        pass
    if (path / "checkpoint").is_dir() or (path / "train_log.csv").is_file():  # the log: before the first checkpoint
        return "training"
    if (path / ".stages").is_dir() or (path / ".work").is_dir():
        return "bundle"  # an unfinished one
    return None


def refuse_bundle_as_world(path: Path) -> None:
    """UserError (one sentence) when `path`, given where a world's folder goes, is a bundle, naming the world it
    carries (BUNDLE/world) or was built on: it said "no taxonomy.json" or "no saved model", and offered to build
    a world into the bundle."""
    path = Path(path)
    if folder_kind(path) != "bundle":
        return
    if (path / "world" / "world.json").is_file():
        where = f"the world it carries is {path / 'world'}: pass that"
    else:
        try:
            named = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("world")
        except (OSError, ValueError, AttributeError, RecursionError):
            named = None
        where = (f"it was built on the world {named}: pass that" if isinstance(named, str) and named else
                 "pass a world's folder (`python -m precompute world --out DIR` builds one)")
    raise UserError(f"{path} is a bundle, not a world's folder; {where}.")
