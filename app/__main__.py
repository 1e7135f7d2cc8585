"""`python -m app [--bundle DIR] [--host H] [--port P]`: serve the explorer (building the demo bundle first if needed)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from sae_core.command_line import OneLineParser
from sae_core.errors import UserError, not_utf8_argument

# Offline and private by default: no analytics, no hub look-ups unless a hub model is named.
for _var, _val in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
    os.environ.setdefault(_var, _val)


def parse_args(argv=None) -> argparse.Namespace:
    from .settings import ENV_VARS

    epilog = "environment variables:\n" + "\n".join(f"  {k:<30} {v}" for k, v in ENV_VARS.items())
    p = OneLineParser(prog="python -m app", description=__doc__, epilog=epilog,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle directory (default: $SAE_APP_BUNDLE or runs/demo_bundle, built when missing)")
    p.add_argument("--host", help="address to listen on (default: $SAE_APP_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: $SAE_APP_PORT or 7860)")
    p.add_argument("--device", help="steering model device: auto | cpu | cuda (default: $SAE_APP_DEVICE or auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16", "4bit"),
                   help="the steering LLaVA's precision (default: $SAE_APP_PRECISION or auto: 4-bit for hub models on "
                        "CUDA, fp32 otherwise)")
    p.add_argument("--load-4bit", action="store_true", default=None, help="= --precision 4bit (CUDA)")
    p.add_argument("--llava", help="the LLaVA to steer: a save_pretrained folder or hub id (default: $SAE_APP_LLAVA or "
                                   "the bundle's own: its world's tiny LLaVA, llava-hf/llava-1.5-7b-hf for a CLIP bundle)")
    return p.parse_args(argv)


def _stop(signum, frame):
    raise KeyboardInterrupt  # Gradio's wait for Ctrl-C closes the server on it, and main returns


def main(argv=None) -> int:
    args = parse_args(argv)
    # a bundle path in another encoding than UTF-8 ended the start in a UnicodeEncodeError (until 2026-12-05)
    if bad := not_utf8_argument([*(sys.argv[1:] if argv is None else argv), os.environ.get("SAE_APP_BUNDLE", "")]):
        print(f"error: {bad}", file=sys.stderr)
        return 2
    # `docker stop` sends SIGTERM to PID 1, which has no default action there: the container was killed after
    # 10 s (until 2026-12-05); now it stops as Ctrl-C stops it (signals reach the main thread only; the previous
    # handler is put back, for a caller that runs main in-process)
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        from .server import serve
        from .settings import AppSettings

        settings = AppSettings.from_env(bundle=args.bundle, host=args.host, port=args.port, device=args.device,
                                        precision=args.precision, load_4bit=args.load_4bit, llava=args.llava)
        serve(settings)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
