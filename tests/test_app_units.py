"""The explorer's pieces without a server: uploads, input bounds, URL state, pictures, tables, settings."""
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import figures, inputs
from app.explorer import Explorer
from app.render import heat_overlay, patch_at
from app.uploads import UploadLimits, load_upload
from sae_core.bundle import open_bundle
from sae_core.errors import UserError

GRADIO_IMAGES = Path(__import__("gradio").__file__).parent / "media_assets" / "images"


def png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + b"\x00" * 3 * 8
    body = zlib.compress(row * 8)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------
def test_real_photos_load_as_rgb_with_their_size():
    for name in ("cheetah.jpg", "tower.jpg"):
        path = GRADIO_IMAGES / name
        with Image.open(path) as ref:
            size = ref.size
        im = load_upload(path)
        assert im.mode == "RGB" and im.size == size


def test_png_gif_and_exif_rotation(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(load_upload(tmp_path / "a.png")), arr)
    frames = [Image.new("P", (8, 6), i) for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert load_upload(tmp_path / "a.gif").size == (8, 6)
    # EXIF orientation 6 = rotate 90 clockwise for display: a 30x20 file shows as 20x30
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_upload(tmp_path / "r.jpg").size == (20, 30)
    # the same photo given to `steer --image` (or a session by path) is the same picture: it was read sideways, so
    # the command line and the web page answered about different images; dataset images stay as torchvision reads them
    from sae_core.datasets import load_rgb
    from sae_core.steering import read_image_file

    upright = np.asarray(load_upload(tmp_path / "r.jpg"))
    assert np.array_equal(np.asarray(read_image_file(tmp_path / "r.jpg")), upright)
    stored = np.asarray(load_rgb(tmp_path / "r.jpg"))
    assert stored.shape == (20, 30, 3) and np.array_equal(np.rot90(stored, -1), upright)  # 90 degrees clockwise


def test_read_image_file_refusals_name_what_is_wrong(tmp_path):
    from sae_core.steering import read_image_file

    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.jpg").write_text("not an image")
    for given, sentence in [("", "no image given; pass an image file, or world:INDEX for a bundle image."),
                            (tmp_path / "photos", f"image {tmp_path / 'photos'} is a folder; pass one image file "
                                                  "in it, or world:INDEX for a bundle image."),  # was "does not exist"
                            (tmp_path / "nope.png", f"image {tmp_path / 'nope.png'} does not exist; pass an image "
                                                    "file, or world:INDEX for a bundle image.")]:
        with pytest.raises(UserError) as e:
            read_image_file(given)
        assert str(e.value) == sentence
    with pytest.raises(UserError, match=r"^cannot read image .*notes\.jpg .*; pass a PNG or JPEG file\.$"):
        read_image_file(tmp_path / "notes.jpg")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 50_000, 50_000)
    assert bomb.stat().st_size < 200
    with pytest.raises(UserError, match="decompression bomb|megapixels"):
        load_upload(bomb)
    # within PIL's own limit but above ours: refused by our pixel limit with the size in the message
    big = tmp_path / "big.png"
    png_header_only(big, 5000, 4000)
    with pytest.raises(UserError, match="5,000 x 4,000"):
        load_upload(big)
    # one pixel column past the default 4096 x 4096, in whole pixels: it read "16.8 megapixels, above the limit of
    # 16.8" until 2026-12-05; 4096 x 4096 itself passes the header check
    png_header_only(big, 4097, 4096)
    with pytest.raises(UserError) as e:
        load_upload(big)
    assert str(e.value) == ("the image is 4,097 x 4,096 = 16,781,312 pixels, above the limit of 16,777,216 (16.78 "
                            "megapixels); downscale it before uploading.")
    # between PIL's limit and twice it PIL only warns: that warning was "not an image PIL can read" (until 2026-12-05)
    assert Image.MAX_IMAGE_PIXELS < 12_000 * 12_000 < 2 * Image.MAX_IMAGE_PIXELS
    png_header_only(big, 12_000, 12_000)
    with pytest.raises(UserError, match=r"^the image is 12,000 x 12,000 = 144,000,000 pixels, above the limit"):
        load_upload(big)


def test_an_upload_far_longer_than_wide_is_refused_before_decoding(tmp_path):
    """A 1 x 1,000,000 PNG of 2 KB is 1 megapixel, within the limit, but the models scale its short side up to
    their input size: 10.2 GB of memory in a search by image (a reviewer's measurement, 2026-12-05). One side more
    than 50 times the other is refused; 50 times is taken."""
    thin = tmp_path / "thin.png"
    Image.new("1", (1, 1_000_000)).save(thin)
    assert thin.stat().st_size < 5_000
    with pytest.raises(UserError) as e:
        load_upload(thin)
    assert str(e.value) == ("the image is 1 x 1,000,000 pixels, one side more than 50 times the other, and the model "
                            "would scale its short side up to its input size; crop it before uploading.")
    Image.new("RGB", (500, 10), (200, 10, 10)).save(thin)
    assert load_upload(thin).size == (500, 10)


def test_byte_limit_non_images_and_corrupt_files(tmp_path):
    data = (GRADIO_IMAGES / "cheetah.jpg").read_bytes()
    small = UploadLimits(max_bytes=len(data) - 1)
    with pytest.raises(UserError, match="MiB"):
        load_upload(GRADIO_IMAGES / "cheetah.jpg", small)
    text = tmp_path / "notes.png"
    text.write_text("these are not pixels\n" * 10)
    with pytest.raises(UserError, match="not an image"):
        load_upload(text)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_upload(truncated)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_upload(empty)
    with pytest.raises(UserError, match="no image"):
        load_upload(None)
    ico = tmp_path / "x.ico"
    Image.new("RGB", (16, 16)).save(ico)
    with pytest.raises(UserError, match="not accepted"):
        load_upload(ico)


def test_deep_greyscale_is_scaled_and_multi_picture_jpegs_are_jpegs(tmp_path):
    """16-bit and float greyscale against the 8-bit image they encode (PIL's own conversion clipped them
    white or black); a JPEG that PIL reads as MPO (phone photos) is accepted as the JPEG it is."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    for name, arr in (("g16.png", grey.astype(np.uint16) * 257), ("g16.tif", grey.astype(np.uint16) * 257),
                      ("f.tif", grey.astype(np.float32) / 255), ("i32.tif", grey.astype(np.int32) * 257)):
        Image.fromarray(arr).save(tmp_path / name)
        got = np.asarray(load_upload(tmp_path / name))
        assert got.shape == (24, 40, 3) and np.abs(got.astype(int) - grey[..., None]).max() <= 1, name
    # a range that fits no convention is stretched to 0-255, order kept
    Image.fromarray(grey.astype(np.int32) * 1000 - 70_000).save(tmp_path / "wide.tif")
    got = np.asarray(load_upload(tmp_path / "wide.tif"))[..., 0].astype(int)
    assert got.min() == 0 and got.max() == 255 and np.abs(got - grey).max() <= 1
    colour = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "phone.jpg", format="MPO", quality=95, save_all=True,
                                 append_images=[Image.new("RGB", (20, 30))])  # a second picture, as phones add
    with Image.open(tmp_path / "phone.jpg") as im:
        assert im.format == "MPO"
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(load_upload(tmp_path / "phone.jpg")), want)


def test_every_event_that_runs_the_model_waits_for_its_one_worker(explorer):
    """The events whose functions run the steering session's model (written out here: the Steer page's, and the
    image search of neurons, which runs the vision tower) share one queue of one worker; the image search had
    Gradio's default of 4 beside it."""
    from app import ui
    from app.steer import SteerService

    demo = ui.build(explorer, steer=SteerService(explorer))
    runs_model = {"steer", "steer_load_image", "steer_upload_image", "steer_pick_latent", "search_neurons_by_image"}
    named = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in runs_model}
    assert set(named) == runs_model
    assert {(fn.api_name, fn.concurrency_id, fn.concurrency_limit) for fn in named.values()} == \
        {(name, "model", 1) for name in runs_model}
    # the patches box says where patch p is, for those who type them (the picture answers clicks only)
    rows, cols = explorer.bundle.manifest["model"]["grid"]
    box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "steer-patches")
    assert box.label == f"patches (empty = every token; row by row from 0 at the top left of the {rows} x {cols} grid)"


def test_the_steer_page_warns_of_an_sae_of_another_model(explorer, monkeypatch):
    """A bundle of a DINOv2 SAE steered LLaVA-1.5 on this page without a word (sae_core.steering.other_tower_warning
    tells the towers apart; tested in test_steering)."""
    from app import ui
    from app.steer import SteerService

    def intro():
        demo = ui.build(explorer, steer=SteerService(explorer))
        return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "steer-intro").value

    def shown():  # as the page reads it: the quoted spec's Markdown punctuation is backslashed
        return re.sub(r"\\(.)", r"\1", intro())

    assert "Warning" not in intro()
    monkeypatch.setitem(explorer.bundle.manifest["model"], "spec", "hf:/models/dinov2")
    assert shown().endswith("\n\n**Warning**: the SAE was trained on activations of hf:/models/dinov2, not of the "
                            f"vision tower of world:{explorer.bundle.world_dir}:llava, so its latents may mean nothing "
                            "there (a bundle built on that tower steers here).")
    # a spec is the bundle's text: a Markdown link in it was a live link on the page until 2026-12-05
    from markdown_it import MarkdownIt

    monkeypatch.setitem(explorer.bundle.manifest["model"], "spec", "hf:/m/[log in](https://example.com)<b>x</b>")
    rendered = MarkdownIt("commonmark").render(intro())
    assert "<a " not in rendered and "<b>x" not in rendered and "[log in](https://example.com)&lt;b&gt;x" in rendered
    # and of strengths in an old CLS-scored bundle's unit, its latents' largest CLS activation (test_bundle)
    monkeypatch.setattr(type(explorer.bundle), "strength_unit_problem", lambda self: "strength 1 is the CLS max")
    assert intro().endswith("\n\n**Warning**: strength 1 is the CLS max.")


def test_the_cache_sweep_deletes_only_unused_uploads_and_generated_files(tmp_path):
    """Uploads (Gradio's <sha256>/ folders and the empty tmp* file its upload route leaves for each) and generated
    files stayed for good: 10 uploads of 3 MB grew the cache by 32 MB. What nobody used for the age is deleted,
    a generated picture shown again counts as used, and nothing else in the folder is touched (written out)."""
    import os
    import time

    from app.render import ImageCache
    from app.server import sweep_cache

    cache, now, day = tmp_path / "cache", time.time(), 86400

    def put(rel, age_s):
        path = cache / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"" if rel.startswith("tmp") and "." not in rel and rel != "tmpfull1234" else b"x")
        os.utime(path, (now - age_s, now - age_s))

    old, new = "a" * 64, "b" * 64
    # tmp + 8 characters and empty: an upload's leftover; other tmp* names are the user's (until 2026-12-05 every
    # tmp* file went: "tmp_notes.txt", mktemp's "tmp.Xy3kP0aQ2b", "tmpfs-mounts.conf" in SAE_APP_CACHE=$HOME)
    for rel, age in ((f"{old}/photo.png", 2 * day), (f"{new}/photo.png", 2 * day), (f"{new}/second.png", 60),
                     ("tmpab12cd34", 2 * day), ("tmpfresh", 60), ("notes.txt", 2 * day), ("mine/data.npy", 2 * day),
                     ("tmp_notes.txt", 2 * day), ("tmp.Xy3kP0aQ2b", 2 * day), ("tmpfs-mounts.conf", 2 * day),
                     ("tmpfull1234", 2 * day),
                     ("generated/0123456789ab/old.png", 2 * day), ("generated/0123456789ab/new.png", 60),
                     ("generated/0123456789ab/.x.png.1.2.tmp", 60)):
        put(rel, age)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.png").write_bytes(b"x")
    os.utime(outside / "keep.png", (now - 2 * day, now - 2 * day))
    (cache / ("c" * 64)).symlink_to(outside, target_is_directory=True)
    images = ImageCache(cache / "generated", "bundle")
    shown = Path(images.get_or_make("neuron 3", lambda: Image.new("RGB", (2, 2))))
    os.utime(shown, (now - 2 * day, now - 2 * day))
    made = []
    assert images.get_or_make("neuron 3", lambda: made.append(1) or Image.new("RGB", (2, 2))) == str(shown)
    assert not made  # drawn once; shown again, it is used
    assert sweep_cache(cache, day) == 4  # both photo.png, tmpab12cd34, old.png
    left = sorted(str(q.relative_to(cache)) for q in cache.rglob("*") if q.is_file() or q.is_symlink())
    assert left == sorted([f"{new}/second.png", "tmpfresh", "notes.txt", "mine/data.npy", "c" * 64, "tmp_notes.txt",
                           "tmp.Xy3kP0aQ2b", "tmpfs-mounts.conf", "tmpfull1234",
                           "generated/0123456789ab/new.png", "generated/0123456789ab/.x.png.1.2.tmp",
                           str(shown.relative_to(cache))])
    assert (outside / "keep.png").exists() and not (cache / old).exists()


