"""The explorer's settings: command-line flags over environment variables over defaults."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sae_core.errors import UserError

from .uploads import UploadLimits

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "runs" / "demo_bundle"
"""Where `python -m app` looks for (and, when missing, builds) the embedded-world demo bundle."""

ENV_VARS = {
    "SAE_APP_BUNDLE": "bundle directory (default runs/demo_bundle, built on first start when missing)",
    "SAE_APP_PRESET": "preset of the demo bundle built when the default one is missing (demo | tiny)",
    "SAE_APP_DEVICE": "device of the steering model: auto | cpu | cuda | cuda:N (default auto)",
    "SAE_APP_PRECISION": "the steering LLaVA's precision: auto | fp32 | bf16 | fp16 | 4bit (default auto: 4-bit "
                         "for hub models on CUDA, fp32 otherwise; fp16 and 4bit need CUDA)",
    "SAE_APP_LOAD_4BIT": "1 is SAE_APP_PRECISION=4bit (bitsandbytes, CUDA only)",
    "SAE_APP_LLAVA": "the LLaVA the Steer page steers: a folder written by save_pretrained or a hub id (default: the "
                     "bundle's own, its world's tiny LLaVA, or llava-hf/llava-1.5-7b-hf for a CLIP bundle)",
    "SAE_APP_HOST": "address to listen on (default 127.0.0.1; 0.0.0.0 in Docker and on Spaces)",
    "SAE_APP_PORT": "port (default 7860)",
    "SAE_APP_CACHE": "folder for generated images and Gradio's file cache (default: a temp folder)",
    "SAE_APP_MAX_UPLOAD_MB": "largest upload in MiB (default 10)",
    "SAE_APP_MAX_UPLOAD_MEGAPIXELS": "largest upload in megapixels (default 16.777216 = 4096 x 4096 pixels)",
    "SAE_APP_SESSIONS": "browser and API sessions Gradio keeps in memory, oldest dropped first (default 500)",
    "SAE_APP_CACHE_HOURS": "uploads and generated files unused this long are deleted from the cache, checked "
                           "every 10 minutes (default 24; 0 keeps them)",
    "SAE_APP_CACHE_GB": "beyond this many GB of uploads and generated files the least recently used go, checked every "
                        "10 minutes (default 10; 0: no bound)",
}
DEFAULT_CACHE_HOURS = 24.0
DEFAULT_CACHE_GB = 10.0
"""A neuron page adds about 1.3 MB of pictures at the paper's size (photos), so a script walking 65,536 neurons
would fill 87 GB within the age bound; 10 GB keeps thousands of pages."""
DEFAULT_SESSIONS = 500
"""Gradio copies the config of every block for each session (about 215 KB with this app) and keeps 10,000
by default, about 2 GB for scripts that call the API without a session hash. The explorer keeps nothing
per session that a dropped session would lose (no gr.State, no choices changed per user), so a small
bound only costs a new copy for a returning tab."""


def _flag(name: str) -> bool:
    """A yes/no variable; UserError for anything else (SAE_APP_LOAD_4BIT=maybe loaded the model in full size)."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise UserError(f"{name}={os.environ[name]!r} is neither yes nor no; set it to 1 or 0 (true/false, yes/no, on/off "
                    "also do), or unset it.")


def _llava(value) -> str | None:
    """--llava / SAE_APP_LLAVA as a spec (sae_core.steering.llava_spec); a path that is not there is refused at the
    start, where the Steer page would say so at its first use."""
    from sae_core.steering import llava_spec

    text = str(value or "").strip()
    if text.startswith(("/", "./", "../", "~")) and not Path(os.path.expanduser(text)).is_dir():
        raise UserError(f"the LLaVA {text} (--llava or SAE_APP_LLAVA) is not a folder here; give a folder written by "
                        "save_pretrained, a hub id such as llava-hf/llava-1.5-7b-hf, or a spec such as llava:DIR.")
    return llava_spec(text)


def _amount(value, variable: str, unit: str, meaning: str) -> float:
    """`value` of `variable` as a finite number of 0 or more; UserError saying what it sets otherwise."""
    try:
        amount = float(value)
    except ValueError:
        amount = -1.0
    if not 0 <= amount < float("inf"):
        raise UserError(f"{variable}={value!r} is not a number of {unit} of 0 or more; set it to {meaning}.")
    return amount


