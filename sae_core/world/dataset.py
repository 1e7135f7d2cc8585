"""`WorldDataset`: a split of a built world, read by index like any dataset (`world:DIR[:split]`).

Images are re-rendered from (seed, split, index); the world directory only stores world.json
(the generator's parameters), taxonomy.json and the trained models.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..errors import UserError
from .generator import SPLITS, WorldSpec, render, sample_factors
from .taxonomy import leaf_name, taxonomy_path
from .text import caption, qa_pairs


def read_world_json(root) -> dict:
    path = Path(root) / "world.json"
    if not path.is_file():
        raise UserError(f"{root} is not an embedded world (no world.json); build one with "
                        f"`python -m precompute world --out {root}`.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class WorldDataset:
    """One split of the world at `root`. `ds[i]` is a PIL RGB image; labels come from the methods."""

    def __init__(self, root, split: str = "train"):
        self.root = Path(root)
        self.meta = read_world_json(root)
        if split not in SPLITS:
            raise UserError(f"unknown world split {split!r}; use one of {', '.join(SPLITS)}.")
        self.split = split
        self.spec = WorldSpec.from_json(self.meta)
        self.n = int(self.spec.splits[split])
        with open(self.root / "taxonomy.json", encoding="utf-8") as f:
            self.taxonomy = json.load(f)
        self._leaf_id = {tuple(leaf["path"]): leaf["id"] for leaf in self.taxonomy["leaves"]}
        self._render = lru_cache(maxsize=64)(self._render_uncached)

    def __getstate__(self) -> dict:
        # the per-instance cache is no picklable object: a DataLoader worker started by `spawn` (macOS's and
        # Windows' way; forkserver is Linux's from Python 3.14) failed on it until 2026-12-05
        return {k: v for k, v in self.__dict__.items() if k != "_render"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._render = lru_cache(maxsize=64)(self._render_uncached)

    def __len__(self) -> int:
        return self.n

    def _check(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for world split {self.split!r} of {self.n} images")
        return i

    def _render_uncached(self, i: int):
        return render(self.spec, self.split, i)

    def __getitem__(self, i):
        return self._render(self._check(i))[0]

    def factors(self, i) -> dict:
        """{'objects': [{shape, family, colour, colour_group, size, position, x, y, diameter, rgb}],
        'background': {texture, rgb, phase}}; x, y, diameter are fractions of the image side."""
        return sample_factors(self.spec, self.split, self._check(i))

    def masks(self, i):
        """Visible pixels of each object, bool (n_objects, H, W), in the order of factors(i)['objects']."""
        return self._render(self._check(i))[1]

    def taxonomy_path(self, i) -> list:
        """[family, shape, colour_group, colour] of the object the image is about."""
        _, masks, factors = self._render(self._check(i))
        return taxonomy_path(factors, masks)

    def class_name(self, i) -> str:
        """The iNaturalist-style leaf name, e.g. '00000_round_circle_warm_red'."""
        path = self.taxonomy_path(i)
        return leaf_name(self._leaf_id[tuple(path)], path)

    def caption(self, i) -> str:
        return caption(self.factors(i))

    def qa(self, i) -> list:
        """(kind, question, answer) triples the tiny LLaVA was trained to answer."""
        _, masks, factors = self._render(self._check(i))
        return qa_pairs(factors, masks)

    def describe(self) -> str:
        return f"world:{self.root}:{self.split}"