def test_the_cache_sweep_bounds_the_cache_by_size_least_recently_used_first(tmp_path):
    """Swept by age alone, a script walking every neuron at the paper's size (1.3 MB of pictures a page) would
    fill 87 GB within the day: beyond max_bytes the least recently used go, files outside the app's names never."""
    import os
    import time

    from app.server import sweep_cache

    cache, now = tmp_path / "cache", time.time()
    gen = cache / "generated" / "0123456789ab"
    gen.mkdir(parents=True)
    upload = cache / ("a" * 64)
    upload.mkdir()
    (cache / "notes.txt").write_bytes(b"n" * 5000)  # not the app's: kept whatever the bound
    ages = {gen / "p0.png": 50, gen / "p1.png": 40, upload / "u.png": 30, gen / "p2.png": 20, gen / "p3.png": 10}
    for path, minutes in ages.items():
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - 60 * minutes, now - 60 * minutes))
    assert sweep_cache(cache, 0, now=now, max_bytes=2500) == 3  # 5,000 bytes to 2,000: the three oldest
    assert sorted(p.name for p in cache.rglob("*.png")) == ["p2.png", "p3.png"] and (cache / "notes.txt").exists()
    assert sweep_cache(cache, 0, now=now, max_bytes=0) == 0  # no bound, no age: nothing goes
    assert sweep_cache(cache, 15 * 60, now=now) == 1  # the age bound alone, as before: p2 (20 minutes) goes


def test_the_cache_sweep_keeps_what_is_used_and_passes_over_what_it_may_not_delete(tmp_path, monkeypatch):
    """Until 2026-12-05: an upload steered on for an hour was swept first (its use never marked it used); a picture
    served between the sweep's listing and its deletions went (its listed age was read before); one file this
    user may not delete (another's, in a shared cache) stopped the whole sweep; and a picture folder removed after
    the start (a /tmp cleaner, once the sweep had emptied it) failed every page until a restart."""
    import os
    import time

    from app.render import ImageCache
    from app.server import sweep_cache
    from app.uploads import load_upload

    cache, now = tmp_path / "cache", time.time()
    gen = cache / "generated" / "0123456789ab"
    gen.mkdir(parents=True)
    upload = cache / ("a" * 64) / "photo.png"
    upload.parent.mkdir()
    Image.new("RGB", (4, 4), "red").save(upload)
    os.utime(upload, (now - 3600, now - 3600))
    pictures = [gen / f"p{i}.png" for i in range(3)]
    for minutes, path in zip((30, 20, 10), pictures):
        path.write_bytes(b"x" * upload.stat().st_size)
        os.utime(path, (now - 60 * minutes, now - 60 * minutes))
    load_upload(upload)  # steered on just now
    assert sweep_cache(cache, 0, max_bytes=3.5 * upload.stat().st_size) == 1
    assert upload.exists() and not pictures[0].exists()

    # a picture served while the sweep deletes is kept, the next least recently used goes instead
    older = gen / "q.png"
    older.write_bytes(b"x" * upload.stat().st_size)
    os.utime(older, (now - 60 * 25, now - 60 * 25))
    real_unlink = Path.unlink

    def unlink_while_serving(self, missing_ok=False):
        if self == older:
            os.utime(pictures[1])  # its page served just as the sweep took the least recently used file
        return real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink_while_serving)
    assert sweep_cache(cache, 0, max_bytes=1.5 * upload.stat().st_size) == 3
    monkeypatch.undo()
    assert pictures[1].exists() and not any(p.exists() for p in (older, pictures[2], upload))

    # a file it may not delete is passed over, and the rest is swept
    others = [gen / f"o{i}.png" for i in range(3)]
    for path in others:
        path.write_bytes(b"x")
        os.utime(path, (now - 2 * 86400, now - 2 * 86400))
    def unlink(self, missing_ok=False):
        if self == others[0]:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert sweep_cache(cache, 86400) == 2
    monkeypatch.undo()
    assert [p.exists() for p in others] == [True, False, False]

    # the picture folder removed after the start: made again at the next picture, and the next export
    images = ImageCache(cache / "generated", "bundle")
    for f in images.root.iterdir():
        f.unlink()
    images.root.rmdir()
    assert Path(images.get_or_make("neuron 3", lambda: Image.new("RGB", (2, 2)))).is_file()
    images.root.joinpath(os.listdir(images.root)[0]).unlink()
    images.root.rmdir()
    assert Path(images.write_text("neuron_3.json", "{}")).read_text() == "{}"


def test_a_transparent_palette_colour_reaches_the_model_as_its_pixels(tmp_path):
    """A palette PNG whose black is marked transparent: PIL kept the mark on the RGB image and transformers'
    processor painted every black pixel white, so extract, atlas and steer encoded another picture than the
    dataset's pixels (CLS activations off by 7.0 of 13.5). Reference: the same pixels saved opaque."""
    from transformers import CLIPImageProcessor

    from sae_core.datasets import load_rgb

    rng = np.random.default_rng(0)
    pal = Image.fromarray(rng.integers(0, 4, (32, 32), dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200] + [0] * 756)
    pal.save(tmp_path / "clear.png", transparency=0)
    pal.convert("RGB").save(tmp_path / "opaque.png")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = [processor(images=load_rgb(tmp_path / n), return_tensors="np")["pixel_values"] for n in ("clear.png", "opaque.png")]
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "clear.png")), np.asarray(load_rgb(tmp_path / "opaque.png")))
    assert np.array_equal(pixels[0], pixels[1])
    assert np.array_equal(np.asarray(load_upload(tmp_path / "clear.png")), np.asarray(load_rgb(tmp_path / "opaque.png")))


# ----------------------------------------------------------------------------------------------
# Input bounds and URL state
# ----------------------------------------------------------------------------------------------
def test_integer_bounds():
    assert inputs.integer("12", "neuron id", 0, 20) == 12
    assert inputs.integer(" #7 ", "neuron id", 0, 20) == 7
    assert inputs.integer(3.0, "neuron id", 0, 20) == 3
    assert inputs.integer("-0", "neuron id", 0, 20) == 0
    assert inputs.integer("+4", "neuron id", 0, 20) == 4  # as the library's ids (checked_index) read it
    for bad in (float("nan"), float("inf"), 2.5, "abc", "", None, True, 21, -1, "1e3",
                "--5", "\u00b2", "\u0663", "1" * 400, "9" * 5000, 1e300, 10**400):
        with pytest.raises(UserError) as e:
            inputs.integer(bad, "neuron id", 0, 20)
        assert len(str(e.value)) < 120, str(e.value)  # one short sentence, not the 400 digits back
    with pytest.raises(UserError, match="neuron id True is not an integer"):  # it said "is missing"
        inputs.integer(True, "neuron id", 0, 20)


def test_the_app_and_the_library_read_typed_ids_alike():
    """The app's id boxes and the library's ids (commands, API callers) read one text the same way: "#3" was
    refused by the library and "+3", another script's digits or "1_000" by the app (until 2026-12-05)."""
    from sae_core.errors import checked_index

    expected = {"3": 3, " 3 ": 3, "#3": 3, "# 3": 3, "+3": 3, "-0": 0, "007": 7, "19": 19,
                "\uff13": None, "\u0663": None, "\u00b2": None, "1_0": None, "3.0": None, "0x3": None,
                "3 4": None, "##3": None, "": None, "#": None, "-3": -3, "20": 20}
    for text, value in expected.items():
        for read in (lambda t: inputs.integer(t, "neuron id", 0, 19), lambda t: checked_index(t, "neuron", 20, "it has")):
            if value is None or not 0 <= value <= 19:
                with pytest.raises(UserError):
                    read(text)
            else:
                assert read(text) == value, text


def test_clamp_values_are_finite_and_bounded():
    assert inputs.clamp_value(3, 2.0) == (3.0, False)
    v, bounded = inputs.clamp_value(1e30, 2.0)
    assert bounded and v == inputs.CLAMP_FACTOR * 2.0
    v, bounded = inputs.clamp_value(-1e30, 2.0)
    assert bounded and v == -inputs.CLAMP_FACTOR * 2.0
    for bad in (float("nan"), float("inf"), "x", None):
        with pytest.raises(UserError):
            inputs.clamp_value(bad, 2.0)
    # numbers and the ASCII text of one are read; a bool, another script's digits or "1_000" are refused as the id
    # boxes refuse them (`integer_text`), where float() took True for 1, "\uff13" for 3 and "\u0661\u0662" for 12
    for given, want in (("2.5", (2.5, False)), (" -1e3 ", (-20.0, True)), ("+.5", (0.5, False)), (np.float32(1.5), (1.5, False)),
                        (np.int64(-3), (-3.0, False)), (10 ** 400, (20.0, True))):  # an int past a float's range is bounded
        assert inputs.clamp_value(given, 2.0) == want, given
    for bad in (True, False, np.bool_(True), "\uff13", "\u0661\u0662", "1_000", "0x10", "\u00b2", "2,5"):
        with pytest.raises(UserError) as e:
            inputs.clamp_value(bad, 2.0, "strength")
        assert str(e.value) == f"strength {bad!r} is not a number; give a number such as 5.".replace(
            "np.True_", "True"), bad
    # a pasted page is not echoed back whole (a 100,000-character strength came back in a 100,065-character message)
    for bad, why in (("x" * 100_000, "is not a number"), ("1" * 100_000, "is not a finite number")):
        with pytest.raises(UserError) as e:
            inputs.clamp_value(bad, 2.0, "strength")
        assert str(e.value) == f"strength '{bad[:36]}... {why}; give a number such as 5."


