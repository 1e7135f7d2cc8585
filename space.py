"""Hugging Face Space entry point (README front matter `app_file: space.py`): the explorer, as `python -m app`.

The Space builds the default demo bundle on its first start (progress in the Space's logs; set the
Space variable SAE_APP_PRESET=tiny for a one-minute build) and then serves on 0.0.0.0:7860.
"""
import os
import sys

os.environ.setdefault("SAE_APP_HOST", "0.0.0.0")
os.environ.setdefault("SAE_APP_PORT", os.environ.get("PORT", "7860"))

from app.__main__ import main  # noqa: E402

sys.exit(main([]))
