"""Dataset specs: order, labels, iNaturalist taxonomy paths, file lists, corrupt images, the world."""
import sys
import types

import numpy as np
import pytest
from PIL import Image

from sae_core.datasets import ImageReadError, first_images_warning, inat_taxonomy, open_dataset
from sae_core.errors import UserError
from tests import extract_helpers as H

INAT = [
    "00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris",
    "00001_Animalia_Arthropoda_Insecta_Lepidoptera_Nymphalidae_Danaus_plexippus",
    "00002_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina",
]


def test_imagefolder_order_labels_and_corrupt_images():
    root = H.image_dir(10, corrupt=(3, 4))
    ds = open_dataset(f"imagefolder:{root}")
    assert len(ds) == 10
    assert [ds.item(i) for i in range(10)] == [f"{'cat' if i < 5 else 'dog'}/{i:04d}.{'png' if i % 3 == 0 else 'jpg'}" for i in range(10)]
    assert ds.label(0) == "cat" and ds.label(9) == "dog" and ds.taxonomy_path(0) is None
    img = ds[1]
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(root / "cat/0001.jpg").convert("RGB")))
    for bad in (3, 4):  # garbage bytes, and a truncated file
        with pytest.raises(ImageReadError, match=ds.item(bad)):
            ds[bad]
    with pytest.raises(IndexError):
        ds[10]


def test_dot_names_are_skipped_and_linked_folders_read_at_every_level(tmp_path):
    """Hidden sub-folders of a class (.ipynb_checkpoints) were read as the class, hidden files at every level
    were read (macOS's ._ files then "skipped" as unreadable), and a linked folder inside a class was left out
    in silence while one at the top was followed. The listing, written out: dot-names nowhere, links followed
    as torchvision's ImageFolder follows them, a link back up read once."""
    def img(rel):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / rel)

    for rel in ("root.png", ".hidden_root.png", "a/1.png", "a/.hidden.png", "a/._1.png", "a/.ipynb_checkpoints/1-checkpoint.png",
                "a/sub/2.png", ".hiddenclass/3.png", "elsewhere/4.png"):
        img(rel)
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "5.png")
    (tmp_path / "a" / "linked").symlink_to(outside, target_is_directory=True)
    (tmp_path / "a" / "sub" / "up").symlink_to(tmp_path / "a", target_is_directory=True)  # a loop
    (tmp_path / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    ds = open_dataset(f"imagefolder:{tmp_path}")
    assert [ds.item(i) for i in range(len(ds))] == [
        "root.png", "a/1.png", "a/linked/5.png", "a/sub/2.png", "b/4.png", "elsewhere/4.png"]
    assert [ds.label(i) for i in range(len(ds))] == [None, "a", "a", "a", "b", "elsewhere"]


def test_a_limit_that_misses_classes_is_warned_about(tmp_path):
    """--limit takes the first N images, and a folder is read class by class: the first 100,000 of ImageNet's
    train images are about 78 of its 1,000 classes. Said when classes are missed, with the counts of the
    folder itself (5 classes of 4 images, 2 loose images first); silent otherwise."""
    for c in range(5):
        (tmp_path / f"c{c}").mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8)).save(tmp_path / f"c{c}" / f"{i}.png")
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"loose{i}.png")
    ds = open_dataset(f"imagefolder:{tmp_path}")
    assert [ds.label(i) for i in range(len(ds))] == [None] * 2 + [f"c{c}" for c in range(5) for _ in range(4)]
    for n, kept in ((2, 0), (3, 1), (9, 2), (17, 4)):
        assert first_images_warning(ds, n) == (
            f"warning: --limit {n} takes the first {n} of the 22 images of imagefolder:{tmp_path}, which hold {kept} "
            "of its 5 classes (a folder is read class by class); for every class, pass no --limit or a "
            "files:LIST.txt naming the images to use.")
    assert first_images_warning(ds, 19) is None and first_images_warning(ds, 22) is None  # every class
    assert first_images_warning(open_dataset(f"imagefolder:{tmp_path / 'c0'}"), 1) is None  # no classes
    # a list says no folder order, and is not told to pass a list (it said "pass ... a files:LIST.txt naming the
    # images to use" to one): its first entries are what --limit takes
    (tmp_path / "list.txt").write_text("c0/0.png\ta\nc0/1.png\ta\nc1/0.png\tb\n")
    assert first_images_warning(open_dataset(f"files:{tmp_path / 'list.txt'}"), 2).endswith(
        "which hold 1 of its 2 classes; for every class, pass no --limit or a list whose first 2 entries cover every "
        "class.")