@dataclass(frozen=True)
class AppSettings:
    bundle: Path = DEFAULT_BUNDLE
    preset: str = "demo"
    device: str = "auto"
    precision: str = "auto"
    load_4bit: bool = False
    llava: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    cache: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "sae_app")
    limits: UploadLimits = UploadLimits()
    sessions: int = DEFAULT_SESSIONS
    cache_hours: float = DEFAULT_CACHE_HOURS
    cache_gb: float = DEFAULT_CACHE_GB

    @property
    def uses_default_bundle(self) -> bool:
        return self.bundle.resolve() == DEFAULT_BUNDLE.resolve()

    @classmethod
    def from_env(cls, **overrides) -> "AppSettings":
        """Settings from SAE_APP_* variables (and GRADIO_SERVER_NAME/PORT, which Spaces set), then `overrides`
        (command-line flags; None means "not given")."""
        env = os.environ
        values = {
            "bundle": Path(env.get("SAE_APP_BUNDLE") or DEFAULT_BUNDLE),
            "preset": env.get("SAE_APP_PRESET", "demo"),
            "device": env.get("SAE_APP_DEVICE", "auto"),
            "precision": env.get("SAE_APP_PRECISION", "auto").strip().lower() or "auto",
            "load_4bit": _flag("SAE_APP_LOAD_4BIT"),
            "llava": env.get("SAE_APP_LLAVA", "").strip() or None,
            "host": env.get("SAE_APP_HOST") or env.get("GRADIO_SERVER_NAME") or "127.0.0.1",
            "port": env.get("SAE_APP_PORT") or env.get("GRADIO_SERVER_PORT") or 7860,
            "cache": Path(env.get("SAE_APP_CACHE") or Path(tempfile.gettempdir()) / "sae_app"),
            "sessions": env.get("SAE_APP_SESSIONS") or DEFAULT_SESSIONS,
            "cache_hours": env.get("SAE_APP_CACHE_HOURS") or DEFAULT_CACHE_HOURS,
            "cache_gb": env.get("SAE_APP_CACHE_GB") or DEFAULT_CACHE_GB,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            port = int(values["port"])
        except ValueError:
            raise UserError(f"port {values['port']!r} is not a number; pass --port 7860 or set SAE_APP_PORT.") from None
        if not 0 < port < 65536:
            raise UserError(f"port {port} is out of range; pass a port between 1 and 65535.")
        if values["preset"] not in ("demo", "tiny"):
            raise UserError(f"preset {values['preset']!r} is not demo or tiny; set SAE_APP_PRESET=demo.")
        try:
            sessions = int(values["sessions"])
        except ValueError:
            sessions = 0
        if sessions < 1:
            raise UserError(f"SAE_APP_SESSIONS={values['sessions']!r} is not a positive whole number; "
                            f"set it to the sessions to keep in memory, e.g. {DEFAULT_SESSIONS}.")
        cache_hours = _amount(values["cache_hours"], "SAE_APP_CACHE_HOURS", "hours", "how long unused uploads and "
                              f"generated files stay, e.g. {DEFAULT_CACHE_HOURS:g} (0 keeps them)")
        cache_gb = _amount(values["cache_gb"], "SAE_APP_CACHE_GB", "GB", "how much the cache's uploads and generated "
                           f"files may hold, e.g. {DEFAULT_CACHE_GB:g} (0: no bound)")
        from sae_core.steering import PRECISION_CHOICES

        if values["precision"] not in PRECISION_CHOICES:
            raise UserError(f"precision {values['precision']!r} (--precision or SAE_APP_PRECISION) is not one of "
                            f"{', '.join(PRECISION_CHOICES)}; auto picks one for the device.")
        if values["load_4bit"] and values["precision"] not in ("auto", "4bit"):
            raise UserError(f"4-bit loading (--load-4bit or SAE_APP_LOAD_4BIT) and precision {values['precision']} "
                            "(--precision or SAE_APP_PRECISION) were both asked for; give one of them.")
        limits = UploadLimits.from_env()
        return cls(bundle=Path(os.path.expanduser(str(values["bundle"]))), preset=values["preset"],
                   device=str(values["device"]), precision=values["precision"], load_4bit=bool(values["load_4bit"]),
                   llava=_llava(values["llava"]), host=str(values["host"]),
                   port=port, cache=Path(values["cache"]), limits=limits, sessions=sessions, cache_hours=cache_hours,
                   cache_gb=cache_gb)

    @property
    def steering_precision(self) -> str:
        """The steering LLaVA's precision (sae_core.steering.llava_load_options): --load-4bit is 4bit."""
        return "4bit" if self.load_4bit else self.precision

    def steering_device(self) -> str:
        """The steering model's device, checked against this machine with the precision; called at start
        for a bundle that steers (a device that is not here failed every Steer request of a server that had
        started), and not for one that only browses, which needs no device."""
        from sae_core.precision import resolve_device

        device = resolve_device(self.device, "the steering device (--device or SAE_APP_DEVICE)")
        if self.steering_precision in ("4bit", "fp16") and not device.startswith("cuda"):
            asked = ("4-bit loading (--load-4bit or SAE_APP_LOAD_4BIT, or --precision 4bit)"
                     if self.steering_precision == "4bit" else "precision fp16 (--precision or SAE_APP_PRECISION)")
            raise UserError(f"{asked} needs a CUDA GPU and none is used here (device {device}); leave it at auto "
                            "to load the steering LLaVA in fp32, or ask for bf16.")
        return device
