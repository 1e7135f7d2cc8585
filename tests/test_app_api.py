"""The explorer's API through gradio_client, against `python -m app` on the tiny bundle."""
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from sae_core.bundle import open_bundle
from tests.test_app_units import GRADIO_IMAGES, png_header_only

COLOUR_Q = "What colour is the shape? Use one word."


@pytest.fixture(scope="module")
def client(explorer_app):
    return Client(explorer_app.url, verbose=False, download_files=False)


def neurons(explorer_app, name):
    return np.load(explorer_app.bundle / "neurons" / f"{name}.npy")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_every_action_is_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    for name in ("/overview", "/neuron_page", "/neuron_json", "/neuron_table", "/neuron_export", "/hierarchy",
                 "/search_neurons_by_text", "/search_neurons_by_image", "/steer", "/steer_load_image",
                 "/steer_select_patch", "/steer_with_neuron", "/restore_from_url", "/steer_restore_from_url",
                 "/probes_overview", "/crossmodal_overview", "/open_neuron_from_crossmodal", "/search_images_by_text",
                 "/search_images_by_image", "/search_images_like", "/image_neurons", "/open_neuron_from_image",
                 "/steer_with_image", "/neuron_table_csv"):
        assert name in names
    assert not any(n.startswith("/lambda") or n.startswith("/fn_") for n in names)


def test_the_overview_gives_the_ms_histogram_in_words(client, explorer_app):
    """The facts name each set's median MS, as the bundle's arrays give it (np.median here)."""
    facts = client.predict(api_name="/overview")[0]
    for path, name in (("neurons/ms.npy", "SAE latents"), ("raw/ms.npy", "raw neurons")):
        ms = np.load(explorer_app.bundle / path)
        ms = ms[np.isfinite(ms)]
        assert f"{name} ({ms.size:,} scored): median {np.median(ms.astype(np.float64)):.3f}," in facts


def test_probe_panel_follows_the_bundles_ood_results(client, explorer_app):
    """Without probes/ood.json (the fresh tiny bundle) the panel names the command and hides the plot; a
    reused bundle (SAE_TINY_BUNDLE) may hold results, and then the note names the file's best detectors."""
    out = client.predict(api_name="/probes_overview")
    ood = explorer_app.bundle / "probes" / "ood.json"
    if not ood.exists():
        assert f"run `python -m precompute ood --bundle {explorer_app.bundle}`" in out[0]
        assert out[1] == {"visible": False, "__type__": "update"}
    else:
        saved = json.loads(ood.read_text())
        for key in ("best_sae", "best_raw"):
            assert f"**{saved[key]}** {saved['methods'][saved[key]]['auroc']:.3f}" in out[0]
        assert out[1]["visible"] is True


def test_neuron_page_follows_the_bundle(client, explorer_app):
    support, top = neurons(explorer_app, "support"), neurons(explorer_app, "top_images")
    k = int(np.argmax(support))
    out = client.predict(k, api_name="/neuron_page")
    assert out[0] == k and out[1].startswith(f"### Neuron {k}\n") and f"over {support[k]} images" in out[1]
    want = [int(i) for i in top[k] if i >= 0]
    assert [g["caption"].split()[0] for g in out[2]] == [f"#{i}" for i in want]
    # gallery files are served and are the 160 px tiles; band strips too
    assert not out[3]  # no gallery by the max over patches: the tiny bundle ranks by it already
    for item in out[2][:3] + out[4][:1]:
        with urllib.request.urlopen(item["image"]["url"], timeout=10) as r:
            assert r.status == 200 and r.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out[7] == f"tab=neuron&neuron={k}"  # the URL query the page sets
    rec = client.predict(k, api_name="/neuron_json")
    assert rec["neuron"] == k and rec["support"] == int(support[k])
    assert rec["ms"] == pytest.approx(float(neurons(explorer_app, "ms")[k]), abs=1e-4)
    assert [t["image"] for t in rec["top"]] == want


