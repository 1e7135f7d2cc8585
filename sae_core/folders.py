"""What a folder of the pipeline holds (a bundle, an activation store, an extraction, an SAE, a training run),
told from its files alone: for `inspect`, and for refusing one step's folder where another's goes."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

FOLDER_KINDS = {"bundle": "a bundle (precompute atlas or demo)", "store": "an activation store",
                "extraction": "an extraction's activation stores (precompute extract)",
                "sae": "an SAE", "training": "an SAE's training run (its checkpoint/)"}


def folder_kind(path: Path) -> str | None:
    """What a folder of this pipeline holds, from its files alone: a key of FOLDER_KINDS, or None."""
    from .checkpoint import sae_format

    if not path.is_dir():
        return None
    if (path / "manifest.json").is_file():  # a bundle's or a store's (a damaged one: the bundle reader names it)
        try:
            return "store" if "shards" in json.loads((path / "manifest.json").read_text()) else "bundle"
        except (OSError, ValueError, TypeError):
            return "bundle"
    if (path / "extract.json").is_file():
        return "extraction"
    try:
        sae_format(path)
        return "sae"
    except UserError:
        pass
    if (path / "checkpoint").is_dir():
        return "training"
    if (path / ".stages").is_dir() or (path / ".work").is_dir():
        return "bundle"  # an unfinished one
    return None
