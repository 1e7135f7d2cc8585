"""A training pool: images of one split rendered once into a uint8 tensor, with integer factor codes."""
from __future__ import annotations

import numpy as np
import torch

from sae_core.progress import progress_bar
from sae_core.world.generator import COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES, WorldSpec, render
from sae_core.world.text import caption

# CLIP's normalisation, also written into the saved image processors
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
FACTOR_CODES = {"shape": SHAPES, "colour": COLOURS, "size": tuple(SIZES), "position": tuple(POSITIONS)}


class Pool:
    """Images [start, start + n) of a split: pixels (n, 3, H, W) uint8, factors, and codes per object."""

    def __init__(self, spec: WorldSpec, split: str, n: int, start: int = 0, desc: str | None = None):
        self.spec, self.split = spec, split
        self.indices = np.arange(start, start + n)
        size = spec.image_size
        pixels = np.empty((n, size, size, 3), np.uint8)
        self.factors, self.masks = [], []
        for k, i in enumerate(progress_bar(self.indices, desc=desc or f"render {split}", unit="img",
                                           leave=False, mininterval=1.0)):
            img, masks, f = render(spec, split, int(i))
            pixels[k] = np.asarray(img)
            self.factors.append(f)
            self.masks.append(masks)
        self.pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        # codes[name]: (n, 2) int, -1 where the image has no second object
        self.n_objects = np.array([len(f["objects"]) for f in self.factors])
        self.codes = {}
        for name, values in FACTOR_CODES.items():
            lookup = {v: j for j, v in enumerate(values)}
            c = np.full((n, 2), -1, np.int64)
            for k, f in enumerate(self.factors):
                for o, obj in enumerate(f["objects"]):
                    c[k, o] = lookup[obj[name]]
            self.codes[name] = c
        self.texture = np.array([TEXTURES.index(f["background"]["texture"]) for f in self.factors])
        self.captions = [caption(f) for f in self.factors]

    def __len__(self) -> int:
        return len(self.indices)

    def single(self) -> np.ndarray:
        """Positions (into the pool) of the single-object images."""
        return np.flatnonzero(self.n_objects == 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised as the saved CLIPImageProcessor does it."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std