def test_bad_neuron_ids_get_a_message(client, explorer_app):
    K = len(neurons(explorer_app, "ms"))
    for bad in (K, -1, 10**12):  # the message names the field (Gradio's own named none)
        with pytest.raises(AppError, match=f"neuron id {bad} is out of range; give an integer between 0 and {K - 1}"):
            client.predict(bad, api_name="/neuron_page")
    # a fraction is refused, not rounded to a neighbour's page; text is refused in a sentence too
    # /neuron_export and /steer_with_neuron read the page's hidden neuron box, which Gradio rounded (3.5 gave
    # neuron 4's file) and whose text was its own traceback
    for endpoint, bad, what in (("/neuron_page", 3.5, "neuron id 3.5"), ("/neuron_page", "abc", "neuron id 'abc'"),
                                ("/neuron_export", 3.5, "neuron id 3.5"), ("/neuron_export", "abc", "neuron id 'abc'"),
                                ("/steer_with_neuron", 3.5, "neuron id 3.5"),
                                ("/image_neurons", 2.5, "image id 2.5"), ("/search_images_like", 2.5, "image id 2.5"),
                                ("/steer_with_image", 2.5, "image id 2.5")):
        with pytest.raises(AppError, match=f"{what} is not an integer"):
            client.predict(bad, *([""] if endpoint == "/image_neurons" else []), api_name=endpoint)
    with pytest.raises(AppError, match="subtree's latent .* 2.5 is not an integer"):
        client.predict("sunburst", 2.5, api_name="/hierarchy")
    with pytest.raises(AppError, match="row limit 2.5 is not an integer"):
        client.predict(0.0, 0, "all", "", "ms", True, 2.5, api_name="/neuron_table")
    n_images = open_bundle(explorer_app.bundle).n_images  # the bound was 2**62 in the sentence ("between 0 and 4611686018427387904")
    with pytest.raises(AppError, match=f"^minimum support -5 is out of range; give an integer between 0 and {n_images}\\.$"):
        client.predict(0.0, -5, "all", "", "ms", True, 50, api_name="/neuron_table")
    # endpoints that answer a click say so, and what to call (a script cannot send a click)
    for endpoint, inputs in (("/open_neuron_from_table", ()), ("/open_neuron_from_relatives", ()),
                             ("/open_neuron_from_image", ()), ("/steer_select_patch", (2, None, "")),
                             ("/steer_pick_latent", (2, None, ""))):
        with pytest.raises(AppError, match="answers a click on the page, which an API call cannot send; (call|give)"):
            client.predict(*inputs, api_name=endpoint)
    with pytest.raises(AppError, match="out of range"):
        client.predict(K, api_name="/neuron_json")
    with pytest.raises(AppError, match="not an integer"):
        client.predict(2.5, api_name="/neuron_json")


def test_neuron_export_is_the_neuron_json_as_a_file(client, explorer_app):
    k = int(np.argmax(neurons(explorer_app, "support")))
    file = client.predict(k, api_name="/neuron_export")  # a plain file (download_files=False: its record)
    assert file["orig_name"] == f"neuron_{k}.json"
    assert client.predict(str(k), api_name="/neuron_export")["orig_name"] == f"neuron_{k}.json"  # as /neuron_page takes it
    with urllib.request.urlopen(file["url"], timeout=10) as r:
        assert json.loads(r.read()) == client.predict(k, api_name="/neuron_json")


