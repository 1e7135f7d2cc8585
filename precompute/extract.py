"""`python -m precompute extract`: one pass over a dataset, activations of several layers to sharded stores.

    python -m precompute extract --model open_clip:ViT-B-32/openai --layer 6,11,embed --tokens cls \\
        --dataset imagefolder:$IMAGENET_PATH/train --out runs/acts
    torchrun --nproc-per-node 8 -m precompute extract ...      # each process takes its own shards

Output: OUT/extract.json (the run's settings and plan) and one store per layer, OUT/layer_L/, with
manifest.json and shards/NNNNN.npy (rows, d) plus shards/NNNNN.index.npy (rows, 2: image index, token
position). The dataset is cut into shards of consecutive images; a shard is written under a temporary
name and renamed when complete, then marked done in OUT/progress/, so a killed run resumes where it
stopped (even with another number of processes). Manifests are written last, after all shards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sae_core.activation_store import MANIFEST, RUN_FILE, rows_digest, save_npy_atomic, write_json_atomic
from sae_core.atomic import first_difference, rank_zero_writer_lock, remove_stale_temporaries
from sae_core.errors import UserError

from .args import command_line, nonnegative_int, out_folder, positive_int

STORE_DTYPES = ("float16", "float32")


@dataclass
class ExtractConfig:
    model: str
    dataset: str
    out: str
    layers: list[str] = field(default_factory=list)
    """Empty = the layer a downstream model reads (LLaVA's vision_feature_layer)."""
    tokens: str = "cls"
    batch_size: int = 64
    dtype: str = "float16"
    limit: int | None = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    shard_images: int | None = None
    shard_mb: int = 256
    workers: int | None = None

    def __post_init__(self):
        from sae_core.datasets import absolute_spec

        # recorded in the stores' manifests, so absolute: an SAE trained on them names its model from any folder
        self.model, self.dataset = absolute_spec(self.model), absolute_spec(self.dataset)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="open_clip:NAME[/PRETRAINED] | hf:ID_OR_DIR | llava:[ID_OR_DIR] | world:DIR[:clip|:llava]")
    p.add_argument("--layer", default="", help="L[,L2,...]: block number from 0, negative hidden_states index (-2 = LLaVA's), or embed; "
                   "default: the layer a downstream model reads (LLaVA)")
    p.add_argument("--tokens", default="cls", help="cls | mean (of patch tokens) | all | patches | random:K (K random tokens per image)")
    p.add_argument("--dataset", required=True, help="imagefolder:PATH | imagenet[:SPLIT] | inat[:SPLIT] | files:LIST.txt | world:DIR[:SPLIT]")
    p.add_argument("--out", required=True, help="output directory (one store per layer below it); rerun the same command to resume")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (per process)")
    p.add_argument("--dtype", default="float16", choices=STORE_DTYPES, help="storage dtype of the activations")
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N images of the dataset")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun, cuda = this process's GPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="compute precision of the model; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random:K token choice (a function of seed and image index)")
    p.add_argument("--shard-images", type=positive_int, default=None, help="images per shard (default: shards of about --shard-mb)")
    p.add_argument("--shard-mb", type=positive_int, default=256, help="target shard size in MiB when --shard-images is not given")
    p.add_argument("--workers", type=nonnegative_int, default=None, help="data-loading processes per rank (default: 0 on a small CPU machine)")


def run(args: argparse.Namespace) -> int:
    cfg = ExtractConfig(
        model=args.model, dataset=args.dataset, out=args.out, layers=[x for x in args.layer.split(",") if x.strip()],
        tokens=args.tokens, batch_size=args.batch_size, dtype=args.dtype, limit=args.limit, device=args.device,
        precision=args.precision, seed=args.seed, shard_images=args.shard_images, shard_mb=args.shard_mb,
        workers=args.workers,
    )
    extract(cfg, command=command_line(args))
    return 0


