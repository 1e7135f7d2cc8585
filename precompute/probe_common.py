"""Shared plumbing of the probe commands (ood, ontology, probes): bundle features per split, output folder."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from sae_core.atomic import strict_json
from sae_core.bundle import PROBES
from sae_core.errors import UserError

from .args import check_writable, out_folder, positive_int


def add_common(p, fit_images: int | None = None) -> None:
    """The options the probe commands share; `fit_images` is --fit-images's default, None for a command that fits
    nothing (ontology: until 2026-12-05 it took --fit-images and ignored it)."""
    p.add_argument("--bundle", required=True, help="a finished bundle (from `precompute demo` or `precompute atlas`)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", help=f"folder for the JSON and HTML outputs (default BUNDLE/{PROBES})")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass")
    if fit_images is not None:
        p.add_argument("--fit-images", type=positive_int, default=fit_images,
                       help="at most this many training images to fit on (default %(default)s)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write cached features (BUNDLE/probes/.features, one file per SAE and "
                   "dataset, checked against the dataset's files)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")


class FeatureCache(NamedTuple):
    folder: Path
    write: bool
    """False when the folder cannot be written (a read-only bundle): cached features are only read."""


@contextmanager
def open_inputs(args, name: str, html: bool = False):
    """(bundle, feature source, out folder, FeatureCache or None), refusing before any work what would fail
    after it: a cross-modal bundle, an output folder that cannot be written (`name`.json goes there, and
    `name`.html with `html`), a second run writing `name`'s outputs there (their lock is held until the block ends)."""
    import torch

    from sae_core.atomic import output_lock, remove_stale_temporaries
    from sae_core.bundle import open_bundle
    from sae_core.image_features import bundle_source
    from sae_core.precision import resolve_device

    torch.set_num_threads(max(1, args.threads))
    device = resolve_device(args.device)  # "cuda" without a GPU was torch's traceback at the model's move
    bundle = open_bundle(args.bundle)
    layer = str(bundle.manifest.get("model", {}).get("layer", ""))
    if layer.startswith("lm:"):
        raise UserError(f"{bundle.root} is a cross-modal bundle whose SAE reads the language model ({layer}); "
                        f"`{name}` reads vision-layer bundles (from `precompute demo` or `precompute atlas`).")
    out = out_folder(Path(args.out) if args.out else bundle.root / PROBES, "the JSON and HTML outputs")
    for suffix in ("json", "html") if html else ("json",):  # a folder named ood.html failed after the scoring
        check_writable(out / f"{name}.{suffix}")
    with output_lock(out / f"{name}.json"):  # NAME.html too; the other commands' files there are theirs
        # what a kill inside an atomic write left (kept for good until 2026-12-05: a cut feature cache can be GBs);
        # the cache is shared by the three commands, which may run at once: only temporaries of dead writers go
        remove_stale_temporaries(out, [f"{name}.json", f"{name}.html"])
        folder = bundle.root / PROBES / ".features"
        if os.access(folder, os.W_OK):  # also under --no-cache: an earlier run's kill left them
            remove_stale_temporaries(folder, dead_writers_only=True)
        cache = None
        if not args.no_cache:
            cache = FeatureCache(folder, writable_folder(folder))
            if not cache.write:
                print(f"note: the feature cache {folder} cannot be written; features are read from it where present "
                      "and not saved (--no-cache skips it).", file=sys.stderr)
        yield bundle, bundle_source(bundle, device=device), out, cache


def writable_folder(folder: Path) -> bool:
    """Whether `folder` can be written, or created under the nearest existing folder above it."""
    while not folder.exists():
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def world_split(bundle, split: str) -> str | None:
    """world:DIR:split for a world bundle, else None."""
    return f"world:{bundle.world_dir}:{split}" if bundle.world_dir is not None else None


def features(source, spec: str, cache: FeatureCache | None, n_images=None, batch_size: int = 128, what: str = ""):
    """Cached image features of the first `n_images` of a dataset spec, with a progress bar (ETA) while extracting."""
    from sae_core.datasets import open_dataset
    from sae_core.image_features import cached_features
    from sae_core.progress import progress_bar

    n = len(open_dataset(spec)) if n_images is None else min(n_images, len(open_dataset(spec)))
    bar = progress_bar(total=n, desc=f"features {what or spec}", unit="img", leave=False,
                       disable=os.environ.get("TQDM_DISABLE", "") not in ("", "0"))
    try:
        return cached_features(source, spec, None if cache is None else cache.folder, n, batch_size=batch_size,
                               progress=lambda done: bar.update(done - bar.n), write=cache is None or cache.write)
    finally:
        bar.close()


def labels_of(spec: str, ids) -> list | None:
    """Class label of each image (world: the leaf name), or None when the dataset has no labels."""
    from sae_core.datasets import open_dataset

    ds = open_dataset(spec)
    labels = [ds.label(int(i)) for i in ids]
    return None if any(lab is None for lab in labels) else labels


def write_outputs(out: Path, name: str, result: dict, figure=None) -> dict:
    """out/NAME.json (and out/NAME.html from a plotly figure), atomically; returns the paths."""
    from sae_core.atomic import atomic_path, write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if figure is not None:  # before the JSON, which the app reads: a figure that fails leaves the last run's pair
        with atomic_path(out / f"{name}.html") as tmp:
            figure.write_html(str(tmp), include_plotlyjs=True, full_html=True)
        paths["html"] = str(out / f"{name}.html")
    write_json_atomic(out / f"{name}.json", result)
    return {"json": str(out / f"{name}.json"), **paths}


def print_result(args, result: dict, table: list[str]) -> None:
    if args.json:
        print(strict_json(result))
    else:
        print("\n".join(table))


def need_spec(value, what: str, flag: str) -> str:
    if not value:
        raise UserError(f"this bundle is not a world bundle, so there is no default {what}; pass {flag} SPEC "
                        "(e.g. imagefolder:PATH).")
    return value