def test_int_lists_and_url_state_round_trip():
    assert inputs.int_list("3, 17 3 5", "patch", 0, 20, 5) == [3, 17, 5]
    with pytest.raises(UserError):
        inputs.int_list("1,2,3", "latent", 0, 9, 2)
    state = {"tab": "steer", "image": 4, "latents": [5, 9], "values": [4.0, 2.5], "patches": [1, 2],
             "keep_error": True, "question": "What colour is the shape? Use one word."}
    q = inputs.encode_state(state)
    from urllib.parse import parse_qsl

    back = inputs.decode_state(dict(parse_qsl(q)))
    assert back == {"tab": "steer", "image": "4", "latents": ["5", "9"], "values": ["4", "2.5"],
                    "patches": ["1", "2"], "keep_error": "1", "question": state["question"]}
    # flags are read by the page (`link_flag`): "maybe" was taken as false here, without a word
    assert inputs.decode_state({"keep_error": "maybe", "sweep": "0", "tokens": "30"}) == \
        {"keep_error": "maybe", "sweep": "0", "tokens": "30"}
    assert inputs.decode_state({"tab": "../../etc", "evil": "1"}) == {}
    q = inputs.encode_state({"tab": "hierarchy", "root": 3, "kind": "treemap"})
    assert q == "tab=hierarchy&root=3&kind=treemap"
    assert inputs.decode_state(dict(parse_qsl(q))) == {"tab": "hierarchy", "root": "3", "kind": "treemap"}


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
def test_patch_at_matches_brute_force():
    size, grid = (320, 200), (4, 5)
    for x in range(0, 320, 7):
        for y in range(0, 200, 9):
            want = min(3, y * 4 // 200) * 5 + min(4, x * 5 // 320)
            assert patch_at((x, y), size, grid) == want


def test_heat_overlay_reddens_the_hot_patch_only():
    img = Image.new("RGB", (32, 32), (0, 0, 255))
    heat = np.zeros(16, dtype=np.float32)
    heat[5] = 3.0  # row 1, column 1
    pic = np.asarray(heat_overlay(img, heat, (4, 4), vmax=3.0, size=160)).astype(int)
    assert pic.shape == (160, 160, 3)
    hot = pic[60, 60]      # centre of patch (1, 1) in a 40 px grid
    cold = pic[140, 140]   # patch (3, 3)
    assert hot[0] > 150 and hot[2] < 120
    assert tuple(cold) == (0, 0, 255)
    # the hot patch's centre is fully hot: blue blended with (255, 40, 0) at alpha 0.65 (within 5 levels:
    # pixel 60 is half a pixel off the centre of the bilinear mask, which falls off towards the neighbours)
    want = 0.35 * np.array([0, 0, 255]) + 0.65 * np.array([255, 40, 0])
    assert np.abs(hot - want).max() <= 5, (hot, want)


def test_ms_histogram_counts_every_scored_neuron_and_cuts_a_towering_bar():
    """Bars against np.histogram of each set (NaN left out, a negative MS in the bin below 0); raw
    neurons piled in one bin (as dense units are) are cut so the SAE's distribution stays readable."""
    rng = np.random.default_rng(0)
    sae = np.r_[rng.uniform(0.1, 0.95, 300), np.nan, -0.01]
    raw = np.r_[np.full(90, 0.26), rng.uniform(0.2, 0.4, 10)]
    fig = figures.ms_histogram(sae, raw)
    edges = np.arange(-0.025, 1.0 + 1e-9, 0.025)
    for trace, values in zip(fig.data, (sae, raw)):
        finite = values[np.isfinite(values)]
        want = 100 * np.histogram(finite, bins=edges)[0] / finite.size
        np.testing.assert_allclose(trace.y, want, atol=1e-9)
        np.testing.assert_allclose(trace.x, (edges[:-1] + edges[1:]) / 2)
    sae_peak = max(fig.data[0].y)
    assert max(fig.data[1].y) > 3 * sae_peak and fig.layout.yaxis.range == pytest.approx((0, 1.15 * sae_peak))
    note, = fig.layout.annotations
    assert note.text == f"raw neurons: {max(fig.data[1].y):.0f}%<br>at MS 0.250-0.275 (bar cut)"  # a phone's 36
    # under the axes (inside them it covered the bars on a phone, and the cut bar where it stood at the right)
    assert (note.yref, note.y, note.yanchor) == ("paper", 0, "top") and note.yshift < 0
    patch = figures.ms_histogram(sae, None, raw)
    assert patch.layout.annotations[0].text.startswith("SAE latents, by the max over patches: ")
    assert "<br>at MS 0.250-0.275" in patch.layout.annotations[0].text  # two lines: one is wider than a phone
    assert fig.layout.xaxis.range == (edges[0], edges[-1])  # the bins' (plotly's autorange ran to 2.8 at 342 px)
    even = figures.ms_histogram(sae, rng.uniform(0.1, 0.9, 100))  # no tower: nothing cut
    assert even.layout.yaxis.range is None and not even.layout.annotations


def test_the_spread_bounds_hold_numpys_quantiles_as_printed():
    """The header's "median at most B" against np.quantile of the scores the histogram counted, on random
    samples of many sizes, as printed (3 figures, rounded up), and never looser than the bin above the order
    statistic over the quantile. Until 2026-12-05 the bound was printed to the nearest (1.3138 "at most 1.31")
    and, where exactly half of an even count lay below a bin edge, was that edge (the median is the mean of the
    middle two); the reviewer's neuron 139: 45 of 90 scores below 1.3335, median 1.3378, "at most 1.33"."""
    from app.explorer import binned_quantile_bound, rounded_up
    from sae_core.atlas import LogHistogram

    rng = np.random.default_rng(0)
    hist = LogHistogram(1, 64, 8.0)
    hist.set_edges_from(np.array([20.0]))
    width = float(hist.edges[1] - hist.edges[0])
    for trial in range(3000):
        n = int(rng.integers(1, 120))
        scores = np.exp(rng.normal(rng.uniform(-2, 2), rng.uniform(0.01, 1.5), n))
        if trial % 3 == 0:  # half of an even count exactly below a bin edge, the other half above it
            edge = 10 ** float(hist.edges[int(rng.integers(10, 50))])
            n += n % 2
            scores = np.r_[edge * rng.uniform(0.8, 0.999, n // 2), edge * rng.uniform(1.001, 1.2, n // 2)]
        hist.counts[:] = 0
        hist.update(np.zeros(n, np.int64), scores)
        for q in (0.5, 0.9):
            bound = binned_quantile_bound(hist.counts[0], hist.edges, q, scores.max())
            x, above = np.quantile(scores, q), np.quantile(scores, q, method="higher")
            assert x <= float(rounded_up(bound)) and bound <= min(above * 10 ** width, scores.max()) * (1 + 1e-6), \
                (trial, q, x, bound)
    assert [rounded_up(v) for v in (1.3138, 1.33, 1.3301, 0.000777, 999.4, 2.0)] == \
        ["1.32", "1.33", "1.34", "0.000777", "1e+03", "2"]
    assert binned_quantile_bound(np.zeros(4, np.int64), hist.edges[:5], 0.5, 1.0) is None


def test_log_axis_ticks_are_whole_numbers_inside_the_range():
    """Against a brute-force list of every number m * 10**p (m = 1..9) in the range: the ticks are those
    with m in 1-2-5 (only 1 past 4 decades) when at least 3 are, else all of them, labelled in full."""
    def inside(lo, hi, ms):
        return [m * 10.0 ** p for p in range(-12, 12) for m in ms if lo <= np.log10(m * 10.0 ** p) <= hi]

    for lo, hi in [(-0.6, 0.4), (-0.3, -0.1), (-1.2, 0.9), (-3.1, 2.2), (-6, 0), (1.05, 1.3), (-0.2, 0.1)]:
        ticks = figures.log_ticks(lo, hi)
        want = next((v for ms in ([1], [1, 2, 5], range(1, 10)) if (ms != [1] or hi - lo > 4)
                     and len(v := inside(lo, hi, ms)) >= 3), inside(lo, hi, range(1, 10)))
        if len(want) < 2:
            assert ticks == {}, (lo, hi)
            continue
        np.testing.assert_allclose(ticks["tickvals"], want, rtol=1e-12)
        assert [float(t) for t in ticks["ticktext"]] == pytest.approx(want, rel=1e-12), ticks["ticktext"]
    assert figures.log_ticks(-0.6, 0.4)["ticktext"] == ["0.5", "1", "2"]  # not plotly's "5 1 2"


def test_tree_colours_patch_only_latents_by_their_patch_ms():
    # levels 0 and 1; node 3 has no MS by its image score but one by patches, node 4 has neither
    nodes = [{"id": 0, "level": 0, "parent": -1, "ms": 0.5}, {"id": 1, "level": 0, "parent": -1, "ms": None},
             {"id": 2, "level": 1, "parent": 0, "ms": 0.25}, {"id": 3, "level": 1, "parent": 1, "ms": None},
             {"id": 4, "level": 1, "parent": 1, "ms": None}]
    patch_ms = np.array([0.9, np.nan, 0.1, 0.75, np.nan, 0.3])
    tree = figures.hierarchy_figure(nodes, "sunburst", patch_ms)
    trace = tree.figure.data[0]
    colours = np.array(trace.marker.colors, dtype=np.float64)
    np.testing.assert_array_equal(colours[[0, 2, 3]], [0.5, 0.25, 0.75])  # the image score's MS wins where it exists
    assert np.isnan(colours[[1, 4]]).all()
    # the hover's MS is the colour's, as text; none for a node without one (plotly printed its colour as 0.000)
    assert [c[1] for c in trace.customdata] == ["MS 0.500", "no MS (fires on fewer than 2 images)", "MS 0.250",
                                                "MS by patches 0.750", "no MS (fires on fewer than 2 images)"]
    assert "%{customdata[1]}" in trace.hovertemplate and "%{color" not in trace.hovertemplate
    assert [int(c[0]) for c in trace.customdata] == [0, 1, 2, 3, 4]  # a click still reads the neuron id first
    assert (tree.levels, tree.nodes, tree.by_patches, tree.uncoloured) == (2, 5, 1, 2)
    plain = figures.hierarchy_figure(nodes, "treemap")
    assert (plain.by_patches, plain.uncoloured) == (0, 3)
    # a label read from the gallery by patches shows on hover where it differs from the node's own
    nodes[0]["label"], nodes[2]["label"] = "red", "ring"
    labelled = figures.hierarchy_figure(nodes, "sunburst", patch_ms, patch_labels=["red", "", "green", "star", None, "x"])
    assert [c[2] for c in labelled.figure.data[0].customdata] == ["", "", "<br>on patches: green",
                                                                  "<br>on patches: star", ""]
    assert "%{customdata[2]}" in labelled.figure.data[0].hovertemplate


def _contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two "#rrggbb" / "rgb(r, g, b)" / named (black, white) colours."""
    import re

    def lum(c):
        named = {"black": "#000000", "white": "#ffffff"}
        c = named.get(c, c)
        c = "#" + "".join(ch * 2 for ch in c[1:]) if c.startswith("#") and len(c) == 4 else c  # "#222"
        v = [int(c[i:i + 2], 16) for i in (1, 3, 5)] if c.startswith("#") else [float(x) for x in re.findall(r"[\d.]+", c)[:3]]
        f = [x / 255 / 12.92 if x / 255 <= 0.03928 else ((x / 255 + 0.055) / 1.055) ** 2.4 for x in v]
        return 0.2126 * f[0] + 0.7152 * f[1] + 0.0722 * f[2]
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_the_ms_histogram_is_given_in_words():
    """To a screen reader the MS histogram was an image of tick numbers, with no text form on the page (a
    reviewer's accessibility pass, 2026-12-05): each set's count, median and spread are written under the facts.
    Percentiles by linear interpolation between order statistics, worked out by hand here."""
    sae = np.array([0.5, np.nan, 0.1, 0.4, 0.2, 0.3])  # sorted 0.1 ... 0.5: q at (n - 1) p
    text = figures.ms_summary(sae, None, np.array([np.nan, np.nan]))
    assert text == ("**MS distribution** (the plot below, in words): SAE latents (5 scored): median 0.300, middle "
                    "half 0.200-0.400, 10th-90th percentile 0.140-0.460; SAE latents by patches: none scored.")
    assert "raw neurons (2 scored): median 0.250," in figures.ms_summary(sae, np.array([0.2, 0.3]))


def test_figure_text_and_the_theme_meet_wcag_contrast():
    """A reviewer's measurements (2026-12-05): 211 of the demo tree's 256 labels below WCAG's 4.5:1 (white on the
    Viridis greens, 2.9:1), every hover box 2.7-4.1:1 (white or #444 on the trace's colour), white on the primary
    buttons 2.8:1, the sliders' bounds and the footer 1.9:1. Checked here against the ratio's definition, on the
    colour scale's own stops interpolated by hand."""
    import plotly.colors as pc

    from app import probes, ui

    ms = np.r_[np.linspace(0, 1, 201), np.nan]
    nodes = [{"id": i, "level": 0, "parent": -1, "ms": None if np.isnan(m) else float(m)} for i, m in enumerate(ms)]
    trace = figures.hierarchy_figure(nodes, "sunburst").figure.data[0]
    stops = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in pc.sequential.Viridis]
    for m, text in zip(ms, trace.insidetextfont.color):
        if np.isnan(m):
            fill = "#444444"  # plotly's fill for a node without a colour (measured in Chromium)
        else:
            x = m * (len(stops) - 1)
            j = min(int(x), len(stops) - 2)
            fill = "rgb({}, {}, {})".format(*(a + (x - j) * (b - a) for a, b in zip(stops[j], stops[j + 1])))
        assert _contrast(text, fill) >= 4.5, (m, text, fill)
    counts, edges = np.array([3, 5, 2]), np.array([0.1, 1.0, 10.0, 100.0])
    layouts = [figures.ms_histogram(ms[:-1], None).layout.to_plotly_json(),
               figures.ms_frequency_scatter({"ms": ms[:-1], "frequency": np.full(201, 0.1), "level": np.zeros(201, int),
                                             "label": np.array(["x"] * 201)}).layout.to_plotly_json(),
               figures.hierarchy_figure(nodes).figure.layout.to_plotly_json(),
               figures.activation_histogram(counts, edges, 3)["layout"],
               probes.roc_figure({"a": {"auroc": 0.7}}, {"a": {"fpr": [0, 1], "tpr": [0, 1]}}, {"a"})["layout"]]
    for layout in layouts:
        box = layout["hoverlabel"]
        assert _contrast(box["font"]["color"], box["bgcolor"]) >= 4.5, layout.get("title")
    theme = ui.theme()
    resolve = lambda v: getattr(theme, v[1:]) if v.startswith("*") else v  # noqa: E731
    for fill in ("button_primary_background_fill", "button_primary_background_fill_dark"):
        assert _contrast(resolve(getattr(theme, fill)), resolve(theme.button_primary_text_color)) >= 4.5, fill
    assert _contrast(resolve(theme.body_text_color_subdued), "white") >= 4.5


def test_the_scatter_says_when_it_draws_a_sample(monkeypatch):
    """Above MAX_SCATTER_POINTS scored latents the scatter draws a sample: it showed 20,000 of 63,064 as if all."""
    cols = {"ms": np.r_[np.linspace(0, 1, 30), np.nan], "frequency": np.r_[np.full(30, 0.1), 0.2],
            "level": np.zeros(31, int), "label": np.array(["x"] * 31)}
    assert figures.ms_frequency_scatter(cols).layout.title.text == "MS versus firing frequency"
    monkeypatch.setattr(figures, "MAX_SCATTER_POINTS", 12)
    drawn = figures.ms_frequency_scatter(cols)
    assert drawn.layout.title.text == "MS versus firing frequency: a sample of 12 of 30"
    assert sum(len(t.x) for t in drawn.data) == 12


def test_tree_with_many_roots_draws_the_biggest_and_any_subtree_on_request():
    """A wide tree (K 65,536 has 4,096 roots) draws MAX_TREE_ROOTS roots, those with the most descendants
    (ties: lower id), with all their descendants and nobody else's; `root` draws one latent's subtree."""
    from sae_core.errors import UserError

    R = figures.MAX_TREE_ROOTS + 12
    rng = np.random.default_rng(0)
    n_children = rng.integers(0, 4, R)  # root r has n_children[r] children, each with one grandchild
    nodes, nid = [{"id": r, "level": 0, "parent": -1, "ms": 0.5} for r in range(R)], R
    family = {r: {r} for r in range(R)}
    for r in range(R):
        for _ in range(n_children[r]):
            nodes.append({"id": nid, "level": 1, "parent": r, "ms": 0.5})
            nodes.append({"id": nid + 1, "level": 2, "parent": nid, "ms": 0.5})
            family[r] |= {nid, nid + 1}
            nid += 2
    tree = figures.hierarchy_figure(nodes, "sunburst")
    want_roots = sorted(range(R), key=lambda r: (-len(family[r]), r))[:figures.MAX_TREE_ROOTS]
    drawn = {int(c[0]) for c in tree.figure.data[0].customdata}
    assert drawn == set().union(*(family[r] for r in want_roots))
    assert (tree.roots, tree.roots_total, tree.levels) == (figures.MAX_TREE_ROOTS, R, 3)
    assert all(p == "" or int(p) in drawn for p in tree.figure.data[0].parents)  # nobody hangs loose
    big = max(range(R), key=lambda r: len(family[r]))
    child = next(n["id"] for n in nodes if n["parent"] == big)
    sub_tree = figures.hierarchy_figure(nodes, "treemap", root=child)
    assert {int(c[0]) for c in sub_tree.figure.data[0].customdata} == {child, child + 1}
    assert (sub_tree.roots, sub_tree.levels, list(sub_tree.figure.data[0].parents)) == (1, 2, ["", str(child)])
    assert sub_tree.ancestors == [big] and figures.hierarchy_figure(nodes, root=child + 1).ancestors == [big, child]
    assert tree.ancestors == []
    small = figures.hierarchy_figure(nodes[:5], "sunburst")  # few roots: every one drawn
    assert (small.roots, small.roots_total, small.nodes) == (5, 5, 5)
    # labels inside the wedges while they can be read (plotly's fitting of 1,949 labels froze the page for seconds)
    assert small.figure.data[0].textinfo is None and tree.nodes <= figures.MAX_LABELLED_NODES
    many = [{"id": i, "level": 0, "parent": -1, "ms": 0.5} for i in range(figures.MAX_TREE_ROOTS)]
    many += [{"id": 100 + i, "level": 1, "parent": i % figures.MAX_TREE_ROOTS, "ms": 0.5}
             for i in range(figures.MAX_LABELLED_NODES)]
    crowded = figures.hierarchy_figure(many, "sunburst")
    assert crowded.nodes > figures.MAX_LABELLED_NODES and crowded.figure.data[0].textinfo == "none"
    with pytest.raises(UserError, match=f"latent {nid + 7} is not in the tree"):
        figures.hierarchy_figure(nodes, "sunburst", root=nid + 7)


# ----------------------------------------------------------------------------------------------
# The data layer on the tiny bundle
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explorer(tiny_bundle, tmp_path_factory):
    return Explorer(open_bundle(tiny_bundle), tmp_path_factory.mktemp("app_cache"))


def test_a_plain_page_load_leaves_every_typed_box_alone(explorer):
    """Every page load wrote the number boxes whose values the app checks itself (`as_sent`: the Images and Neuron
    ids, the Steer image and latents, the filter's support and rows, the subtree) their first values: a user who
    had typed meanwhile saw it replaced when the server answered late (a CI dry run's browser test: "2.5" typed,
    image 0 opened). Only a link to the box's page restores it now: no load step writes such a box, and each
    step that does, in a chain started by a load, runs only on the success of a step with no outputs (which
    refuses, silently, any other link)."""
    from app import ui
    from app.steer import SteerService

    demo = ui.build(explorer, steer=SteerService(explorer))
    # as_sent sets preprocess on the instance; the hidden box of the neuron shown is as_sent for the API's callers
    # (/neuron_export), and nobody types in it
    typed = {i for i, block in demo.blocks.items() if "preprocess" in vars(block) and block.visible is not False}
    elems = {demo.blocks[i].elem_id for i in typed}
    assert "shown-neuron" not in elems
    assert {"image-id", "neuron-id", "steer-image-index", "steer-latent-1", "tree-root"} <= elems, elems
    deps = {d["id"]: d for d in demo.config["dependencies"]}

    def root(d):
        return root(deps[d["trigger_after"]]) if d.get("trigger_after") is not None else d

    on_load = [d for d in deps.values() if any(event == "load" for _, event in root(d)["targets"])]
    writers = [d for d in on_load if typed & set(d["outputs"])]
    assert {demo.blocks[i].elem_id for d in writers for i in typed & set(d["outputs"])} >= elems - {None}
    for d in writers:
        assert d.get("trigger_after") is not None and d["trigger_only_on_success"], d
        step = d
        while step.get("trigger_after") is not None and step["outputs"]:
            step = deps[step["trigger_after"]]
        assert step["outputs"] == [], d
    # and every load step with a server function is queued: steps sent outside the queue at load made the browser
    # open a second event stream that could stay open (6 of 20 page loads never went idle)
    assert all(d["queue"] for d in on_load if d["backend_fn"]), [d["id"] for d in on_load if not d["queue"]]


def page_load(demo, query: dict) -> dict:
    """What the page-load chains without inputs write for an address, run as Gradio runs them (a chain goes on
    after a step only when it returned; an error stops it): {component id: last value written}."""
    import inspect

    import gradio as gr

    class Request:
        query_params = query

    deps = demo.config["dependencies"]
    written = {}

    def run(d):
        if d["inputs"]:
            return  # a step that reads the page (the Steer page's model call): not a restore
        fn = demo.fns[d["id"]].fn
        if fn is None:
            return  # javascript only
        try:
            out = fn(Request()) if inspect.signature(fn).parameters else fn()
        except gr.Error:
            return
        out = out if isinstance(out, tuple) else (out,)
        # an empty gr.update() changes nothing on the page
        written.update((i, v) for i, v in zip(d["outputs"], out) if not (isinstance(v, dict) and set(v) == {"__type__"}))
        for nxt in deps:
            if nxt.get("trigger_after") == d["id"]:
                run(nxt)

    for d in deps:
        if d.get("trigger_after") is None and any(event == "load" for _, event in d["targets"]):
            run(d)
    return written


def test_a_link_opens_its_tab_with_what_it_restores(explorer):
    """The tab a link names is opened, with what the link restores, whether or not the app can steer (the Steer
    tab of an app without a model is opened by a ?tab=steer link too, its reason shown); a plain load opens no tab
    and writes no number box (see above)."""
    from app import ui
    from app.steer import SteerService

    def selected(written, demo):
        tabs = next(i for i, b in demo.blocks.items() if type(b).__name__ == "Tabs")
        v = written.get(tabs)
        return getattr(v, "selected", None) or (v.get("selected") if isinstance(v, dict) else None)

    for steer in (SteerService(explorer), None):
        demo = ui.build(explorer, steer=steer)
        box = {b.elem_id: i for i, b in demo.blocks.items() if b.elem_id}
        for query, tab in (({"tab": "steer", "image": "3"}, "steer"), ({"tab": "images", "image": "4"}, "images"),
                           ({"neuron": "5", "tab": "overview"}, "overview"), ({"tab": "neuron", "neuron": "6"}, "neuron"),
                           ({"tab": "hierarchy"}, "hierarchy"), ({}, None)):
            written = page_load(demo, query)
            assert selected(written, demo) == tab, (steer, query)
            if query.get("neuron"):
                assert written[box["neuron-id"]] == int(query["neuron"])
            if query.get("image") and (tab != "steer" or steer):
                assert written[box["image-id" if tab == "images" else "steer-image-index"]] == int(query["image"])
        typed = {i for i, b in demo.blocks.items() if "preprocess" in vars(b)}
        assert not typed & set(page_load(demo, {}))
        # a filter's link leaves the search box alone: it wrote "", over a search typed before it was answered
        written = page_load(demo, {"tab": "neurons", "label": "red"})
        label_box = next(i for i, b in demo.blocks.items() if str(getattr(b, "label", "")).startswith("label contains"))
        assert box["neuron-query"] not in written and written[label_box] == "red"


def test_a_steer_link_reproduces_the_answer_length_and_the_sweep(explorer):
    """The address the Steer button writes holds the answer's length and the sweep (`tokens`, `sweep`), and so does
    the one the page's other events write (`steer_address`); opened, it restores every control the answer came
    from. Until 2026-12-05 both were lost, so the link answered with 5 tokens and a sweep: another answer."""
    from urllib.parse import parse_qsl

    import gradio as gr

    from app import ui
    from app.steer import SteerService

    demo = ui.build(explorer, steer=SteerService(explorer))
    steer = next(f.fn for f in demo.fns.values() if f.api_name == "steer")
    address = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "steer_address")
    box = {b.elem_id: i for i, b in demo.blocks.items() if b.elem_id}
    labelled = {(type(b), b.label): i for i, b in demo.blocks.items() if getattr(b, "label", None)}
    sweep, tokens = labelled[gr.Checkbox, "strength sweep"], labelled[gr.Slider, "answer tokens"]
    keep_error = labelled[gr.Checkbox, "keep the SAE error term"]
    k = int(np.argmax(explorer.bundle.array("max_act")))
    slots = (k, 2.5, -1, 4.0, -1, 4.0)
    answered = steer(2, None, *slots, "3,0", True, "Describe the image.", False, 30)
    assert answered[3] == []  # no sweep ran
    link = answered[6]
    assert address(2, *slots, "3,0", True, "Describe the image.", False, 30) == link
    state = dict(parse_qsl(link))
    assert (state["tokens"], state["sweep"], state["keep_error"]) == ("30", "0", "1"), link
    restored = page_load(demo, state)
    assert (restored[tokens], restored[sweep], restored[keep_error]) == (30, False, True)
    assert (restored[box["steer-image-index"]], restored[box["steer-latent-1"]], restored[box["steer-value-1"]],
            restored[box["steer-patches"]], restored[box["steer-question"]]) == (2, k, 2.5, "0,3", "Describe the image.")
    # the defaults too, as the page's other events write them (a load, a patch click)
    link = address("2", str(k), 4.0, "-1", 4.0, -1, 4.0, "", False, "", True, 5)
    assert dict(parse_qsl(link))["sweep"] == "1" and dict(parse_qsl(link))["tokens"] == "5", link
    restored = page_load(demo, dict(parse_qsl(link)))
    assert (restored[tokens], restored[sweep], restored[keep_error]) == (5, True, False)


def test_a_links_flags_read_one_rule_and_a_bad_field_is_warned_about(explorer):
    """A link's yes/no fields (keep_error, sweep, desc) read 1/true/yes/on and 0/false/no/off; anything else is
    warned about and left at its default, as an unknown drawing and an unknown tab are, one warning each. Until
    2026-12-05 `keep_error=maybe` and `desc=maybe` read as no, `kind=pie` drew the sunburst and `tab=bogus` opened
    the Overview, all without a word; the filter's warnings read "...between 1 and 500.; it is left at its default"."""
    import warnings

    import gradio as gr

    from app import ui
    from app.steer import SteerService

    for word, want in (("1", True), ("true", True), (" Yes ", True), ("ON", True), ("0", False), ("false", False),
                       ("no", False), ("Off", False)):
        assert inputs.link_flag(word, "sweep") is want
    for bad in ("maybe", "", "2", "y"):
        with pytest.raises(UserError) as e:
            inputs.link_flag(bad, "sweep")
        assert str(e.value) == f"sweep {bad!r} is neither yes nor no; give 1 or 0 (true/false, yes/no, on/off also do)."

    demo = ui.build(explorer, steer=SteerService(explorer))
    labelled = {(type(b), b.label): i for i, b in demo.blocks.items() if getattr(b, "label", None)}
    sweep, tokens = labelled[gr.Checkbox, "strength sweep"], labelled[gr.Slider, "answer tokens"]
    keep_error, desc = labelled[gr.Checkbox, "keep the SAE error term"], labelled[gr.Checkbox, "descending"]
    drawing, latent = labelled[gr.Radio, "drawing"], labelled[gr.Number, "latent 1 (-1 = unused)"]
    tabs = next(i for i, b in demo.blocks.items() if isinstance(b, gr.Tabs))
    lost = "part of the link could not be restored: "
    flag_words = "is neither yes nor no; give 1 or 0 (true/false, yes/no, on/off also do); it is left at its default"

    def load(query):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            written = page_load(demo, query)
        return written, [str(w.message) for w in caught if "link" in str(w.message)]

    written, said = load({"tab": "steer", "latents": "3", "keep_error": "yes", "sweep": "off", "tokens": "7"})
    assert (written[keep_error], written[sweep], written[tokens], written[latent], said) == (True, False, 7, 3, [])
    written, said = load({"tab": "steer", "latents": "3", "keep_error": "maybe", "sweep": "x", "tokens": "99"})
    assert (written[keep_error], written[sweep], written[tokens], written[latent]) == (False, True, 5, 3)
    assert said == [f"{lost}keep_error 'maybe' {flag_words}", f"{lost}sweep 'x' {flag_words}",
                    f"{lost}answer tokens 99 is out of range; give an integer between 1 and 64; it is left at its default"]
    written, said = load({"tab": "neurons", "desc": "no"})
    assert (written[desc], said) == (False, [])
    written, said = load({"tab": "neurons", "desc": "maybe", "rows": "0"})
    assert written[desc] is True
    assert said == [f"{lost}descending 'maybe' {flag_words}",
                    f"{lost}row limit 0 is out of range; give an integer between 1 and 500; it is left at its default"]
    written, said = load({"tab": "neurons", "sort": "x" * 900, "min_ms": "y" * 900})  # a pasted page is not said back
    assert said == [f"{lost}the minimum MS '{'y' * 36}... is not a number between 0 and 1; it is "
                    "left at its default", f"{lost}the sort column '{'x' * 36}... is not one "
                    f"of {', '.join(explorer.table_sorts)}; it is left at its default"]
    written, said = load({"tab": "hierarchy", "kind": "treemap"})
    assert (written[drawing], said) == ("treemap", [])
    written, said = load({"tab": "hierarchy", "kind": "pie"})
    assert written[drawing] == "sunburst"
    assert said == [f"{lost}the drawing 'pie' is not one of sunburst, treemap; it is left at its default"]
    written, said = load({"tab": "bogus"})
    assert tabs not in written
    assert said == [f"{lost}the tab 'bogus' is not one of overview, neurons, neuron, images, hierarchy, steer; it is "
                    "left at its default"]
    assert load({"tab": "images"})[1] == [] and load({})[1] == []


def test_on_link_goes_on_only_for_its_links():
    """`on_link`'s step: silent refusal (a hidden gr.Error) for any other address, nothing for its own."""
    import gradio as gr

    from app import ui

    with gr.Blocks() as demo:
        ui.on_link(demo, lambda state: state.get("tab") == "images")
    check = demo.fns[0].fn

    class Request:
        def __init__(self, query):
            self.query_params = query

    assert check(Request({"tab": "images", "image": "3"})) is None
    for query in ({}, {"tab": "neuron"}, {"image": "3"}):
        with pytest.raises(gr.Error) as e:
            check(Request(query))
        assert e.value.visible is False


def test_pictures_show_what_the_model_sees_and_the_index_picks_the_image(explorer, tmp_path):
    """A wide upload: the model (CLIP's processor: shortest side, centre crop) sees its blue centre square
    only, so the Steer page's picture, the patch grid drawn on it and the click-to-patch map show that
    square, not the red sides; the index box picks a dataset image over an upload left in its box."""
    from app.steer import STEER_PICTURE, SteerService

    assert explorer.view == {"resize": {"shortest_edge": 32}, "crop": {"height": 32, "width": 32}}  # its processor
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (100, 0, 200, 100))
    path = tmp_path / "wide.png"
    wide.save(path)
    svc = SteerService(explorer)
    pil, key, where = svc.image(-1, path)
    assert pil.size == (300, 100) and key is pil and where == {"image": None}  # the model gets the whole upload
    with Image.open(svc.picture(pil)) as pic:
        assert pic.size == svc.picture_size(pil) == (STEER_PICTURE, STEER_PICTURE)
        rgb = np.asarray(pic.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 200) & (rgb[..., 2] < 60)
    assert red.mean() < 0.001 and ((rgb[..., 2] > 200) & (rgb[..., 0] < 60)).mean() > 0.9
    rows, cols = explorer.grid  # the top-right corner of the picture is the last patch of the first row
    assert patch_at((STEER_PICTURE - 1, 0), svc.picture_size(pil), explorer.grid) == cols - 1
    # a sliver (2000 x 10) draws, its selected patches marked, instead of failing on cells under 3 px
    sliver = Image.new("RGB", (2000, 10), (0, 255, 0))
    with Image.open(svc.picture(sliver, selected=[0, rows * cols - 1])) as pic:
        assert pic.size == (STEER_PICTURE, STEER_PICTURE)
    # the index box: >= 0 is that dataset image even with an upload still in the box; -1 is the upload
    img, key, where = svc.image(3, path)
    assert key == 3 and where == {"image": 3} and img.size == explorer.bundle.image(3).size
    assert svc.image("-1", path)[2] == {"image": None}
    with pytest.raises(UserError, match="no image chosen"):
        svc.image(-1, None)
    with pytest.raises(UserError, match="between -1 and"):
        svc.image(-2, path)


def test_only_minus_one_leaves_a_latent_slot_unused(explorer):
    """-1 (as a number or text) or nothing is an unused slot, as the box says ("-1 = unused"); any other negative id
    is refused in check_neuron's sentence (until 2026-12-05 -5, -1e300 or "-7" were taken as unused)."""
    from app.steer import SteerService

    svc = SteerService(explorer)
    for unused in (-1, -1.0, np.int64(-1), "-1", " -1 ", None, ""):
        assert svc.clamps([3, unused], [2.0, 4.0])[0] == [3], unused
    n = explorer.n_neurons
    for bad, sentence in ((-5, f"neuron id -5 is out of range; give an integer between 0 and {n - 1}."),
                          (-1e300, f"neuron id -1e+300 is out of range; give an integer between 0 and {n - 1}."),
                          ("-7", f"neuron id -7 is out of range; give an integer between 0 and {n - 1}."),
                          (-1.5, f"neuron id -1.5 is not an integer; give an integer between 0 and {n - 1}.")):
        with pytest.raises(UserError) as e:
            svc.clamps([3, bad], [2.0, 4.0])
        assert str(e.value) == sentence


def test_a_bundle_without_its_dataset_steers_uploads_only(explorer, tmp_path, monkeypatch):
    """Where the dataset cannot be opened, a dataset image is refused with the way out the page offers (the
    bundle's sentence advised a command-line flag); an upload still steers."""
    from app.steer import SteerService

    monkeypatch.setitem(explorer.__dict__, "dataset_error", "image folder /data/x does not exist.")
    svc = SteerService(explorer)
    with pytest.raises(UserError, match=r"dataset image 3 cannot be steered here, as the bundle's dataset cannot be "
                                        r"opened \(image folder /data/x does not exist\); upload an image instead\."):
        svc.image(3, None)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "up.png")
    assert svc.image(-1, tmp_path / "up.png")[2] == {"image": None}