def test_table_and_hierarchy(client, explorer_app):
    ms, group = neurons(explorer_app, "ms"), neurons(explorer_app, "group")
    t = client.predict(0.0, 0, "all", "", "ms", True, 10, api_name="/neuron_table")
    want = np.argsort(-np.nan_to_num(ms, nan=-np.inf), kind="stable")[:10]
    assert [r[0] for r in t["data"]] == want.tolist()
    fig, depth, note = client.predict("treemap", api_name="/hierarchy")  # the root left at its default
    assert [r[1] for r in depth["data"]] == np.bincount(group).tolist()
    built = json.loads((explorer_app.bundle / "hierarchy.json").read_text())["depth_per_level"]
    assert [r[2] for r in depth["data"]] == [round(d, 3) for d in built] and "Taxonomy depth: the mean depth" in note
    # the tiny bundle scores images by the max over patches: no second MS to fall back on
    grey = int(np.isnan(ms).sum())
    assert f"dark grey ({grey}): none, the neuron fires on fewer than 2 images by its max over patches." in note
    # one latent's subtree: it, its children, theirs, ... (from the bundle's own tree file), and its ancestors
    nodes = json.loads((explorer_app.bundle / "hierarchy.json").read_text())["nodes"]
    parent = {n["id"]: n["parent"] for n in nodes}
    k = next(n["id"] for n in nodes if n["level"] == 1 and any(parent[j] == n["id"] for j in parent))
    below = {k}
    while True:
        more = {j for j, p in parent.items() if p in below} - below
        if not more:
            break
        below |= more
    fig, _, note = client.predict("sunburst", k, api_name="/hierarchy")
    drawn = {int(c[0]) for c in json.loads(fig["plot"])["data"][0]["customdata"]}
    assert drawn == below and f"The subtree of latent {k} (its ancestors: #{parent[k]}): {len(below)} nodes" in note
    # a latent with no children: one node, in the singular ("1 nodes in 1 of 4 levels drawn")
    leaf = next(n["id"] for n in nodes if n["level"] > 0 and n["id"] not in set(parent.values()))
    _, _, note = client.predict("sunburst", leaf, api_name="/hierarchy")
    assert f"1 node in 1 of {len(np.unique(group))} levels drawn" in note
    with pytest.raises(Exception, match="subtree's latent .* 1000000 is out of range"):
        client.predict("sunburst", 10**6, api_name="/hierarchy")


def test_original_answer_matches_llava_generate(client, explorer_app):
    """The page's 'original' answer is what transformers' own LLaVA.generate says (independent path)."""

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from sae_core.world.dataset import WorldDataset
    from sae_core.world.text import llava_prompt

    torch.set_num_threads(1)
    world = json.loads((explorer_app.bundle / "manifest.json").read_text())["world"]
    llava = LlavaForConditionalGeneration.from_pretrained(Path(world) / "llava").eval()
    proc = AutoProcessor.from_pretrained(Path(world) / "llava")
    ds = WorldDataset(world, "val")
    for i in (0, 1):
        enc = proc(images=[ds[i]], text=[llava_prompt(COLOUR_Q)], return_tensors="pt")
        with torch.inference_mode():
            ids = llava.generate(**enc, max_new_tokens=5, do_sample=False)
        want = proc.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        out = client.predict(image_index=i, upload=None, latent_1=0, value_1=0.0, question=COLOUR_Q, sweep=False,
                             api_name="/steer")
        assert out[0] == want


