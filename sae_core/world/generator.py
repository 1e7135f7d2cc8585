"""The embedded world's images: a pure function of (seed, split, index), with labels and masks.

Only numpy and PIL are used (no torch), and every random choice comes from one numpy Generator
seeded with (seed, split, index), so an image is identical on every machine and in every process.

An image holds one or two objects on a textured background. Each object has a shape (from a family),
a colour (from a colour group), a size word and a position word; its exact centre, diameter and RGB
fill are factors too. Objects are drawn at 4x resolution and box-filtered down (anti-aliased edges);
an object's mask is the set of pixels where its visible coverage is at least one half.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# family -> shapes, colour group -> colours: the two trees the taxonomy is made of.
SHAPE_FAMILIES = {
    "round": ("circle", "oval", "ring", "crescent"),
    "polygon": ("triangle", "square", "diamond", "hexagon"),
    "symbol": ("star", "cross", "heart", "arrow"),
}
COLOUR_GROUPS = {
    "warm": ("red", "orange", "yellow", "pink"),
    "cool": ("green", "cyan", "blue", "purple"),
    "neutral": ("white", "grey", "black", "brown"),
}
COLOUR_RGB = {
    "red": (220, 30, 30), "orange": (245, 130, 20), "yellow": (240, 220, 30), "pink": (245, 120, 190),
    "green": (40, 170, 60), "cyan": (30, 200, 220), "blue": (30, 70, 220), "purple": (140, 50, 190),
    "white": (250, 250, 250), "grey": (120, 120, 120), "black": (20, 20, 20), "brown": (130, 75, 30),
}
TEXTURES = ("plain", "striped", "checked", "dotted", "noisy")
# muted, light background tones: far from every object colour, so objects always stand out
BACKGROUND_TONES = ((200, 190, 168), (168, 190, 174), (174, 180, 204), (198, 176, 188))
SIZES = {"small": (0.30, 0.38), "large": (0.48, 0.60)}  # diameter as a fraction of the image side
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
             "centre": (0.5, 0.5)}
PAIR_LAYOUTS = (("left", "right"), ("top", "bottom"))
SPLITS = {"train": 0, "val": 1, "ood": 2}

SHAPES = tuple(s for f in SHAPE_FAMILIES.values() for s in f)
COLOURS = tuple(c for g in COLOUR_GROUPS.values() for c in g)
FAMILY_OF = {s: f for f, ss in SHAPE_FAMILIES.items() for s in ss}
GROUP_OF = {c: g for g, cs in COLOUR_GROUPS.items() for c in cs}
SUPERSAMPLE = 4
COLOUR_JITTER = 12  # each channel of an object's fill moves by at most this much


@dataclass(frozen=True)
class WorldSpec:
    """Everything that defines a world's images; stored as world.json (plus build details)."""
    seed: int = 0
    image_size: int = 32
    splits: dict = field(default_factory=lambda: {"train": 20000, "val": 2000, "ood": 1000})
    ood_shape: str = "hexagon"
    ood_colour: str = "cyan"
    two_object_frac: float = 0.3

    def __post_init__(self):
        if self.ood_shape not in SHAPES or self.ood_colour not in COLOURS:
            raise ValueError(f"unknown held-out shape or colour: {self.ood_shape}, {self.ood_colour}")

    @property
    def train_shapes(self) -> tuple:
        return tuple(s for s in SHAPES if s != self.ood_shape)

    @property
    def train_colours(self) -> tuple:
        return tuple(c for c in COLOURS if c != self.ood_colour)

    def to_json(self) -> dict:
        return {"seed": self.seed, "image_size": self.image_size, "splits": dict(self.splits),
                "ood_shape": self.ood_shape, "ood_colour": self.ood_colour,
                "two_object_frac": self.two_object_frac}

    @classmethod
    def from_json(cls, d: dict) -> "WorldSpec":
        keys = ("seed", "image_size", "splits", "ood_shape", "ood_colour", "two_object_frac")
        return cls(**{k: d[k] for k in keys if k in d})


