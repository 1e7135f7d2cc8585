"""`python -m precompute atlas`: build a bundle (per-neuron atlas, labels, hierarchy, index) from an SAE.

    python -m precompute atlas --sae runs/sae --dataset world:W:val --model world:W:llava --layer -2 \\
        --embedder world:W --out runs/bundle

Stages (each writes its files atomically, then a marker in BUNDLE/.stages/; a rerun of the same
command skips finished stages and reruns every stage after one that runs again; other settings on
the same --out are refused):
  scan       one streaming pass: model -> layer (all tokens) -> SAE -> top images, histograms, bands,
             frequencies, MS of SAE and raw neurons, image embeddings, reconstruction metrics
  geometry   Matryoshka levels, decoder-cosine neighbours
  labels     best vocabulary concept per neuron (CLIP text vs mean embedding of its top images, or of
             its gallery by the max over patches where it has none)
  hierarchy  parent of each latent in the level above (decoder cosine and co-activation), tree, depth
  index      FAISS index of the image embeddings
  world      ground-truth figures (world datasets only)
  thumbs     thumbnails of the images shown in some gallery
  manifest   written last: without it the bundle is unfinished and never served
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sae_core import bundle as B
from sae_core.atomic import first_difference, remove_stale_temporaries, strict_json, writer_lock
from sae_core.errors import UserError

from .args import command_line, nonnegative_int, out_folder, positive_float, positive_int

STAGES = ("scan", "geometry", "labels", "hierarchy", "index", "world", "thumbs")
STAGE_DIR = ".stages"
THUMB_MAX_SIDE = 128


@dataclass
class AtlasJob:
    sae: str
    dataset: str
    model: str
    out: str
    layer: str | None = None
    embedder: str | None = None
    topk: int = 16
    score: str | None = None
    batch_size: int = 128
    memory_gib: float = 4.0
    device: str = "cpu"
    limit: int | None = None
    seed: int = 0
    vocabulary: str | None = None
    checkpoint_every: int | None = None
    """Images between saves of the scan's running state (None: every 5 minutes)."""
    command: str = ""
    extra_manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        from sae_core.atlas import AtlasConfig
        from sae_core.datasets import absolute_spec

        # recorded in the manifest, so absolute: the explorer, started elsewhere, read `hf:clip` from its own folder
        self.dataset, self.model = absolute_spec(self.dataset), absolute_spec(self.model)
        self.embedder = self.embedder and absolute_spec(self.embedder)
        # bad numbers (--topk, --batch-size, --memory-gib, --score) fail here, before any model loads
        AtlasConfig(layer=str(self.layer), score=self.score or "max", topk=self.topk, batch_size=self.batch_size,
                    memory_gib=self.memory_gib)
        if self.vocabulary:  # read now: found at the labels stage, a typo came after the scan and locked --out to it
            from sae_core.labels import file_concepts

            file_concepts(self.vocabulary)
        if self.limit is not None and self.limit < 2:  # refused before any model loads, not after
            raise UserError(f"--limit {self.limit} must be at least 2: the atlas compares images (MS needs two).")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every {self.checkpoint_every} must be at least 1 image "
                            "(leave it out to save every 5 minutes).")

    @functools.cached_property
    def opened_dataset(self):
        """The dataset, opened once for every stage of this run: an image folder is listed when it opens
        (ImageNet train: 1.28 million files), and the limit, scan, labels, hierarchy, index and thumbnails each
        listed it again."""
        from sae_core.datasets import open_dataset

        return open_dataset(self.dataset)

    def identity(self) -> dict:
        """Settings that define the bundle's content (a rerun must match them to resume)."""
        d = asdict(self)
        for k in ("out", "batch_size", "memory_gib", "device", "checkpoint_every", "command", "extra_manifest"):
            d.pop(k)
        d["sae"] = self.sae if self.sae.startswith("hf:") else str(Path(self.sae).resolve())
        return d


def add_arguments(p) -> None:
    p.add_argument("--sae", required=True,
                   help="SAE directory: ours (`precompute train`), SAELens's, sparsify's or dictionary_learning's; "
                        "or hf:OWNER/REPO[/FOLDER] on the Hugging Face Hub")
    p.add_argument("--dataset", required=True, help="images to scan: imagefolder:PATH | files:LIST | world:DIR[:SPLIT] | ...")
    p.add_argument("--model", required=True, help="the model the SAE was trained on: open_clip:... | hf:... | llava:... | world:DIR[:llava]")
    p.add_argument("--layer", help="layer the SAE reads (default: the layer it was trained on, else the model's read layer)")
    p.add_argument("--embedder", help="model whose unit-norm image embeddings define MS, labels and search "
                   "(default: world:DIR for world models, else --model)")
    p.add_argument("--out", required=True, help="bundle directory (rerun the same command to resume)")
    p.add_argument("--topk", type=positive_int, default=16, help="top images kept per neuron")
    p.add_argument("--score", choices=("cls", "max", "mean"),
                   help="image score: CLS activation, or max/mean over patches (default: as the SAE was trained)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per batch (at most; see --memory-gib)")
    p.add_argument("--memory-gib", type=positive_float, default=4.0,
                   help="memory one batch's dense SAE codes may take; smaller batches when the batch would exceed it "
                        "(K 65,536 on 257 tokens: about 10 images in 4 GiB)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--limit", type=positive_int, help="scan only the first N images")
    p.add_argument("--vocabulary", help="text file of concepts, one per line (default: the world's words for world "
                                        "data, else the dataset's class names: folders, iNaturalist species, ImageNet "
                                        "classes named by LOC_synset_mapping.txt)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the band samples")
    p.add_argument("--checkpoint-every", type=positive_int,
                   help="images between saves of the scan's state, so a killed scan resumes there (default: every 5 minutes)")