def test_steer_sweep_state_and_bounds(client, explorer_app):
    k = int(np.argmax(neurons(explorer_app, "max_act")))
    out = client.predict(image_index=2, upload=None, latent_1=k, value_1=4.0, patches="0,5", keep_error=True,
                         question=COLOUR_Q, sweep=True, api_name="/steer")
    original, sae, steered, sweep, score, details, query = out
    assert [r[0] for r in sweep["data"]] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert details["clamp"]["latents"] == [k] and details["clamp"]["keep_error"] is True
    assert details["clamp"]["positions"] == [1, 6]  # patches 0 and 5 after the CLS token
    assert details["clamp"]["patches"] == [0, 5]  # as given (only the positions were shown until 2026-12-05)
    unit = float(neurons(explorer_app, "token_max")[k])  # a strength of 1: the largest on one token
    assert details["clamp"]["values"][0] == pytest.approx(4.0 * unit, rel=1e-4)
    assert "steering score" in score
    assert query == (f"tab=steer&image=2&latents={k}&values=4&patches=0%2C5&keep_error=1&sweep=1&tokens=5&"
                     "question=What+colour+is+the+shape%3F+Use+one+word.")  # the sweep and the length since 2026-12-05
    # beyond the sliders, as scripts may send: negative strengths clamp, huge ones are bounded with a note
    # (Gradio's own slider check refused both); a fractional latent is refused (it was rounded and steered)
    k2 = (k + 1) % len(neurons(explorer_app, "ms"))
    # (a latent as text is that latent, "-1" as text an unused slot, as the numbers are)
    out = client.predict(image_index=2, upload=None, latent_1=str(k), value_1=-3.0, latent_2=k2, value_2=1e30,
                         latent_3="-1", sweep=False, max_new_tokens=2, api_name="/steer")
    unit2 = float(neurons(explorer_app, "token_max")[k2]) or 1.0
    np.testing.assert_allclose(out[5]["clamp"]["values"], [-3.0 * unit, 10.0 * unit2], rtol=1e-4)
    assert f"strength of neuron {k2} bounded to 10" in out[4]
    state = dict(urllib.parse.parse_qsl(out[6]))  # the address holds what was applied
    assert (state["latents"], state["values"], state["sweep"], state["tokens"]) == (f"{k},{k2}", "-3,10", "0", "2")
    # only -1 is an unused slot; another negative id is refused (-5 was taken as unused until 2026-12-05)
    with pytest.raises(AppError, match=r"^neuron id -5 is out of range; give an integer between 0 and \d+\.$"):
        client.predict(image_index=2, upload=None, latent_1=k, latent_2=-5, api_name="/steer")
    with pytest.raises(AppError, match=f"neuron id {k}.5 is not an integer"):
        client.predict(image_index=2, upload=None, latent_1=k + 0.5, api_name="/steer")
    with pytest.raises(AppError, match="image index 2.5 is not an integer"):
        client.predict(image_index=2.5, upload=None, latent_1=k, api_name="/steer")
    with pytest.raises(AppError, match="no latent"):
        client.predict(image_index=2, upload=None, api_name="/steer")
    with pytest.raises(AppError, match="patch 99|out of range"):
        client.predict(image_index=2, upload=None, latent_1=k, patches="99", api_name="/steer")
    # a checkbox as a script sends it: "false" is false (Gradio passed it on, and any text read as true: the
    # error term kept), "true" true, anything else one sentence
    said = client.predict(image_index=2, upload=None, latent_1=k, keep_error="false", sweep="false",
                          max_new_tokens=2, api_name="/steer")
    plain = client.predict(image_index=2, upload=None, latent_1=k, keep_error=False, sweep=False,
                           max_new_tokens=2, api_name="/steer")
    assert said[5]["clamp"]["keep_error"] is False and said[:3] == plain[:3] and said[3] == plain[3]
    assert said[6] == plain[6] and "keep_error=0" in said[6]  # its link said keep_error=1 until 2026-12-05
    assert client.predict(image_index=2, upload=None, latent_1=k, keep_error="true", sweep=False, max_new_tokens=2,
                          api_name="/steer")[5]["clamp"]["keep_error"] is True
    for field, value in (("keep_error", "maybe"), ("sweep", "x")):
        with pytest.raises(AppError, match=f"^{field} '{value}' is neither true nor false; send true or false.$"):
            client.predict(image_index=2, upload=None, latent_1=k, **{field: value}, api_name="/steer")
    asc = client.predict(0.0, 0, "all", "", "ms", "false", 20, api_name="/neuron_table")
    assert asc == client.predict(0.0, 0, "all", "", "ms", False, 20, api_name="/neuron_table")
    assert asc != client.predict(0.0, 0, "all", "", "ms", True, 20, api_name="/neuron_table")
    with pytest.raises(AppError, match="^descending 'maybe' is neither true nor false"):
        client.predict(0.0, 0, "all", "", "ms", "maybe", 20, api_name="/neuron_table")


