"""Checks on images users upload: byte and pixel limits, real image formats, a full decode, EXIF turns."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from sae_core.datasets import to_rgb
from sae_core.errors import UserError

# What an explorer needs to see; anything else (PSD, EPS, ICO, ...) is refused before decoding.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
_READ_AS = {"MPO": "JPEG"}  # what PIL calls a JPEG with more pictures in it (phone photos, Ultra HDR)
MAX_ASPECT = 50  # long side over short side; a panorama is 4 to 12 (until 2026-12-05 any shape was taken)


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one upload. Defaults: 10 MiB and 16.78 megapixels (4096 x 4096 pixels)."""

    max_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096

    @classmethod
    def from_env(cls) -> "UploadLimits":
        """SAE_APP_MAX_UPLOAD_MB and SAE_APP_MAX_UPLOAD_MEGAPIXELS override the defaults (positive, finite)."""
        def setting(name: str, default: float) -> float:
            text = os.environ.get(name, "").strip()
            try:
                value = float(text) if text else default
            except ValueError:
                value = math.nan
            if not 0 < value < math.inf:
                raise UserError(f"{name}={text!r} is not a positive finite number; set it to a limit such as {default:.3g}, "
                                "or unset it for that default.")
            return value

        mb = setting("SAE_APP_MAX_UPLOAD_MB", cls.max_bytes / 2**20)
        mpx = setting("SAE_APP_MAX_UPLOAD_MEGAPIXELS", cls.max_pixels / 1e6)
        return cls(max_bytes=max(1, int(mb * 2**20)), max_pixels=max(1, int(mpx * 1e6)))


def load_upload(path, limits: UploadLimits = UploadLimits()):
    """Open an uploaded file as a PIL RGB image, or raise UserError saying why it was refused.

    The pixel count is read from the header and checked *before* any decoding, so a decompression
    bomb (a few KB of PNG claiming 50,000 x 50,000 pixels) costs nothing; then the whole image is
    decoded, so truncated or corrupt files fail here rather than inside a model.
    """
    from PIL import Image, ImageOps

    if path is None or str(path) == "":
        # also what follows the page's own refusal of a file (a .txt, one above the size limit), so it
        # says that much rather than that nothing was given
        raise UserError(f"no image was accepted (none was uploaded, or the upload was refused); upload a PNG or "
                        f"JPEG file of at most {limits.max_bytes / 2**20:.3g} MiB.")
    path = Path(path)
    if not path.is_file():
        raise UserError("the uploaded file is missing on the server; upload it again.")
    try:  # a use (Gradio's copy in the app's cache): the cache sweep keeps what is used, and an upload steered
        os.utime(path)  # for an hour looked an hour old, the first to go (until 2026-12-05)
    except OSError:  # another user's file in a shared cache, a read-only copy: used as it is
        pass
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise UserError(f"the file is {size / 2**20:.1f} MiB, above the {limits.max_bytes / 2**20:.3g} MiB limit; "
                        "upload a smaller image.")
    if size == 0:
        raise UserError("the uploaded file is empty; upload a PNG or JPEG image.")
    with warnings.catch_warnings():
        # PIL only *warns* between MAX_IMAGE_PIXELS and twice that: at the open, ignored, as our own limit below
        # says it with the image's size (a 12,000 x 12,000 PNG was "not an image PIL can read" until 2026-12-05);
        # at the decode, a refusal
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            raise UserError("the image claims more pixels than any real photo (a decompression bomb); "
                            "upload an ordinary image.") from None
        except Exception:
            raise UserError("the file is not an image PIL can read; upload a PNG or JPEG file.") from None
        with im:
            if _READ_AS.get(im.format, im.format) not in IMAGE_FORMATS:
                raise UserError(f"{im.format or 'this'} files are not accepted; upload one of "
                                f"{', '.join(IMAGE_FORMATS)}.")
            w, h = im.size
            if w < 1 or h < 1 or w * h > limits.max_pixels:
                # whole pixels: 4097 x 4096 read "16.8 megapixels, above the limit of 16.8" (until 2026-12-05)
                raise UserError(f"the image is {w:,} x {h:,} = {w * h:,} pixels, above the limit of "
                                f"{limits.max_pixels:,} ({limits.max_pixels / 1e6:.2f} megapixels); downscale it "
                                "before uploading.")
            if max(w, h) > MAX_ASPECT * min(w, h):
                # the models scale the short side up to their input size: a 1 x 1,000,000 PNG of 2 KB took 10 GB
                raise UserError(f"the image is {w:,} x {h:,} pixels, one side more than {MAX_ASPECT} times the other, "
                                "and the model would scale its short side up to its input size; crop it before "
                                "uploading.")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im.seek(0)  # first frame of an animation
                im.load()
                out = to_rgb(ImageOps.exif_transpose(im))
            except (Image.DecompressionBombWarning, Image.DecompressionBombError):
                raise UserError("the image decodes to more pixels than allowed (a decompression bomb); "
                                "upload an ordinary image.") from None
            except Exception:
                raise UserError("the image is corrupt or truncated and cannot be decoded; upload it again "
                                "or export it anew.") from None
    return out

