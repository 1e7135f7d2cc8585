"""The part of an image a model sees (sae_core.image_view) against the models' own preprocessing: the
region and shape `model_view` cuts out, resized to the model's input, is what the processor feeds it."""
import numpy as np
import pytest
from PIL import Image

from sae_core.image_view import CENTRE_SQUARE, model_view, read_view, view_box


def smooth_picture(w: int, h: int, seed: int = 0) -> Image.Image:
    """A non-square picture with large smooth blobs everywhere: any shift or stretch of a region shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BICUBIC)


def processor_pixels(pixel_values, mean, std) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) in [0, 1]."""
    x = np.asarray(pixel_values, dtype=np.float64)
    return (x * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]).transpose(1, 2, 0)


def view_pixels(img, view, hw) -> np.ndarray:
    return np.asarray(model_view(img, view).resize((hw[1], hw[0]), Image.BICUBIC), dtype=np.float64) / 255


def transformers_processors():
    from transformers import BitImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    return {  # the configurations of CLIP / LLaVA, DINOv2 and SigLIP checkpoints
        "clip": CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
        "dinov2": BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                    do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                    image_std=[0.229, 0.224, 0.225]),
        "siglip": SiglipImageProcessor(size={"height": 224, "width": 224}),
    }


@pytest.mark.parametrize("name", ["clip", "dinov2", "siglip"])
@pytest.mark.parametrize("wh", [(400, 240), (180, 330), (256, 256)])
def test_view_is_what_a_transformers_processor_feeds_the_model(name, wh):
    proc = transformers_processors()[name]
    view = read_view(processor=proc)
    img = smooth_picture(*wh)
    fed = processor_pixels(proc(images=img, return_tensors="np")["pixel_values"][0], proc.image_mean, proc.image_std)
    err = np.abs(view_pixels(img, view, fed.shape[:2]) - fed).mean()
    whole = np.abs(view_pixels(img, None, fed.shape[:2]) - fed).mean()  # the uncut picture, squashed
    assert err < 0.02, (name, wh, err)
    if not np.allclose(view_box(wh, view)[0], (0, 0, *wh)):  # where the view cuts, the uncut image is far off
        assert whole > 3 * err and whole > 0.03, (name, wh, err, whole)


@pytest.mark.parametrize("mode", ["shortest", "squash"])
def test_view_is_what_an_open_clip_transform_feeds_the_model(mode):
    import open_clip

    transform = open_clip.image_transform(224, is_train=False, resize_mode=mode)
    view = read_view(per_image=transform)
    img = smooth_picture(420, 250, seed=1)
    norm = next(t for t in transform.transforms if type(t).__name__ == "Normalize")
    fed = processor_pixels(transform(img).numpy(), norm.mean, norm.std)
    err = np.abs(view_pixels(img, view, fed.shape[:2]) - fed).mean()
    assert err < 0.02, (mode, err)
    assert np.abs(view_pixels(img, None, fed.shape[:2]) - fed).mean() > 3 * err or mode == "squash"


def test_views_not_read_are_none_and_the_default_is_clips():
    import open_clip

    assert read_view(per_image=open_clip.image_transform(224, is_train=False, resize_mode="longest")) is None
    assert read_view(processor=transformers_processors()["clip"]) == CENTRE_SQUARE
    # the box by hand: a 400 x 240 image, shortest side 240 -> 224: the centre 240 x 240, columns 80 to 320
    box, aspect = view_box((400, 240), CENTRE_SQUARE)
    assert np.allclose(box, (80, 0, 320, 240)) and aspect == 1
    # DINOv2's 224 of 256: the centre 210 x 210 of the 240 x 240 square
    box, _ = view_box((400, 240), {"resize": {"shortest_edge": 256}, "crop": {"height": 224, "width": 224}})
    assert np.allclose(box, (95, 15, 305, 225))
    img = smooth_picture(64, 64)
    assert model_view(img, CENTRE_SQUARE) is img and model_view(img, None) is img