def test_neuron_table_csv_holds_every_match(client, explorer_app):
    """/neuron_table_csv: every neuron the filter keeps, in the table's order and columns, at full precision,
    against a filter written out on the bundle's arrays; the table itself stops at its row limit."""
    import pandas as pd

    filters = dict(min_ms=0.3, min_support=2, level="all", label_contains="", sort_by="ms", descending=True)
    shown = client.predict(**filters, limit=5, api_name="/neuron_table")
    file = client.predict(**filters, api_name="/neuron_table_csv")  # a plain file, downloaded as a browser would
    assert file["orig_name"].endswith(".csv")
    with urllib.request.urlopen(file["url"], timeout=10) as r:
        frame = pd.read_csv(r)
    ms, support = neurons(explorer_app, "ms").astype(np.float64), neurons(explorer_app, "support")
    keep = np.flatnonzero(np.nan_to_num(ms, nan=-1.0) >= 0.3)
    keep = keep[support[keep] >= 2]
    expected = keep[np.argsort(-ms[keep], kind="stable")]
    assert len(shown["data"]) == 5 < len(expected)
    np.testing.assert_array_equal(frame["neuron"].to_numpy(), expected)
    np.testing.assert_allclose(frame["ms"].to_numpy(), ms[expected], rtol=1e-6)
    assert list(frame.columns) == shown["headers"]
    assert [r[0] for r in shown["data"]] == expected[:5].tolist()
    with pytest.raises(AppError, match="nonsense"):  # refused by name (Gradio checks the dropdown's choices)
        client.predict(**{**filters, "sort_by": "nonsense"}, api_name="/neuron_table_csv")


def test_steer_latents_table_reads_in_strength_units(client, explorer_app):
    """The Steer page's latents: most active first, each with its activation over its largest on one token of
    the dataset, the unit a strength of 1 clamps to (checked against the bundle's token_max and against /steer's
    clamp); on an image of the scanned dataset no latent passes 1."""
    from app.steer import LATENT_COLUMNS

    picture, table = client.predict(image_index=2, upload=None, patches="", api_name="/steer_load_image")
    assert table["headers"] == LATENT_COLUMNS
    rows = [dict(zip(LATENT_COLUMNS, r)) for r in table["data"]]
    assert rows and [r["max on image"] for r in rows] == sorted((r["max on image"] for r in rows), reverse=True)
    token_max = neurons(explorer_app, "token_max")
    for r in rows:
        unit = float(token_max[r["neuron"]]) if token_max[r["neuron"]] > 0 else 1.0
        assert r["x token max"] == pytest.approx(r["max on image"] / unit, abs=2e-3)
        assert r["x token max"] <= 1.0 + 2e-3  # image 2 was scanned: its patches are tokens of the dataset
    k = rows[0]["neuron"]
    out = client.predict(image_index=2, upload=None, latent_1=k, value_1=rows[0]["x token max"], sweep=False,
                         api_name="/steer")
    # clamped to the strength read from the table: the activation the image already gives that latent
    assert out[5]["clamp"]["values"][0] == pytest.approx(rows[0]["max on image"], rel=0.02)