def test_the_sweep_is_in_strength_units_whatever_the_sliders_say(explorer, monkeypatch):
    """The sweep's rows are 0, 0.5, ... x each latent's strength unit (its largest activation on one token):
    the same clamps at slider strength 0 (an ablation) as at 4; they were raw values at strength 0."""
    from app.steer import SWEEP_STRENGTHS, SteerService

    svc = SteerService(explorer)
    session = svc.session()
    asked = []
    monkeypatch.setattr(session, "sweep", lambda image, latents, values_list, **kw: (
        asked.append(values_list), [(v, "x") for v in values_list])[1])
    monkeypatch.setattr(SteerService, "scores", staticmethod(lambda *a: {}))
    units = np.asarray(explorer.bundle.array("token_max"), np.float64)
    k1, k2 = int(np.argmax(units)), int(np.argmin(np.where(units > 0, units, np.inf)))  # the largest, the smallest
    for strengths in ([0.0, 0.0], [4.0, 1.5]):
        out = svc.steer(2, [k1, k2], strengths, None, False, "", True, 2)
        assert [row[0] for row in out["sweep"]] == list(SWEEP_STRENGTHS)
        np.testing.assert_allclose(asked[-1], [[st * units[k1], st * units[k2]] for st in SWEEP_STRENGTHS], rtol=1e-6)


