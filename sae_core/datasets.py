"""Image datasets behind one small interface, opened from a command-line spec.

Every dataset has ``len(ds)``, ``ds[i] -> PIL RGB image`` (raising `ImageReadError` for a corrupt or
unreadable file, which extraction skips and counts), ``ds.item(i)`` (a path or id that names image i),
``ds.label(i)`` (class name or None), ``ds.taxonomy_path(i)`` (list of names from the root, or None),
and ``ds.describe()`` (a JSON-able dict that says how to get image i back, for manifests and bundles).

Specs
    imagefolder:PATH      class sub-folders of images (or images directly in PATH); $VARS expand.
                          Folder names shaped like iNaturalist 2021's
                          ``00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris``
                          become 7-level taxonomy paths (kingdom ... species).
    imagenet[:SPLIT]      $IMAGENET_PATH/SPLIT (train by default) in the class-folder layout
    inat[:SPLIT]          $INAT_PATH/SPLIT (train by default), iNaturalist 2021 layout
    files:LIST.txt        one image path per line (relative to the list's folder), optionally followed
                          by a tab and a label; blank lines and lines starting with # are ignored
    world:DIR[:SPLIT]     the embedded world at DIR (train by default; val, ood)
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import UserError, not_utf8, readable, unknown_world_part
from .folders import refuse_bundle_as_world

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_INAT_NAME = re.compile(r"^\d+_[^_]+(_[^_]+){6,}$")


class ImageReadError(Exception):
    """An image that cannot be decoded; extraction skips it and records it."""


def load_rgb(path: str | Path, upright: bool = False):
    """Decode a file fully into a PIL RGB image, or raise ImageReadError saying why not. `upright`: turned by its
    EXIF orientation, as a photo viewer shows it (a user's photo; dataset images are read as torchvision reads them)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            # to_rgb forces the full decode: truncated files fail here
            return to_rgb(ImageOps.exif_transpose(im) if upright else im)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise ImageReadError(f"{path}: {type(e).__name__}: {e}") from e


def to_rgb(im):
    """`im` (PIL) as 8-bit RGB. PIL's own conversion clips the one-channel modes of more than 8 bits (a 16-bit
    greyscale scan came out white): those are scaled instead (16 bits by 257, 0-1 floats by 255, any other
    range stretched to 0-255)."""
    if im.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        rgb = im.convert("RGB")
        # PIL leaves a palette (or RGB) PNG's transparent colour in the copy's info, and transformers' convert_to_rgb
        # then paints every pixel of that colour white: the model saw another picture than these pixels (an
        # RGBA file's colours are kept under its alpha; the same here)
        rgb.info.pop("transparency", None)
        return rgb
    import numpy as np
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        a = a / 257
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")  # 2-d uint8: mode L


def inat_taxonomy(folder_name: str) -> list[str] | None:
    """ "00000_Animalia_..._Lumbricus_terrestris" -> [Animalia, ..., Lumbricus, Lumbricus terrestris].

    The species level is the binomial (genus + epithet, and any further parts) so that names are
    unique per level. Names that do not have the iNaturalist shape give None.
    """
    if not _INAT_NAME.match(folder_name):
        return None
    parts = folder_name.split("_")[1:]
    genus, epithet = parts[5], " ".join(parts[6:])
    return parts[:5] + [genus, f"{genus} {epithet}"]


def items_digest(ds, n: int) -> str:
    """sha256 of the names (`item`) of a dataset's first `n` images, one a line: what image ids 0..n-1 stand for,
    so a bundle can tell when its folder has changed under it (0.17 s for 1.28 M ImageNet-like names here)."""
    text = "\n".join(ds.item(i) for i in range(n))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def images_changed(out, spec: str, n: int, verb: str) -> UserError:
    """The refusal to resume `out` where the names of the first `n` images `spec` lists (items_digest) differ from
    the ones it was started on: a resumed extraction or atlas mixed the two lists in silence until 2026-12-05."""
    return UserError(f"{out} was started on other images: the names of the first {n:,} images of {spec} have changed "
                     f"since (files added, removed or renamed); pass a new --out, or delete {out} to {verb} there "
                     "from the start.")


class ImageDataset:
    """Common base: subclasses implement __len__, load(i), item(i)."""

    spec: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.load(i)

    def load(self, i: int):
        raise NotImplementedError

    def item(self, i: int) -> str:
        return str(i)

    def label(self, i: int) -> str | None:
        return None

    def taxonomy_path(self, i: int) -> list[str] | None:
        return None

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": type(self).__name__, "n_images": len(self)}


class FileListDataset(ImageDataset):
    """Images at known paths, with optional labels and taxonomy paths."""

    def __init__(self, spec: str, root: Path, paths: list[str], labels: list[str | None] | None = None,
                 taxonomy: dict[str, list[str]] | None = None):
        self.spec, self.root, self.paths = spec, root, paths
        self.labels = labels
        self.taxonomy = taxonomy  # label -> path

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        return load_rgb(self.root / self.paths[i])

    def item(self, i):
        return self.paths[i]

    def label(self, i):
        return self.labels[i] if self.labels else None

    def taxonomy_path(self, i):
        if self.taxonomy is None:
            return None
        lab = self.label(i)
        return list(self.taxonomy[lab]) if lab in self.taxonomy else None

    def describe(self):
        d = super().describe()
        d.update(root=str(self.root), fetch="root / item(i); items in the spec's order (a file list: its lines; "
                                                 "an image folder: its loose images, then class by class, a folder's "
                                                 "files before its sub-folders, names sorted)")
        return d


def image_folder(spec: str, path: str) -> FileListDataset:
    root = Path(os.path.expandvars(os.path.expanduser(path)))
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist or is not a directory; pass imagefolder:PATH to a folder of class sub-folders.")
    paths: list[str] = []
    labels: list[str | None] = []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    # One rule at every level: a name starting with "." is not read (.ipynb_checkpoints copies, macOS's ._
    # AppleDouble files, .DS_Store; until 2026-12-05 only top-level folders were left out), and a linked folder
    # is read as a folder, as torchvision's ImageFolder does (one inside a class was left out in silence)
    def shown(name: str, suffix_ok: bool = True) -> bool:
        return not name.startswith(".") and (not suffix_ok or Path(name).suffix.lower() in IMAGE_EXTENSIONS)

    classes = [e.name for e in entries if e.is_dir() and shown(e.name, suffix_ok=False)]
    # a class is labelled by its folder's name as text: a name in another encoding by its bytes ("caf\\xe9"), which
    # the text tower and the explorer can read ("caf\udce9" failed the tokenizer after the whole scan until 2026-12-05)
    label_of = {c: readable(c) for c in classes}
    for e in entries:  # images directly in root have no label
        if e.is_file() and shown(e.name):
            paths.append(e.name)
            labels.append(None)
    for cls in classes:
        seen = set()  # real folders walked: a link back up would loop for ever
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if shown(d, suffix_ok=False))
            rel = os.path.relpath(dirpath, root)
            for f in sorted(filenames):
                if shown(f):
                    paths.append(os.path.join(rel, f))
                    labels.append(label_of[cls])
    if not paths:
        raise UserError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); check the path.")
    taxonomy = {label_of[c]: t for c in classes if (t := inat_taxonomy(label_of[c])) is not None}
    if len(taxonomy) < len(classes):
        taxonomy = None  # not an iNaturalist layout (all or nothing)
    return FileListDataset(spec, root, paths, labels if classes else None, taxonomy)