def run(args) -> int:
    from sae_core.precision import resolve_device

    device = resolve_device(args.device)
    job = AtlasJob(sae=args.sae, dataset=args.dataset, model=args.model, out=args.out, layer=args.layer,
                   embedder=args.embedder, topk=args.topk, score=args.score, batch_size=args.batch_size,
                   memory_gib=args.memory_gib,
                   device=device, limit=args.limit, seed=args.seed, vocabulary=args.vocabulary,
                   checkpoint_every=args.checkpoint_every,
                   command=command_line(args))
    from .progress import PipelineProgress

    progress = PipelineProgress(STAGE_WEIGHTS, desc="atlas", log=Path(args.out) / STAGE_DIR / "log.txt")
    with progress:
        manifest = build_atlas(job, progress)
    print(strict_json({"out": str(args.out), **{k: manifest["metrics"].get(k) for k in
                                                 ("fvu", "l0", "dead_frac", "ms_mean", "ms_mean_raw")}}))
    return 0


WORLD_FIGURES = ("ms_ground_truth_spearman", "ms_ground_truth_spearman_raw", "ms_agreement",
                 "ms_agreement_factor_embedder", "ms_agreement_ideal_neurons", "ms_ground_truth_spearman_patch_only",
                 "ms_agreement_patch_only", "label_accuracy", "label_accuracy_patch_gallery", "label_accuracy_by_patch",
                 "hierarchy_depth")
"""The world stage's figures that the manifest's metrics carry (and `precompute inspect` prints)."""

POOR_FVU = 0.5
"""Above this fraction of variance unexplained the atlas says the SAE may be reading the wrong activations."""

# Expected seconds per stage on 2 CPU cores for the demo world (the progress bar's weights).
STAGE_WEIGHTS = {"atlas: scan": 30, "atlas: geometry": 1, "atlas: labels": 3, "atlas: hierarchy": 3,
                 "atlas: index": 1, "atlas: world": 3, "atlas: thumbs": 3}


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------
def _stage_path(out: Path, name: str) -> Path:
    return out / STAGE_DIR / f"{name}.json"


def scan_checkpoint_path(out: Path) -> Path:
    """The running state of an unfinished scan (sae_core.atlas.ScanCheckpoint), gone once the scan is done."""
    return out / STAGE_DIR / "scan.state.safetensors"


def stage_info(out: Path, name: str) -> dict | None:
    """What stage `name` recorded when it finished, or None: not finished, or its marker cannot be read
    (damaged by hand or by the disk: the stage runs again rather than the command ending in a traceback)."""
    return read_json_dict(_stage_path(out, name))


