"""The embedded world: synthetic images with ground-truth factors, masks, taxonomy and text.

`generator` renders images from (seed, split, index); `taxonomy` and `text` derive the labels and the
language; `dataset.WorldDataset` reads a built world directory. Models are trained by
`python -m precompute world` (precompute/world/), never here.
"""
from .generator import COLOURS, SHAPES, TEXTURES, WorldSpec, render, sample_factors

__all__ = ["COLOURS", "SHAPES", "TEXTURES", "WorldSpec", "render", "sample_factors"]
