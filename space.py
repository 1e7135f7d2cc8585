"""Hugging Face Space entry point (README front matter `app_file: space.py`): the explorer, as `python -m app`.

The Space builds the default demo bundle on its first start (progress in the Space's logs; set the
Space variable SAE_APP_PRESET=tiny for a one-minute build) and then serves on 0.0.0.0:7860.
"""
import os
import sys

# Gradio's GRADIO_SERVER_NAME/PORT (which Spaces set) count as the app's own SAE_APP_HOST/PORT do: until
# 2026-12-05 the defaults below were set over them, and GRADIO_SERVER_PORT=7999 served on 7860
if not (os.environ.get("SAE_APP_HOST") or os.environ.get("GRADIO_SERVER_NAME")):
    os.environ["SAE_APP_HOST"] = "0.0.0.0"
if not (os.environ.get("SAE_APP_PORT") or os.environ.get("GRADIO_SERVER_PORT")) and os.environ.get("PORT"):
    os.environ["SAE_APP_PORT"] = os.environ["PORT"]  # other hosts' convention; the app's default is 7860

from app.__main__ import main  # noqa: E402

sys.exit(main([]))
