"""`python -m precompute ms`: Monosemanticity Scores of any neurons from activations and image embeddings."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from sae_core.activation_store import save_npy_atomic, why_not_npy
from sae_core.atomic import output_lock, remove_stale_temporaries, write_json_atomic
from sae_core.errors import UserError
from sae_core.monosemanticity import MSAccumulator, finish_result, read_activations_csv, rescore_in_float64
from sae_core.precision import resolve_device
from sae_core.progress import progress_bar

from .args import check_writable, nonnegative_float, positive_int


def add_arguments(p):
    p.add_argument("--activations", required=True,
                   help="(N images, K neurons) .npy, or the paper's activations.csv (rows `k,a_1..a_N`)")
    p.add_argument("--embeddings", required=True, help="(N, d) .npy of image embeddings, rows in the same image order")
    p.add_argument("--out", required=True, help="output .npy of MS per neuron (float32, NaN where support < 2)")
    p.add_argument("--min-support", type=int, default=2,
                   help="also report (and write OUT_min_support.npy) MS only for neurons firing on >= S images")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--chunk", type=positive_int, default=4096, help="images per streamed chunk")
    p.add_argument("--matmul", choices=["float64", "float32"], default="float64",
                   help="dtype of the per-chunk product (sums are float64 either way; float32 is ~2x faster on CPU)")
    p.add_argument("--checkpoint-every", type=nonnegative_float, default=300,
                   help="seconds between resumable checkpoints (0: after every chunk)")


SHAPES = {"activations": "(N images, K neurons)", "embeddings": "(N images, d)"}


def load_matrix(path: str, name: str) -> np.ndarray:
    """A 2-D .npy, memory-mapped, without pickle."""
    p = Path(path)
    save = f"save the {SHAPES[name]} array with np.save as .npy"
    if p.is_dir():
        raise UserError(f"{name} file {p} is a folder; give the path of the .npy file in it.")
    if not p.is_file():
        raise UserError(f"{name} file {p} does not exist; check the path.")
    if p.stat().st_size == 0:
        raise UserError(f"{name} file {p} is empty (0 bytes); {save}.")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise UserError(f"{p} is not a plain numeric .npy ({why_not_npy(p, e)}); save it with np.save from a numeric "
                        "array.") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise UserError(f"{p} is an .npz archive; {save}.")
    if arr.ndim != 2:
        raise UserError(f"{name} in {p} must be a 2-D array, got shape {arr.shape}.")
    if 0 in arr.shape:
        raise UserError(f"{name} in {p} has shape {arr.shape}, so it holds no values; save a {SHAPES[name]} "
                        f"array with at least one of each.")
    return arr


def load_activations(path: str):
    """(neuron ids or None, (N, K) activations) from a .npy or the paper's activations.csv."""
    if str(path).lower().endswith(".csv"):
        return read_activations_csv(path)
    return None, load_matrix(path, "activations")


def file_key(path: str) -> dict:
    """What identifies an input for resuming: a file rewritten with the same shape is another input."""
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def compute_ms(acts, emb, device, chunk: int, matmul: str, min_support: int, partial: Path | None = None,
               checkpoint_every: float = 300.0, inputs: dict | None = None):
    """Stream (N, K) `acts` and (N, d) `emb` through an MSAccumulator with a progress bar.

    With `partial`, the accumulator is saved there every `checkpoint_every` seconds (one safetensors
    file, its settings and the images done in its metadata, so state and count never disagree) and a
    later call with the same `inputs` description resumes after the last saved chunk.
    """
    from sae_core.resume import load_state, read_info, save_state

    if acts.shape[0] != emb.shape[0]:
        raise UserError(f"activations cover {acts.shape[0]} images but embeddings {emb.shape[0]}; "
                        f"both need one row per image, in the same order.")
    if chunk < 1:
        raise UserError(f"--chunk must be a positive number of images, got {chunk}.")
    acc = MSAccumulator(acts.shape[1], emb.shape[1], device=device,
                        matmul_dtype=torch.float32 if matmul == "float32" else torch.float64)
    meta = dict(inputs or {}, n_images=int(acts.shape[0]), n_neurons=int(acts.shape[1]), d=int(emb.shape[1]),
                chunk=chunk, matmul=matmul)
    start = 0
    saved = read_info(partial) if partial else None
    if saved is not None and {k: v for k, v in saved.items() if k != "n_done"} == meta:
        load_state(partial, {"ms": acc})
        start = saved["n_done"]
        print(f"resuming after {start} of {acts.shape[0]} images")
    elif saved is not None:
        changed = sorted(k for k in (set(meta) | set(saved)) - {"n_done"} if saved.get(k) != meta.get(k))
        print(f"starting over: {', '.join(changed)} changed since {partial.name} was saved")
    last = time.monotonic()
    with progress_bar(total=acts.shape[0], initial=start, unit="img", desc="MS") as bar:
        for a in range(start, acts.shape[0], chunk):
            acc.update(acts[a:a + chunk], emb[a:a + chunk])
            bar.update(min(chunk, acts.shape[0] - a))
            if partial and time.monotonic() - last > checkpoint_every and a + chunk < acts.shape[0]:
                save_state(partial, {"ms": acc}, dict(meta, n_done=acc.n))
                last = time.monotonic()
    result = acc.result(min_support)
    if (unresolved := acc.float32_unresolved()).size:
        print(f"{unresolved.size} neurons scored again in float64: one image holds nearly all of their activation, "
              "which the float32 product cannot resolve")
        result = rescore_in_float64(result, acc, acts, emb, chunk)
    return result


