"""Pictures the pages show: upscaled thumbnails, patch heatmap overlays, the patch grid to click on."""
from __future__ import annotations

import errno
import hashlib
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sae_core.errors import UserError, write_failure

DISPLAY = 160
"""Side in pixels of every gallery tile (the world's 32 px images are blown up with nearest neighbour)."""
HEAT_RGB = (255, 40, 0)
MAX_ALPHA = 0.65


def fitted_size(wh: tuple[int, int], size: int = DISPLAY) -> tuple[int, int]:
    """(w, h) of a picture of size `wh` fitted into a size x size square (what `upscale` makes)."""
    w, h = wh
    scale = size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def upscale(img, size: int = DISPLAY):
    """Fit `img` into a size x size square: nearest neighbour for small images (keeps pixels crisp)."""
    from PIL import Image

    return img.resize(fitted_size(img.size, size), Image.NEAREST if max(img.size) <= size // 2 else Image.LANCZOS)


def outline_patch(draw, origin: tuple[float, float], size: tuple[int, int], grid: tuple[int, int], best) -> None:
    """Outline patch `best` (an index of `grid`, rows x cols) in yellow on the picture of `size` drawn at
    `origin`: the best patch of a gallery tile or of a band strip's image. None or out of range: nothing."""
    rows, cols = grid
    if best is None or not 0 <= best < rows * cols:
        return
    r, c = divmod(best, cols)
    cw, ch = size[0] / cols, size[1] / rows
    x0, y0 = origin
    left, top = x0 + c * cw, y0 + r * ch
    draw.rectangle([left, top, max(left, left + cw - 1), max(top, top + ch - 1)], outline=(255, 255, 0),
                   width=2 if min(cw, ch) >= 4 else 1)


def heat_overlay(img, heat: np.ndarray, grid: tuple[int, int], vmax: float, best: int | None = None,
                 size: int = DISPLAY):
    """`img` with the neuron's per-patch activation `heat` (P,) painted over it in red.

    `vmax` normalises the colour (the neuron's largest activation on its top images, so tiles of one
    gallery are comparable); `best` (a patch index, not a token position) gets an outline.
    """
    from PIL import Image, ImageDraw

    base = upscale(img, size).convert("RGB")
    rows, cols = grid
    h = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)[: rows * cols]) / max(float(vmax), 1e-12), 0, 1)
    alpha = (h.reshape(rows, cols) * (255 * MAX_ALPHA)).round().astype(np.uint8)
    mask = Image.fromarray(alpha, mode="L").resize(base.size, Image.BILINEAR)
    # PIL's composite is base * (1 - mask/255) + red * mask/255 in C (a tile 1.7 -> 0.7 ms against float numpy)
    pic = Image.composite(Image.new("RGB", base.size, HEAT_RGB), base, mask)
    outline_patch(ImageDraw.Draw(pic), (0, 0), pic.size, grid, best)
    return pic