def file_list(spec: str, path: str) -> FileListDataset:
    lst = Path(os.path.expandvars(os.path.expanduser(path)))
    if lst.is_dir():
        raise UserError(f"file list {lst} is a folder; pass imagefolder:{lst} for a folder of images, or "
                        "files:LIST.txt with one image path per line.")
    if not lst.is_file():
        raise UserError(f"file list {lst} does not exist; pass files:LIST.txt with one image path per line.")
    try:  # -sig: Notepad and Excel start their UTF-8 with a BOM, which became part of the first path
        text = lst.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(lst) from None
    paths, labels = [], []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        p, _, lab = line.partition("\t")
        paths.append(p.strip())
        labels.append(lab.strip() or None)
    if not paths:
        raise UserError(f"file list {lst} names no images; write one path per line.")
    return FileListDataset(spec, lst.parent, paths, labels if any(labels) else None)


def first_images_warning(ds: ImageDataset, n: int) -> str | None:
    """What `--limit n` leaves out, when it takes the first n images of a folder read class by class (or of a
    file list) and they miss some of its classes (--limit 100000 on imagenet:train holds about 78 of its 1,000), as one
    warning sentence; None when they hold every class, or the dataset lists no classes."""
    labels = getattr(ds, "labels", None)
    if not labels or n >= len(labels):
        return None
    kept, every = len(set(labels[:n]) - {None}), len(set(labels) - {None})
    if kept >= every:
        return None
    if ds.spec.startswith("files:"):  # a list is in use already (it was told to pass one): its order is what to change
        why, instead = "", f"a list whose first {n:,} entries cover every class"
    else:
        why, instead = " (a folder is read class by class)", "a files:LIST.txt naming the images to use"
    return (f"warning: --limit {n:,} takes the first {n:,} of the {len(labels):,} images of {ds.spec}, which hold "
            f"{kept:,} of its {every:,} classes{why}; for every class, pass no --limit or {instead}.")