def test_uploads_search_and_refusals(client, tmp_path):
    out = client.predict(handle_file(str(GRADIO_IMAGES / "cheetah.jpg")), api_name="/search_neurons_by_image")
    table, picture, note = out
    assert table["data"] and "fire on the image" in note
    acts = [r[1] for r in table["data"]]
    assert acts == sorted(acts, reverse=True) and acts[0] > 0
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 40_000, 40_000)
    with pytest.raises(AppError, match="decompression bomb|megapixels"):
        client.predict(handle_file(str(bomb)), api_name="/search_neurons_by_image")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image at all")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(fake)), api_name="/search_neurons_by_image")
    # two uploads holding the same bytes in other shapes are two pictures (the second was served the first's)
    from PIL import Image

    halves = np.zeros((32, 64, 3), np.uint8)
    halves[:, 32:] = 255
    shapes = [Image.fromarray(halves), Image.frombytes("RGB", (32, 64), halves.tobytes())]
    shown = []
    for i, im in enumerate(shapes):
        im.save(tmp_path / f"shape{i}.png")
        picture = client.predict(handle_file(str(tmp_path / f"shape{i}.png")), "", api_name="/steer_upload_image")[1]
        shown.append(np.asarray(Image.open(picture["path"] if isinstance(picture, dict) else picture).convert("L")))
    assert shown[0].shape != shown[1].shape or not np.array_equal(shown[0], shown[1])
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((GRADIO_IMAGES / "tower.jpg").read_bytes()[:5000])
    with pytest.raises(AppError, match="corrupt or truncated"):
        client.predict(image_index=-1, upload=handle_file(str(cut)), latent_1=0, api_name="/steer")


def test_only_generated_files_are_served(client, explorer_app):
    url = explorer_app.url + "/gradio_api/file="
    page = client.predict(1, api_name="/neuron_page")
    served = page[2][0]["image"]["path"]
    assert http_status(url + served) == 200
    bundle = explorer_app.bundle.resolve()
    for path in (bundle / "sae" / "sae.safetensors", bundle / "manifest.json", bundle / "neurons" / "ms.npy",
                 Path(__file__).resolve(), Path("/etc/passwd"),
                 Path(served).parent / ".." / ".." / ".." / ".." / "etc" / "passwd"):
        assert http_status(url + str(path)) in (403, 404), path
    thumbs = sorted((bundle / "images" / "thumbs").glob("*.png"))
    if thumbs:
        assert http_status(url + str(thumbs[0])) in (403, 404)


def test_search_by_text_through_the_api(client):
    table, note = client.predict("a photo of a red object", api_name="/search_neurons_by_text")
    assert table["headers"][:2] == ["neuron", "match"]
    match = [r[1] for r in table["data"]]
    assert len(match) == 20 and match == sorted(match, reverse=True)
    with pytest.raises(AppError, match="empty"):
        client.predict("  ", api_name="/search_neurons_by_text")


def test_image_search_through_the_api(client, explorer_app, tmp_path):
    """The Images page's calls as a script makes them: results carry their ids in the captions, an
    uploaded dataset image finds itself first, and /image_neurons counts the galleries holding an image."""
    from PIL import Image

    items, note, query, state = client.predict("a photo of a red object", api_name="/search_images_by_text")
    ids = [int(it["caption"].split()[0].lstrip("#")) for it in items]
    cos = [float(it["caption"].split()[-1]) for it in items]
    assert len(ids) == 24 == len(set(ids)) and cos == sorted(cos, reverse=True)
    assert query == "a photo of a red object" and state == "tab=images&query=a+photo+of+a+red+object"
    thumbs = sorted((explorer_app.bundle / "images" / "thumbs").glob("*.png"))
    i = int(thumbs[0].stem)
    Image.open(thumbs[0]).save(tmp_path / "upload.png")
    items, note, _, _ = client.predict(handle_file(str(tmp_path / "upload.png")), api_name="/search_images_by_image")
    assert items[0]["caption"].startswith(f"#{i} ") and "nearest the uploaded image" in note
    items, note, _, _ = client.predict(i, api_name="/search_images_like")
    assert f"#{i} " not in [it["caption"][:len(str(i)) + 2] for it in items] and f"image #{i}" in note
    image, picture, table, note, state = client.predict(i, "", api_name="/image_neurons")
    held = sum(int((np.load(f) == i).sum()) for f in (explorer_app.bundle / "neurons").glob("*top_images.npy"))
    assert image == i and len(table["data"]) == held > 0 and state == f"tab=images&image={i}"
    with pytest.raises(AppError, match="empty"):
        client.predict("  ", api_name="/search_images_by_text")