def test_inaturalist_folders_give_seven_level_taxonomy(tmp_path, monkeypatch):
    for k, name in enumerate(INAT):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(tmp_path / "train" / name / f"{k}.jpg")
    monkeypatch.setenv("INAT_PATH", str(tmp_path))
    ds = open_dataset("inat:train")
    assert len(ds) == 3
    assert ds.taxonomy_path(1) == ["Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus",
                                   "Danaus plexippus"]
    assert ds.taxonomy_path(2)[0] == "Plantae" and len(ds.taxonomy_path(2)) == 7
    assert inat_taxonomy("n01440764") is None  # ImageNet synsets are not taxonomy paths
    monkeypatch.delenv("INAT_PATH")
    with pytest.raises(UserError, match="INAT_PATH"):
        open_dataset("inat:train")
    monkeypatch.setenv("IMAGENET_PATH", str(tmp_path))
    assert len(open_dataset("imagenet:train")) == 3
    with pytest.raises(UserError, match="does not exist"):
        open_dataset("imagenet:val")


def test_file_list_with_labels_and_comments(tmp_path):
    root = H.image_dir(10)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# two images\n{root}/cat/0001.jpg\tkitten\n\n{root}/dog/0008.jpg\n")
    ds = open_dataset(f"files:{lst}")
    assert len(ds) == 2 and ds.label(0) == "kitten" and ds.label(1) is None
    np.testing.assert_array_equal(np.asarray(ds[1]), np.asarray(Image.open(root / "dog/0008.jpg").convert("RGB")))
    rel = H.write_file_list(root)
    assert len(open_dataset(f"files:{rel}")) == 10  # paths relative to the list's folder


