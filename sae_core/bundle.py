"""The bundle: one directory describing one (model, layer, SAE, dataset); reader and writer helpers.

Layout (schema version 1; README "The bundle and the atlas" documents every file):

    manifest.json        written LAST: a directory without it is unfinished and never served
    sae/                 sae.safetensors + config.json (sae_core.checkpoint)
    neurons/NAME.npy     per-neuron arrays, first axis = neuron id k (ms, support, top_images, ...)
    neurons/labels.json  {"method", "vocabulary", "labels", "from_patch_gallery"[, "labels_by_patch"]}
    raw/ms.npy           MS of the layer's own units on the same images
    images/              embeddings.npy, index.faiss, thumbs/{id}.png (gallery images only)
    hierarchy.json       the Matryoshka tree; world.json (world bundles): ground-truth figures

The reader (`open_bundle`) memory-maps arrays on first use and validates the schema version; the
writer side (`write_array`, `write_json`, `write_manifest`) writes every file atomically and the
manifest last. This module knows nothing of Gradio or of command lines.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import threading
from functools import cached_property
from pathlib import Path

import numpy as np

from .activation_store import save_npy_atomic
from .atomic import json_kind, read_json_object, write_json_atomic
from .datasets import WORLD_MODELS, WORLD_SPLITS
from .errors import UserError, checked_index

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SAE_DIR = "sae"
NEURONS = "neurons"
LABELS = "neurons/labels.json"
HIERARCHY = "hierarchy.json"
WORLD = "world.json"
EMBEDDINGS = "images/embeddings.npy"
INDEX = "images/index.faiss"
THUMBS = "images/thumbs"
RAW_MS = "raw/ms.npy"
MS_FACTORS = "neurons/ms_factors.npy"  # world bundles: MS of the SAE neurons under the ground-truth factors
WORLD_DIR = "world"  # the demo keeps the world it built inside the bundle, so a copied bundle carries it
PROBES = "probes"  # where ood, ontology and probes write their JSON and HTML by default (the app reads them there)
WORLD_SPEC_PARTS = WORLD_MODELS + WORLD_SPLITS  # what may follow world:DIR: (model or split)

# Arrays whose first axis is the neuron id (name -> relative path); others are named by path.
ONE_PER_NEURON = frozenset({
    "ms", "support", "frequency", "mean_act", "max_act", "group", "parent", "parent_coact", "label_score",
    "parent_decoder", "parent_cos", "parent_coact_score", "taxonomy_depth", "patch_support", "patch_ms",
    "patch_label_score", "token_max"})
"""The arrays of NEURON_ARRAYS that hold one number per neuron (the others have a row per neuron); a new
per-neuron array goes in both."""
THREE_AXES = frozenset({"top_heat", "patch_top_heat", "band_images", "band_acts", "band_patch", "patch_band_images",
                        "patch_band_acts", "patch_band_patch"})
"""The arrays of NEURON_ARRAYS of shape (K, T, P) or (K, NB, S); the others not in ONE_PER_NEURON are (K, n)."""
NEURON_ARRAYS = (
    "ms", "support", "frequency", "mean_act", "max_act", "hist_counts", "top_images", "top_acts",
    "top_patch", "top_heat", "band_images", "band_acts", "group", "parent", "parent_coact",
    "label_score", "decoder_neighbors", "decoder_neighbor_cos", "parent_decoder", "parent_cos", "parent_coact_score", "taxonomy_depth",
    # bundles scored by CLS: the gallery by the max over patches (for latents that fire on patches only)
    "patch_top_images", "patch_top_acts", "patch_top_patch", "patch_top_heat", "patch_support", "patch_ms",
    "patch_hist_counts", "patch_band_images", "patch_band_acts", "patch_label_score",
    # since 2026-12-02 (22:40): each band sample's best patch
    "band_patch", "patch_band_patch",
    # since 2026-12-03 (13:00): the largest activation on any one token (the steering strength unit)
    "token_max",
    # since 2026-12-04 (afternoon): how many firing images each band (a quantile group) holds
    "band_counts", "patch_band_counts",
)
REQUIRED_MANIFEST_KEYS = ("schema_version", "model", "sae", "dataset", "embedder", "metrics", "files")


# ----------------------------------------------------------------------------------------------
# Writer helpers
# ----------------------------------------------------------------------------------------------
def write_array(root: str | Path, rel: str, arr: np.ndarray) -> Path:
    """np.save `arr` to root/rel atomically (temporary name + fsync + rename); returns the path."""
    path = Path(root) / rel
    save_npy_atomic(path, arr)
    return path


def write_json(root: str | Path, rel: str, obj) -> Path:
    path = Path(root) / rel
    write_json_atomic(path, obj)
    return path


def list_files(root: str | Path) -> dict[str, str]:
    """{name: relative path} of every finished file in a bundle directory (thumbnails as one entry)."""
    root = Path(root)
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if path.is_dir() or any(x.startswith(".") for x in parts) or rel == MANIFEST \
                or rel.startswith(THUMBS + "/") or parts[0] == WORLD_DIR:
            continue
        name = path.stem if rel.startswith(NEURONS + "/") and path.suffix == ".npy" else rel
        files[name] = rel
    if (root / THUMBS).is_dir():
        files["thumbs"] = THUMBS
    if (root / WORLD_DIR).is_dir():
        files["world_dir"] = WORLD_DIR
    return files


def write_manifest(root: str | Path, manifest: dict) -> dict:
    """Write manifest.json last: adds schema_version, created, versions (if absent) and `files`."""
    import torch

    root = Path(root)
    full = {"schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}}
    full.update(manifest)
    full["schema_version"] = SCHEMA_VERSION
    full["files"] = list_files(root)
    write_json_atomic(root / MANIFEST, full)
    return full


def unfinish(root: str | Path) -> None:
    """Remove the manifest (a bundle being rebuilt must not be served half old, half new)."""
    path = Path(root) / MANIFEST
    if path.exists():
        path.unlink()


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------
NPY_MAGIC = b"\x93NUMPY"


def open_bundle(path: str | Path) -> "Bundle":
    """Open a finished bundle; UserError (one sentence) if missing, unfinished or of another schema."""
    return Bundle(path)


def refuse_another_folder(root: Path) -> None:
    """Refuse, saying what it is, a folder of another step of the pipeline given where a bundle goes (each was
    called an unfinished bundle, or one of another schema version); return for anything else."""
    from .folders import folder_kind

    kind = folder_kind(root)
    build = "build a bundle from it with `python -m precompute atlas ... --out BUNDLE` (README, Quick start)"
    if kind in ("store", "extraction"):
        raise UserError(f"{root} is an activation store (python -m precompute extract), not a bundle; train an SAE on "
                        f"it with `python -m precompute train`, then {build}.")
    if kind == "sae":
        raise UserError(f"{root} is an SAE folder, not a bundle; "
                        f"{build.replace('atlas ...', f'atlas --sae {root} ...')}.")
    if kind == "world":
        raise UserError(f"{root} is an embedded world (python -m precompute world), not a bundle; build a bundle on it "
                        f"with `python -m precompute demo --world {root} --out BUNDLE`.")


def _inside(rel) -> bool:
    """Whether `rel` names a path below a bundle's folder by its spelling (no absolute path, no ".."); the resolved
    path is not checked, so a folder of the bundle may be a link to another disk."""
    return isinstance(rel, str) and not Path(rel).is_absolute() and ".." not in Path(rel).parts


def _parent_loop(nodes: list[dict], n_neurons: int) -> str | None:
    """What is wrong with the tree's parent links, or None: a parent outside -1..n_neurons-1, or a chain of parents
    that comes back to where it started (the Hierarchy page walked such a loop for ever, its memory growing by
    50 MB/s, until 2026-12-05). One walk per node, none over a node already known to reach a root."""
    parent = {n["id"]: n.get("parent", -1) for n in nodes}
    outside = next((i for i, p in parent.items() if not -1 <= p < n_neurons), None)
    if outside is not None:
        return f"node {outside} has parent {parent[outside]}, outside -1..{n_neurons - 1}"
    reaches_root: set[int] = set()
    for start in parent:
        chain, seen, i = [], set(), start
        while i in parent and i not in reaches_root:
            if i in seen:
                loop = chain[chain.index(i):] + [i]
                return "the parents of node " + " -> ".join(map(str, loop[:6])) + (" -> ..." if len(loop) > 6 else "") \
                    + " make a loop"
            seen.add(i)
            chain.append(i)
            i = parent[i]
        reaches_root.update(chain)
    return None


class Bundle:
    """A finished bundle, read lazily: arrays are memory-mapped on first use and cached."""

    def __init__(self, path: str | Path):
        root = Path(os.path.expandvars(os.path.expanduser(str(path))))
        if root.is_file():
            raise UserError(f"{root} is a file, not a bundle; pass the bundle's folder (the --out of `python -m "
                            "precompute atlas` or `demo`).")
        if not root.is_dir():
            raise UserError(f"bundle {root} does not exist; build one with `python -m precompute demo --out {root}` "
                            f"or `python -m precompute atlas ... --out {root}`.")
        mpath = root / MANIFEST
        if not mpath.is_file():
            refuse_another_folder(root)
            raise UserError(f"bundle {root} has no {MANIFEST}, so it is unfinished (its build stopped or is still "
                            f"running); re-run the command that builds it to complete it (`python -m precompute "
                            f"inspect {root}` says how far it got and which command that is).")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than json reads
            raise UserError(f"{mpath} cannot be read as JSON ({e}); rebuild the bundle.") from e
        if isinstance(manifest, dict) and "shards" in manifest and "schema_version" not in manifest:
            refuse_another_folder(root)
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            found = "no schema_version" if version is None else f"schema version {version!r}"
            raise UserError(f"bundle {root} has {found} in {MANIFEST} but this code reads version "
                            f"{SCHEMA_VERSION}; rebuild the bundle with this version of precompute.")
        missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
        if missing:
            raise UserError(f"{mpath} lacks {', '.join(missing)}; the bundle is damaged, rebuild it.")
        # every reader indexes these sections and sizes: a wrong type would be a traceback far from its cause
        for key in REQUIRED_MANIFEST_KEYS[1:]:
            if not isinstance(manifest[key], dict):
                raise UserError(f"{mpath} holds {key} as a JSON {json_kind(manifest[key])}, not an object; the bundle "
                                "is damaged, rebuild it.")
        for name, rel in manifest["files"].items():  # read as paths below the bundle, never outside it
            if not _inside(rel):
                raise UserError(f"{mpath} lists {name} at {json.dumps(rel)}, not a path inside the bundle; the bundle "
                                "is damaged, rebuild it.")
        for section, key in (("sae", "d_sae"), ("dataset", "n_images")):
            value = manifest[section].get(key)
            if type(value) is not int or value < 0:
                raise UserError(f"{mpath} holds {section}.{key} = {json.dumps(value)}, not a whole number; the bundle "
                                "is damaged, rebuild it.")
        # read as text by the app's start, its pages and `inspect` ("world": 5 was a TypeError traceback there,
        # model.tokens [1] "unhashable type: 'list'" on every neuron page; until 2026-12-05)
        texts = {"world": manifest.get("world"), **{f"{section}.{key}": manifest[section].get(key) for section, key in
                                                    (("model", "spec"), ("model", "tokens"), ("embedder", "spec"),
                                                     ("dataset", "spec"))}}
        for where, value in texts.items():
            if value is not None and not isinstance(value, str):
                raise UserError(f"{mpath} holds {where} = {json.dumps(value)[:80]}, not a string; the bundle is "
                                "damaged, rebuild it.")
        self.root = root
        self.manifest: dict = manifest
        self._arrays: dict[str, np.ndarray] = {}
        # The dataset and the search index are opened once even when the app's first requests come at once.
        self._open_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}: {self.n_neurons} neurons, {self.n_images} images)"

    # --- sizes --------------------------------------------------------------------------------
    @property
    def n_neurons(self) -> int:
        return int(self.manifest["sae"]["d_sae"])

    @property
    def n_images(self) -> int:
        return int(self.manifest["dataset"]["n_images"])

    @property
    def is_world(self) -> bool:
        return bool(self.manifest.get("world"))

    def has(self, name: str) -> bool:
        """Whether the bundle holds the array or file `name` (a neuron array name or a relative path)."""
        try:
            return self._path(name).exists()
        except UserError:
            return False

    # --- files --------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        files = self.manifest.get("files", {})
        if name in files:
            rel = files[name]
        elif name in NEURON_ARRAYS or name in ("hist_edges", "patch_hist_edges"):
            rel = f"{NEURONS}/{name}.npy"
        else:
            rel = name if name.endswith((".npy", ".json", ".faiss")) else f"{name}.npy"
        # a bundle is something users hand each other: neither a name nor its manifest reads a file outside it
        if not _inside(rel):
            raise UserError(f"{name!r} is not a file inside the bundle {self.root}; name one of its files, such as "
                            "'ms', 'raw/ms' or 'hierarchy.json'.")
        return self.root / rel

    def array(self, name: str) -> np.ndarray:
        """A memory-mapped array: "ms", "top_images", ... (neurons/), or a path such as "raw/ms"."""
        arr = self._arrays.get(name)
        if arr is None:
            path = self._path(name)
            if not path.is_file():
                raise UserError(f"bundle {self.root} has no array {name!r} ({path.relative_to(self.root)}); "
                                "rebuild it with the current atlas.")
            try:
                with open(path, "rb") as f:
                    head = f.read(len(NPY_MAGIC))
                if head != NPY_MAGIC:  # numpy would call any such file "pickled (object) data"
                    raise UserError(f"{path} is not a .npy file (it lacks numpy's header); the bundle is damaged, "
                                    "rebuild it.")
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {path} ({e}); the bundle is damaged, rebuild it.") from e
            self._arrays[name] = arr
        return arr

    def json(self, rel: str) -> dict:
        """A JSON object file of the bundle, e.g. "hierarchy.json" or "probes/ood.json"."""
        path = self._path(rel)
        if not path.is_file():
            raise UserError(f"bundle {self.root} has no {rel}; rebuild it with the current atlas.")
        # written atomically by the atlas, so damaged afterwards; every JSON file of a bundle is an object
        return read_json_object(path, "the bundle is damaged: copy it again or rebuild it")

    @cached_property
    def labels(self) -> dict:
        """{"method", "vocabulary", "labels": [str per neuron], "from_patch_gallery": [neuron ids labelled
        from their gallery by the max over patches], and for CLS-scored bundles since 2026-12-02
        "labels_by_patch": [str per neuron, read from that gallery]} (empty labels if none were computed)."""
        if not (self.root / LABELS).is_file():
            return {"method": None, "vocabulary": [], "labels": [""] * self.n_neurons, "from_patch_gallery": []}
        labels = {"from_patch_gallery": [], **self.json(LABELS)}
        # every page indexes these lists: their shape is checked once, here, not at each reader
        for key in ("labels", "labels_by_patch"):
            v = labels.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise UserError(f"{self.root / LABELS}: {key} is not a list of strings; the bundle is damaged, rebuild it.")
        if labels.get("method") is not None and not isinstance(labels["method"], str):  # shown on every neuron page
            raise UserError(f"{self.root / LABELS}: method is {json.dumps(labels['method'])[:80]}, not a string; the "
                            "bundle is damaged, rebuild it.")
        patch = labels["from_patch_gallery"]
        if "labels" not in labels or not isinstance(patch, list) or not all(type(k) is int for k in patch):
            raise UserError(f"{self.root / LABELS} lacks its labels or lists non-integer neuron ids as labelled from "
                            "patches; the bundle is damaged, rebuild it.")
        return labels

    @cached_property
    def _labelled_from_patch(self) -> frozenset:
        return frozenset(self.labels["from_patch_gallery"])

    @cached_property
    def children(self) -> dict[int, list[int]]:
        """parent -> children in the tree (from neurons/parent.npy)."""
        out: dict[int, list[int]] = {}
        if self.has("parent"):
            parent = np.asarray(self.array("parent"))
            for k in np.flatnonzero(parent >= 0):
                out.setdefault(int(parent[k]), []).append(int(k))
        return out

    # --- one neuron ---------------------------------------------------------------------------
    def check_neuron(self, k) -> int:
        """`k` as a neuron id of this bundle (UserError, one sentence, for a fraction, text or out of range)."""
        return checked_index(k, "neuron", self.n_neurons, "this bundle has neurons")

    def strength_units(self) -> np.ndarray:
        """(K,) float64: the activation a steering strength of 1 sets each latent to, its largest on one
        token of the dataset (`token_max`; for bundles built before it, the larger of `max_act` and the top
        activation over patches where kept; a CLS-scored bundle of before 2026-12-01 kept neither, and its unit is
        the CLS token's largest: `strength_unit_problem`); 1 where it never fired."""
        if self.has("token_max"):
            unit = np.asarray(self.array("token_max"), np.float64)
        else:
            unit = np.asarray(self.array("max_act"), np.float64)
            if self.has("patch_top_acts"):
                unit = np.maximum(unit, np.asarray(self.array("patch_top_acts")[:, 0], np.float64))
        return np.where(np.isfinite(unit) & (unit > 0), unit, 1.0)

    def strength_unit_problem(self) -> str | None:
        """Why this bundle's strength units are not each latent's largest activation on one token, or None: a
        CLS-scored bundle built before 2026-12-01 recorded its latents' largest CLS activation only, so strength 1
        was that (1.0 raw for a latent that never fires on the CLS token), and nothing said so until 2026-12-05."""
        if self.has("token_max") or self.has("patch_top_acts") or self.manifest.get("model", {}).get("tokens") != "cls":
            return None
        return (f"{self.root} was built before 2026-12-01 and records each latent's largest activation on its CLS "
                "token only, so a strength of 1 is that value (1.0 raw for a latent that never fires on the CLS "
                f"token), not its largest on any token; delete {self.root / '.stages' / 'scan.json'} and run its "
                "atlas or demo command again for strengths in that unit")

    def _opt(self, name: str, k: int):
        return self.array(name)[k] if self.has(name) else None

    def _gallery(self, k: int, prefix: str = "") -> tuple[list, np.ndarray | None]:
        """Neuron k's top images [(image id, activation, best patch position or -1)] best first, and their
        patch heat (n, P) float32 or None; prefix "patch_" reads the gallery by the max over patches."""
        top_ids = np.asarray(self.array(f"{prefix}top_images")[k])
        top_acts = np.asarray(self.array(f"{prefix}top_acts")[k])
        top_patch = np.asarray(self._opt(f"{prefix}top_patch", k)) if self.has(f"{prefix}top_patch") else np.full(len(top_ids), -1)
        keep = top_ids >= 0
        heat = self._opt(f"{prefix}top_heat", k)
        if heat is not None:  # no best patch where the neuron fires on no patch (bundles before 2026-12-01 said 1)
            top_patch = np.where(np.asarray(heat, np.float32).max(1) > 0, top_patch, -1)
        top = [(int(i), float(a), int(p)) for i, a, p in zip(top_ids[keep], top_acts[keep], top_patch[keep])]
        return top, None if heat is None else np.asarray(heat[: len(top)], dtype=np.float32)

    def _bands(self, k: int, prefix: str = "") -> list[list[tuple[int, float, int]]]:
        """Neuron k's lower activation bands, highest first: [(image id, activation, best patch position
        or -1)] per band (-1 also for bundles built before band patches were stored)."""
        if not self.has(f"{prefix}band_images"):
            return []
        ids, acts = (np.asarray(self.array(f"{prefix}band_{name}")[k]) for name in ("images", "acts"))
        patch = (np.asarray(self.array(f"{prefix}band_patch")[k]) if self.has(f"{prefix}band_patch")
                 else np.full(ids.shape, -1))
        return [[(int(i), float(a), int(p)) for i, a, p in zip(row[row >= 0], act[row >= 0], pos[row >= 0])]
                for row, act, pos in zip(ids, acts, patch)]

    def _band_counts(self, k: int, prefix: str = "") -> list[int] | None:
        counts = self._opt(f"{prefix}band_counts", k)
        return None if counts is None else [int(c) for c in counts]

    def neuron(self, k) -> dict:
        """Everything a neuron page shows, from a handful of memory-mapped reads."""
        k = self.check_neuron(k)
        top, heat = self._gallery(k)
        patch_top, patch_heat = self._gallery(k, "patch_") if self.has("patch_top_images") else (None, None)
        neighbors = []
        if self.has("decoder_neighbors"):
            ids = np.asarray(self.array("decoder_neighbors")[k])
            cos = np.asarray(self.array("decoder_neighbor_cos")[k])
            neighbors = [(int(i), float(c)) for i, c in zip(ids, cos) if i >= 0]
        labels = self.labels
        group = self._opt("group", k)
        parent = self._opt("parent", k)
        parent_coact = self._opt("parent_coact", k)
        parent_decoder = self._opt("parent_decoder", k)
        score = self._opt("label_score", k)

        def num(x, cast=float):
            return None if x is None else cast(x)

        return {
            "id": k,
            "ms": float(self.array("ms")[k]),
            "support": int(self.array("support")[k]),
            "frequency": float(self.array("frequency")[k]),
            "mean_act": float(self.array("mean_act")[k]),
            "max_act": float(self.array("max_act")[k]),
            "token_max": num(self._opt("token_max", k)),  # bundles since 2026-12-03 (13:00)
            "hist": (np.asarray(self.array("hist_counts")[k]), np.asarray(self.array("hist_edges"))),
            # CLS-scored bundles since 2026-12-02: the histogram of the max over patches
            "patch_hist": ((np.asarray(self.array("patch_hist_counts")[k]), np.asarray(self.array("patch_hist_edges")))
                           if self.has("patch_hist_counts") else None),
            "top": top,
            "top_heat": heat,
            "patch_top": patch_top,
            "patch_top_heat": patch_heat,
            "patch_support": num(self._opt("patch_support", k), int),
            "patch_ms": num(self._opt("patch_ms", k)),
            "bands": self._bands(k),
            # CLS-scored bundles since 2026-12-02: the bands of the max over patches
            "patch_bands": self._bands(k, "patch_") if self.has("patch_band_images") else None,
            # since 2026-12-04: the firing images in each band (None for older bundles)
            "band_counts": self._band_counts(k),
            "patch_band_counts": self._band_counts(k, "patch_"),
            "group": num(group, int) if group is not None else 0,
            "parent": num(parent, int) if parent is not None else -1,
            "parent_coact": num(parent_coact, int) if parent_coact is not None else -1,
            "parent_decoder": num(parent_decoder, int) if parent_decoder is not None else -1,
            "parent_cos": num(self._opt("parent_cos", k)),  # the decoder cosine to parent_decoder
            "children": self.children.get(k, []),
            "label": labels["labels"][k] if k < len(labels.get("labels", [])) else "",
            "label_score": num(score),
            "label_method": labels.get("method"),
            "label_from_patch": k in self._labelled_from_patch,
            # CLS-scored bundles since 2026-12-02: the label of the gallery by the max over patches
            "label_by_patch": labels["labels_by_patch"][k] if "labels_by_patch" in labels else None,
            "label_by_patch_score": num(self._opt("patch_label_score", k)),
            "neighbors": neighbors,
        }

    # --- models, data, index ------------------------------------------------------------------
    def load_sae(self, device: str = "cpu"):
        """The bundle's SparseAutoencoder (sae_core.checkpoint.load_sae on BUNDLE/sae)."""
        from .checkpoint import load_sae

        return load_sae(self.root / SAE_DIR, device=device)

    @property
    def world_dir(self) -> Path | None:
        """The world directory of a world bundle (BUNDLE/world when the bundle carries it), else None."""
        if (self.root / WORLD_DIR / "world.json").is_file():
            return self.root / WORLD_DIR
        return Path(self.manifest["world"]) if self.manifest.get("world") else None

    def local_spec(self, spec: str) -> str:
        """A model, embedder or dataset spec from the manifest, with a `world:` spec's folder replaced by
        `world_dir`: a bundle built elsewhere and copied here names the folder it was built in, while
        its images, models and steering must come from the world it carries. Other specs as given."""
        if self.world_dir is None or not spec.startswith("world:"):
            return spec
        _, sep, part = spec[len("world:"):].rpartition(":")
        return f"world:{self.world_dir}" + (f":{part}" if sep and part in WORLD_SPEC_PARTS else "")

    def dataset(self):
        """The image dataset the atlas scanned (sae_core.datasets.open_dataset of the manifest's spec;
        for a world bundle, the world it carries or names, so a copied bundle still renders its images)."""
        with self._open_lock:
            if not hasattr(self, "_dataset"):
                from .datasets import items_digest, open_dataset

                spec, n = self.local_spec(self.manifest["dataset"]["spec"]), self.n_images
                ds = open_dataset(spec)
                # a file added, removed or renamed before the last scanned one shifts every id after it: the
                # galleries' thumbnails would show one image and steering read another (bundles from before
                # 2026-12-05 record no digest and are not checked)
                recorded = self.manifest["dataset"].get("items_sha256")
                if recorded is not None and (len(ds) < n or items_digest(ds, n) != recorded):
                    raise UserError(f"the dataset {spec} no longer lists the {n:,} images this bundle was built on "
                                    f"in the same order (it has {len(ds):,} now: a file was added, removed or renamed "
                                    "among them), so its image ids would name other images; restore it as it was, "
                                    "or build the bundle again with `python -m precompute atlas`.")
                self._dataset = ds
            return self._dataset

    @property
    def view(self) -> dict | None:
        """The part of an image the bundle's model sees (`sae_core.image_view`), as the atlas recorded it;
        CLIP's centre square for a bundle from before it did. Draw patches on `model_view(img, view)`."""
        from .image_view import CENTRE_SQUARE

        model = self.manifest["model"]
        return model["view"] if "view" in model else CENTRE_SQUARE

    def thumb_path(self, i: int) -> Path:
        return self.root / THUMBS / f"{int(i)}.png"

    def image(self, i):
        """Image i as PIL RGB: the bundle's thumbnail if it has one, else read/rendered from the dataset."""
        from .datasets import ImageReadError, load_rgb

        i = checked_index(i, "image", self.n_images, "this bundle covers images")
        path = self.thumb_path(i)
        damaged = None
        if path.is_file():
            try:
                return load_rgb(path)
            except ImageReadError as e:  # rendered again as a missing one is (until 2026-12-05 the page's error)
                damaged = e
        try:
            return self.dataset()[i]
        except ImageReadError as e:  # the atlas skipped it too (manifest "skipped")
            raise UserError(f"image {i} cannot be read ({e}); the dataset holds a damaged file there.") from None
        except UserError as e:
            if damaged is None:
                raise
            raise UserError(f"the thumbnail {path} cannot be read ({str(damaged).removeprefix(f'{path}: ')}) and the "
                            f"dataset cannot render it instead ({str(e).rstrip('.')}); copy the bundle's "
                            f"{THUMBS} again or make its dataset available here.") from None

    def search_index(self):
        """The image search index (sae_core.search_index.SearchIndex, read once): `.search(queries (Q, E),
        k) -> (ids (Q, k), scores (Q, k))` over images/embeddings.npy; `.index` is the faiss index."""
        with self._open_lock:
            if not hasattr(self, "_index"):
                from .search_index import load_index

                self._index = load_index(self._path("images/index.faiss"),
                                         embeddings=self.array("images/embeddings"))
            return self._index

    def hierarchy(self) -> dict:
        """hierarchy.json: {"nodes": [{id, level, parent, label, ms}], "depth_per_level": [...], ...}, read and
        checked once (the Hierarchy page draws subtree after subtree of it: at K 65,536 each read 17 MB again, a
        quarter of a second); shared, so not to be changed by the caller."""
        with self._open_lock:
            if not hasattr(self, "_tree"):
                self._tree = self._read_hierarchy()
            return self._tree

    def _read_hierarchy(self) -> dict:
        tree = self.json(HIERARCHY)
        # the Hierarchy page indexes every node by these: checked where it is read, not at the app's start (the file
        # is 10 MB at K 65,536); until 2026-12-05 the page showed "'level'" or "string indices must be integers"
        nodes, depth = tree.get("nodes", []), tree.get("depth_per_level") or []

        def bad(n) -> bool:
            return not (isinstance(n, dict) and type(n.get("id")) is int and 0 <= n["id"] < self.n_neurons
                        and type(n.get("level")) is int and type(n.get("parent", -1)) is int
                        and type(n.get("ms")) in (int, float, type(None)) and isinstance(n.get("label") or "", str))

        wrong = "nodes is not a list" if not isinstance(nodes, list) else next(
            (f"node {i} is {json.dumps(n)[:80]}" for i, n in enumerate(nodes) if bad(n)), None)
        if not isinstance(depth, list) or any(type(d) not in (int, float, type(None)) for d in depth):
            wrong = wrong or "depth_per_level is not a list of numbers"
        wrong = wrong or _parent_loop(nodes, self.n_neurons)
        if wrong:
            raise UserError(f"{self.root / HIERARCHY} is not the tree the atlas writes ({wrong}; a node is {{id: a "
                            f"neuron 0..{self.n_neurons - 1}, level, parent: whole numbers, label, ms}}); the bundle is "
                            "damaged, rebuild it.")
        return tree

    def world_figures(self) -> dict | None:
        """world.json (ground-truth figures) for world bundles, else None."""
        return self.json(WORLD) if (self.root / WORLD).is_file() else None

    # --- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Check that every listed file exists, the per-neuron arrays agree in shape and what the pages index and draw
        by is in range (array headers, the small arrays and the manifest: the app's start runs it); UserError if not."""
        for name, rel in self.manifest["files"].items():
            # a bundle copied without its world/ is still served, from its thumbnails (README, The explorer)
            if name != "world_dir" and not (self.root / rel).exists():
                raise UserError(f"bundle {self.root} lists {rel} but it is missing; rebuild the bundle.")
        K = self.n_neurons
        for name in NEURON_ARRAYS:
            ndim = 1 if name in ONE_PER_NEURON else 3 if name in THREE_AXES else 2
            # every later check and page indexes these axes (a 1-D top_images was an IndexError in `inspect`)
            if self.has(name) and self.array(name).ndim != ndim:
                raise UserError(f"bundle {self.root}: neurons/{name}.npy has shape {self.array(name).shape}, not "
                                + {1: f"one value per neuron ({K},)", 2: f"a row per neuron ({K}, n)",
                                   3: f"a table per neuron ({K}, n, m)"}[ndim]
                                + "; rebuild the bundle.")
            if self.has(name) and self.array(name).shape[0] != K:
                raise UserError(f"bundle {self.root}: neurons/{name}.npy has {self.array(name).shape[0]} rows "
                                f"but the SAE has {K} neurons; rebuild the bundle.")
            if self.has(name) and self.array(name).dtype.kind not in "biuf":
                raise UserError(f"bundle {self.root}: neurons/{name}.npy holds {self.array(name).dtype} values, not "
                                "numbers; rebuild the bundle.")
        if self.has("raw/ms"):  # the Overview's MS distribution draws it beside the SAE's (unchecked until 2026-12-05)
            raw = self.array("raw/ms")
            if raw.ndim != 1 or raw.dtype.kind not in "biuf":
                raise UserError(f"bundle {self.root}: {RAW_MS} holds {raw.dtype} values of shape {raw.shape}, not one "
                                "number per raw unit of the layer; rebuild the bundle.")
        self._validate_values()
        if self.has(EMBEDDINGS):  # search results are row numbers, read as image ids
            shape = self.array(EMBEDDINGS).shape
            if len(shape) != 2 or shape[0] != self.n_images:
                raise UserError(f"bundle {self.root}: {EMBEDDINGS} has shape {shape}, not one row for each of its "
                                f"{self.n_images} images; rebuild the bundle.")
        T = self.array("top_images").shape[1]
        for name in ("top_acts", "top_patch", "top_heat"):
            if self.has(name) and self.array(name).shape[1] != T:
                raise UserError(f"bundle {self.root}: neurons/{name}.npy has {self.array(name).shape[1]} "
                                f"top slots, top_images has {T}; rebuild the bundle.")
        for name in ("band_images", "patch_band_images"):
            if not self.has(name):
                continue
            ids = np.asarray(self.array(name))
            for other in (name.replace("images", "acts"), name.replace("images", "patch")):
                if self.has(other) and ids.shape != self.array(other).shape:
                    raise UserError(f"bundle {self.root}: neurons/{name}.npy and {other}.npy differ in shape; "
                                    "rebuild the bundle.")
            if ids.size and (ids.max() >= self.n_images or ids.min() < -1):
                raise UserError(f"bundle {self.root}: {name} holds ids outside 0..{self.n_images - 1}; rebuild it.")
        for name in ("top_images", "patch_top_images"):
            if not self.has(name):
                continue
            ids = np.asarray(self.array(name))
            if ids.shape[1] != T:
                raise UserError(f"bundle {self.root}: neurons/{name}.npy has {ids.shape[1]} top slots, top_images "
                                f"has {T}; rebuild the bundle.")
            if ids.size and (ids.max() >= self.n_images or ids.min() < -1):
                raise UserError(f"bundle {self.root}: {name} holds ids outside 0..{self.n_images - 1}; rebuild it.")
        for name in ("hist", "patch_hist"):
            edges = self.array(f"{name}_edges") if self.has(f"{name}_edges") else None
            if edges is not None and edges.shape != (self.array(f"{name}_counts").shape[1] + 1,):
                raise UserError(f"bundle {self.root}: {name}_edges does not match {name}_counts; rebuild it.")
        labels = self.labels["labels"]
        if len(labels) != K:
            raise UserError(f"bundle {self.root}: labels.json has {len(labels)} labels for {K} neurons; rebuild it.")
        if len(self.labels.get("labels_by_patch", labels)) != K:
            raise UserError(f"bundle {self.root}: labels.json has {len(self.labels['labels_by_patch'])} labels by "
                            f"patches for {K} neurons; rebuild it.")
        if any(not 0 <= int(k) < K for k in self.labels["from_patch_gallery"]):
            raise UserError(f"bundle {self.root}: labels.json lists neurons outside 0..{K - 1} as labelled from "
                            "patches; rebuild it.")
        # what the pages index with or draw by, cheap to check (K ids, array headers, the manifest): the app's start
        # validates, where until 2026-12-05 it served them and a page showed numpy's "index 9999 is out of bounds"
        for name in ("parent", "parent_coact", "parent_decoder", "decoder_neighbors"):
            if not self.has(name):
                continue
            ids = np.asarray(self.array(name))
            if ids.size and (ids.max() >= K or ids.min() < -1):
                raise UserError(f"bundle {self.root}: {name} holds neuron ids outside 0..{K - 1}; rebuild it.")
        self._validate_manifest()

    def _validate_values(self) -> None:
        """MS in [-1, 1] or NaN (a weighted mean of cosines), and no infinity among the per-neuron figures the pages
        show (the heat maps, K x T x patches, are not read): until 2026-12-05 an MS of inf read on the neuron page as
        "fires on too few images" and sorted first, 7.0 was shown as a score, a max activation as "inf"."""
        for name in ("ms", "patch_ms", RAW_MS):
            if self.has(name):
                ms = np.asarray(self.array(name), np.float64)
                outside = ms[np.abs(ms) > 1 + 1e-4]  # NaN compares false: no MS, a score
                if outside.size:
                    raise UserError(f"bundle {self.root}: {name} holds {outside[0]:g}, outside the -1 to 1 of a "
                                    "Monosemanticity Score; the bundle is damaged, rebuild it.")
        shown = ("top_acts", "patch_top_acts", "decoder_neighbor_cos", "band_acts", "patch_band_acts")  # (K, ...)
        for name in (*sorted(ONE_PER_NEURON), *shown):
            if self.has(name) and self.array(name).dtype.kind == "f" and np.isinf(self.array(name)).any():
                raise UserError(f"bundle {self.root}: neurons/{name}.npy holds an infinite value; the bundle is "
                                "damaged, rebuild it.")

    def _validate_manifest(self) -> None:
        """The manifest's patch grid (against the heat arrays' patches), view, skipped images and metrics, as the
        pages read them."""
        from .image_view import is_view

        mpath, model = self.root / MANIFEST, self.manifest["model"]
        grid = model.get("grid")
        if grid is not None and not (isinstance(grid, list) and len(grid) == 2
                                     and all(type(g) is int and g > 0 for g in grid)):  # null: no heat maps drawn
            raise UserError(f"{mpath} holds model.grid = {json.dumps(grid)}, not the [rows, columns] of the model's patch "
                            "grid; the bundle is damaged, rebuild it.")
        if grid is not None:  # the heat maps are drawn on it, and token positions are mapped to patches by n_patches
            patches = {f"neurons/{n}.npy": self.array(n).shape[-1] for n in ("top_heat", "patch_top_heat") if self.has(n)}
            if model.get("n_patches") is not None:
                patches["model.n_patches"] = model["n_patches"]
            other = {what: n for what, n in patches.items() if n != grid[0] * grid[1]}
            if other:
                raise UserError(f"bundle {self.root}: its model.grid {grid} has {grid[0] * grid[1]} patches but "
                                + ", ".join(f"{what} has {json.dumps(n)}" for what, n in other.items())
                                + "; the bundle is damaged, rebuild it.")
        if not is_view(model.get("view")):
            raise UserError(f"{mpath} holds model.view = {json.dumps(model['view'])}, not the part of an image the "
                            "model sees ({\"resize\": {\"shortest_edge\": S} or {\"height\": H, \"width\": W}, "
                            "\"crop\": {\"height\": H, \"width\": W} or null}); the bundle is damaged, rebuild it.")

        skipped = self.manifest.get("skipped") or []  # the Images page leaves these out (an app start's TypeError)
        if not (isinstance(skipped, list) and all(isinstance(x, dict) and type(x.get("index")) is int
                                                  and 0 <= x["index"] < self.n_images for x in skipped)):
            raise UserError(f"{mpath} holds skipped = {json.dumps(skipped)[:80]}, not the list of images the scan could "
                            "not read ({\"index\": an image id, \"error\"}); the bundle is damaged, rebuild it.")

        def number(v) -> bool:
            return v is None or type(v) in (int, float)

        bad = [k for k, v in self.manifest["metrics"].items()  # metric_tokens: which tokens were measured
               if k != "metric_tokens" and not (number(v) or isinstance(v, list) and all(map(number, v)))]
        if bad:
            raise UserError(f"{mpath} holds metrics that are not numbers ({', '.join(bad)}); the bundle is damaged, "
                            "rebuild it.")