def test_a_bundle_copied_without_its_dataset_shows_what_it_carries(tiny_bundle, tmp_path):
    """A bundle copied to another machine without its dataset keeps the thumbnails of its gallery
    images: image searches show those, a grey tile for any other image, and say why in the note."""
    import shutil

    from app.server import start

    root = tmp_path / "copied"
    shutil.copytree(tiny_bundle, root, ignore=shutil.ignore_patterns("world", ".work", ".stages"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop("world", None)
    manifest.pop("world_split", None)
    manifest["dataset"]["spec"] = f"imagefolder:{tmp_path / 'not-copied'}"
    (root / "manifest.json").write_text(json.dumps(manifest))
    # and built on images without a taxonomy: no depth per level (the note explained the empty column as if it
    # held figures)
    tree = json.loads((root / "hierarchy.json").read_text())
    tree["depth_per_level"] = [None] * len(tree["depth_per_level"])
    (root / "hierarchy.json").write_text(json.dumps(tree))
    thumbs = {int(p.stem) for p in (root / "images" / "thumbs").glob("*.png")}
    emb = np.load(root / "images" / "embeddings.npy").astype(np.float64)
    # an image whose 24 nearest include some without a thumbnail
    query = next(i for i in sorted(thumbs) if len(set(np.argsort(-(emb @ emb[i]))[1:25].tolist()) - thumbs) > 0)
    # and one of the thumbnails among them damaged: a grey tile too (the whole search failed on it)
    damaged = next(i for i in np.argsort(-(emb @ emb[query]))[1:25].tolist() if i in thumbs)
    (root / "images" / "thumbs" / f"{damaged}.png").write_bytes(b"not a png")
    thumbs.discard(damaged)
    demo, url = start(root, cache=tmp_path / "cache")
    try:
        client = Client(url, verbose=False)
        items, note, _, _ = client.predict(query, api_name="/search_images_like")
        ids = [int(it["caption"].split()[0].lstrip("#")) for it in items]
        gone = [i for i in ids if i not in thumbs]
        assert damaged in gone and f"{len(gone)} of them cannot be shown here" in note and "not-copied does not exist" in note
        sizes = {i: Path(it["image"]["path"] if isinstance(it["image"], dict) else it["image"]).stat().st_size
                 for i, it in zip(ids, items)}
        assert len({sizes[i] for i in gone}) == 1  # one grey tile for all of them
        _, picture, table, note, _ = client.predict(gone[0], "", api_name="/image_neurons")
        assert picture is None and "cannot be shown here" in note
        _, depth, note = client.predict("sunburst", api_name="/hierarchy")
        assert all(r[2] is None for r in depth["data"]) and "Taxonomy depth" not in note
        assert note.endswith("No taxonomy depth: the dataset has no taxonomy (the world's, or iNaturalist-style class "
                             "folders).")
    finally:
        demo.close()


def test_a_model_request_right_after_the_start_waits_for_the_warm_up_load(tiny_bundle, tmp_path):
    """The text tower's warm-up loads a model just after the server starts; a request loading the steering
    model meanwhile, from another thread, failed with "cannot import name 'AutoProcessor' from
    'transformers'" (the half-imported package). It waits for that load (sae_core's MODEL_LOADING) and
    answers."""
    from app.server import spawn

    proc, url = spawn(tiny_bundle, cache=tmp_path, extra_env={"OMP_NUM_THREADS": "1"})
    try:
        table, _, note = Client(url, verbose=False).predict(handle_file(str(GRADIO_IMAGES / "cheetah.jpg")),
                                                            api_name="/search_neurons_by_image")
        assert table["data"] and "fire on the image" in note
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_request_cannot_make_the_server_fetch_a_url_or_hold_a_huge_body(explorer_app):
    """Two holes a reviewer found on 2026-12-05, in front of Gradio (app/guard.py): a file input given as
    {"path": "http://..."} was downloaded into the cache before any check of ours, with no size limit (400 MB from
    two calls, kept after the app refused them), so any caller could make the server fetch what it named; and each
    call's body stayed in its session (200 MB refused queries pinned ~195 MB each). Both are refused before Gradio
    reads them, in one sentence; ordinary calls go on."""
    import json
    import urllib.request

    def post(route, payload: bytes):
        request = urllib.request.Request(explorer_app.url + route, data=payload, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    before = sorted(p.name for p in explorer_app.cache.iterdir())
    for path in ("http://1.2.3.4/photo.png", "HTTPS://example.com/x.png"):
        for route in ("/gradio_api/call/search_images_by_image", "/gradio_api/queue/join"):
            body = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}], "fn_index": 0,
                    "session_hash": "guard"}
            # also with the path's letters escaped in the JSON, which a byte search would miss
            for raw in (json.dumps(body), json.dumps(body).replace('"http', '"\\u0068ttp').replace('"HTTP', '"\\u0048TTP')):
                status, said = post(route, raw.encode())
                assert status == 400 and said["error"].startswith("a file given by URL is not fetched by this "
                                                                  "server"), (route, raw, status, said)
    assert sorted(p.name for p in explorer_app.cache.iterdir()) == before  # nothing fetched into the cache
    status, said = post("/gradio_api/call/search_neurons_by_text", json.dumps({"data": ["a" * 2_000_000]}).encode())
    assert status == 413 and "above the 1,048,576 bytes this server takes" in said["error"], said
    status, said = post("/gradio_api/call/neuron_json", json.dumps({"data": [3]}).encode())
    assert status == 200 and said.get("event_id"), said