def test_the_header_shows_no_negative_zero_and_the_unit_steering_uses(explorer):
    """A label score of -0.0004 read "-0.00"; a latent that never fires said its strength 1 was 0 while
    the Steer page clamps it to 1.0 raw (Bundle.strength_units)."""
    k = explorer.default_neuron
    page = dict(explorer.bundle.neuron(k), label="red", label_score=-0.0004, token_max=0.0)
    header = explorer.neuron_summary(k, page)
    assert "score 0.00" in header and "-0.00" not in header
    assert "**never fires on a token** (the Steer page's strength 1 = 1.0 raw)" in header
    silent = np.flatnonzero(np.asarray(explorer.bundle.array("token_max")) <= 0)
    assert (explorer.bundle.strength_units()[silent] == 1.0).all()  # what the header now says


def test_the_header_names_a_matryoshka_level_only_where_there_are_levels(explorer, monkeypatch):
    """A relu SAE's neurons each read "Matryoshka level 0 (a root) · 0 children"."""
    k = explorer.default_neuron
    page = explorer.bundle.neuron(k)
    assert len(explorer.levels) > 1 and f"- **Matryoshka level** {page['group']}" in explorer.neuron_summary(k, page)
    monkeypatch.setattr(explorer, "levels", [0])
    assert "Matryoshka" not in explorer.neuron_summary(k, page)


def test_table_filters_and_sorts_like_numpy(explorer, tiny_bundle):
    ms = np.load(Path(tiny_bundle) / "neurons" / "ms.npy")
    support = np.load(Path(tiny_bundle) / "neurons" / "support.npy")
    group = np.load(Path(tiny_bundle) / "neurons" / "group.npy")
    df = explorer.table(min_ms=0.3, min_support=5, level=1, sort_by="ms", descending=True, limit=500)
    want = [k for k in range(len(ms)) if np.isfinite(ms[k]) and ms[k] >= 0.3 and support[k] >= 5 and group[k] == 1]
    want.sort(key=lambda k: -ms[k])
    assert df["neuron"].tolist() == want
    asc = explorer.table(sort_by="support", descending=False, limit=10)
    assert asc["support"].tolist() == sorted(support.tolist())[:10]
    with pytest.raises(UserError):
        explorer.table(sort_by="; drop table")