def _rng(spec: WorldSpec, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([spec.seed, SPLITS[split], index]))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_factors(spec: WorldSpec, split: str, index: int) -> dict:
    """The factors of image `index` of `split`: a JSON-ready dict (objects in caption order).

    Train and val draw shapes and colours from the training sets; every ood image has at least one
    object with the held-out shape or the held-out colour (a third of the time both).
    """
    rng = _rng(spec, split, index)
    n = 2 if rng.random() < spec.two_object_frac else 1
    layout = ("centre", "left", "right", "top", "bottom") if n == 1 else _pick(rng, PAIR_LAYOUTS)
    positions = [_pick(rng, layout)] if n == 1 else list(layout)
    # in a pair at most one object is large, so the two rarely overlap much
    sizes = [_pick(rng, tuple(SIZES)) for _ in range(n)]
    if n == 2 and sizes == ["large", "large"]:
        sizes[int(rng.integers(2))] = "small"
    shapes = [_pick(rng, spec.train_shapes) for _ in range(n)]
    colours = [_pick(rng, spec.train_colours) for _ in range(n)]
    if split == "ood":
        k = int(rng.integers(n))
        kind = int(rng.integers(3))  # 0: held-out shape, 1: held-out colour, 2: both
        if kind in (0, 2):
            shapes[k] = spec.ood_shape
        if kind in (1, 2):
            colours[k] = spec.ood_colour
    objects = []
    for shape, colour, size, pos in zip(shapes, colours, sizes, positions):
        lo, hi = SIZES[size]
        diameter = float(rng.uniform(lo, hi))
        ax, ay = POSITIONS[pos]
        r = diameter / 2 + 0.03  # keep the whole object inside the frame
        x = float(np.clip(ax + rng.uniform(-0.04, 0.04), r, 1 - r))
        y = float(np.clip(ay + rng.uniform(-0.04, 0.04), r, 1 - r))
        rgb = np.clip(np.array(COLOUR_RGB[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3),
                      0, 255)
        objects.append({"shape": shape, "family": FAMILY_OF[shape], "colour": colour,
                        "colour_group": GROUP_OF[colour], "size": size, "position": pos,
                        "x": round(x, 4), "y": round(y, 4), "diameter": round(diameter, 4),
                        "rgb": [int(v) for v in rgb]})
    texture = _pick(rng, TEXTURES)
    tone = BACKGROUND_TONES[int(rng.integers(len(BACKGROUND_TONES)))]
    return {"objects": objects,
            "background": {"texture": texture, "rgb": list(tone), "phase": int(rng.integers(1 << 30))}}


def _regular(k: int, r: float, start: float) -> list:
    return [(r * math.cos(start + 2 * math.pi * i / k), r * math.sin(start + 2 * math.pi * i / k))
            for i in range(k)]


def _outline(shape: str) -> list:
    """Polygon vertices of a shape in a unit frame (centre 0, radius 1, y down)."""
    if shape == "triangle":
        return [(0, -1.0), (0.95, 0.72), (-0.95, 0.72)]
    if shape == "square":
        return [(-0.74, -0.74), (0.74, -0.74), (0.74, 0.74), (-0.74, 0.74)]
    if shape == "diamond":
        return [(0, -1.0), (0.8, 0), (0, 1.0), (-0.8, 0)]
    if shape == "hexagon":
        return _regular(6, 1.0, 0.0)
    if shape == "star":
        pts = []
        for i in range(10):
            rad = 1.0 if i % 2 == 0 else 0.45
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.34
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                (-1, -w), (-w, -w)]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            px = 16 * math.sin(t) ** 3
            py = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((px / 17.0, -(py + 2.5) / 15.5))
        return pts
    if shape == "arrow":
        return [(-1, -0.3), (0.1, -0.3), (0.1, -0.75), (1, 0), (0.1, 0.75), (0.1, 0.3), (-1, 0.3)]
    raise ValueError(shape)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    def box(rx, ry, dx=0.0):
        return [cx + dx - rx, cy - ry, cx + dx + rx, cy + ry]
    if shape == "circle":
        draw.ellipse(box(r, r), fill=255)
    elif shape == "oval":
        draw.ellipse(box(r, 0.58 * r), fill=255)
    elif shape == "ring":
        draw.ellipse(box(r, r), fill=255)
        draw.ellipse(box(0.5 * r, 0.5 * r), fill=0)
    elif shape == "crescent":
        draw.ellipse(box(r, r), fill=255)
        draw.ellipse(box(0.82 * r, 0.82 * r, dx=0.5 * r), fill=0)
    else:
        draw.polygon([(cx + r * px, cy + r * py) for px, py in _outline(shape)], fill=255)


def _coverage(obj: dict, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, float32 (size, size), from a 4x drawing."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(canvas), obj["shape"], obj["x"] * big, obj["y"] * big,
                obj["diameter"] * big / 2)
    return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def _background(bg: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Background (size, size, 3) float32: two tones of one muted colour in a texture."""
    tone = np.array(bg["rgb"], dtype=np.float32)
    dark = tone * 0.82
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * (32.0 / size)  # texture scale in 32-px units
    phase = bg["phase"] % 8
    tex = bg["texture"]
    if tex == "plain":
        t = np.zeros((size, size), np.float32)
    elif tex == "striped":
        t = (((xx + yy + phase) // 3) % 2).astype(np.float32)  # diagonal stripes
    elif tex == "checked":
        t = ((((xx + phase) // 4) + ((yy + phase) // 4)) % 2).astype(np.float32)
    elif tex == "dotted":
        t = ((((xx + phase) % 5) < 2) & (((yy + phase) % 5) < 2)).astype(np.float32)
    elif tex == "noisy":
        t = rng.random((size, size), dtype=np.float32)
    else:
        raise ValueError(tex)
    return tone * (1 - t[..., None]) + dark * t[..., None]


def render(spec: WorldSpec, split: str, index: int, factors: dict | None = None):
    """Render one image: (PIL RGB image, masks bool (n_objects, H, W), factors dict).

    Objects are painted in order, so a later object occludes an earlier one; a mask holds only the
    visible part of its object.
    """
    factors = sample_factors(spec, split, index) if factors is None else factors
    size = spec.image_size
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, SPLITS[split], index, 1]))
    img = _background(factors["background"], size, rng)
    covers = []
    for obj in factors["objects"]:
        a = _coverage(obj, size)
        img = img * (1 - a[..., None]) + np.array(obj["rgb"], np.float32) * a[..., None]
        covers.append(a)
    visible = []
    for k, a in enumerate(covers):
        v = a.copy()
        for later in covers[k + 1:]:
            v = v * (1 - later)
        visible.append(v >= 0.5)
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    masks = np.stack(visible) if visible else np.zeros((0, size, size), bool)
    return Image.fromarray(pixels, "RGB"), masks, factors


def main_object(factors: dict, masks: np.ndarray | None = None) -> int:
    """Index of the object an image is 'about': the only one, else the larger visible one."""
    objs = factors["objects"]
    if len(objs) == 1:
        return 0
    if masks is not None:
        return int(np.argmax(masks.reshape(len(objs), -1).sum(1)))
    return int(np.argmax([o["diameter"] for o in objs]))