def strip(images, tile: int = 96, gap: int = 4, slots: int = 0, boxes=None, grid: tuple[int, int] | None = None):
    """Images side by side, each fitted into a tile x tile square, on a white background, at least
    `slots` tiles wide: strips of one width are drawn at one scale (a gallery stretches each to its width,
    so a one-image strip came out as one huge image). `boxes`: per image a patch index (of `grid`) to
    outline in yellow, as the top gallery marks its best patch, or None."""
    from PIL import Image, ImageDraw

    n = max(len(images), slots)
    out = Image.new("RGB", (n * (tile + gap) - gap, tile), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, img in enumerate(images):
        t = upscale(img, tile).convert("RGB")
        x0, y0 = j * (tile + gap) + (tile - t.size[0]) // 2, (tile - t.size[1]) // 2
        out.paste(t, (x0, y0))
        if boxes is not None and grid:
            outline_patch(draw, (x0, y0), t.size, grid, boxes[j])
    return out


def patch_grid(img, grid: tuple[int, int], selected=(), heat: np.ndarray | None = None, vmax: float = 1.0,
               size: int = 320):
    """The steering image with its patch grid drawn, `selected` patches outlined, optional heat."""
    from PIL import ImageDraw

    pic = heat_overlay(img, heat, grid, vmax, size=size) if heat is not None else upscale(img, size).convert("RGB")
    rows, cols = grid
    cw, ch = pic.size[0] / cols, pic.size[1] / rows
    draw = ImageDraw.Draw(pic)
    for c in range(1, cols):
        draw.line([(c * cw, 0), (c * cw, pic.size[1])], fill=(255, 255, 255), width=1)
    for r in range(1, rows):
        draw.line([(0, r * ch), (pic.size[0], r * ch)], fill=(255, 255, 255), width=1)
    for p in selected:
        r, c = divmod(int(p), cols)
        x0, y0 = c * cw + 1, r * ch + 1  # cells of a few pixels (a sliver of an image) still get a mark
        draw.rectangle([x0, y0, max(x0, (c + 1) * cw - 2), max(y0, (r + 1) * ch - 2)], outline=(0, 255, 255),
                       width=max(1, min(3, int(min(cw, ch) // 3))))
    return pic


def patch_at(xy, size: tuple[int, int], grid: tuple[int, int]) -> int:
    """The patch index under pixel (x, y) of a picture of `size` (w, h) showing a `grid` of patches."""
    x, y = xy
    rows, cols = grid
    c = min(cols - 1, max(0, int(x * cols / size[0])))
    r = min(rows - 1, max(0, int(y * rows / size[1])))
    return r * cols + c


RENDER_VERSION = 3
"""Part of every cached picture's folder name: raise it when a drawing changes, so a cache kept from an
earlier version (the default cache folder outlives the app) is not served. 2: no best-patch box where a
neuron fires on no patch; band strips padded to the band size. 3: images as the model sees them (crop)."""


class ImageCache:
    """Generated pictures as PNG files under one folder (the only folder besides the bundle that is served).

    Files are named by a hash of their key, so a neuron page rendered once is only read afterwards.
    """

    def __init__(self, root: Path, namespace: str):
        namespace = f"{namespace}|render {RENDER_VERSION}"
        self.root = Path(root) / hashlib.sha1(namespace.encode()).hexdigest()[:12]
        # written once at the start: a read-only cache folder was two tracebacks there (until 2026-12-05)
        with self._writing(self.root / f".probe.{os.getpid()}.tmp") as probe:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()

    @contextmanager
    def _writing(self, tmp: Path):
        """A write into the cache, its temporary `tmp` removed where it fails, and a failure of the storage as one
        sentence (a full or read-only cache served "[Errno 28] No space left on device" for every page not yet
        drawn, and left a temporary per attempt, until 2026-12-05)."""
        try:
            yield tmp
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            # the cache's own path (its folder may be what could not be made), not a dataset image that could not be
            # read: a refused permission or an I/O error says which; no space, a quota or a read-only disk are writes
            ours = str(e.filename or "").startswith(str(self.root.parent.parent))
            said = ("permission denied" if isinstance(e, PermissionError) else write_failure(e)) if ours else (
                None if e.errno == errno.EIO else write_failure(e))
            if said is None:
                raise
            raise UserError(f"the explorer's picture cache {self.root.parent.parent} cannot be written ({said}); free "
                            "space there, or point SAE_APP_CACHE at a writable folder with room and restart.") from None

    def path(self, key: str, suffix: str = ".png") -> Path:
        return self.root / (hashlib.sha1(key.encode()).hexdigest()[:20] + suffix)

    def get_or_make(self, key: str, make) -> str:
        """Path of the PNG for `key`, drawing it with `make()` (a PIL image) the first time."""
        path = self.path(key)
        try:
            os.utime(path)  # a use: the server's cache sweep deletes what nobody used for a day (app.server)
        except PermissionError:  # another user's file in a shared cache: used as it is
            pass
        except FileNotFoundError:
            with self._writing(path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")) as tmp:
                self.root.mkdir(parents=True, exist_ok=True)  # removed since the start: by a /tmp cleaner once
                # compress_level 1: a third of the encoding time of the default 6, files about 35% larger
                make().save(tmp, format="PNG", compress_level=1)
                os.replace(tmp, path)
        return str(path)

    def write_text(self, name: str, text: str) -> str:
        """A generated text file (JSON export); written atomically under a readable name."""
        path = self.root / name
        with self._writing(path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")) as tmp:
            self.root.mkdir(parents=True, exist_ok=True)  # as in get_or_make
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        return str(path)