def read_json_dict(path: Path) -> dict | None:
    """The JSON object at `path`, or None where it is missing, unreadable or no object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _stage_outputs(name: str, job: AtlasJob, world) -> list[str]:
    """The files of stage `name` that later stages and the explorer read (not the optional ones: the
    crossmodal command's own scan writes no ms_factors)."""
    if name == "scan":
        return ["neurons/top_images.npy", "neurons/ms.npy", "neurons/support.npy", "neurons/max_act.npy",
                "neurons/hist_counts.npy", "neurons/band_images.npy", B.RAW_MS, "raw/top_images.npy", B.EMBEDDINGS,
                *(["neurons/patch_top_images.npy", "neurons/patch_ms.npy"] if job.score == "cls" else [])]
    return {"geometry": ["neurons/group.npy", "neurons/decoder_neighbors.npy"],
            "labels": [B.LABELS, "neurons/label_score.npy"],
            "hierarchy": ["neurons/parent.npy", "neurons/parent_coact.npy", B.HIERARCHY],
            "index": [B.INDEX, B.INDEX + ".json"], "world": [B.WORLD] if world is not None else [], "thumbs": [B.THUMBS]}[name]


def _readable(out: Path, name: str) -> bool:
    from sae_core import search_index

    path = out / name
    try:
        if name == B.INDEX:  # read back: a cut-short copy exists but search would end in a faiss error
            index = search_index._faiss().read_index(str(path))
            return (index.ntotal, index.d) == np.load(out / B.EMBEDDINGS, mmap_mode="r").shape
        if name == B.INDEX + ".json":
            search_index.read_info(out / B.INDEX)
        elif path.suffix == ".npy":
            np.load(path, mmap_mode="r", allow_pickle=False)  # a truncated file fails here: its header or mmap
        elif path.suffix == ".json":
            return read_json_dict(path) is not None
        return path.exists()
    except (OSError, ValueError, RuntimeError, UserError):  # RuntimeError: faiss's, for a damaged index
        return False


def _redo_broken_stages(out: Path, job: AtlasJob, world, note) -> None:
    """A finished stage whose files are gone or damaged runs again (with every stage after it), instead of
    a later stage ending in a traceback on them."""
    for name in STAGES:
        if stage_info(out, name) is None:
            continue
        broken = next((f for f in _stage_outputs(name, job, world) if not _readable(out, f)), None)
        if broken is not None:
            note(f"atlas: {out / broken} is missing or damaged; the {name} stage and those after it run again.")
            _stage_path(out, name).unlink()
            return


def _mark(out: Path, name: str, info: dict) -> None:
    B.write_json(out, f"{STAGE_DIR}/{name}.json", info)


def _forget_later_stages(out: Path, name: str) -> None:
    """Stage `name` is about to run (again): later stages read what it writes (labels feed the tree and
    the world figures), so their markers go and they run again too."""
    for later in STAGES[STAGES.index(name) + 1:]:
        _stage_path(out, later).unlink(missing_ok=True)


def _check_identity(out: Path, identity: dict, recorded=None) -> None:
    """Hold `out` to the settings of what it holds (see hold_settings)."""
    built = scan_checkpoint_path(out).is_file() or any(_stage_path(out, s).is_file() for s in STAGES)
    hold_settings(out, f"{STAGE_DIR}/settings.json", identity, built, recorded)


def _sae_file_digest(sae: str) -> str | None:
    """`files_digest` of the SAE's weights file (an SAE retrained in place is another SAE); None for a hub SAE."""
    from sae_core.checkpoint import weights_file
    from sae_core.datasets import files_digest

    return None if sae.startswith("hf:") else files_digest([weights_file(sae)])


def covering_limit(limit, dataset_size) -> int | None:
    """--limit as the build it makes: None when it leaves every image (`dataset_size()`, only called then), so
    that `--limit 5000` on 2,000 images and no --limit are one build."""
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= dataset_size():
        return None
    return limit


def hold_settings(out: Path, name: str, settings: dict, built: bool, recorded=None) -> None:
    """Refuse settings other than those `out/name` records once something was `built` under them; until
    then (a run that failed on a typo before it saved anything) the new settings replace the old.
    `recorded(old)`: the recorded settings as `settings` now spell the same build (older versions wrote some
    differently)."""
    path = out / name
    new = json.loads(json.dumps(settings))
    if path.is_file() and built:
        old = read_json_dict(path)
        if old is None:
            raise UserError(f"{path} cannot be read, so the settings {out} was built with are unknown; pass a new "
                            f"--out, or delete {out} to build there from the start.")
        raw = old
        if recorded is not None:
            old = recorded(old)
        differs = first_difference({k: old.get(k) for k in new}, new)
        if differs:
            raise UserError(f"{out} holds a bundle built with other settings ({differs}); pass the same options "
                            "to resume, or a new --out.")
        missing = {k: v for k, v in new.items() if k not in raw}
        if missing:  # recorded before these were (the files' digests, 2026-12-05): added, once, and held from then on
            B.write_json(out, name, {**raw, **missing})
    else:
        B.write_json(out, name, new)


def _world_root(dataset_spec: str) -> tuple[Path, str] | None:
    from sae_core.datasets import world_root_and_split

    kind, _, rest = dataset_spec.partition(":")
    if kind != "world" or not rest:
        return None
    root, split = world_root_and_split(rest)
    return Path(os.path.expanduser(root)).resolve(), split


# ----------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------
def build_atlas(job: AtlasJob, progress=None) -> dict:
    """Run (or resume) every stage of the atlas and write the manifest; returns the manifest."""
    from sae_core.checkpoint import load_sae, trained_on

    out = out_folder(Path(job.out), "the bundle", writes=("bundle",))
    sae = load_sae(job.sae, device=job.device)
    trained = trained_on(sae)
    if "embed" in (trained["layer"], trained["tokens"]):  # before 2026-12-05: "pass --layer L", then a width mismatch
        raise UserError(f"the SAE in {job.sae} was trained on layer embed (one image embedding, no patch tokens for "
                        "galleries or heat maps), and the atlas needs an SAE trained on a block layer's tokens; extract "
                        "and train one on a block layer (e.g. --layer -2) and pass that.")
    world = _world_root(job.dataset)
    if job.layer is None:
        job.layer = str(trained["layer"]) if trained["layer"] is not None else None
    if job.embedder is None:
        model_world = job.model.startswith("world:")
        job.embedder = ("world:" + job.model[6:].rsplit(":", 1)[0] if job.model.endswith(":llava") else job.model) \
            if model_world else job.model
    if job.score is None:
        from sae_core.atlas import default_score

        job.score = default_score(trained["tokens"])
    # a second build into this folder (the command started twice) is refused while this one runs; the demo and the
    # cross-modal command hold the same lock around it (re-entrant)
    with writer_lock(out):
        try:
            return _build_stages(job, sae, out, world, progress)
        except BaseException:
            _forget_unbuilt(out)
            raise


def _forget_unbuilt(out: Path) -> None:
    """A build stopped before it saved anything (refused: a layer the model lacks, a score it has no token for)
    takes its settings and log with it, so that writer_lock removes the --out it made: they were left behind
    until 2026-12-05, and `inspect` called the folder an unfinished bundle with a resume command that was refused
    again."""
    if scan_checkpoint_path(out).is_file() or any(_stage_path(out, s).is_file() for s in STAGES):
        return  # something was built: the settings hold it to its build, and a rerun resumes
    for name in ("settings.json", "log.txt"):
        (out / STAGE_DIR / name).unlink(missing_ok=True)
    try:
        (out / STAGE_DIR).rmdir()
    except OSError:  # something else is there: kept
        pass


def _build_stages(job: AtlasJob, sae, out: Path, world, progress) -> dict:
    """build_atlas's writing half: the stages not done yet, then the manifest (the caller holds out's lock)."""
    from sae_core.datasets import (absolute_spec, files_changed, image_files_digest, images_changed, items_digest,
                                   model_files_digest)
    from sae_core.labels import file_concepts

    def dataset_size():  # listed once per run (the digest below needs it: 1.28 M files for ImageNet's train split)
        return len(job.opened_dataset)

    job.limit = covering_limit(job.limit, dataset_size)
    n = dataset_size() if job.limit is None else min(job.limit, dataset_size())
    digest = items_digest(job.opened_dataset, n)  # which images: a resumed scan mixed two lists until 2026-12-05

    def recorded(old: dict) -> dict:
        # bundles built before limits were recorded this way hold a covering --limit as given, before 2026-12-05 a
        # relative path in a spec as typed (resumed from the same folder, it names what the absolute path names
        # now), and before that evening no digest of the images (taken as these)
        old = {**old, "limit": covering_limit(old.get("limit"), dataset_size),
               "items_sha256": old.get("items_sha256", digest),
               **{k: absolute_spec(old[k]) for k in ("dataset", "model", "embedder") if isinstance(old.get(k), str)}}
        if old["items_sha256"] != digest and (old["limit"], old.get("dataset")) == (job.limit, job.dataset):
            raise images_changed(out, job.dataset, n, "build")  # (another limit or dataset: reported as that)
        # the same specs and names, other files under them: until 2026-12-05 a finished bundle was kept, and a
        # killed one finished with the new SAE's decoder figures beside the old SAE's galleries, in silence
        old = {**files, **old}  # (recorded before the night of 2026-12-05: taken as these)
        for key, (spec_key, what) in changed_what.items():
            if old[key] != files[key] and old.get(spec_key) == identity[spec_key]:
                raise files_changed(out, what, "build")
        return old

    files = {"images_files": image_files_digest(job.opened_dataset, n), "model_files": model_files_digest(job.model),
             "embedder_files": job.embedder and model_files_digest(job.embedder), "sae_file": _sae_file_digest(job.sae),
             "vocabulary_sha256": job.vocabulary and hashlib.sha256(
                 json.dumps(file_concepts(job.vocabulary)).encode()).hexdigest()}
    changed_what = {"images_files": ("dataset", f"the first {n:,} images of {job.dataset}"),
                    "model_files": ("model", f"the weights of {job.model}"),
                    "embedder_files": ("embedder", f"the weights of {job.embedder}"),
                    "sae_file": ("sae", f"the SAE's weights in {job.sae}"),
                    "vocabulary_sha256": ("vocabulary", f"the concepts of {job.vocabulary}")}
    identity = {**job.identity(), "items_sha256": digest, **files}
    _check_identity(out, identity, recorded)
    _redo_broken_stages(out, job, world, progress.note if progress is not None else lambda line: print(line, file=sys.stderr))
    if stage_info(out, "scan") is not None:  # a kill between the scan's mark and this removal left it for good
        scan_checkpoint_path(out).unlink(missing_ok=True)  # (until 2026-12-05: ~4 GB at the paper's size)
    manifest = read_json_dict(out / B.MANIFEST)
    if manifest is not None and all(stage_info(out, s) is not None for s in STAGES):  # geometry's is {}
        if progress:
            for s in STAGES:
                progress.skip(f"atlas: {s}")
        return manifest
    B.unfinish(out)
    remove_stale_temporaries(out)

    def stage(name):
        if progress is None:
            import contextlib

            return contextlib.nullcontext(lambda f: None)
        return progress.stage(f"atlas: {name}")

    def skip(name):
        if progress is not None:
            progress.skip(f"atlas: {name}")

    # --- scan --------------------------------------------------------------------------------
    scan_info = stage_info(out, "scan")
    if scan_info is None:
        _forget_later_stages(out, "scan")
        with stage("scan") as advance:
            scan_info = _stage_scan(job, sae, out, advance,
                                    note=progress.note if progress is not None else lambda line: print(line, file=sys.stderr))
        _mark(out, "scan", scan_info)
        scan_checkpoint_path(out).unlink(missing_ok=True)  # everything it held is in the bundle now
    else:
        skip("scan")

    # --- geometry ----------------------------------------------------------------------------
    if stage_info(out, "geometry") is None:
        _forget_later_stages(out, "geometry")
        with stage("geometry"):
            from sae_core.atlas import decoder_neighbors
            from sae_core.hierarchy import level_of

            B.write_array(out, "neurons/group.npy", level_of(sae.cfg.group_sizes, sae.cfg.d_sae).astype(np.int32))
            ids, cos = decoder_neighbors(sae.W_dec)
            B.write_array(out, "neurons/decoder_neighbors.npy", ids)
            B.write_array(out, "neurons/decoder_neighbor_cos.npy", cos)
        _mark(out, "geometry", {})
    else:
        skip("geometry")

    for name, fn in (("labels", _stage_labels), ("hierarchy", _stage_hierarchy), ("index", _stage_index),
                     ("world", _stage_world), ("thumbs", _stage_thumbs)):
        if stage_info(out, name) is None:
            _forget_later_stages(out, name)
            with stage(name):
                info = fn(job, sae, out, scan_info, world)
            _mark(out, name, info or {})
        else:
            skip(name)

    return _write_manifest(job, sae, out, world)


def _same_model(recorded: str, name: str) -> bool:
    """Whether an SAE's recorded model name (a hub id or a folder) is `name`: a folder by where it is, however
    spelt (relative, with ~, through a link)."""
    if recorded == name:
        return True
    a, b = (Path(os.path.expanduser(str(x))) for x in (recorded, name))
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _same_layer(adapter, recorded, layer) -> bool:
    """Whether the layer an SAE records is `layer` of this model; True where it cannot be told here (a layer
    this model does not have: its other warning or its FVU says so)."""
    try:
        return adapter.resolve_layer(str(recorded)).same_place(layer)
    except UserError:
        return True


def _stage_scan(job: AtlasJob, sae, out: Path, advance, note) -> dict:
    """The scan and its files; `note(line)` tells the user something now (the batch cut, a resume)."""
    from sae_core.adapters import load_adapter
    from sae_core.atlas import AtlasConfig, ScanCheckpoint, images_per_batch, metric_tokens_for, scan
    from sae_core.checkpoint import copy_sae, no_layer_reason, trained_model, trained_on, weights_file
    from sae_core.datasets import first_images_warning, items_digest

    if job.layer is None:
        raise UserError(f"{no_layer_reason(sae, job.sae)}; pass --layer L (the output of block L, counted from 0).")
    adapter = load_adapter(job.model, device=job.device)
    recorded, trained = trained_model(sae), trained_on(sae)
    if recorded.get("name") and not _same_model(recorded["name"], adapter.name):
        # said before the scan (hours on a large dataset), not only by its FVU after it
        note(f"atlas: warning: the SAE was trained on activations of {recorded['name']} ({recorded.get('spec')}), "
             f"and --model {job.model} is {adapter.name}; unless that is the same model in another place, pass "
             "the SAE's own model.")
    embedder = adapter if job.embedder == job.model else load_adapter(job.embedder, device=job.device)
    try:
        layer = adapter.resolve_layer(job.layer)
    except UserError as e:  # a layer the SAE brought (an imported SAE's hook) is not one the user typed
        if trained["layer"] is None or str(trained["layer"]) != str(job.layer):
            raise
        hook = ((sae.training_info or {}).get("imported") or {}).get("hook")
        raise UserError(f"the SAE's own {str(e).rstrip('.')}; the SAE" + (f" (hook {hook})" if hook else "")
                        + " was trained on another model: pass that one as --model, or one of these as --layer."
                        ) from None
    if layer.kind == "embed":
        raise UserError("the atlas needs a block layer with tokens, not embed; pass --layer L.")
    trained_layer = trained["layer"]
    if trained_layer is not None and not _same_layer(adapter, trained_layer, layer):
        note(f"atlas: warning: the SAE was trained on layer {trained_layer}, and --layer is {job.layer}; an SAE "
             "read at another layer reconstructs it poorly (the scan's FVU will say how), so pass its own layer "
             "unless this is meant.")
    ds = job.opened_dataset
    n = len(ds) if job.limit is None else min(job.limit, len(ds))
    if warning := first_images_warning(ds, n):
        note(warning)
    cfg = AtlasConfig(layer=job.layer, score=job.score, topk=job.topk, batch_size=job.batch_size,
                      memory_gib=job.memory_gib, seed=job.seed, metric_tokens=metric_tokens_for(trained["tokens"]))
    batch = images_per_batch(cfg.batch_size, adapter.layout.n_tokens, sae.cfg.d_sae, cfg.memory_gib)
    if batch < cfg.batch_size:  # said, not silent: a user who set --batch-size expects it
        note(f"atlas: {batch} images per batch, not {cfg.batch_size}: the SAE's dense codes of "
             f"{adapter.layout.n_tokens} tokens x {sae.cfg.d_sae} latents would pass --memory-gib "
             f"{cfg.memory_gib:g} (raise it on a machine with more memory).")
    reference_embed = None
    world = _world_root(job.dataset)
    if world is not None:  # MS under the world's ground-truth factors, for the calibration in world.json
        from sae_core.ground_truth import factor_embedding, factor_table

        table = factor_table(ds.factors, np.arange(n))
        reference_embed = functools.partial(factor_embedding, table)
    # _check_identity already holds the out dir to these settings, the SAE file's size and time among them (since
    # 2026-12-05); the scan's saved state keeps its own record of them, as it did before the settings did
    weights = weights_file(job.sae).stat()
    checkpoint = ScanCheckpoint(scan_checkpoint_path(out), every_images=job.checkpoint_every,
                                every_s=300.0 if job.checkpoint_every is None else math.inf,
                                key={"sae_file": [weights.st_size, weights.st_mtime_ns]},
                                log=lambda line: note(f"atlas: {line}"))
    t0 = time.time()
    result = scan(adapter, sae, ds, cfg, embedder=None if embedder is adapter else embedder, n_images=n,
                  progress=lambda done: advance(done / n), reference_embed=reference_embed, checkpoint=checkpoint)
    if result.skipped:  # extract warns image by image; the scan said nothing, and the bundle simply had fewer
        i, err = result.skipped[0]
        note(f"atlas: {len(result.skipped)} of {n} images could not be read and are left out of every figure (first: "
             f"#{i}, {err}); the manifest's `skipped` lists them, and `inspect` counts them.")
    fvu = result.metrics.get("fvu")
    if fvu is not None and not fvu <= POOR_FVU:  # NaN warns too; most often an SAE given another model or layer than its own
        note(f"atlas: FVU {fvu:.3g}: the SAE reconstructs these activations poorly (a fitted SAE is usually "
             f"well below {POOR_FVU}); check that --model and --layer {job.layer} are what it was trained on.")
    for name, arr in result.neurons.items():
        B.write_array(out, f"neurons/{name}.npy", arr)
    B.write_array(out, B.RAW_MS, result.raw_ms)
    if result.ms_reference is not None:
        B.write_array(out, B.MS_FACTORS, result.ms_reference)
    for name, arr in result.raw_top.items():
        B.write_array(out, f"raw/{name}.npy", arr)
    if result.parent_coact is not None:
        B.write_array(out, "neurons/parent_coact.npy", result.parent_coact)
        B.write_array(out, "neurons/parent_coact_score.npy", result.parent_coact_score)
    B.write_array(out, B.EMBEDDINGS, result.embeddings)
    copy_sae(job.sae, out / B.SAE_DIR, sae)
    ms, ms_raw = result.neurons["ms"], result.raw_ms
    patch_ms = result.neurons.get("patch_ms")
    layout = adapter.layout
    return {
        "metrics": {**result.metrics,
                    "ms_mean": _nanmean(ms), "ms_mean_raw": _nanmean(ms_raw),
                    "ms_nan": int(np.isnan(ms).sum()), "ms_nan_raw": int(np.isnan(ms_raw).sum()),
                    **({"ms_mean_patch": _nanmean(patch_ms), "ms_nan_patch": int(np.isnan(patch_ms).sum())}
                       if patch_ms is not None else {})},
        "n_images": n, "n_scanned": result.n_images, "batch_size": result.batch_size,
        "skipped": [{"index": int(i), "error": e} for i, e in result.skipped],
        "model": {"spec": job.model, "layer": str(job.layer), "tokens": job.score, "n_tokens": layout.n_tokens,
                  "n_patches": layout.n_patches, "n_prefix": layout.n_prefix, "grid": list(layout.grid),
                  "has_cls": layout.has_cls, "d": adapter.width, "describe": adapter.describe(),
                  "view": adapter.view, "sae_trained_on_tokens": trained["tokens"]},
        "embedder": {"spec": job.embedder, "d": int(result.embeddings.shape[1])},
        "dataset": {**ds.describe(), "spec": job.dataset, "n_images": n, "items_sha256": items_digest(ds, n)},
        "scan_s": round(time.time() - t0, 1), "scan_resumed_from": result.resumed_from,
    }


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _stage_labels(job, sae, out, scan_info, world):
    """Best concept per neuron: the embedder's text tower against the mean embedding of its top images
    (of its gallery by the max over patches for a CLS-scored latent without top images)."""
    from sae_core.labels import label_with_text_embedder
    from sae_core.text_encoders import load_text_embedder

    K = sae.cfg.d_sae
    concepts, source = _vocabulary(job, world)
    reason = source  # where there are no concepts, `source` says why
    embedder = None
    if concepts is not None:
        try:
            embedder = load_text_embedder(job.embedder, device=job.device)
        except UserError as e:  # a vision-only embedder, a missing tokenizer: the bundle is still useful without labels
            reason = f"the embedder's text side cannot be used: {str(e).rstrip('.')}"  # it says why, naming the embedder
    if embedder is None:
        B.write_json(out, B.LABELS, {"method": f"none: {reason}", "vocabulary": [], "labels": [""] * K})
        B.write_array(out, "neurons/label_score.npy", np.full(K, np.nan, np.float32))
        return {"method": None, "reason": reason}
    emb = np.load(out / B.EMBEDDINGS, mmap_mode="r")
    patch_top = out / "neurons/patch_top_images.npy"
    res = label_with_text_embedder(np.load(out / "neurons/top_images.npy"), emb, embedder, concepts,
                                   n_top=job.topk, patch_top_images=np.load(patch_top) if patch_top.is_file() else None,
                                   source=source)
    B.write_json(out, B.LABELS, res.to_json())
    B.write_array(out, "neurons/label_score.npy", np.asarray(res.scores, np.float32))
    if res.scores_by_patch is not None:
        B.write_array(out, "neurons/patch_label_score.npy", np.asarray(res.scores_by_patch, np.float32))
    return {"method": res.method, "vocabulary_size": len(concepts), "from_patch_gallery": len(res.from_patch)}


def _stage_hierarchy(job, sae, out, scan_info, world):
    """Parents by co-activation (from the scan; the tree's linkage) and by decoder cosine, taxonomy
    depth per level against the dataset's taxonomy (world or iNaturalist folders), the tree.

    The tree follows co-activation because on the demo world a child's top-16 images share a deeper
    taxonomy ancestor with its co-activation parent's (0.586) than with its decoder-cosine parent's
    (0.526, barely above a random latent of the level above: 0.491), at all four levels."""
    from sae_core.hierarchy import build_tree, decoder_parents, level_of, taxonomy_depth, tree_parents

    K = sae.cfg.d_sae
    level = level_of(sae.cfg.group_sizes, K)
    parent_decoder, parent_cos = decoder_parents(sae.W_dec.detach().cpu(), sae.cfg.group_sizes)
    coact_path = out / "neurons/parent_coact.npy"
    parent_coact = np.load(coact_path) if coact_path.is_file() else np.full(K, -1, np.int64)
    parent, _ = tree_parents(parent_coact, parent_decoder)
    B.write_array(out, "neurons/parent.npy", parent.astype(np.int64))
    B.write_array(out, "neurons/parent_decoder.npy", parent_decoder.astype(np.int64))
    B.write_array(out, "neurons/parent_cos.npy", parent_cos.astype(np.float32))
    if not coact_path.is_file():
        B.write_array(out, "neurons/parent_coact.npy", parent_coact)
    top = np.load(out / "neurons/top_images.npy")
    ds = job.opened_dataset
    depth_per_level, per_neuron = None, None
    # any gallery image with a path: an iNaturalist folder's loose images have none, and the first top
    # image being one of them skipped the depth of every latent
    if any(ds.taxonomy_path(int(i)) is not None for i in np.unique(top[top >= 0])):
        depth_per_level, per_neuron = taxonomy_depth(top, level, ds.taxonomy_path, n_top=job.topk)
        B.write_array(out, "neurons/taxonomy_depth.npy", per_neuron.astype(np.float32))
    labels = json.loads((out / B.LABELS).read_text(encoding="utf-8"))["labels"]
    tree = build_tree(level, parent, labels=labels, ms=np.load(out / "neurons/ms.npy"),
                      label_score=np.load(out / "neurons/label_score.npy"), support=np.load(out / "neurons/support.npy"),
                      parent_coact=parent_coact, parent_cos=parent_cos, parent_decoder=parent_decoder,
                      depth_per_level=depth_per_level)
    B.write_json(out, B.HIERARCHY, tree)
    return {"depth_per_level": tree["depth_per_level"] if depth_per_level is not None else None,
            "parent_agreement": tree.get("parent_agreement"), "linkage": tree["linkage"]}


def _vocabulary(job, world) -> tuple[list | None, str]:
    """The labels' concepts (--vocabulary, else the world's words, else the dataset's class names) and where they
    come from, or None and the reason there are none."""
    from sae_core.labels import class_concepts, file_concepts, world_concepts

    if job.vocabulary:
        return file_concepts(job.vocabulary), f"--vocabulary {job.vocabulary}"
    if world is not None:
        return world_concepts(world[0]), "the world's colours, shapes and textures"
    concepts, what = class_concepts(job.opened_dataset)
    if concepts is None:
        return None, f"no vocabulary given (--vocabulary FILE), and the dataset's classes cannot serve: {what}"
    return concepts, f"{what}, as no --vocabulary was given"


def _stage_index(job, sae, out, scan_info, world):
    from sae_core import search_index

    emb = np.load(out / B.EMBEDDINGS, mmap_mode="r")
    text = None
    if len(emb) >= search_index.EXACT_THRESHOLD:  # approximate: tune it for text search too, not images alone
        concepts, _ = _vocabulary(job, world)
        if concepts:
            from sae_core.text_encoders import load_text_embedder

            try:
                text = load_text_embedder(job.embedder, device=job.device)([c.prompt for c in concepts]).numpy()
            except UserError:  # a vision-only embedder: no text search to tune for
                pass
    index = search_index.build_index(emb, exact_threshold=search_index.EXACT_THRESHOLD, seed=job.seed,
                                     text_queries=text)
    index.save(out / B.INDEX)
    return {"index": index.info}


def _stage_world(job, sae, out, scan_info, world):
    """Ground truth of world datasets: purity of each neuron's top images, Spearman(MS, purity) and
    agreement with simulated users, for SAE and raw neurons; label accuracy; depth per level."""
    if world is None:
        return {}
    from sae_core.ground_truth import factor_table, ground_truth_report, ideal_neuron_report
    from sae_core.labels import labelling_gallery
    from sae_core.world.dataset import WorldDataset

    ds = WorldDataset(world[0], world[1])
    emb = np.load(out / B.EMBEDDINGS, mmap_mode="r")
    table = factor_table(ds.factors, np.arange(emb.shape[0]))   # every scanned image
    top = np.load(out / "neurons/top_images.npy")
    sae_rep = ground_truth_report(np.load(out / "neurons/ms.npy"), top, table=table, seed=job.seed)
    raw_rep = ground_truth_report(np.load(out / B.RAW_MS), np.load(out / "raw/top_images.npy"), table=table,
                                 seed=job.seed)
    figures = {"ms_ground_truth_spearman": sae_rep["ms_ground_truth_spearman"],
               "ms_agreement": sae_rep["ms_agreement"],
               "ms_ground_truth_spearman_raw": raw_rep["ms_ground_truth_spearman"],
               "ms_agreement_raw": raw_rep["ms_agreement"],
               "purity_mean": sae_rep["purity_mean"], "purity_mean_raw": raw_rep["purity_mean"]}
    # Calibration: the same figures with a perfect embedder (the SAE's neurons, MS under the world's
    # factors) and with perfect neurons (ideal_neurons, MS under this bundle's embedder). Low figures
    # with both high say the neurons are at fault; a low ideal-neuron figure says the embedder is.
    calibration = {}
    if (out / B.MS_FACTORS).is_file():
        f_rep = ground_truth_report(np.load(out / B.MS_FACTORS), top, table=table, seed=job.seed)
        calibration["factor_embedder"] = {k: f_rep[k] for k in ("ms_ground_truth_spearman", "ms_agreement", "agreement")}
    calibration["ideal_neurons"] = ideal_neuron_report(table, np.asarray(emb, np.float32), seed=job.seed)
    patch_top_path = out / "neurons/patch_top_images.npy"
    patch_top = np.load(patch_top_path) if patch_top_path.is_file() else None
    gallery, from_patch = labelling_gallery(top, patch_top)  # CLS-scored: patch galleries where no CLS image
    if patch_top is not None:
        p_rep = ground_truth_report(np.where(from_patch, np.load(out / "neurons/patch_ms.npy"), np.nan), patch_top,
                                    table=table, seed=job.seed)
        figures["ms_ground_truth_spearman_patch_only"] = p_rep["ms_ground_truth_spearman"]
        figures["ms_agreement_patch_only"] = p_rep["ms_agreement"]
    figures["ms_agreement_factor_embedder"] = calibration.get("factor_embedder", {}).get("ms_agreement")
    figures["ms_agreement_ideal_neurons"] = calibration["ideal_neurons"]["ms_agreement"]
    labels_info = stage_info(out, "labels") or {}
    figures["label_accuracy"], figures["label_accuracy_patch_gallery"], figures["label_accuracy_by_patch"] = \
        _label_accuracy(out, ds, gallery, from_patch, patch_top) if labels_info.get("method") else (None,) * 3
    figures["hierarchy_depth"] = (stage_info(out, "hierarchy") or {}).get("depth_per_level")
    B.write_json(out, B.WORLD, {**figures, "split": world[1], "world": str(world[0]), "calibration": calibration,
                                "neurons": sae_rep, "raw": raw_rep})
    return figures


def _label_accuracy(out: Path, ds, gallery: np.ndarray, from_patch: np.ndarray, patch_top: np.ndarray | None
                    ) -> tuple[float | None, float | None, float | None]:
    """Share of labelled neurons whose label is the factor value most of their gallery's images share
    (among the vocabulary's values; sae_core.labels.label_accuracy): for neurons labelled from their
    top images, apart for those labelled from their gallery by the max over patches (`gallery`,
    `from_patch`: sae_core.labels.labelling_gallery, the images the labels were read from), and for
    every neuron's label by patches against its gallery by the max over patches (`patch_top`)."""
    from sae_core.labels import dominant_factors, label_accuracy, world_factor_values

    lab = json.loads((out / B.LABELS).read_text(encoding="utf-8"))
    values, allowed = world_factor_values(ds), lab["vocabulary"] or None
    # over the gallery the labels were read from, --topk images (until 2026-12-05 its first 16 whatever --topk)
    dom = dominant_factors(gallery, values, n_top=gallery.shape[1], allowed=allowed)
    accs = [label_accuracy([s if f == want else "" for s, f in zip(lab["labels"], from_patch)], dom)
            for want in (False, True)]
    by_patch = lab.get("labels_by_patch")
    accs.append(label_accuracy(by_patch, dominant_factors(patch_top, values, n_top=patch_top.shape[1], allowed=allowed))
                if by_patch is not None and patch_top is not None else float("nan"))
    return tuple(a if np.isfinite(a) else None for a in accs)


def _stage_thumbs(job, sae, out, scan_info, world):
    """PNG thumbnails of gallery images, written into a temporary folder renamed at the end (one
    rename instead of an fsync per file)."""
    ids = set()
    for name in ("top_images", "band_images", "patch_top_images", "patch_band_images"):  # patch_*: --score cls
        if (out / f"neurons/{name}.npy").is_file():
            ids |= set(np.load(out / f"neurons/{name}.npy").ravel().tolist())
    ids.discard(-1)
    ds = job.opened_dataset
    final = out / B.THUMBS
    tmp = final.with_name(".thumbs.tmp")
    if final.exists():
        shutil.rmtree(final)
    tmp.mkdir(parents=True, exist_ok=True)  # a killed run's partial folder is reused
    for i in sorted(ids):
        path = tmp / f"{i}.png"
        if path.exists():
            continue
        im = ds[i]
        if max(im.size) > THUMB_MAX_SIDE:
            im = im.copy()
            im.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE))
        im.save(path.with_name(f".{i}.png.part"), format="PNG")
        os.replace(path.with_name(f".{i}.png.part"), path)
    os.replace(tmp, final)
    return {"n_thumbs": len(ids)}


def _write_manifest(job: AtlasJob, sae, out: Path, world) -> dict:
    scan = stage_info(out, "scan")
    cfg = sae.cfg
    metrics = dict(scan["metrics"])
    world_info = stage_info(out, "world") or {}
    metrics.update({k: v for k, v in world_info.items() if k in WORLD_FIGURES})
    manifest = {
        "command": job.command,
        # the job's specs (absolute paths), not a scan's of before 2026-12-05 (a relative path as typed)
        "model": {**scan["model"], "spec": job.model},
        "layer": str(job.layer),
        "sae": {"architecture": cfg.arch, **cfg.to_dict(), "training": sae.training_info},
        "dataset": {**scan["dataset"], "spec": job.dataset},
        "embedder": {**scan["embedder"], "spec": job.embedder},
        "metrics": metrics,
        "stages": {s: stage_info(out, s) for s in STAGES if s != "scan"},
        "skipped": scan["skipped"],
        **job.extra_manifest,
    }
    if world is not None:
        manifest["world"] = str(world[0])
        manifest["world_split"] = world[1]
    return B.write_manifest(out, manifest)