def test_a_wrong_filter_or_text_type_is_one_sentence_naming_its_field(client):
    """A reviewer's API calls of 2026-12-05: the table's minimum MS (a slider) as None or "abc" got Gradio's paragraph
    naming its component classes, and -1 "Value -1 is less than minimum value 0", naming no field; a list given as
    a search's text was searched for as "['a red object']", and a steer question given as a list was answered as
    that text while the returned link named the question. Each is one sentence naming its field now."""
    from gradio_client.exceptions import AppError

    table = dict(min_support=0, level="all", label_contains="", sort_by="ms", descending=True)
    for bad in ("abc", -1, 2, True):
        with pytest.raises(AppError, match=r"^the minimum MS .* is not a number from 0 to 1; give one, e\.g\. 0\.5\.$"):
            client.predict(bad, **table, limit=5, api_name="/neuron_table")
    rows = client.predict(0.5, **table, limit=500, api_name="/neuron_table")
    assert rows["data"] and all(r[rows["headers"].index("ms")] >= 0.5 for r in rows["data"])
    for api, args in (("/search_images_by_text", (["a red object"],)), ("/search_neurons_by_text", ({"a": 1},))):
        with pytest.raises(AppError, match=r"^the query .* is not text; give a string\.$"):
            client.predict(*args, api_name=api)


def test_a_call_with_too_few_values_shows_no_internals(explorer_app):
    """Over plain HTTP, `{"data": []}` to /neuron_page answered Gradio's internal error, the handler's components
    listed by their Python object addresses (show_error=True; until 2026-12-05). Our own sentences still come."""
    import json
    import urllib.request

    def call(name, data):
        request = urllib.request.Request(f"{explorer_app.url}/gradio_api/call/{name}", method="POST",
                                         data=json.dumps({"data": data}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            event = json.loads(r.read())["event_id"]
        with urllib.request.urlopen(f"{explorer_app.url}/gradio_api/call/{name}/{event}", timeout=60) as r:
            return r.read().decode()

    assert "object at 0x" not in call("neuron_page", []) and "event: error" in call("neuron_page", [])
    said = call("neuron_json", ["abc"])
    assert "event: error" in said and "neuron id" in said and "is not" in said, said