WORLD_SPLITS = ("train", "val", "ood")  # what may follow world:DIR: in a dataset spec
WORLD_MODELS = ("clip", "llava")  # ... and in a model spec (adapters.world_model_dir)


def world_root_and_split(rest: str) -> tuple[str, str]:
    """"DIR" or "DIR:SPLIT" (what follows `world:` in a dataset spec) -> (DIR, SPLIT); the split defaults to train."""
    head, sep, tail = rest.rpartition(":")
    return (head, tail) if sep and tail in WORLD_SPLITS else (rest, "train")


def absolute_spec(spec: str) -> str:
    """A model or dataset spec (sae_core.adapters, open_dataset) as a manifest records it: the local path it names
    made absolute when that path is relative and exists here (`hf:clip` -> `hf:/home/u/clip`), so that it names
    the same files from any folder; hub ids, tags, `imagenet`/`inat` and paths that do not exist here as given.
    Until 2026-12-05 a relative path was recorded as typed, and the explorer, started in another folder, read
    another ./clip in silence, or took the path for a hub id."""
    parts = _spec_path(spec)
    if parts is None:
        return spec
    head, path, tail = parts
    return f"{head}{_absolute_path(path)}{tail}"


def _spec_path(spec: str) -> tuple[str, str, str] | None:
    """(what comes before, the path, what comes after) of a spec that names a local path, else None (hub ids,
    open_clip tags, `imagenet`)."""
    kind, _, rest = spec.partition(":")
    if kind in ("imagefolder", "files", "hf", "llava"):
        return f"{kind}:", rest, ""
    if kind == "world":  # world:DIR[:SPLIT] and world:DIR[:clip|:llava]
        head, sep, tail = rest.rpartition(":")
        return ("world:", head, sep + tail) if sep and tail in WORLD_SPLITS + WORLD_MODELS else ("world:", rest, "")
    if kind == "open_clip" and rest.startswith("local-dir:"):
        return "open_clip:local-dir:", rest[len("local-dir:"):], ""
    if kind == "open_clip" and not rest.startswith("hf-hub:"):  # NAME/PRETRAINED: a tag, or a checkpoint file
        name, sep, pretrained = rest.partition("/")
        if "/" in pretrained or Path(pretrained).suffix or _untagged_file(name, pretrained):
            return f"open_clip:{name}{sep}", pretrained, ""
    return None