# ----------------------------------------------------------------------------------------------
def _auto_precision(precision: str, device: str) -> str:
    import torch

    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def _versions() -> dict:
    import platform

    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "transformers": transformers.__version__}
    try:
        import open_clip

        v["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return v


class _Items:
    """Dataset wrapper for the DataLoader: index -> (index, PIL image | None, error | None)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from sae_core.datasets import ImageReadError

        try:
            return i, self.ds[i], None
        except ImageReadError as e:
            return i, None, str(e)


class _Collate:
    """Preprocess a batch in one processor call (in the loader's workers when there are some); an
    image the processor cannot handle is found by retrying one by one, then skipped and counted."""

    def __init__(self, preprocessor, ds):
        self.preprocessor, self.ds = preprocessor, ds

    def __call__(self, items):
        import torch

        skipped = [(i, err) for i, im, err in items if err is not None]
        ok = [(i, im) for i, im, err in items if err is None]
        if not ok:
            return None, np.zeros(0, np.int64), skipped
        try:
            pixels = self.preprocessor.batch([im for _, im in ok])
        except Exception:
            good, tensors = [], []
            for i, im in ok:
                try:
                    tensors.append(self.preprocessor(im))
                    good.append((i, im))
                except Exception as e:  # e.g. an image too small for the processor
                    skipped.append((i, f"{self.ds.item(i)}: preprocessing failed: {type(e).__name__}: {e}"))
            ok = good
            pixels = torch.stack(tensors) if tensors else None
        skipped.sort()
        return pixels, np.array([i for i, _ in ok], dtype=np.int64), skipped


def _auto_shard_images(n: int, batch: int, world_size: int, shard_bytes: int, image_bytes: int) -> int:
    """Images per shard: at most about `shard_bytes`, at least 4 shards per process (load balance),
    and a whole number of batches, so batches fall on the same images whatever the shard grid (the
    rows are then bit-identical for any number of processes)."""
    by_size = max(1, shard_bytes // max(1, image_bytes))
    by_balance = -(-n // (4 * world_size))
    s = min(by_size, by_balance)
    return max(batch, s - s % batch) if by_size >= batch else s  # (a shard smaller than a batch: as asked)


def _plan(cfg: ExtractConfig, out: Path, identity: dict, rows_per_image: int, width: int, is_main: bool,
          world_size: int = 1) -> dict:
    """Create or check OUT/extract.json (rank 0), so a resumed run continues the same shard grid."""
    from sae_core.datasets import absolute_spec, files_changed, images_changed

    run_file = out / RUN_FILE
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if run_file.exists():
            plan = json.loads(run_file.read_text(encoding="utf-8"))
            old = plan.get("identity", {})
            # before 2026-12-05 a relative path in a spec was recorded as typed: from the same folder, it names this one
            old = {**old, **{k: absolute_spec(old[k]) for k in ("model", "dataset") if isinstance(old.get(k), str)}}
            # plans before the evening of 2026-12-05 did not record which images: taken as these; another dataset
            # or number of images is reported as that setting
            for key in ("items_sha256", "images_files", "model_files"):  # and before the night of 12-05, whose files
                old.setdefault(key, identity[key])
            same_images = all(old.get(k) == identity[k] for k in ("dataset", "n_images"))
            if old["items_sha256"] != identity["items_sha256"] and same_images:
                raise images_changed(out, cfg.dataset, identity["n_images"], "extract")
            # the same names and spec, other files under them (until 2026-12-05 the old shards were kept in silence)
            if old["images_files"] != identity["images_files"] and same_images:
                raise files_changed(out, f"the first {identity['n_images']:,} images of {cfg.dataset}", "extract")
            if old["model_files"] != identity["model_files"] and old.get("model") == identity["model"]:
                raise files_changed(out, f"the weights of {cfg.model}", "extract")
            differs = first_difference({k: old.get(k) for k in identity}, identity)
            if differs:
                raise UserError(f"{out} holds an extraction with other settings ({differs}); pass the same options "
                                "to resume, or a new --out.")
            if plan.get("identity") != identity:  # recorded before some of it was: recorded whole from now on
                plan["identity"] = identity
                write_json_atomic(run_file, plan)
            if cfg.shard_images and cfg.shard_images != plan["shard_images"]:
                raise UserError(f"{out} was started with --shard-images {plan['shard_images']}; resume with that value or a new --out.")
        else:
            n = identity["n_images"]
            shard_images = cfg.shard_images or _auto_shard_images(
                n, cfg.batch_size, world_size, cfg.shard_mb << 20, rows_per_image * width * np.dtype(cfg.dtype).itemsize)
            plan = {"identity": identity, "shard_images": int(shard_images),
                    "n_shards": int(-(-n // shard_images)), "layers": identity["layers"], "complete": False}
            write_json_atomic(run_file, plan)
        remove_stale_temporaries(out)
    return plan if is_main else {}


def extract(cfg: ExtractConfig, command: str = "") -> dict:
    """Run (or resume) an extraction; returns the run summary written to OUT/extract.json."""
    out_folder(Path(cfg.out), "the activation stores", writes=("extraction",))
    # under torchrun every rank writes its own shards of OUT and rank 0 holds OUT's lock: a second launch into
    # the same folder is refused while this one runs (its rank 0 before its plan, which its other ranks wait for
    # before they write); before, both wrote the same shards and each removed the other's temporaries
    with rank_zero_writer_lock(cfg.out):
        return _extract(cfg, command)


def _extract(cfg: ExtractConfig, command: str) -> dict:
    import torch

    from sae_core.adapters import TokenSpec, load_adapter, parse_layers, select_tokens
    from sae_core.datasets import first_images_warning, image_files_digest, items_digest, model_files_digest, open_dataset
    from sae_core.distributed import barrier, finish_distributed, init_distributed, local_device
    from sae_core.precision import resolve_device, warn_if_slow_half
    from sae_core.progress import progress_bar

    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size} must be at least 1.")
    if cfg.dtype not in STORE_DTYPES:
        raise UserError(f"--dtype {cfg.dtype} is not one of {', '.join(STORE_DTYPES)}.")
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    try:
        device = local_device(device, info)
        precision = _auto_precision(cfg.precision, device)
        if info.is_main:
            warn_if_slow_half(device, precision, "--precision fp32")
        token_spec = TokenSpec.parse(cfg.tokens)
        ds = open_dataset(cfg.dataset)
        adapter = load_adapter(cfg.model, device=device, precision=precision)
        names = parse_layers(cfg.layers) if cfg.layers else []
        if not names:
            if adapter.read_layer is None:
                raise UserError(f"{cfg.model} has no layer a downstream model reads; pass --layer L[,L2,...].")
            names = [str(adapter.read_layer)]
        layers = [adapter.resolve_layer(x) for x in names]
        for i, lay in enumerate(layers):  # "-2,2" of a 4-block tower: one block, written twice as two stores
            same = next((names[j] for j in range(i) if layers[j].same_place(lay)), None)
            if same is not None:
                raise UserError(f"layers {same} and {names[i]} are one place of {cfg.model} "
                                f"({lay.describe(adapter.n_blocks)}); list it once.")
        if any(lay.kind != "embed" for lay in layers):
            token_spec.check(adapter.layout, cfg.model)
        n_images = min(len(ds), cfg.limit) if cfg.limit is not None else len(ds)
        if n_images < 1:
            raise UserError(f"--limit {cfg.limit} leaves no images to extract.")
        if info.is_main and (warning := first_images_warning(ds, n_images)):
            print(warning, file=sys.stderr)
        identity = {"model": cfg.model, "dataset": cfg.dataset, "layers": names, "tokens": str(token_spec),
                    "dtype": cfg.dtype, "n_images": n_images, "seed": cfg.seed, "precision": precision}
        if info.is_main:  # only rank 0 checks the plan: other ranks would read every image's name and stat its file
            identity.update(items_sha256=items_digest(ds, n_images), images_files=image_files_digest(ds, n_images),
                            model_files=model_files_digest(cfg.model))
        rows_per = max(1 if lay.kind == "embed" else token_spec.rows_per_image(adapter.layout) for lay in layers)
        out = Path(cfg.out)
        plan = _plan(cfg, out, identity, rows_per, max(adapter.width, adapter.embed_dim), info.is_main, info.world_size)
        barrier(info)
        if not info.is_main:
            plan = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        S, n_shards = plan["shard_images"], plan["n_shards"]
        progress = out / "progress"
        layer_dirs = {lay.name: out / f"layer_{lay.name}" for lay in layers}
        if info.is_main:
            progress.mkdir(exist_ok=True)
            for d in layer_dirs.values():
                (d / "shards").mkdir(parents=True, exist_ok=True)
        barrier(info)

        # This rank's shards: a contiguous block, so rows stay in dataset order when merged.
        mine = range(info.rank * n_shards // info.world_size, (info.rank + 1) * n_shards // info.world_size)
        todo = [k for k in mine if not _shard_done(progress / f"{k:05d}.json", layer_dirs)]
        batches, owner = [], []
        for k in todo:
            lo, hi = k * S, min((k + 1) * S, n_images)
            for b in range(lo, hi, cfg.batch_size):
                batches.append(list(range(b, min(b + cfg.batch_size, hi))))
                owner.append(k)
        workers = cfg.workers
        if workers is None:
            cpus = os.cpu_count() or 1
            workers = min(8, cpus // max(1, info.world_size) - 1) if device.startswith("cuda") else (0 if cpus <= 4 else 2)
            workers = max(0, workers)
        loader = torch.utils.data.DataLoader(
            _Items(ds), batch_sampler=batches, collate_fn=_Collate(adapter.preprocessor, ds), num_workers=workers,
            pin_memory=device.startswith("cuda"), persistent_workers=False,
        )
        throttle = float(os.environ.get("SAE_EXTRACT_THROTTLE_S", "0"))  # tests: make a run slow enough to kill
        bar = progress_bar(total=sum(len(b) for b in batches), unit="img", disable=not info.is_main, dynamic_ncols=True,
                           desc=f"extract {cfg.model} layers {','.join(names)}" + (f" (rank 0 of {info.world_size})" if info.world_size > 1 else ""))
        t0 = time.time()
        done_images = 0
        buf: dict[str, list] = {lay.name: [] for lay in layers}
        skipped: list[dict] = []  # this shard's
        n_skipped = 0  # this session's, for the bar (it showed the shard's count)
        for bi, (pixels, ids, skip) in enumerate(loader):
            k = owner[bi]
            n_skipped += len(skip)
            for i, err in skip:
                skipped.append({"index": int(i), "item": ds.item(int(i)), "error": err})
                bar.write(f"warning: skipped unreadable image {i} ({err})", file=sys.stderr)
            if pixels is not None:
                acts = adapter.capture(pixels, layers)
                for lay in layers:
                    rows, index = select_tokens(acts[lay.name], token_spec, ids, adapter.layout, cfg.seed)
                    buf[lay.name].append((_to_storage(rows, cfg.dtype, lay.name, precision), index))
            bar.update(len(ids) + len(skip))
            done_images += len(ids) + len(skip)
            if n_skipped:
                bar.set_postfix(skipped=n_skipped, refresh=False)
            if throttle:
                time.sleep(throttle)
            if bi + 1 == len(batches) or owner[bi + 1] != k:
                _write_shard(k, S, n_images, layers, layer_dirs, buf, skipped, progress, adapter.width)
                buf = {lay.name: [] for lay in layers}
                skipped = []
        bar.close()
        done_images = _sum_over_ranks(done_images, info, device)  # also waits for every rank
        elapsed = time.time() - t0
        summary = {}
        if info.is_main:
            summary = _merge(cfg, out, plan, layers, layer_dirs, adapter, ds, token_spec, precision, command,
                             elapsed, done_images, info.world_size)
        barrier(info)
        if not info.is_main:
            summary = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        return summary
    finally:
        finish_distributed(info)


def _shard_done(marker: Path, layer_dirs: dict[str, Path]) -> bool:
    """Whether a shard is marked done and its files are all there, whole: a shard file deleted or cut
    short after its marker was written is redone, instead of being listed again in a manifest that
    then cannot be read."""
    if not marker.exists():
        return False
    try:
        rows = json.loads(marker.read_text(encoding="utf-8"))["rows"]
        for name, d in layer_dirs.items():
            acts = np.load(d / "shards" / marker.with_suffix(".npy").name, mmap_mode="r")
            index = np.load(d / "shards" / marker.with_suffix(".index.npy").name, mmap_mode="r")
            if acts.ndim != 2 or acts.shape[0] != rows[name] or index.shape != (rows[name], 2):
                return False
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return False
    return True


def _sum_over_ranks(n: int, info, device: str) -> int:
    if info.world_size == 1:
        return n
    import torch
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return int(t.item())


def _to_storage(rows, dtype: str, layer: str, precision: str) -> np.ndarray:
    """float32 rows -> the storage dtype, refusing values the store cannot hold."""
    arr = rows.float().cpu().numpy()
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    if not np.isfinite(peak):
        raise UserError(f"layer {layer} produced NaN or infinite activations at precision {precision}; rerun with --precision fp32.")
    if dtype == "float16" and peak > float(np.finfo(np.float16).max):
        raise UserError(f"layer {layer} has activations up to {peak:.3g}, beyond float16's range; "
                        "rerun with --dtype float32 and a new --out.")
    return arr.astype(dtype)


def _write_shard(k, S, n_images, layers, layer_dirs, buf, skipped, progress, width):
    rows, digests = {}, {}
    for lay in layers:
        parts = buf[lay.name]
        if parts:
            acts = np.concatenate([a for a, _ in parts])
            index = np.concatenate([i for _, i in parts])
        else:
            acts, index = np.zeros((0, width), np.float16), np.zeros((0, 2), np.int64)
        d = layer_dirs[lay.name] / "shards"
        save_npy_atomic(d / f"{k:05d}.index.npy", index)
        save_npy_atomic(d / f"{k:05d}.npy", acts)
        rows[lay.name] = int(len(acts))
        # what training tells one store from another by (ActivationStore.identity): digested here, from memory
        digests[lay.name] = rows_digest(acts, index)
    # The marker goes last: a shard is done only when every layer's files are in place.
    write_json_atomic(progress / f"{k:05d}.json", {
        "shard": k, "images": [k * S, min((k + 1) * S, n_images)], "rows": rows, "rows_digest": digests,
        "skipped": skipped,
    })


def _merge(cfg, out, plan, layers, layer_dirs, adapter, ds, token_spec, precision, command, elapsed,
           done_images, world_size) -> dict:
    markers = []
    for k in range(plan["n_shards"]):
        p = out / "progress" / f"{k:05d}.json"
        if not p.exists():
            raise UserError(f"shard {k} of {out} is missing after all processes finished; rerun the same command to complete it.")
        markers.append(json.loads(p.read_text(encoding="utf-8")))
    skipped = [s for m in markers for s in m["skipped"]]
    n_images = plan["identity"]["n_images"]
    if len(skipped) == n_images:
        # their shards marked done, a rerun after the data was mended read nothing and said the same again
        for k in range(plan["n_shards"]):
            (out / "progress" / f"{k:05d}.json").unlink(missing_ok=True)
        (out / RUN_FILE).unlink()  # and the plan: it holds the files as they were, and the rerun reads them mended
        said = (f"the only image of {cfg.dataset} could not be read ({skipped[0]['error']})" if n_images == 1 else
                f"none of the {n_images} images of {cfg.dataset} could be read (first: {skipped[0]['error']})")
        raise UserError(f"{said}; check the dataset, then run the same command again (it reads them all again).")
    model = adapter.describe()
    for lay in layers:
        shards = [{"path": f"shards/{m['shard']:05d}.npy", "index": f"shards/{m['shard']:05d}.index.npy",
                   "rows": m["rows"][lay.name], "images": m["images"],
                   **({"rows_digest": m["rows_digest"][lay.name]} if "rows_digest" in m else {})}  # (none before 12-05)
                  for m in markers if m["rows"][lay.name] > 0]
        d = adapter.embed_dim if lay.kind == "embed" else adapter.width
        manifest = {
            "format": "sae-lab activations", "version": 1,
            "d": d, "dtype": cfg.dtype, "rows": int(sum(s["rows"] for s in shards)),
            "model": model, "layer": lay.name, "layer_kind": lay.kind, "block": lay.block,
            "layer_description": lay.describe(adapter.n_blocks),
            "tokens": "embed" if lay.kind == "embed" else str(token_spec), "seed": cfg.seed,
            "precision": precision,
            "dataset": {**ds.describe(), "images_used": n_images},
            "n_images": n_images - len(skipped), "n_skipped": len(skipped), "skipped": skipped,
            "row_index": "index files hold [image index, token position]; position -1 = pooled (mean or embed)",
            "shards": shards, "command": command, "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(layer_dirs[lay.name] / MANIFEST, manifest)
    if skipped:
        print(f"warning: {len(skipped)} of {n_images} images could not be read and were skipped "
              f"(listed under 'skipped' in the manifests).", file=sys.stderr)
    summary = {**plan, "complete": True, "n_skipped": len(skipped),
               "stores": {lay.name: str(layer_dirs[lay.name]) for lay in layers},
               "last_session": {"images": done_images, "seconds": round(elapsed, 3),
                                "images_per_s": round(done_images / elapsed, 2) if elapsed > 0 else None,
                                "processes": world_size},
               "config": asdict(cfg)}
    write_json_atomic(out / RUN_FILE, summary)
    rows = {lay.name: json.loads((layer_dirs[lay.name] / MANIFEST).read_text(encoding="utf-8"))["rows"]
            for lay in layers}
    print(f"wrote {len(layers)} store(s) under {out}: " + ", ".join(f"layer_{n} ({r} rows)" for n, r in rows.items()),
          file=sys.stderr)
    return summary