def test_neuron_record_and_gallery_follow_the_bundle(explorer, tiny_bundle):
    root = Path(tiny_bundle) / "neurons"
    top_images, top_acts = np.load(root / "top_images.npy"), np.load(root / "top_acts.npy")
    k = int(np.argmax(np.load(root / "support.npy")))
    rec = explorer.neuron_record(k)
    json.dumps(rec)  # JSON-able: no NaN, no numpy types
    want = [int(i) for i in top_images[k] if i >= 0]
    assert [t["image"] for t in rec["top"]] == want
    assert np.allclose([t["act"] for t in rec["top"]], top_acts[k][: len(want)], atol=1e-4)
    gallery = explorer.gallery(k)
    assert len(gallery) == len(want)
    for (path, caption), img_id in zip(gallery, want):
        assert Path(path).parent == explorer.images.root and caption.startswith(f"#{img_id} ")
        with Image.open(path) as im:
            assert im.size == (160, 160)
    # the header names the label's method; its whole description is the Overview's, once
    method = json.loads((root / "labels.json").read_text())["method"]
    header = explorer.neuron_summary(k, explorer.bundle.neuron(k))
    assert f"method {method.split(':')[0]}, described on the Overview" in header and method not in header and len(method) > 100
    assert explorer.facts()["labels"] == method
    # band strips: one per non-empty band, all of one size (a gallery stretches each to its width), also
    # for a neuron whose lower bands hold fewer images than the band size
    all_bands = np.load(root / "band_images.npy")
    counts = (all_bands >= 0).sum(2)
    k = int(np.flatnonzero(((counts > 0) & (counts < all_bands.shape[2])).any(1))[0])
    bands = all_bands[k]
    strips = explorer.band_gallery(k)
    assert len(strips) == int((bands >= 0).any(1).sum())
    sizes = set()
    held = np.load(root / "band_counts.npy")[k]  # the firing images in each band, of which the strip is a sample
    assert held.sum() == explorer.bundle.neuron(k)["support"] and explorer.neuron_record(k)["band_counts"] == held.tolist()
    band_acts = np.load(root / "band_acts.npy")[k]
    for (path, caption), band, acts, n in zip(strips, *(x[(bands >= 0).any(1)] for x in (bands, band_acts, held))):
        shown = int((band >= 0).sum())
        # the range of a sample is said to be the sample's: the band holds images above and below it
        acts = acts[band >= 0]
        act = f"act {acts.min():.3g} to {acts.max():.3g}"
        said = f": {shown} of {n:,} images, these {act}" if n > shown else f": {shown} image{'s' if shown > 1 else ''}, {act}"
        assert caption.startswith("band ") and said in caption, (caption, n)
        with Image.open(path) as im:
            sizes.add(im.size)
    assert sizes == {(bands.shape[1] * 100 - 4, 96)}  # band size x (96 px tile + 4 px gap) - the last gap
    # each sample's best patch is outlined in yellow: the outline's corner in the patch's grid cell
    rows, cols = explorer.grid
    patches = np.load(root / "band_patch.npy")[k][(bands >= 0).any(1)]
    for (path, _), pos in zip(strips, patches):
        with Image.open(path) as im:
            for j, p in enumerate(pos[pos >= 0] - explorer.n_prefix):
                r, c = divmod(int(p), cols)
                cell = 96 // cols
                assert im.getpixel((j * 100 + c * cell, r * cell)) == (255, 255, 0)
                assert im.getpixel((j * 100 + c * cell + cell // 2, r * cell + cell // 2)) != (255, 255, 0)
    assert (patches >= 0).sum() > 0
    with pytest.raises(UserError):
        explorer.neuron_record(explorer.n_neurons)
    with pytest.raises(UserError):
        explorer.neuron_record(float("nan"))


def test_overview_metrics_show_every_figure_once_with_a_name(explorer, tiny_bundle, monkeypatch):
    """Each numeric figure of the manifest's metrics and of world.json is one row (world bundles repeat
    some figures in both files), under a readable name, formatted from the file's value."""
    root = Path(tiny_bundle)
    metrics = json.loads((root / "manifest.json").read_text())["metrics"]
    world = json.loads((root / "world.json").read_text())
    figures = {k for d in (metrics, world) for k, v in d.items()
               if isinstance(v, (int, float, list)) and not isinstance(v, bool)}
    rows = dict(explorer.metrics_rows())
    assert len(rows) == len(explorer.metrics_rows()) == len(figures)
    assert not any("_" in name for name in rows)  # no bare keys such as dead_frac_images
    assert rows["FVU (fraction of variance unexplained)"] == f"{metrics['fvu']:.4f}"
    assert rows["dead latents: never fire on the measured tokens"] == f"{100 * metrics['dead_frac']:.2f}%"
    ms = np.load(root / "neurons" / "ms.npy")
    assert rows["SAE latents without an MS (fire on fewer than 2 images)"] == f"{int(np.isnan(ms).sum())} of {ms.size}"
    depth = rows["ground truth: taxonomy depth per Matryoshka level, coarse to fine"].split(", ")
    assert np.allclose([float(d) for d in depth], metrics["hierarchy_depth"], atol=0.005)
    assert rows["ground truth: agreement of MS with simulated users, raw neurons"] == f"{world['ms_agreement_raw']:.4f}"
    # a figure a newer atlas adds still shows, under its key
    monkeypatch.setitem(explorer.bundle.manifest["metrics"], "new_figure", 0.123456)
    assert dict(explorer.metrics_rows())["new_figure"] == "0.1235"


# ----------------------------------------------------------------------------------------------
# Settings and start-up
# ----------------------------------------------------------------------------------------------
def test_settings_from_env_and_flags(monkeypatch, tmp_path):
    from app.settings import AppSettings

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("SAE_APP_BUNDLE", str(tmp_path / "b"))
    monkeypatch.setenv("SAE_APP_DEVICE", "cuda:1")
    monkeypatch.setenv("SAE_APP_LOAD_4BIT", "1")
    monkeypatch.setenv("SAE_APP_PORT", "8123")
    s = AppSettings.from_env()
    assert (s.bundle, s.device, s.load_4bit, s.port) == (tmp_path / "b", "cuda:1", True, 8123)
    assert s.steering_device() == "cuda:1"
    # a device that is not here, or 4 bits without CUDA, are refused at start where the bundle steers (every
    # Steer request failed); a bundle that only browses needs no device
    for device, message in (("bogus", "bogus is not a device"), ("cuda:2", "names a GPU that is not here"),
                            ("cpu", "4-bit loading .* needs a CUDA GPU")):
        monkeypatch.setenv("SAE_APP_DEVICE", device)
        with pytest.raises(UserError, match=message):
            AppSettings.from_env().steering_device()
    monkeypatch.setenv("SAE_APP_DEVICE", "cuda:1")
    # limits that are not positive finite numbers (inf was a traceback, -5 refused every upload)
    for name in ("SAE_APP_MAX_UPLOAD_MB", "SAE_APP_MAX_UPLOAD_MEGAPIXELS"):
        for bad in ("inf", "1e400", "-5", "0", "nan", "ten"):
            monkeypatch.setenv(name, bad)
            with pytest.raises(UserError, match=f"{name}=.* is not a positive finite number"):
                AppSettings.from_env()
        monkeypatch.delenv(name)
    monkeypatch.setenv("SAE_APP_MAX_UPLOAD_MB", "0.5")
    assert AppSettings.from_env().limits.max_bytes == 2**19
    monkeypatch.delenv("SAE_APP_MAX_UPLOAD_MB")
    with pytest.raises(UserError, match="port 0 is out of range"):
        AppSettings.from_env(port=0)
    assert AppSettings.from_env(port=9000, bundle=tmp_path / "c").port == 9000
    monkeypatch.setenv("SAE_APP_PORT", "eighty")
    with pytest.raises(UserError, match="port"):
        AppSettings.from_env()
    monkeypatch.setenv("SAE_APP_PORT", "8123")
    assert s.sessions == 500
    monkeypatch.setenv("SAE_APP_SESSIONS", "40")
    assert AppSettings.from_env().sessions == 40
    for bad in ("0", "-3", "many", "2.5"):
        monkeypatch.setenv("SAE_APP_SESSIONS", bad)
        with pytest.raises(UserError, match="SAE_APP_SESSIONS"):
            AppSettings.from_env()
    monkeypatch.delenv("SAE_APP_SESSIONS")
    assert s.cache_hours == 24
    monkeypatch.setenv("SAE_APP_CACHE_HOURS", "0.5")
    assert AppSettings.from_env().cache_hours == 0.5
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv("SAE_APP_CACHE_HOURS", bad)
        with pytest.raises(UserError, match=rf"^SAE_APP_CACHE_HOURS='{bad}' is not a number of hours of 0 or more"):
            AppSettings.from_env()
    monkeypatch.delenv("SAE_APP_CACHE_HOURS")
    assert s.cache_gb == 10
    monkeypatch.setenv("SAE_APP_CACHE_GB", "0.5")
    assert AppSettings.from_env().cache_gb == 0.5
    for bad in ("-1", "lots", "inf"):
        monkeypatch.setenv("SAE_APP_CACHE_GB", bad)
        with pytest.raises(UserError, match=rf"^SAE_APP_CACHE_GB='{bad}' is not a number of GB of 0 or more"):
            AppSettings.from_env()
    monkeypatch.delenv("SAE_APP_CACHE_GB")
    # a yes/no variable is yes or no: "maybe" (or a typo of "true") loaded the steering model in full size, silently
    for value, meant in (("TRUE", True), (" on ", True), ("0", False), ("No", False), ("", False)):
        monkeypatch.setenv("SAE_APP_LOAD_4BIT", value)
        assert AppSettings.from_env().load_4bit is meant, value
    for bad in ("maybe", "ture", "2"):
        monkeypatch.setenv("SAE_APP_LOAD_4BIT", bad)
        with pytest.raises(UserError, match=rf"^SAE_APP_LOAD_4BIT='{bad}' is neither yes nor no; set it to 1 or 0"):
            AppSettings.from_env()
    # the steering LLaVA's precision (the app had only 4-bit or auto; an H100 could not ask for fp16)
    monkeypatch.delenv("SAE_APP_LOAD_4BIT")
    monkeypatch.setenv("SAE_APP_PRECISION", "FP16")
    assert AppSettings.from_env().steering_precision == "fp16"
    assert AppSettings.from_env(precision="bf16").steering_precision == "bf16"  # the flag wins
    assert AppSettings.from_env(precision="auto", load_4bit=True).steering_precision == "4bit"
    with pytest.raises(UserError, match=r"^precision 'fp8' \(--precision or SAE_APP_PRECISION\) is not one of auto, "):
        AppSettings.from_env(precision="fp8")
    with pytest.raises(UserError, match=r"^4-bit loading .* and precision fp16 .* were both asked for; give one"):
        AppSettings.from_env(load_4bit=True)
    for precision, ok in (("fp16", False), ("4bit", False), ("bf16", True), ("fp32", True)):
        s = AppSettings.from_env(device="cpu", precision=precision)
        if ok:
            assert s.steering_device() == "cpu"
        else:
            with pytest.raises(UserError, match="needs a CUDA GPU and none is used here"):
                s.steering_device()
    assert AppSettings.from_env(device="cuda:1", precision="fp16").steering_device() == "cuda:1"


def test_the_steer_page_loads_llava_at_the_precision_asked(explorer):
    """SteerService passes its precision to the LLaVA it loads: bf16 here (the CPU standing in for CUDA's fp16);
    auto on the CPU is fp32."""
    from app.steer import SteerService

    import torch

    svc = SteerService(explorer, device="cpu", precision="bf16")
    session = svc.session()
    assert session.adapter.dtype == torch.bfloat16
    assert {p.dtype for p in session.llava.parameters()} == {torch.bfloat16}
    assert SteerService(explorer, device="cpu").session().adapter.dtype == torch.float32


def test_missing_named_bundle_is_a_message_not_a_build(tmp_path, capsys):
    from app.__main__ import main

    assert main(["--bundle", str(tmp_path / "nowhere")]) == 2
    assert "python -m precompute demo" in capsys.readouterr().err


def test_a_busy_port_or_an_unusable_cache_is_a_message(tiny_bundle, tmp_path, capsys, monkeypatch):
    """Both were tracebacks; a busy port's came after the app had printed that it was serving."""
    import socket

    from app.__main__ import main

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # the app sets it: put back afterwards
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SAE_APP_CACHE", str(tmp_path / "a_file" / "cache"))
    assert main(["--bundle", str(tiny_bundle), "--device", "cpu"]) == 2
    assert "cache folder" in capsys.readouterr().err
    monkeypatch.setenv("SAE_APP_CACHE", str(tmp_path / "cache"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--bundle", str(tiny_bundle), "--device", "cpu", "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert f"cannot serve on 127.0.0.1:{port}" in out.err and "[app] serving" not in out.out


def test_text_search_finds_neurons_of_that_colour(explorer, tiny_bundle):
    """Ground truth of the world: the neurons that match "a photo of a {colour} object" best have top images
    of that colour (the main object's colour, from the generator's factors) far above its base rate (about
    9% of the images for each of these colours): the best match over 3x, the five best together over 4x.
    (The best match's share alone, once held to 1/2, varies with the world's build: 0.56 for red on the
    suite's one-thread world, 0.38 on a two-thread one, whose fourth and fifth matches have 0.94 and 1.0.)"""
    from app.search import NeuronSearch
    from sae_core.world.dataset import WorldDataset
    from sae_core.world.generator import main_object

    ds = WorldDataset(explorer.bundle.manifest["world"], "val")
    top = np.load(Path(tiny_bundle) / "neurons" / "top_images.npy")

    def colour(i):
        f = ds.factors(int(i))
        return f["objects"][main_object(f, ds.masks(int(i)))]["colour"]

    colours = [colour(i) for i in range(explorer.n_images)]
    search = NeuronSearch.for_bundle(explorer)
    for c in ("red", "blue", "green", "yellow"):
        ids, sims = search.by_text(f"a photo of a {c} object", top=5)
        assert sims == sorted(sims, reverse=True) and len(ids) == 5
        hits = [[colours[i] == c for i in top[k] if i >= 0] for k in ids]
        base = colours.count(c) / len(colours)
        best, five = np.mean(hits[0]), np.mean(np.concatenate(hits))
        assert best > 3 * base and five > 4 * base, (c, base, best, five)
    with pytest.raises(UserError):
        search.by_text("")
    # the ranking written out: cosine of the query with the mean of each neuron's first N_TOP top images (those with
    # MIN_IMAGES of them), against the search's (its directions were built by a loop over neurons, now by blocks)
    from app.search import MIN_IMAGES, N_TOP
    from sae_core.labels import labelling_gallery
    from sae_core.text_encoders import load_text_embedder

    emb = np.load(Path(tiny_bundle) / "images" / "embeddings.npy").astype(np.float64)
    gallery, _ = labelling_gallery(explorer.bundle.array("top_images"), explorer.bundle.array("patch_top_images")
                                   if explorer.bundle.has("patch_top_images") else None)
    q = np.asarray(load_text_embedder(explorer.bundle.manifest["embedder"]["spec"])(["a photo of a red object"]).numpy(),
                   np.float64)[0]
    cos = {}
    for k, row in enumerate(np.asarray(gallery)[:, :N_TOP]):
        row = row[row >= 0]
        if len(row) >= MIN_IMAGES:
            m = emb[row].mean(0)
            cos[k] = float(q @ m / np.linalg.norm(m))
    want = sorted(cos, key=lambda k: -cos[k])[:10]
    ids, sims = search.by_text("a photo of a red object", top=10)
    assert ids == want and np.allclose(sims, [cos[k] for k in want], atol=1e-3)


def test_image_search_matches_brute_force_and_the_world(explorer, tiny_bundle, tmp_path):
    """The Images page's searches against a numpy ranking of the bundle's embeddings, with the query
    embedded independently (the embedder loaded again, here); "a photo of a {colour} object" finds
    images of that colour far above its base rate (the generator's factors); a dataset image saved
    as a PNG and uploaded finds itself; bad input is one sentence."""
    from app.search import N_IMAGES, ImageSearch
    from sae_core.text_encoders import load_text_embedder
    from sae_core.world.dataset import WorldDataset
    from sae_core.world.generator import main_object

    search = ImageSearch.for_bundle(explorer)
    emb = np.load(Path(tiny_bundle) / "images" / "embeddings.npy").astype(np.float64)
    text = load_text_embedder(explorer.bundle.manifest["embedder"]["spec"])
    ds = WorldDataset(explorer.bundle.manifest["world"], "val")

    def colour(i):
        f = ds.factors(int(i))
        return f["objects"][main_object(f, ds.masks(int(i)))]["colour"]

    colours = [colour(i) for i in range(len(emb))]
    for c in ("red", "blue", "green"):
        ids, sims = search.by_text(f"a photo of a {c} object")
        want = emb @ text([f"a photo of a {c} object"]).numpy()[0].astype(np.float64)
        assert len(ids) == N_IMAGES and sims == sorted(sims, reverse=True)
        np.testing.assert_allclose(sims, want[ids], atol=2e-3)            # the scores are the cosines
        assert min(sims) >= np.sort(want)[-N_IMAGES] - 2e-3                # and no better image was missed
        share = sum(colours[i] == c for i in ids) / len(ids)
        assert share >= 0.5 and share > 3 * colours.count(c) / len(colours), (c, share)
    # images like #i: the nearest by the stored embeddings, #i itself left out
    i = 11
    ids, sims = search.like(i)
    order = [j for j in np.argsort(-(emb @ emb[i] / np.linalg.norm(emb[i])), kind="stable") if j != i]
    assert i not in ids and len(ids) == N_IMAGES
    assert min(sims) >= (emb[order[N_IMAGES - 1]] @ emb[i]) / np.linalg.norm(emb[i]) - 2e-3
    # an upload of a dataset image is its own nearest image
    png = tmp_path / "query.png"
    explorer.bundle.image(i).save(png)
    ids, sims = search.by_upload(png, top=3)
    assert ids[0] == i and sims[0] > 0.99, (ids, sims)
    (tmp_path / "fake.png").write_text("not a picture")
    for call, arg, msg in ((search.by_text, "", "query is empty"), (search.by_upload, tmp_path / "fake.png", "not an image"),
                           (search.like, len(emb), "image index")):
        with pytest.raises(UserError, match=msg):
            call(arg)


def test_images_the_atlas_skipped_are_never_search_results(explorer, tiny_bundle, tmp_path):
    """An image the atlas could not read keeps a zero embedding in the index: it is left out of every
    image search (it showed as a tile that failed to draw), and "images like it" says why there are none."""
    import shutil

    from app.search import ImageSearch

    i = 11
    nearest, _ = ImageSearch.for_bundle(explorer).like(i, top=3)
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["skipped"] = [{"index": nearest[0], "error": "UnidentifiedImageError"}]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    search = ImageSearch.for_bundle(Explorer(open_bundle(copy), tmp_path / "cache"))
    ids, _ = search.like(i, top=3)
    assert ids == nearest[1:] + ids[2:] and nearest[0] not in ids and len(ids) == 3
    assert all(nearest[0] not in search.by_text(t)[0] for t in ("a red star", "a blue ring", "a photo"))
    with pytest.raises(UserError, match=f"image {nearest[0]} could not be read"):
        search.like(nearest[0])


def test_image_neurons_are_the_galleries_holding_it(explorer, tiny_bundle):
    check_image_neurons(explorer, Path(tiny_bundle) / "neurons")


def check_image_neurons(explorer, root: Path) -> None:
    """Explorer.image_neurons against a loop over every gallery slot of the bundle's files (root: its
    neurons/), for the image in the most galleries, one in a single gallery and one in none (where there are). A
    CLS-scored bundle's gallery by the max over patches counts with its own label and MS
    (tests/test_atlas.py calls this on one)."""
    galleries = [(explorer.score_name, "")] + ([("max over patches", "patch_")]
                                               if (root / "patch_top_images.npy").exists() else [])
    ids = {p: np.load(root / f"{p}top_images.npy") for _, p in galleries}
    counts = np.bincount(np.concatenate([a[a >= 0] for a in ids.values()]), minlength=explorer.n_images)
    picked = [int(np.argmax(counts))] + [int(np.flatnonzero(counts == n)[0]) for n in (1, 0) if (counts == n).any()]
    names = set()
    for image in picked:
        want = sorted((slot + 1, -float(np.load(root / f"{p}top_acts.npy")[k, slot]), k, name, p)
                      for name, p in galleries for k in range(len(ids[p])) for slot in range(ids[p].shape[1])
                      if ids[p][k, slot] == image)
        table, n_neurons, n_rows = explorer.image_neurons(image)
        assert (n_neurons, n_rows) == (len({k for _, _, k, _, _ in want}), len(want))
        if image == picked[0] and n_rows > 1:  # a cut table keeps the best ranks, and says how many there are
            cut, _, rows = explorer.image_neurons(image, limit=n_rows - 1)
            assert rows == n_rows and cut.equals(explorer.image_neurons(image)[0].iloc[:n_rows - 1])
        assert list(table.columns) == ["neuron", "ranked by", "rank", "act", "label", "ms"]
        got = list(zip(table["rank"], table["neuron"], table["ranked by"]))
        assert got == [(r, k, name) for r, _, k, name, _ in want], image
        assert len(table) == counts[image]
        for (_, neg_act, k, _, p), act, label, ms in zip(want, table["act"], table["label"], table["ms"]):
            assert act == pytest.approx(-neg_act, rel=1e-3)
            cols = explorer.columns  # a gallery by patches shows its own label and MS where the bundle has them
            assert label == str(cols.get(f"{p}label", cols["label"])[k])
            want_ms = cols.get(f"{p}ms", cols["ms"])[k]
            assert (ms is None or np.isnan(ms)) if np.isnan(want_ms) else ms == pytest.approx(want_ms, abs=1e-3)
        names |= set(table["ranked by"])
    assert names == {name for name, _ in galleries}  # every gallery was exercised


def test_image_search_through_an_ivfpq_index(tiny_bundle, tmp_path):
    """A bundle of over 100,000 images gets an IVF-PQ index (sae_core.search_index); the Images page's
    searches go through it the same way. Forced on a copy of the tiny bundle: the nearest images of 20
    of its images agree with an exact numpy ranking (recall@24 at least 0.9, the page's note says IVF-PQ)."""
    import shutil

    from app.search import N_IMAGES, ImageSearch
    from sae_core.search_index import build_index

    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("world", ".work", ".stages"))
    emb = np.load(root / "images" / "embeddings.npy")
    build_index(emb.astype(np.float32), exact_threshold=0).save(root / "images" / "index.faiss")
    search = ImageSearch.for_bundle(Explorer(open_bundle(root), tmp_path / "cache"))
    assert search.kind == "ivfpq"
    e = emb.astype(np.float64)
    found = []
    for i in range(0, len(e), len(e) // 20)[:20]:
        ids, sims = search.like(i)
        exact = [j for j in np.argsort(-(e @ e[i]), kind="stable") if j != i][:N_IMAGES]
        found.append(len(set(ids) & set(exact)) / N_IMAGES)
        np.testing.assert_allclose(sims, (e[ids] @ e[i]) / np.linalg.norm(e[i]), atol=2e-3)  # re-ranked exactly
    print(f"\nIVF-PQ recall@24 of the Images page on the tiny bundle: {np.mean(found):.3f}")
    assert np.mean(found) >= 0.9, found


def test_text_tower_loads_in_the_background_once_the_app_serves(explorer, tiny_bundle, tmp_path, monkeypatch):
    """The first search by text waited 5 to 11 s for the CLIP text tower behind nothing but a spinner; the
    app now loads it once the server is up, with no search sent, and that search then answers as a fresh
    NeuronSearch does. A demo built and never served loads nothing and its warm-up ends."""
    import time
    from types import SimpleNamespace

    from gradio_client import Client

    from app import ui
    from app.search import BundleEmbedder, NeuronSearch
    from app.server import start

    never = SimpleNamespace(warm=lambda: pytest.fail("warmed a demo that never served"))
    thread = ui.warm_when_served(SimpleNamespace(is_running=False), never, wait_s=0.5)
    thread.join(5)
    assert not thread.is_alive()

    loaded = []
    real = BundleEmbedder.texts
    monkeypatch.setattr(BundleEmbedder, "texts", lambda self, texts: loaded.append(list(texts)) or real(self, texts))
    demo, url = start(tiny_bundle, cache=tmp_path / "cache")
    try:
        deadline = time.monotonic() + 120
        while not loaded and time.monotonic() < deadline:
            time.sleep(0.2)
        assert loaded, "the text tower was not loaded in the background within 120 s of the start"
        searched = list(loaded)
        table, _ = Client(url, verbose=False).predict("a photo of a red object", api_name="/search_neurons_by_text")
        ids, sims = NeuronSearch.for_bundle(explorer).by_text("a photo of a red object")
        assert [r[0] for r in table["data"]] == ids and [r[1] for r in table["data"]] == pytest.approx(sims, abs=1e-4)
        assert searched == [["a photo"]]  # the warm-up's, before any search
    finally:
        demo.close()


def test_a_neuron_without_a_label_says_why_when_the_bundle_has_none(explorer):
    """A bundle without labels (a DINOv2 embedder: no text tower) said on every neuron page "the bundle has none
    for this neuron", as if that neuron were the exception (until 2026-12-05); the bundle's reason is given."""
    reason = "the embedder hf:/m/dinov2 is a vision-only model with no text tower"
    assert explorer.label_text({"label": "", "label_method": f"none: {reason}"}) == \
        f"no label: this bundle has no labels ({reason})"
    k = next(i for i, lab in enumerate(explorer.bundle.labels["labels"]) if lab)
    page = {**explorer.bundle.neuron(k), "label": ""}  # one unlabelled neuron of a labelled bundle
    assert explorer.label_text(page) == "no label (the bundle has none for this neuron)"


def test_search_by_image_reads_the_bundles_model_without_llava(explorer, monkeypatch, tmp_path):
    """The Neurons page's search by image used the steering session, so on a bundle of a CLIP it loaded (or, offline,
    failed to load) LLaVA-1.5-7b, and said "the Steer page cannot answer" there (until 2026-12-05). It reads the
    bundle's own model and SAE, with LLaVA unloadable: two references, the atlas' streaming pass (the strongest
    gallery entry's latent gets the activation recorded there) and, this world bundle's model being its LLaVA's
    tower, the steering session's own reading of the image (the same latents and values)."""
    import app.steer as steer_mod
    from sae_core.steering import SteeringSession

    b = explorer.bundle
    assert b.manifest["model"]["tokens"] == "max"  # a gallery's activation is the image's max over patches
    top, acts = np.asarray(b.array("top_images")), np.asarray(b.array("top_acts"))
    k0 = int(np.argmax(acts[:, 0]))
    image = int(top[k0, 0])  # the image of the strongest gallery entry
    path = tmp_path / "image.png"
    b.dataset()[image].save(path)  # lossless: the pixels the atlas read
    every = SteeringSession.from_bundle(b, device="cpu").latents_on_image(str(path), top=b.n_neurons)["top"]
    reference = every[:10]

    def offline(*a, **k):
        raise UserError("cannot load the config of llava-hf/llava-1.5-7b-hf (OSError: no network).")

    monkeypatch.setattr(SteeringSession, "from_bundle", offline)
    found = steer_mod.SteerService(explorer).fire_on_upload(path, top=10)
    rows = found["table"].to_dict("records")
    # how many fire, not how many are listed (the note said "10 neurons fire" for the 10 rows until 2026-12-05)
    assert len(every) > 10 and found["picture"]
    assert found["note"].startswith(f"{len(every)} neurons fire on the image's patches (the 10 that fire most are listed)")
    assert [r["neuron"] for r in rows] == [k for k, *_ in reference]
    assert [r["act_on_image"] for r in rows] == pytest.approx([mx for _, mx, *_ in reference], rel=1e-3, abs=1e-3)
    assert rows[0]["neuron"] == k0 and rows[0]["act_on_image"] == pytest.approx(float(acts[k0, 0]), rel=1e-3)


def test_a_bundle_model_moved_away_is_one_sentence_the_app_user_can_act_on(explorer, tmp_path):
    """A model folder moved after the bundle was built: searches said the loader's "pass a directory written by
    save_pretrained", which the explorer cannot take (until 2026-12-05); they say what is off and what to do."""
    from app.search import BundleCoder, BundleEmbedder

    gone = f"hf:{tmp_path / 'clip'}"
    said = (f"cannot be loaded, so searching by text or by image is off (the other pages work): cannot load the "
            f"config of {tmp_path / 'clip'}: {tmp_path / 'clip'} does not exist (a path, not a hub id); put the model "
            "back where the bundle records it, or rebuild the bundle with `python -m precompute atlas`.")
    with pytest.raises(UserError) as e:
        BundleEmbedder(gone).texts(["red"])
    assert str(e.value) == f"the bundle's embedder {gone} {said}"
    coder = BundleCoder(explorer)
    coder.spec = gone
    with pytest.raises(UserError) as e:
        coder.latents(Image.new("RGB", (32, 32)), top=5)
    assert str(e.value) == f"the bundle's model {gone} {said}"
    # a world moved away (the demo's bundles) and an open_clip checkpoint file: their loaders' advice left out too
    for gone, problem in ((f"world:{tmp_path / 'world'}", f"{tmp_path / 'world' / 'clip'} has no saved model (config.json)"),
                          (f"open_clip:ViT-B-32/{tmp_path / 'ckpt.pt'}",
                           f"open_clip checkpoint file {tmp_path / 'ckpt.pt'} does not exist")):
        with pytest.raises(UserError) as e:
            BundleEmbedder(gone).texts(["red"])
        assert str(e.value) == (f"the bundle's embedder {gone} cannot be loaded, so searching by text or by image is "
                                f"off (the other pages work): {problem}; put the model back where the bundle records "
                                "it, or rebuild the bundle with `python -m precompute atlas`.")


def test_the_app_steers_the_llava_it_is_told(explorer, monkeypatch, tmp_path):
    """SAE_APP_LLAVA / --llava name the LLaVA the Steer page loads (none could: an offline machine with a local
    LLaVA-1.5 folder could not steer a CLIP bundle): a save_pretrained folder, a hub id or a spec, as
    `precompute steer --llava` takes them; a path that is not there is refused at the start, and a failed load
    names the LLaVA it tried and how to change it."""
    import app.steer as steer_mod
    from app.__main__ import parse_args
    from app.settings import AppSettings
    from sae_core.steering import SteeringSession

    folder = explorer.bundle.world_dir / "llava"  # the world's LLaVA, written by save_pretrained
    monkeypatch.setenv("SAE_APP_LLAVA", f" {folder} ")
    assert AppSettings.from_env().llava == f"llava:{folder.resolve()}"
    assert AppSettings.from_env(llava=parse_args(["--llava", "llava-hf/llava-1.5-7b-hf"]).llava).llava == \
        "llava:llava-hf/llava-1.5-7b-hf"
    assert AppSettings.from_env(llava="hf:org/llava").llava == "hf:org/llava"  # a spec as given
    with pytest.raises(UserError, match=rf"^the LLaVA {tmp_path / 'gone'} \(--llava or SAE_APP_LLAVA\) is not a "
                       "folder here; give a folder"):
        AppSettings.from_env(llava=str(tmp_path / "gone"))
    # the command line's conversion: a folder, a hub id, a spec, a missing path the load then names
    from sae_core.steering import llava_spec

    assert [llava_spec(v) for v in (str(folder), "org/llava", "hf:org/llava", str(tmp_path / "gone"), " ")] == \
        [f"llava:{folder.resolve()}", "llava:org/llava", "hf:org/llava", f"llava:{tmp_path / 'gone'}", None]
    with pytest.raises(UserError, match=rf"{tmp_path / 'gone'} does not exist \(a path, not a hub id\)"):
        SteeringSession(explorer.bundle.load_sae(), llava_spec(str(tmp_path / "gone")), -2, device="cpu")
    monkeypatch.setenv("SAE_APP_LLAVA", "")
    assert AppSettings.from_env().llava is None
    # the folder as given loads and steers (a bare folder was the spec-prefix sentence until 2026-12-05)
    svc = steer_mod.SteerService(explorer, device="cpu", llava=AppSettings.from_env(llava=str(folder)).llava)
    assert svc.session().adapter.llava is not None
    seen = []

    def offline(*a, **k):
        seen.append(k.get("llava"))
        raise UserError(f"cannot load the config of {k.get('llava')} (OSError: no network).")

    monkeypatch.setattr(SteeringSession, "from_bundle", offline)
    svc = steer_mod.SteerService(explorer, device="cpu", llava="llava:org/llava-1.5")
    with pytest.raises(steer_mod.ModelUnavailable) as e:
        svc.session()
    assert seen == ["llava:org/llava-1.5"]
    assert str(e.value).endswith("cannot load the config of llava:org/llava-1.5 (OSError: no network) (the app "
                                 "loads llava:org/llava-1.5; --llava or SAE_APP_LLAVA names another).")


def test_a_failed_steering_load_is_remembered_for_a_minute(explorer, monkeypatch):
    """A LLaVA that cannot load is tried once per RETRY_LOAD_AFTER_S, not at every Steer request (a 7B model that
    ran out of memory spent its minutes, and the memory, again on each); running out of memory is one sentence
    with what to do (it was torch's error); once the minute is over the load is tried again and may succeed."""
    import torch

    import app.steer as steer_mod
    from sae_core.steering import SteeringSession

    attempts, now = [], [1000.0]
    failures = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"),
                UserError("llava-hf/llava-1.5-7b-hf cannot be fetched offline.")]
    real = SteeringSession.from_bundle

    def load(*args, **kwargs):
        attempts.append(kwargs["precision"])
        if failures:
            raise failures.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(SteeringSession, "from_bundle", load)
    monkeypatch.setattr(steer_mod.time, "monotonic", lambda: now[0])
    svc = steer_mod.SteerService(explorer, device="cpu", precision="fp16")
    for _ in range(3):
        with pytest.raises(steer_mod.ModelUnavailable, match=r"^the steering model cannot be loaded, .*: it ran out of "
                           r"memory on cpu \(CUDA out of memory\. Tried to allocate 2\.00 GiB\); free memory, or use a "
                           r"larger device or a lighter precision \(SAE_APP_PRECISION=4bit on a CUDA GPU\) and restart "
                           r"the app"):
            svc.session()
        now[0] += 20
    assert len(attempts) == 1
    now[0] += 1  # 61 s after the failure: tried again
    with pytest.raises(steer_mod.ModelUnavailable, match="cannot be fetched offline"):
        svc.session()
    assert len(attempts) == 2
    svc.precision = "fp32"
    now[0] += 59
    with pytest.raises(steer_mod.ModelUnavailable, match="cannot be fetched offline"):
        svc.session()
    now[0] += 1
    assert svc.session() is svc.session() and len(attempts) == 3 and svc.loaded


def test_the_steer_page_says_the_cpu_ran_out_of_memory_too(explorer, monkeypatch):
    """The CPU allocator's failure is a RuntimeError, not torch.OutOfMemoryError: on a machine without a GPU, a
    LLaVA too large for its memory reached the page as an error without a sentence (and was loaded again at the
    next request)."""
    import torch

    import app.steer as steer_mod
    from sae_core import steering

    loads = []

    def load_too_big(*args, **kwargs):
        loads.append(1)
        torch.empty(2 ** 62, dtype=torch.uint8)  # more than any address space: the allocator refuses

    monkeypatch.setattr(steering, "load_adapter", load_too_big)
    svc = steer_mod.SteerService(explorer, device="cpu", precision="fp32")
    for _ in range(2):
        with pytest.raises(steer_mod.ModelUnavailable, match=r": it ran out of memory on cpu \(DefaultCPUAllocator: "
                           r"can't allocate memory: .*\); free memory, or use a larger device or a lighter precision "
                           r"\(SAE_APP_PRECISION=4bit on a CUDA GPU or bf16\) and restart the app"):
            svc.session()
    assert len(loads) == 1


def test_running_out_of_memory_in_a_page_action_is_one_sentence():
    """Every page action goes through ui.user_errors: running out of memory there (LLaVA answering on a full GPU,
    the allocator on the CPU) reached the page as Gradio's bare "Error"; a bug's RuntimeError still does."""
    import gradio as gr
    import torch

    from app.ui import user_errors

    @user_errors
    def answer():
        return torch.empty(2 ** 62, dtype=torch.uint8)  # more than any address space: the allocator refuses

    @user_errors
    def buggy():
        raise RuntimeError("The size of tensor a (3) must match the size of tensor b (4)")

    with pytest.raises(gr.Error) as said:
        answer()
    assert re.match(r"the server ran out of memory for this request \(DefaultCPUAllocator: can't allocate memory: "
                    r".*\); try again when other requests are done", said.value.message)
    with pytest.raises(RuntimeError, match="must match"):
        buggy()


def test_the_decoder_parents_row_gives_its_cosine_and_frequencies_keep_their_figures(explorer):
    """Two numbers a reviewer found off on 2026-12-05: the related table's parent row left the decoder cosine
    blank (the same latent among the decoder neighbours showed it), now the cosine of the two decoder rows of the
    bundle's SAE; the Neurons table rounded a frequency to 5 decimals, so a latent firing on 6 of ImageNet's 1.28 M
    images read 0.0 like a dead one, and the JSON export to 6 (1 image in 1.28 M: 1e-06 for 7.8e-07)."""
    import torch

    b = explorer.bundle
    w = b.load_sae().W_dec.detach().double()
    w = w / w.norm(dim=1, keepdim=True)
    parents = np.asarray(b.array("parent_decoder"))
    checked = 0
    for k in np.flatnonzero(parents >= 0)[:40]:
        j = int(parents[k])
        rows = [r for r in explorer.related(int(k)) if r[0] in ("parent", "parent (decoder cosine)") and r[1] == j]
        assert len(rows) == 1, (k, explorer.related(int(k)))
        assert rows[0][-1] == pytest.approx(float(torch.dot(w[k], w[j])), abs=6e-4), (k, j, rows)
        checked += 1
    assert checked >= 20
    n = 1_281_167
    for fired in (1, 6, 1000):
        assert Explorer._cell("frequency", fired / n) == pytest.approx(fired / n, rel=5e-4)
    k = int(np.argmax(explorer.columns["frequency"]))
    assert explorer.neuron_record(k)["frequency"] == pytest.approx(float(b.array("frequency")[k]), rel=5e-6)


def test_text_from_a_bundle_or_a_link_reaches_markdown_and_toasts_as_itself():
    """Labels, queries, specs and commands went into the pages' Markdown as typed until 2026-12-05: a link's query
    `[log in](https://...)` was a live link in the Images note, a label `<h1>` a heading, a backtick in a recorded
    command ended its code span, and a link field's `<b>` was bold in the warning quoting it. Rendered here by
    markdown-it (CommonMark, with GFM's tables and strikethrough), each reads back as the text given, in no tag."""
    import html

    from markdown_it import MarkdownIt

    from app.markdown import markdown_code, markdown_text, readable, toast_text

    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    given = ['<img src=x onerror="alert(1)">', "<script>alert(1)</script>", "</table></div><h1>BIG</h1>",
             "[log in](https://example.com/login)", "![x](https://example.com/x.png)", "*emph* __under__ ~~del~~",
             "# heading", "1. item", "- item", "| a | b |", "`code`", "``two``", "a\\`b", "&amp; &lt;", "x\\", "st. bernard",
             "\\*not\\*", "$$x^2$$", "<https://example.com>", "line one\n\n# line two"]
    given += ["    indented", "www.example.com", "mail@example.com", "2) item", "+ item", "=== x", "plain words"]
    for text in given:
        for line in ('guess: "{}"', "{}"):  # within a line, and starting one
            out = md.render(line.format(markdown_text(text)))
            assert out.startswith("<p>") and out.endswith("</p>\n") and out.count("<") == 2, (text, out)
            assert html.unescape(out[3:-5]) == line.format(" ".join(text.splitlines()).lstrip()), (text, out)
        out = md.render(f"- **command**: {markdown_code(text)}")
        inner = out.split("<code>", 1)[1].rsplit("</code>", 1)[0]
        assert out.count("<code>") == 1 and html.unescape(inner).strip() == " ".join(text.split("\n")).strip(), (text, out)
        # no tag opens in a toast, and what it shows (HTML's reading) is the text; API clients get the same message
        assert not re.search(r"<[A-Za-z/!?]", toast_text(text)) and html.unescape(toast_text(text)) == text
    assert readable("caf\udce9") == "caf\\xe9" and markdown_text("caf\udce9") == "caf\\\\xe9"  # not UTF-8: its bytes
    assert toast_text("|v| < 3.4e38 & finite") == "|v| < 3.4e38 & finite"  # nothing HTML reads: left for API clients


def test_labels_reach_plotly_as_text_not_markup():
    """plotly draws <a href>, <b> and <br> found in a label (a bundle's `<a href="https://...">` was a live link in
    the tree and the scatter until 2026-12-05): labels go in with HTML's characters as entities, which plotly shows
    as the characters; only the figures' own <br> stay tags."""
    import html

    evil = '<a href="https://example.com">log in</a> & <b>x</b>'
    nodes = [{"id": 0, "level": 0, "parent": -1, "ms": 0.5, "label": evil},
             {"id": 1, "level": 1, "parent": 0, "ms": 0.4, "label": "plain"}]
    tree = figures.hierarchy_figure(nodes, "sunburst", patch_labels=[evil, evil]).figure.data[0]
    assert list(tree.labels) == ["#0 " + html.escape(evil, quote=False), "#1 plain"]
    assert tree.customdata[1][2] == "<br>on patches: " + html.escape(evil, quote=False)
    cols = {"ms": np.array([0.5, 0.6]), "frequency": np.array([0.1, 0.2]), "level": np.array([0, 0]),
            "label": np.array([evil, "plain"], dtype=object)}
    texts = [t for trace in figures.ms_frequency_scatter(cols).data for t in trace.text]
    assert sorted(texts) == sorted(["#0 " + html.escape(evil, quote=False), "#1 plain"])
    assert all("<" not in t for t in texts) and html.unescape(texts[0].split(" ", 1)[1]) in (evil, "plain")


def test_the_label_filter_matches_across_unicode_forms_and_case(tiny_bundle, tmp_path):
    """A class folder macOS wrote as "cafe" + a combining accent (NFD) was not found by "café" typed on a keyboard
    (NFC) until 2026-12-05 (0 rows against 16); nor "STRASSE" in "Straße". Both forms and cases match now."""
    import shutil

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns(".work", ".stages"))
    labels = json.loads((root / "neurons" / "labels.json").read_text())
    named = {3: "cafe\u0301 au lait", 5: "CAF\u00c9", 7: "Stra\u00dfe", 9: "cafe"}
    labels["labels"] = [named.get(k, lab) for k, lab in enumerate(labels["labels"])]
    (root / "neurons" / "labels.json").write_text(json.dumps(labels))
    ex = Explorer(open_bundle(root), tmp_path / "cache")
    for typed, want in (("caf\u00e9", [3, 5]), ("cafe\u0301", [3, 5]), ("STRASSE", [7]), ("cafe", [9])):
        rows = ex.table(min_ms=0, min_support=0, label_contains=typed, sort_by="neuron", descending=False, limit=500)
        assert rows["neuron"].tolist() == want, typed


def test_a_full_or_read_only_picture_cache_is_one_sentence(tmp_path, monkeypatch):
    """A full picture cache served "[Errno 28] No space left on device" for every page not drawn yet and left a
    temporary per attempt; a read-only one at the start was two tracebacks (until 2026-12-05). Now one sentence
    naming the cache and SAE_APP_CACHE, and nothing left behind."""
    import errno

    from app.render import ImageCache

    cache = ImageCache(tmp_path / "cache" / "generated", "a bundle")
    said = (rf"^the explorer's picture cache {tmp_path / 'cache'} cannot be written \(no space is left on the "
            r"device\); free space there, or point SAE_APP_CACHE at a writable folder with room and restart\.$")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(UserError, match=said):
        cache.get_or_make("a page", lambda: Image.new("RGB", (4, 4)))
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match=said):
        cache.write_text("neuron_3.json", "{}")
    assert list(cache.root.iterdir()) == []  # no temporary left behind
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(UserError, match=r"cannot be written \(the file system is read-only\)"):
        ImageCache(tmp_path / "other" / "generated", "a bundle")
    monkeypatch.undo()
    # a cache folder this user may not write, whose generated/ is still to be made (outside the namespace folder:
    # it was re-raised as a traceback until the review of 2026-12-05)
    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if self.name == "generated":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(UserError, match=rf"picture cache {tmp_path / 'third'} cannot be written \(permission denied\)"):
        ImageCache(tmp_path / "third" / "generated", "a bundle")
    monkeypatch.undo()

    def unreadable_image():  # a dataset image that could not be read is no failure of the cache
        raise OSError(errno.EIO, "Input/output error", "/data/images/0.png")

    with pytest.raises(OSError, match="Input/output error"):
        cache.get_or_make("another page", unreadable_image)


def test_an_old_bundles_band_strips_say_they_are_samples_of_log_bin_bands(tiny_bundle, tmp_path):
    """A bundle of before 2026-12-04 keeps its bands as runs of the histogram's log bins, without their sizes: the
    gallery's label called them "equal shares" and a strip of 8 of a band's 58 images read "8 images, act ..." as
    if the whole band (until 2026-12-05). The label says what they are and how to rebuild them, each caption that it
    is a sample; a bundle with band sizes is unchanged."""
    import shutil

    from app import ui
    from app.steer import SteerService

    root = tmp_path / "old_bands"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns(".work", ".stages"))
    manifest = json.loads((root / "manifest.json").read_text())
    for name in ("band_counts", "patch_band_counts"):
        if name in manifest["files"]:
            (root / manifest["files"].pop(name)).unlink()
    (root / "manifest.json").write_text(json.dumps(manifest))
    for bundle, old in ((root, True), (tiny_bundle, False)):
        ex = Explorer(open_bundle(bundle), tmp_path / f"cache_{old}")
        k = int(np.argmax(ex.columns["support"]))
        captions = [c for _, c in ex.band_gallery(k)]
        assert captions and all((" sampled image" in c and ", these act " in c) == old for c in captions), captions
        demo = ui.build(ex, steer=SteerService(ex))
        label = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "band-gallery").label
        assert ("runs of the histogram's bins (a bundle of before 2026-12-04: rebuild its scan" in label) == old
        assert ("equal shares of the images it fires on" in label) == (not old)