def files_digest(files) -> str:
    """sha256 of the name, size and mtime_ns of each (name, path) in `files` (or of each path, named as given):
    changes when a file is rewritten, added or removed, at the cost of one stat each (what `make` trusts; a copy
    that keeps no times counts as new)."""
    h = hashlib.sha256()
    for f in files:
        name, path = f if isinstance(f, tuple) else (f, f)
        try:
            st = os.stat(path)
            h.update(os.fsencode(name) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(os.fsencode(name) + b"\0missing\n")
    return h.hexdigest()


def model_files_digest(spec: str) -> str | None:
    """`files_digest` of the local files a model spec loads (a model folder's, recursively; a checkpoint file), so a
    run resumed under the same spec can tell other weights saved there since (a world rebuilt, a model folder
    overwritten: until 2026-12-05 the old activations, SAE and bundle were kept in silence); None for hub ids and
    tags, whose files the hub's cache keeps by revision."""
    parts = _spec_path(spec)
    if parts is None or not parts[1]:  # `llava:` alone is the hub's LLaVA-1.5 (its path read as "." walked the folder)
        return None
    head, path, tail = parts
    local = Path(os.path.expandvars(os.path.expanduser(path)))
    if head == "world:":  # world:DIR is its CLIP (the embedder), world:DIR:llava its LLaVA
        local = local / (tail[1:] if tail[1:] in WORLD_MODELS else "clip")
    if local.is_file():
        return files_digest([local])
    if not local.is_dir():
        return None
    return files_digest(sorted((str(p.relative_to(local)), p) for p in local.rglob("*") if p.is_file()))


def image_files_digest(ds, n: int) -> str | None:
    """`files_digest` of the first `n` images' files of a folder or file list (an image rewritten under its own name
    is another image, which `items_digest` cannot see), the world.json a world's images are rendered from; None for
    datasets of neither kind."""
    if isinstance(ds, FileListDataset):
        root = Path(ds.root)
        return files_digest((item, root / item) for item in ds.paths[:n])
    if isinstance(ds, WorldImages):
        return files_digest([("world.json", Path(ds.root, "world.json"))])
    return None


def files_changed(out, what: str, verb: str) -> UserError:
    """The refusal to resume `out` where the files `what` names were rewritten since it was started (their size or
    modification time; `files_digest`)."""
    return UserError(f"{out} was made from other files: {what} changed since (a file's size or modification "
                     f"time); pass a new --out, or delete {out} to {verb} there from the start.")


def _untagged_file(name: str, pretrained: str) -> bool:
    """Whether open_clip would load `pretrained` as a checkpoint file: it takes a tag (openai) before a file of
    that name, so a suffix-less file counts only where open_clip knows no such tag (until 2026-12-05 it stayed
    relative)."""
    if not pretrained or not Path(pretrained).is_file():
        return False
    try:
        import open_clip
    except ImportError:  # the load will say open_clip is missing; the path is recorded as a file meanwhile
        return True
    return not open_clip.get_pretrained_cfg(name, pretrained)


def _absolute_path(path: str) -> str:
    """`path` made absolute where it is relative and exists, its symbolic links kept: a linked ./data is recorded
    as ./data, which follows the link where it is pointed later (until 2026-12-05 its target was recorded). A path
    with ".." is resolved: after a link, the filesystem's ".." is the link target's parent, not the text's."""
    local = Path(os.path.expandvars(os.path.expanduser(path)))
    if not path or Path(path).is_absolute() or not local.exists():
        return path
    # "~/clip" and "$DATA/x" too: the shell expands neither inside `hf:~/clip`, and transformers took it for a
    # hub id ("Repo id must use alphanumeric chars"; until the evening of 2026-12-05)
    return str(local.resolve()) if ".." in local.parts else os.path.abspath(local)


class WorldImages(ImageDataset):
    """The embedded world's images, rendered on demand from their index (sae_core.world)."""

    def __init__(self, spec: str, root: str, split: str):
        try:
            from sae_core.world.dataset import WorldDataset
        except ImportError as e:
            raise UserError(f"the embedded world code is not available ({e}); update the checkout.") from e
        rootp = Path(os.path.expandvars(os.path.expanduser(root)))
        if not rootp.is_dir():
            unknown_world_part(root, WORLD_SPLITS, "split")
            raise UserError(f"world directory {rootp} does not exist; build it with `python -m precompute world --out {rootp}`.")
        refuse_bundle_as_world(rootp)
        try:
            self.world = WorldDataset(str(rootp), split=split)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise UserError(f"cannot open the world at {rootp} split {split!r} ({e}); rebuild it or pick train, val or ood.") from e
        self.spec, self.root, self.split = spec, rootp, split
        self.taxonomy = getattr(self.world, "taxonomy", None)

    def __len__(self):
        return len(self.world)

    def load(self, i):
        img = self.world[i]
        return img if img.mode == "RGB" else img.convert("RGB")

    def item(self, i):
        return f"{self.split}/{i}"

    def factors(self, i):
        return self.world.factors(i)

    def label(self, i):
        """The class name, iNaturalist-style like an image folder's ("00000_round_circle_warm_red")."""
        if hasattr(self.world, "class_name"):
            return self.world.class_name(i)
        path = self.taxonomy_path(i)
        return "_".join(path) if path else None

    def taxonomy_path(self, i):
        return list(self.world.taxonomy_path(i))

    def describe(self):
        d = super().describe()
        d.update(root=str(self.root), split=self.split, fetch="WorldDataset(root, split)[i] (rendered from the index)")
        return d


def _env_root(var: str, split: str, spec: str) -> str:
    base = os.environ.get(var)
    if not base:
        raise UserError(f"{spec} needs the environment variable {var} set to the dataset's root folder.")
    return str(Path(base) / split)


def open_dataset(spec: str) -> ImageDataset:
    """Open a dataset from its spec (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if kind == "imagefolder" and rest:
        return image_folder(spec, rest)
    if kind == "imagenet":
        return image_folder(spec, _env_root("IMAGENET_PATH", rest or "train", spec))
    if kind == "inat":
        return image_folder(spec, _env_root("INAT_PATH", rest or "train", spec))
    if kind == "files" and rest:
        return file_list(spec, rest)
    if kind == "world" and rest:
        return WorldImages(spec, *world_root_and_split(rest))
    raise UserError(
        f"dataset spec {spec!r} is not one of imagefolder:PATH, imagenet[:SPLIT], inat[:SPLIT], "
        "files:LIST.txt, world:DIR[:SPLIT]."
    )