def run(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npy":
        raise UserError(f"--out must name a .npy file, got {out}.")
    if args.min_support < 2:
        raise UserError(f"--min-support must be at least 2 (a score needs two images), got {args.min_support}.")
    device = resolve_device(args.device)
    partial = out.with_name(out.name + ".partial")
    min_support_file = out.with_name(out.stem + "_min_support.npy")
    # OUT_min_support.npy too when not written: an earlier run's is removed
    outputs = [out, out.with_name(out.stem + "_support.npy"), out.with_suffix(".json"), partial, min_support_file]
    sources = {Path(p).resolve(): name for name, p in (("activations", args.activations), ("embeddings", args.embeddings))}
    for f in outputs:
        if f.resolve() in sources:  # it was overwritten with the result
            raise UserError(f"--out {out} would replace {f.name}, the {sources[f.resolve()]} file; name another file.")
        check_writable(f)
    # a second run writing this --out is refused: its cleanup of stale temporaries would delete this one's, and
    # the two would share one checkpoint and leave scores and support of different runs side by side
    with output_lock(out):
        _write_ms(args, out, device, partial, min_support_file, outputs)
    return 0


def _write_ms(args, out: Path, device, partial: Path, min_support_file: Path, outputs: list[Path]) -> None:
    """run's work, under out's lock: read the inputs, compute (resuming `partial`), write the outputs, say so."""
    ids, acts = load_activations(args.activations)
    emb = load_matrix(args.embeddings, "embeddings")
    remove_stale_temporaries(out.parent, [f.name for f in outputs])  # all of them beside out
    inputs = {"activations": file_key(args.activations), "embeddings": file_key(args.embeddings)}
    r = compute_ms(acts, emb, device, args.chunk, args.matmul, args.min_support, partial, args.checkpoint_every, inputs)
    ms, support = r.ms, r.support
    if ids is not None and not np.array_equal(ids, np.arange(len(ids))):
        # csv neuron ids index the output; ids the file does not list get NaN and support 0
        ms = np.full(int(ids.max()) + 1, np.nan, np.float32)
        support = np.zeros(int(ids.max()) + 1, np.int64)
        ms[ids], support[ids] = r.ms, r.support
        r = finish_result(ms, support, r.n_images, args.min_support)
    summary = dict(r.summary(), activations=args.activations, embeddings=args.embeddings, device=str(device),
                   matmul=args.matmul, out=str(out))
    if ids is not None:
        summary["neurons_in_csv"] = int(len(ids))
    save_npy_atomic(out, r.ms)
    save_npy_atomic(out.with_name(out.stem + "_support.npy"), r.support)
    if args.min_support > 2:
        save_npy_atomic(min_support_file, r.ms_supported)
    elif min_support_file.is_file():  # an earlier run's, which would sit beside this run's scores as theirs
        min_support_file.unlink()
    write_json_atomic(out.with_suffix(".json"), summary)
    for f in (partial, partial.with_name(partial.name + ".json")):  # .json: the state's count until 2026-12-03
        if f.exists():
            f.unlink()
    mean = "n/a" if summary["ms_mean"] is None else f"{summary['ms_mean']:.4f}"
    print(f"{r.ms.shape[0]} neurons over {r.n_images} images: {r.n_nan} without a score (support < 2), "
          f"mean MS {mean}")
    if args.min_support > 2:
        mean_s = "n/a" if summary["ms_mean_supported"] is None else f"{summary['ms_mean_supported']:.4f}"
        print(f"with support >= {args.min_support}: {r.n_below_min_support} more neurons left out, mean MS {mean_s}")
    written = [out.with_name(out.stem + "_support.npy").name, out.with_suffix(".json").name]
    if args.min_support > 2:
        written.insert(1, min_support_file.name)
    print(f"wrote {out}, {', '.join(written[:-1])} and {written[-1]}")
