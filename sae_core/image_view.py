"""The part of an image a vision model sees: its preprocessing's resize and centre crop, read once from the
model's own transform, so a picture with a patch grid, a heat map or a best-patch box lines up with it."""
from __future__ import annotations

CENTRE_SQUARE = {"resize": {"shortest_edge": 224}, "crop": {"height": 224, "width": 224}}
"""CLIP's view (LLaVA's too): the shortest side resized, the centre square kept. What a bundle that records
no view is shown with."""

_NO_GEOMETRY = {"ToTensor", "PILToTensor", "Normalize", "ConvertImageDtype", "function", "MaybeConvertMode",
                "MaybeToTensor"}
"""torchvision and open_clip transforms (and plain functions: open_clip's RGB conversion) that move no pixel."""


def _dims(size) -> dict:
    """A transformers size (SizeDict or dict) or torchvision size (int, [int], (h, w)) as a plain dict."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"shortest_edge": size}
    if isinstance(size, (list, tuple)):
        return {"shortest_edge": int(size[0])} if len(size) == 1 else {"height": int(size[0]), "width": int(size[1])}
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return {key: int(get(key)) for key in ("shortest_edge", "height", "width") if get(key)}


def _resize(dims: dict) -> dict | None:
    if "shortest_edge" in dims:
        return {"shortest_edge": dims["shortest_edge"]}
    if "height" in dims and "width" in dims:
        return {"height": dims["height"], "width": dims["width"]}
    return None


def read_view(processor=None, per_image=None) -> dict | None:
    """{"resize": {"shortest_edge": S} or {"height": H, "width": W} (squashed), "crop": {"height", "width"} or
    None} of a transformers image processor or a torchvision Compose (open_clip); None for a transform
    this does not read (no resize, a resize that keeps the longest side, an unknown step)."""
    if processor is not None:
        if not getattr(processor, "do_resize", True):
            return None
        resize = _resize(_dims(getattr(processor, "size", None)))
        crop = _dims(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
        if resize is None or (crop is not None and not {"height", "width"} <= crop.keys()):
            return None
        return {"resize": resize, "crop": crop and {"height": crop["height"], "width": crop["width"]}}
    resize, crop = None, None
    for step in getattr(per_image, "transforms", None) or []:
        kind = type(step).__name__
        if kind == "Resize" and resize is None and crop is None:
            resize = _resize(_dims(step.size))
            if resize is None or getattr(step, "max_size", None):
                return None
        elif kind == "CenterCrop" and resize is not None and crop is None:
            c = _dims(step.size)
            crop = {"height": c["shortest_edge"], "width": c["shortest_edge"]} if "shortest_edge" in c else c
        elif kind not in _NO_GEOMETRY:
            return None
    return resize and {"resize": resize, "crop": crop}


def _positive(dims, keys) -> bool:
    return isinstance(dims, dict) and all(type(dims.get(k)) in (int, float) and dims[k] > 0 for k in keys)


def is_view(view) -> bool:
    """Whether `view` (a manifest's model.view) is null or what `view_box` reads: a resize of a positive
    shortest_edge, or of a height and width, and a crop of a height and width or none."""
    if view is None:
        return True
    resize = view.get("resize") if isinstance(view, dict) else None
    crop = view.get("crop") if isinstance(view, dict) else None
    return (_positive(resize, ("shortest_edge",) if isinstance(resize, dict) and "shortest_edge" in resize
                      else ("height", "width"))
            and (crop is None or _positive(crop, ("height", "width"))))


def view_box(size: tuple[int, int], view: dict) -> tuple[tuple[float, float, float, float], float]:
    """((left, top, right, bottom) of the region the model sees, in the image's pixels; the width / height
    ratio the model sees it at) for an image of `size` (w, h)."""
    w, h = size
    resize = view["resize"]
    if "shortest_edge" in resize:
        s = resize["shortest_edge"] / min(w, h)
        rw, rh = w * s, h * s
    else:
        rw, rh = float(resize["width"]), float(resize["height"])
    crop = view.get("crop") or {"width": rw, "height": rh}
    cw, ch = min(crop["width"], rw), min(crop["height"], rh)  # a crop larger than the image pads it
    sx, sy = rw / w, rh / h
    left, top = (rw - cw) / 2 / sx, (rh - ch) / 2 / sy
    return (left, top, left + cw / sx, top + ch / sy), cw / ch


def model_view(img, view: dict | None):
    """`img` (PIL) cut to the region the model sees and stretched to the shape it sees it at, where its
    transform squashes: patch (r, c) of the model's grid is then cell (r, c) of the picture. None: `img`."""
    from PIL import Image

    if view is None:
        return img
    (left, top, right, bottom), aspect = view_box(img.size, view)
    box = (round(left), round(top), max(round(right), round(left) + 1), max(round(bottom), round(top) + 1))
    out = img if box == (0, 0, *img.size) else img.crop(box)
    w, h = out.size
    if abs(w / h - aspect) > 0.02 * aspect:
        out = out.resize((max(1, round(h * aspect)), h) if w / h < aspect else (w, max(1, round(w / aspect))),
                         Image.BICUBIC)
    return out