def test_file_lists_from_windows_editors_and_other_encodings(tmp_path):
    """A list saved with a BOM and CRLF line ends (Notepad, Excel) lost its first image in silence (the BOM
    became part of its path: one "unreadable image" warning, exit 0); a list in Latin-1 was a traceback in
    extract, atlas and ood; a folder given as the list "did not exist"."""
    root = H.image_dir(10)
    lst = tmp_path / "list.txt"
    lst.write_bytes(f"\ufeff{root}/cat/0001.jpg\r\n{root}/dog/0008.jpg\tdog\r\n".encode("utf-8"))
    ds = open_dataset(f"files:{lst}")
    assert len(ds) == 2 and ds.label(1) == "dog"
    np.testing.assert_array_equal(np.asarray(ds[0]), np.asarray(Image.open(root / "cat/0001.jpg").convert("RGB")))
    lst.write_bytes(f"{root}/caf\xe9/0001.jpg\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"line 1 is not UTF-8 text \(byte 0xe9\); save it as UTF-8"):
        open_dataset(f"files:{lst}")
    with pytest.raises(UserError, match=rf"file list {root} is a folder; pass imagefolder:{root} "):
        open_dataset(f"files:{root}")


def test_world_spec_delegates_to_the_world_dataset(tmp_path, monkeypatch):
    calls = {}

    class FakeWorld:
        taxonomy = {"round": {"circle": {}}}

        def __init__(self, root, split="train"):
            calls["args"] = (root, split)

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return Image.new("RGB", (32, 32), (i, 0, 0))

        def factors(self, i):
            return {"shape": "circle"}

        def taxonomy_path(self, i):
            return ["round", "circle", "warm", "red"]

    fake = types.ModuleType("sae_core.world.dataset")
    fake.WorldDataset = FakeWorld
    monkeypatch.setitem(sys.modules, "sae_core.world.dataset", fake)
    ds = open_dataset(f"world:{tmp_path}:ood")
    assert calls["args"] == (str(tmp_path), "ood") and len(ds) == 4
    assert ds[2].getpixel((0, 0)) == (2, 0, 0) and ds.taxonomy_path(1)[-1] == "red" and ds.label(1) == "round_circle_warm_red"
    assert ds.item(3) == "ood/3" and ds.factors(0) == {"shape": "circle"}
    open_dataset(f"world:{tmp_path}")
    assert calls["args"][1] == "train"
    # a misspelt split or model after an existing world's folder is named as such (it was "world directory
    # W:vall does not exist; build it with ... world --out W:vall"); a missing world still gets the build command
    from sae_core.adapters import world_model_dir

    for given, what, parts in [(lambda r: open_dataset(f"world:{r}"), "split", "train, val, ood"),
                               (world_model_dir, "model", "clip, llava")]:
        with pytest.raises(UserError) as e:
            given(f"{tmp_path}:vall")
        assert str(e.value) == (f"'vall' in world:{tmp_path}:vall is not a {what} of the world {tmp_path}; give one "
                                f"of {parts}.")
        with pytest.raises(UserError, match=r"build (it|the world) with `python -m precompute world --out "):
            given(f"{tmp_path}/nope")


@pytest.mark.parametrize("spec, msg", [
    ("folder:/x", "is not one of"),
    ("imagefolder:/nonexistent/x", "does not exist"),
    ("files:/nonexistent/list.txt", "does not exist"),
])
def test_bad_dataset_specs(spec, msg):
    with pytest.raises(UserError, match=msg):
        open_dataset(spec)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        open_dataset(f"imagefolder:{tmp_path}")


def test_the_real_world_dataset_through_its_spec(tmp_path):
    """The embedded world's own WorldDataset (its world.json and taxonomy.json only; no models needed)."""
    stages = pytest.importorskip("precompute.world.stages")
    from precompute.world.presets import PRESETS

    stages.stage_world(tmp_path, PRESETS["tiny"], 0)
    ds = open_dataset(f"world:{tmp_path}:val")
    assert len(ds) > 0 and ds[0].mode == "RGB" and ds.item(1) == "val/1"
    path = ds.taxonomy_path(0)
    assert len(path) >= 4 and ds.label(0).endswith("_".join(path))
    np.testing.assert_array_equal(np.asarray(ds[3]), np.asarray(open_dataset(f"world:{tmp_path}:val")[3]))
    assert ds.describe()["split"] == "val" and len(open_dataset(f"world:{tmp_path}:ood")) > 0


def test_specs_are_recorded_with_their_local_paths_made_absolute(tmp_path, monkeypatch):
    """Manifests recorded `hf:clip` and `imagefolder:data` as typed, and the explorer, started in another folder,
    read another ./clip in silence: a relative path that exists is recorded absolute, and the spec then opens the
    same images from any folder; hub ids, tags and paths that do not exist here are kept as given."""
    from sae_core.datasets import absolute_spec, model_files_digest

    here = tmp_path.resolve()
    for d in ("clip", "data/a", "openai/clip-vit-base-patch32", "w/clip", "w/llava"):
        (here / d).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(here / "data/a/0.png")
    (here / "list.txt").write_text("data/a/0.png\n")
    for f in ("ckpt.pt", "ckpt", "laion2b_s34b_b79k"):
        (here / f).write_bytes(b"")
    (here / "data_link").symlink_to(here / "data")
    (here / "w2/inner").mkdir(parents=True)
    (here / "w2/data2").mkdir()
    (here / "jump").symlink_to(here / "w2/inner")  # jump/.. is w2 to the filesystem, "." to the text
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(here))  # the shell expands no "~" inside `hf:~/clip`: it was kept, then a hub id
    want = {
        "hf:~/clip": f"hf:{here}/clip",
        "hf:clip": f"hf:{here}/clip", "llava:./clip": f"llava:{here}/clip", "imagefolder:data": f"imagefolder:{here}/data",
        "files:list.txt": f"files:{here}/list.txt", "world:w": f"world:{here}/w", "world:w:llava": f"world:{here}/w:llava",
        "world:w:val": f"world:{here}/w:val", "open_clip:ViT-B-32/ckpt.pt": f"open_clip:ViT-B-32/{here}/ckpt.pt",
        "open_clip:local-dir:clip": f"open_clip:local-dir:{here}/clip",
        # a checkpoint file without a suffix (open_clip has no tag of its name); a link is kept, not its target
        "open_clip:ViT-B-32/ckpt": f"open_clip:ViT-B-32/{here}/ckpt", "imagefolder:data_link": f"imagefolder:{here}/data_link",
        "imagefolder:jump/../data2": f"imagefolder:{here}/w2/data2",
        # a local folder shaped like a hub id is what transformers loads, so it is recorded as a path
        "hf:openai/clip-vit-base-patch32": f"hf:{here}/openai/clip-vit-base-patch32",
    }
    # open_clip takes a tag before a file of its name (./openai, ./laion2b_s34b_b79k are there): kept, as are hub
    # ids and missing paths
    kept = ["hf:openai/clip-vit-large-patch14", "hf:nope", "llava:", "llava:llava-hf/llava-1.5-7b-hf", "imagenet:val",
            "inat", "open_clip:ViT-B-32/openai", "open_clip:ViT-B-32/laion2b_s34b_b79k", "open_clip:ViT-B-32", "open_clip:hf-hub:timm/vit_base", "imagefolder:nope",
            f"hf:{here}/clip", f"imagefolder:{here}/data", "world:nope:llava", "hf:~/nope"]
    assert {s: absolute_spec(s) for s in [*want, *kept]} == {**want, **{s: s for s in kept}}
    # hub ids, tags and `llava:` (the hub's LLaVA-1.5) name no local files, so no files' digest: `llava:` walked the
    # working folder, which held the command's own --out (a rerun was refused; the night of 2026-12-05)
    assert [s for s in kept if model_files_digest(s) is not None] == [f"hf:{here}/clip", f"imagefolder:{here}/data"]
    elsewhere = here / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for spec in ("imagefolder:data", "files:list.txt"):
        ds = open_dataset(want[spec])
        assert len(ds) == 1 and ds.root == here / ("data" if spec.startswith("imagefolder") else "") and ds[0].size == (8, 8)
