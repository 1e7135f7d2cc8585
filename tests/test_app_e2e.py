"""End to end in real headless Chromium (Debian's, driven by Playwright): one browser, several checks.

Writes tests/artifacts/e2e_steer.png (the Steer page after clamping the colour neuron)."""
import json
import os
import shutil
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sae_core.steering_eval import COLOUR_Q

CHROMIUM = os.environ.get("SAE_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists(),
                                reason="Debian chromium is not installed (apt-get install -y chromium)")


def colour_neuron(bundle: Path):
    """Ground truth and the library, not the app: among the neurons whose top images most often show one
    colour (best first), the first that changes the tiny LLaVA's answer on a single-object validation
    image of another colour when set to 4x its largest activation on one token (the app's strength 4)
    through `SteeringSession` (the library the app calls); returns it, its colour and that image. Some colour neurons do not steer (on one tiny
    world the purest was a brown one that left "grey" alone), which is the steering module's business."""
    from sae_core.steering import ORIGINAL, SteeringSession
    from sae_core.steering_eval import first_word
    from sae_core.world.dataset import WorldDataset
    from sae_core.world.generator import main_object

    world = json.loads((bundle / "manifest.json").read_text())["world"]
    ds = WorldDataset(world, "val")
    top = np.load(bundle / "neurons" / "top_images.npy")
    unit = np.load(bundle / "neurons" / "token_max.npy")  # the app's strength 1

    def colour(i):
        f = ds.factors(int(i))
        return f["objects"][main_object(f, ds.masks(int(i)))]["colour"]

    candidates = []
    for k in range(len(top)):
        ids = [i for i in top[k] if i >= 0]
        if len(ids) >= 8:
            cs = [colour(i) for i in ids]
            c = max(set(cs), key=cs.count)
            candidates.append(((cs.count(c) / len(cs), float(unit[k])), k, c))
    candidates.sort(reverse=True)
    session = SteeringSession.from_bundle(bundle, device="cpu", precision="fp32")
    for _, k, c in candidates[:12]:
        image = next(i for i in range(len(ds)) if len(ds.factors(i)["objects"]) == 1 and colour(i) != c)
        clamp = session.make_clamp([k], [4.0 * float(unit[k])])  # strength 4, as the browser sets it
        answers = session.answer_batch([ds[image]] * 2, [ORIGINAL, clamp], COLOUR_Q, 3)
        if first_word(answers[0]) != first_word(answers[1]):
            return k, c, image
    raise AssertionError("none of the 12 purest colour neurons changes an answer through the library")


@pytest.fixture(scope="module")
def page(explorer_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


def gallery_widths(pg, selector="#top-gallery img"):
    pg.wait_for_function(f"() => document.querySelectorAll('{selector}').length > 0 && "
                         f"Array.from(document.querySelectorAll('{selector}')).every(i => i.complete)")
    return pg.evaluate(f"() => Array.from(document.querySelectorAll('{selector}')).map(i => i.naturalWidth)")


def wait_value(pg, selector: str, value: str):
    """Wait until the first element matching `selector` exists and holds `value` (tabs render lazily)."""
    pg.wait_for_function("([s, v]) => { const e = document.querySelector(s); return !!e && e.value === v; }",
                         arg=[selector, value])


def wait_address(pg, **want: str):
    """Wait until the address's query holds `want` (name: value each): the address follows an event's answer
    through the hidden url box, a step after the boxes that answer shows (read at once, a CI run of 2026-12-05
    found the Overview's address still after the Neuron tab's click); a failure names the address."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        pg.wait_for_function("(w) => { const q = new URLSearchParams(location.search);"
                             " return Object.entries(w).every(([k, v]) => q.get(k) === v); }", arg=want, timeout=30_000)
    except PlaywrightTimeout:
        raise AssertionError(f"the address stayed {pg.url}, without {want}") from None


def test_browse_open_neuron_from_plot_and_steer(page, explorer_app):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    pg, url = page, explorer_app.url
    top = np.load(explorer_app.bundle / "neurons" / "top_images.npy")
    # 0. The Neuron tab opened first shows a neuron, not empty boxes: the highest MS with a full gallery.
    ms, support = (np.load(explorer_app.bundle / "neurons" / f"{n}.npy") for n in ("ms", "support"))
    k_first = max((k for k in range(len(ms)) if support[k] >= top.shape[1] and np.isfinite(ms[k])), key=lambda k: ms[k])
    pg.goto(url + "/")
    # The Overview's metrics table draws its last row without an inner scroll (it was cut at 1,000 px).
    pg.wait_for_selector("#metrics-table [role=gridcell]:has-text('taxonomy depth per Matryoshka level')")
    assert pg.evaluate("() => { const v = document.querySelector('#metrics-table .virtual-table-viewport');"
                       " return v.scrollHeight <= v.clientHeight + 2; }")
    # The Neurons table opens on neurons with a full gallery (an MS over 2 or 3 images is noise).
    pg.get_by_role("tab", name="Neurons", exact=True).click()
    cells = "Array.from(document.querySelectorAll('#neuron-table [role=row]')).map(r => r.querySelectorAll('[role=gridcell]'))"
    pg.wait_for_function(f"() => {cells}.filter(c => c.length > 4 && c[4].innerText.trim() !== '').length >= 5")
    shown = pg.evaluate(f"() => {cells}.filter(c => c.length > 4).map(c => Number(c[4].innerText))")  # rows drawn so far
    assert len(shown) >= 5 and min(shown) >= top.shape[1], shown
    pg.get_by_role("tab", name="Neuron", exact=True).click()
    pg.wait_for_function("(k) => { const h = document.querySelector('#neuron-header h3');"
                         " return !!h && h.innerText === 'Neuron ' + k; }", arg=k_first)
    assert len(gallery_widths(pg)) == top.shape[1]
    # the gallery's label sits above its first row (it hid the top 17 px of it), and no caption is cut short
    label_bottom, first_top = pg.evaluate("() => [document.querySelector('#top-gallery [data-testid=block-label]')"
                                          ".getBoundingClientRect().bottom, document.querySelector("
                                          "'#top-gallery .thumbnail-item').getBoundingClientRect().top]")
    assert label_bottom <= first_top, (label_bottom, first_top)
    assert pg.evaluate("() => Array.from(document.querySelectorAll('#top-gallery .caption-label'))"
                       ".every(c => c.scrollWidth <= c.clientWidth)")
    cell_widths = "() => Array.from(document.querySelectorAll('#top-gallery .thumbnail-item')).map(e => e.getBoundingClientRect().width)"
    full_cell = pg.evaluate(cell_widths)[0]
    # the band strips are drawn at one scale, strip-shaped (Gradio's own gallery cells are square)
    gallery_widths(pg, "#band-gallery img")
    cells = pg.evaluate("() => Array.from(document.querySelectorAll('#band-gallery .thumbnail-item'))"
                        ".map(e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; })")
    assert cells and all(abs(h - cells[0][1]) < 2 for _, h in cells) and cells[0][0] > 4 * cells[0][1], cells
    # each strip's caption sits under its images (drawn over them, it hid the last 3 of the strip)
    assert pg.evaluate("() => Array.from(document.querySelectorAll('#band-gallery .thumbnail-item')).every(e =>"
                       " e.querySelector('.caption-label').getBoundingClientRect().top >="
                       " e.querySelector('img').getBoundingClientRect().bottom - 1)")
    # The export's file box appears once there is a file, holding this neuron's JSON, and goes when
    # another neuron opens (it would be the previous neuron's file).
    # Export acts on the neuron shown, also with another id typed in the box but not opened (it exported
    # the typed one while the page showed this one).
    assert not pg.locator("#export-file").is_visible()
    k_next = next(int(j) for j in np.argsort(-support) if j != k_first)
    pg.fill("#neuron-id input", str(k_next))
    pg.get_by_role("button", name="Export JSON").click()
    pg.wait_for_selector("#export-file a[download]")
    assert pg.get_attribute("#export-file a[download]", "download") == f"neuron_{k_first}.json"
    assert pg.inner_text("#neuron-header h3") == f"Neuron {k_first}"
    pg.click("#open-neuron")
    pg.wait_for_function("() => !document.querySelector('#export-file')?.checkVisibility()")
    # A neuron that fires on no image: its empty galleries are hidden (the header says so), and come
    # back for the next neuron. (The tiny world's SAEs have had 1-2 such latents; none: nothing to check.)
    silent = np.flatnonzero(support == 0)
    if len(silent):
        pg.goto(f"{url}/?tab=neuron&neuron={silent[0]}")
        pg.wait_for_function("(k) => { const h = document.querySelector('#neuron-header h3');"
                             " return !!h && h.innerText === 'Neuron ' + k; }", arg=int(silent[0]))
        assert "fires on 0 image" in pg.inner_text("#neuron-header")
        pg.wait_for_function("() => !document.querySelector('#top-gallery').checkVisibility()")
        pg.fill("#neuron-id input", str(k_first))
        pg.click("#open-neuron")
        pg.wait_for_function("() => document.querySelector('#top-gallery').checkVisibility()")
    # A gallery of a few images keeps the full gallery's 8 columns: Gradio's default spread 2 images over
    # the page's width, each 4 times as wide as a full gallery's.
    few = [k for k in range(len(top)) if 1 <= (top[k] >= 0).sum() <= 4]
    if few:  # the tiny world's SAEs have always had some; none: nothing to check
        pg.goto(f"{url}/?tab=neuron&neuron={few[0]}")
        pg.wait_for_function("(k) => { const h = document.querySelector('#neuron-header h3');"
                             " return !!h && h.innerText === 'Neuron ' + k; }", arg=few[0])
        gallery_widths(pg)
        widths = pg.evaluate(cell_widths)
        assert len(widths) == (top[few[0]] >= 0).sum() and max(abs(w - full_cell) for w in widths) < 2, (widths, full_cell)
    # 0b. So does the Steer tab: the image in its box (0), with the latents that fire on it.
    pg.get_by_role("tab", name="Steer", exact=True).click()
    pg.wait_for_selector("#steer-picture img")
    pg.wait_for_function("() => Array.from(document.querySelectorAll('#steer-latents [role=gridcell]'))"
                         ".some(c => c.innerText.trim() !== '')")
    # 1. Overview: click a point of the MS-vs-frequency scatter; its neuron page opens.
    pg.goto(url + "/")
    pg.wait_for_selector("#scatter-plot .scatterlayer path.point")
    pg.wait_for_function("() => { const g = document.querySelector('#scatter-plot .js-plotly-plot'); return g && g.__saeHooked; }")
    point = pg.locator("#scatter-plot .scatterlayer path.point").first
    box = point.bounding_box()
    click = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    point.click(force=True)
    pg.wait_for_selector("#neuron-header h3")
    k_clicked = int(pg.inner_text("#neuron-header h3").split()[-1])
    # the opened neuron's (frequency, MS) from the bundle lies under the mouse (points may overlap)
    freq = float(np.load(explorer_app.bundle / "neurons" / "frequency.npy")[k_clicked])
    ms = float(np.load(explorer_app.bundle / "neurons" / "ms.npy")[k_clicked])
    pg.click("button[role=tab]:has-text('Overview')")
    where = ("([f, m]) => { const g = document.querySelector('#scatter-plot .js-plotly-plot');"
             " const L = g._fullLayout, r = g.getBoundingClientRect();"
             " return [r.left + L.xaxis._offset + L.xaxis.d2p(f), r.top + L.yaxis._offset + L.yaxis.d2p(m)]; }")
    try:  # polled: the tab's page lays out again when shown (a loaded host once measured it 105 px lower)
        pg.wait_for_function(f"([f, m, cx, cy]) => {{ const [x, y] = ({where})([f, m]);"
                             " return Math.abs(x - cx) < 6 && Math.abs(y - cy) < 6; }",
                             arg=[freq, ms, *click], timeout=10_000)
    except PlaywrightTimeout:
        raise AssertionError((pg.evaluate(where, [freq, ms]), click)) from None
    pg.get_by_role("tab", name="Neuron", exact=True).click()
    wait_address(pg, tab="neuron", neuron=str(k_clicked))
    # 2. The neuron page's gallery images rendered (natural width > 0), one per top image.
    widths = gallery_widths(pg)
    assert len(widths) == int((top[k_clicked] >= 0).sum()) and min(widths) > 0

    # 2b. Hierarchy: clicking a node of the Matryoshka sunburst opens that neuron.
    pg.click("button[role=tab]:has-text('Hierarchy')")
    node = pg.locator("#tree-plot g.slice").nth(3)
    node.wait_for(state="attached")
    # The click handler is attached by a 400 ms poll; a click before it is lost (seen under load).
    pg.wait_for_function("() => { const g = document.querySelector('#tree-plot .js-plotly-plot'); return g && g.__saeHooked; }")
    k_node = int(node.evaluate("(el) => el.__data__.data.data.id"))
    node.click(force=True)
    pg.wait_for_function("(k) => { const h = document.querySelector('#neuron-header h3');"
                         " return !!h && h.innerText === 'Neuron ' + k; }", arg=k_node)

    # 3. A shared link restores a neuron page; "steer with this neuron" carries it to Steer.
    k, colour, image = colour_neuron(explorer_app.bundle)
    pg.goto(f"{url}/?tab=neuron&neuron={k}")
    pg.wait_for_function(f"() => {{ const h = document.querySelector('#neuron-header h3');"
                         f" return h && h.innerText === 'Neuron {k}'; }}")
    assert min(gallery_widths(pg)) > 0
    pg.click("#steer-with-neuron")
    wait_value(pg, "#steer-latent-1 input", str(k))

    # 4. Steer: pick a dataset image of another colour, clamp the colour neuron, answers differ.
    pg.fill("#steer-image-index input", str(image))
    pg.click("#steer-load")
    pg.wait_for_selector("#steer-picture img")
    pg.fill("#steer-question input", COLOUR_Q)
    pg.keyboard.press("Enter")
    pg.fill("#steer-value-1 input[type=number]", "4")
    pg.keyboard.press("Enter")
    pg.click("#steer-button")
    pg.wait_for_function("() => { const e = document.querySelector('#answer-steered textarea'); return !!e && e.value !== ''; }")
    pg.wait_for_selector("#steer-score:has-text(\"steering score\")")
    original = pg.input_value("#answer-original textarea")
    steered = pg.input_value("#answer-steered textarea")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "e2e_steer.png"
    pg.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot} (original {original!r}, steered {steered!r}, neuron {k}'s top images: {colour})")
    # The check: clamping changes the answer. (Whether it becomes the neuron's own colour is
    # the steering module's claim, tested there; on one tiny world: grey -> blue with a black neuron.)
    assert steered != original, (original, steered, colour)

    # 5. The steering state is in the URL and comes back on load.
    wait_address(pg, tab="steer", latents=str(k))
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(pg.url).query))
    assert q["tab"] == "steer" and q["image"] == str(image) and q["latents"] == str(k)
    pg.goto(pg.url)
    wait_value(pg, "#steer-latent-1 input", str(k))
    wait_value(pg, "#steer-image-index input", str(image))
    assert pg.input_value("#steer-question input") == COLOUR_Q
    # with the latents that fire on that image, as the Load button gives them (the table was left empty)
    pg.wait_for_function("() => Array.from(document.querySelectorAll('#steer-latents [role=gridcell]'))"
                         ".some(c => c.innerText.trim() !== '')")

    # 6. Clicking the picture selects the patch under the cursor (an eighth in from the top-left = patch 0).
    # After the reload the picture is drawn again by the restore (and maybe the tab's first visit), and a
    # click on an image being replaced is lost (seen once under a full suite's load): click through the
    # locator, which waits for a stable, attached image, and once more if nothing came of it in 30 s
    # (a second click on a click that did land would toggle the patch off: hence the long first wait).
    picture = pg.locator("#steer-picture img")
    # the picture's label sits above the drawn picture (until 2026-12-05 it covered the top of patches 0 and 1)
    label, drawn = pg.evaluate("""() => { const l = document.querySelector('#steer-picture [data-testid=block-label]')
        .getBoundingClientRect(); const i = document.querySelector('#steer-picture img'), q = i.getBoundingClientRect();
        const s = Math.min(1, q.width / i.naturalWidth, q.height / i.naturalHeight);  // object-fit: scale-down
        const w = i.naturalWidth * s, h = i.naturalHeight * s, x = q.left + (q.width - w) / 2, y = q.top + (q.height - h) / 2;
        return [[l.left, l.top, l.right, l.bottom], [x, y, x + w, y + h]]; }""")
    assert label[3] <= drawn[1] + 0.5 or label[2] <= drawn[0] or label[0] >= drawn[2], (label, drawn)
    assert drawn[3] - drawn[1] > 250  # not shrunk to make room: the picture's box is 340 px high
    for attempt in range(2):
        box = picture.bounding_box()
        picture.click(position={"x": box["width"] / 8, "y": box["height"] / 8})
        try:
            pg.wait_for_function("() => document.querySelector('#steer-patches textarea')?.value === '0'",
                                 timeout=30_000 if attempt == 0 else 60_000)
            break
        except PlaywrightTimeout:
            if attempt == 1 or pg.input_value("#steer-patches textarea") != "":
                raise
    # Typing the patches draws the choice as the click drew it (the keyboard's way; the picture showed nothing
    # until Steer): Enter puts the list in order and shows the very picture the click made. Leaving the box does
    # not: a click on "All patches" right after typing was answered, then undone by the box's own update.
    clicked_src = picture.get_attribute("src")
    pg.click("#steer-all-patches")
    wait_value(pg, "#steer-patches textarea", "")
    pg.wait_for_function("s => document.querySelector('#steer-picture img')?.src !== s", arg=clicked_src)
    pg.fill("#steer-patches textarea", "0 0")
    pg.press("#steer-patches textarea", "Enter")
    wait_value(pg, "#steer-patches textarea", "0")
    pg.wait_for_function("s => document.querySelector('#steer-picture img')?.src === s", arg=clicked_src)
    pg.fill("#steer-patches textarea", "0 15")
    pg.click("#steer-all-patches")  # straight from the box
    wait_value(pg, "#steer-patches textarea", "")
    pg.wait_for_timeout(1500)  # the undoing update came about 100 ms after the clear
    assert pg.input_value("#steer-patches textarea") == ""
    pg.fill("#steer-patches textarea", "0")
    pg.press("#steer-patches textarea", "Enter")
    pg.wait_for_function("s => document.querySelector('#steer-picture img')?.src === s", arg=clicked_src)

    # 7. The address follows the page after a patch click, a load and a latent picked from the table, not only
    # after Steer (a copied link opened the image, latent and patches of the last Steer, or of the link followed)
    wait_address(pg, tab="steer", image=str(image), latents=str(k), patches="0")
    other = next(i for i in range(len(top.ravel())) if i != image)
    pg.fill("#steer-image-index input", str(other))
    pg.click("#steer-load")
    wait_address(pg, image=str(other), patches="0")
    rows = pg.locator("#steer-latents [role=row]").filter(has=pg.locator("[role=gridcell]"))
    pg.wait_for_function("() => Array.from(document.querySelectorAll('#steer-latents [role=row]'))"
                         ".map(r => r.querySelector('[role=gridcell]')).filter(c => c && c.innerText.trim() !== '')"
                         ".length > 1")
    ids = [int(c) for c in rows.locator("[role=gridcell]:first-child").all_inner_texts()]
    picked = next(j for j in ids if j != k)
    rows.nth(ids.index(picked)).locator("[role=gridcell]").first.click()
    wait_value(pg, "#steer-latent-1 input", str(picked))
    wait_address(pg, image=str(other), latents=str(picked), patches="0")
    pg.goto(pg.url)  # the copied link opens what the page showed
    wait_value(pg, "#steer-image-index input", str(other))
    wait_value(pg, "#steer-latent-1 input", str(picked))
    wait_value(pg, "#steer-patches textarea", "0")


def test_bad_uploads_show_a_message(page, explorer_app, tmp_path):
    from tests.test_app_units import png_header_only

    pg = page
    pg.goto(explorer_app.url + "/?tab=steer")
    pg.wait_for_selector("#steer-upload input[type=file]", state="attached")
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 40_000, 40_000)
    pg.set_input_files("#steer-upload input[type=file]", str(bomb))
    pg.wait_for_selector("text=decompression bomb")
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is not a photo")
    pg.goto(explorer_app.url + "/?tab=steer")
    pg.wait_for_selector("#steer-upload input[type=file]", state="attached")
    pg.set_input_files("#steer-upload input[type=file]", str(fake))
    pg.wait_for_selector("text=not an image PIL can read")
    # a steer link of an upload says so when opened (it opened dataset image 0 without a word)
    png = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png)
    pg.goto(explorer_app.url + "/?tab=steer")
    pg.wait_for_selector("#steer-upload input[type=file]", state="attached")
    pg.set_input_files("#steer-upload input[type=file]", str(png))
    wait_address(pg, tab="steer", image="upload")
    pg.goto(pg.url)
    pg.wait_for_selector("text=its image was an upload, which a link cannot carry; upload it again")
    # a link with one bad field restores the others, bounds a strength into the slider's range, and says so; the
    # answer's length and the sweep are restored too (a link lost both until 2026-12-05), a bad flag warned about
    pg.goto(explorer_app.url + "/?tab=steer&image=--1&latents=3&values=-5&question=Which%20shape%3F&tokens=30&sweep=0"
            "&keep_error=maybe")
    wait_value(pg, "#steer-latent-1 input", "3")
    wait_value(pg, "#steer-value-1 input[type=number]", "0")
    assert pg.input_value("#steer-question input") == "Which shape?"
    pg.wait_for_selector("text=part of the link could not be restored")
    pg.wait_for_selector("text=keep_error 'maybe' is neither yes nor no")
    assert pg.get_by_label("answer tokens", exact=False).and_(pg.locator("input[type=number]")).input_value() == "30"
    assert not pg.get_by_role("checkbox", name="strength sweep").is_checked()
    assert not pg.get_by_role("checkbox", name="keep the SAE error term").is_checked()
    # a latent given twice keeps its first strength, and the next latent its own (it took the second one's)
    pg.goto(explorer_app.url + "/?tab=steer&latents=3,3,5&values=1,2,8&patches=5,3,5")
    wait_value(pg, "#steer-latent-2 input", "5")
    wait_value(pg, "#steer-patches textarea", "3,5")  # in order, as typing leaves them (it showed "5,3")
    wait_value(pg, "#steer-value-2 input[type=number]", "8")
    assert pg.input_value("#steer-latent-1 input") == "3" and pg.input_value("#steer-value-1 input[type=number]") == "1"
    pg.wait_for_selector("text=latent 3 is given more than once")
    # one warning for a latent repeated 400 times (399 before), and a query's true length (one of 5,000 characters
    # was cut to 1,000 and said to be "1000 characters long"; until 2026-12-05)
    pg.goto(explorer_app.url + "/?tab=steer&latents=" + ",".join(["1"] * 400 + ["2", "2"]))
    pg.wait_for_selector("text=latents 1, 2 are given more than once")
    wait_value(pg, "#steer-latent-2 input", "2")
    assert pg.locator(".toast-wrap").get_by_text("given more than once").count() == 1
    pg.goto(explorer_app.url + "/?tab=images&query=" + "a" * 5000)
    pg.wait_for_selector("text=the query is 5000 characters long")
    # a link's text is shown as typed: a Markdown link in its query was a live link in the Images note, and a
    # field's HTML was drawn in the warning that quoted it (until 2026-12-05)
    typed = "[Session expired: log in again](https://example.com/login) *x* <b>y</b> www.example.com"
    pg.goto(explorer_app.url + "/?tab=images&query=" + urllib.parse.quote(typed))
    pg.wait_for_function("(q) => (document.querySelector('#image-note') || {innerText: ''}).innerText.includes(q)",
                         arg=typed)
    assert pg.locator("#image-note a, #image-note em, #image-note b").count() == 0
    pg.goto(explorer_app.url + "/?tab=hierarchy&kind=" + urllib.parse.quote("<b>BOLD</b>"))
    pg.wait_for_selector("text=the drawing '<b>BOLD</b>' is not one of")
    assert pg.locator(".toast-wrap b").count() == 0
    # an images link with one bad field restores the other (the query's search was lost with the image)
    pg.goto(explorer_app.url + "/?tab=images&image=abc&query=a+photo+of+a+red+object")
    pg.wait_for_function("() => document.querySelectorAll('#image-results .thumbnail-item').length === 24")
    pg.wait_for_selector("text=the link's image could not be shown")
    # a refused upload is one message: the results, the text box and the note stay, with no "Error" badge (the
    # gallery turned into an empty box saying "Error"), and a file the page itself refused is not "no image given"
    # (the image id 99999 would be refused twice, once as the search's: it is warned about once)
    pg.set_input_files("#image-upload input[type=file]", str(fake))
    pg.get_by_role("button", name="Search by upload").click()
    pg.wait_for_selector("text=not an image PIL can read")
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    pg.click("#image-upload button[aria-label='Clear']")
    pg.set_input_files("#image-upload input[type=file]", str(text))
    pg.get_by_role("button", name="Search by upload").click()
    pg.wait_for_selector("text=no image was accepted (none was uploaded, or the upload was refused)")
    assert pg.locator("#image-results .thumbnail-item").count() == 24
    assert pg.input_value("#image-query textarea") == "a photo of a red object"
    assert pg.locator("#image-results .error, #image-query .error, #image-note .error").count() == 0
    pg.goto(explorer_app.url + "/?tab=images&image=99999")
    pg.wait_for_selector("text=the link's image could not be shown")
    pg.wait_for_timeout(1000)
    assert pg.locator("text=image id 99999 is out of range").count() == 1


def test_image_search_shows_where_it_fires_until_another_table(page, explorer_app):
    """The picture of where the top neuron fires appears with an image search's table and goes with a
    table it does not explain (a text search): before any search it is no empty box."""
    pg = page
    pg.goto(explorer_app.url + "/?tab=neurons")
    pg.wait_for_selector("#search-upload input[type=file]", state="attached")
    assert not pg.locator("#search-where").is_visible()
    thumb = sorted((explorer_app.bundle / "images" / "thumbs").glob("*.png"))[0]
    pg.set_input_files("#search-upload input[type=file]", str(thumb))
    pg.get_by_role("button", name="Search by image").click()
    pg.wait_for_selector("#search-where img", state="visible")
    # likewise the filter's CSV goes with a search's table (it offered the filter's rows above the search's),
    # and a search's note with a filter's table
    pg.click("#neuron-table-csv")
    pg.wait_for_selector("#neuron-csv-file a[download]")
    pg.get_by_label("search neurons by text (CLIP text tower + FAISS)").fill("a photo of a red object")
    pg.get_by_role("button", name="Search by text").click()
    pg.wait_for_function("() => !document.querySelector('#search-where')?.checkVisibility()")
    pg.wait_for_selector("#search-note:has-text('best match first')")
    assert not pg.locator("#neuron-csv-file").is_visible()
    # the search is in the address (it stayed ?tab=neurons), and so is a filter, which a link restores
    pg.wait_for_function("() => location.search === '?tab=neurons&search=a+photo+of+a+red+object'")
    pg.get_by_role("button", name="Filter", exact=True).click()
    pg.wait_for_function("() => document.querySelector('#search-note').innerText.trim() === ''")
    assert not pg.locator("#neuron-table [role=columnheader]:has-text('match')").count()
    pg.get_by_label("label contains", exact=False).fill("red")
    pg.get_by_label("descending").uncheck()
    pg.get_by_role("button", name="Filter", exact=True).click()
    pg.wait_for_function("() => location.search === '?tab=neurons&label=red&desc=0'")
    rows = ("() => Array.from(document.querySelectorAll('#neuron-table [role=row]')).map(r => Array.from("
            "r.querySelectorAll('[role=gridcell]')).map(c => c.innerText)).filter(r => r.length)")
    pg.wait_for_function(f"() => ({rows})().length > 0 && ({rows})().every(r => r[1].includes('red'))")
    shown = pg.evaluate(rows)
    pg.goto(pg.url)
    pg.wait_for_function(f"(n) => ({rows})().length === n", arg=len(shown))
    assert pg.evaluate(rows) == shown and not pg.get_by_label("descending").is_checked()


def test_images_page_finds_images_and_the_neurons_that_show_them(page, explorer_app):
    """The Images page: a text query fills the gallery; a click on a result shows the neurons whose top
    galleries hold it (counted here from the bundle's files) and records it in the URL, which restores
    it, also after a round trip through another tab picked by hand; a row of that table opens its neuron;
    "Steer with this image" loads it on the Steer page; a click on a neuron's gallery image leads to that
    image on the Images page; a new search hides the picked image, and "Images like this one" shows its own."""
    pg, url = page, explorer_app.url
    top = np.load(explorer_app.bundle / "neurons" / "top_images.npy")
    patch = explorer_app.bundle / "neurons" / "patch_top_images.npy"
    galleries = [top] + ([np.load(patch)] if patch.exists() else [])
    held = lambda i: int(sum((g == i).sum() for g in galleries))
    pg.goto(url + "/?tab=images")
    pg.wait_for_selector("#image-query textarea")
    # no empty boxes before a search and a pick: the results gallery, the picture and its table are hidden
    assert not pg.locator("#image-results").is_visible() and not pg.locator("#image-picture").is_visible()
    assert not pg.locator("#image-neurons").is_visible()
    pg.fill("#image-query textarea", "a photo of a red object")
    pg.keyboard.press("Enter")
    pg.wait_for_function("() => document.querySelectorAll('#image-results .thumbnail-item').length === 24")
    captions = pg.eval_on_selector_all("#image-results .thumbnail-item", "els => els.map(e => e.innerText)")
    ids = [int(c.split()[0].lstrip("#")) for c in captions]
    assert len(set(ids)) == 24 and "images of 2,000 nearest" in pg.inner_text("#image-note")
    j = next(j for j, i in enumerate(ids) if held(i))  # a result some neuron's gallery holds
    # the address names the search the results came from, not the text typed since (its link opened
    # other results)
    pg.fill("#image-query textarea", "a blue star")
    pg.locator("#image-results .thumbnail-item").nth(j).click()
    note = f"Image #{ids[j]} is in the top galleries of"
    pg.wait_for_selector(f"#image-neurons-note:has-text('{note}')")
    rows = "Array.from(document.querySelectorAll('#image-neurons [role=row]')).filter(r => r.querySelector('[role=gridcell]'))"
    pg.wait_for_function(f"(n) => {rows}.length === n", arg=held(ids[j]))
    pg.wait_for_selector("#image-picture img", state="visible")
    wait_address(pg, image=str(ids[j]))
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(pg.url).query))
    assert q == {"tab": "images", "query": "a photo of a red object", "image": str(ids[j])}
    # the link restores the search and the image
    pg.goto(pg.url)
    pg.wait_for_function("() => document.querySelectorAll('#image-results .thumbnail-item').length === 24")
    pg.wait_for_selector(f"#image-neurons-note:has-text('{note}')")
    wait_value(pg, "#image-id input", str(ids[j]))
    # a tab picked by hand puts its own address in the bar, and picking this tab again puts this one back
    here = pg.url
    pg.get_by_role("tab", name="Hierarchy", exact=True).click()
    pg.wait_for_function("() => location.search === '?tab=hierarchy'")
    pg.get_by_role("tab", name="Overview", exact=True).click()
    pg.wait_for_function("() => location.search === '?tab=overview'")
    # in a narrow window the tabs wrap onto a second row (Gradio's "More tabs" menu hid 4 of 6 on a phone until
    # 2026-12-05), and a tab of that row puts its address too
    pg.set_viewport_size({"width": 420, "height": 1000})
    tab = pg.get_by_role("tab", name="Hierarchy", exact=True)
    assert tab.bounding_box()["y"] > pg.get_by_role("tab", name="Overview", exact=True).bounding_box()["y"]
    tab.click()
    pg.wait_for_function("() => location.search === '?tab=hierarchy'")
    pg.set_viewport_size({"width": 1400, "height": 1000})
    pg.get_by_role("tab", name="Images", exact=True).click()
    pg.wait_for_function("(u) => location.href === u", arg=here)
    # a row opens its neuron
    first = int(pg.eval_on_selector_all("#image-neurons [role=gridcell]", "els => els[0].innerText"))
    pg.locator("#image-neurons [role=gridcell]").first.click()
    pg.wait_for_function("(k) => { const h = document.querySelector('#neuron-header h3');"
                         " return !!h && h.innerText === 'Neuron ' + k; }", arg=first)
    # Steer with this image: its index and picture on the Steer page
    pg.get_by_role("tab", name="Images", exact=True).click()
    pg.click("#image-steer")
    wait_value(pg, "#steer-image-index input", str(ids[j]))
    pg.wait_for_selector("#steer-picture img")
    wait_address(pg, tab="steer", image=str(ids[j]))
    assert dict(urllib.parse.parse_qsl(urllib.parse.urlparse(pg.url).query)) == {"tab": "steer", "image": str(ids[j])}
    # a click on a neuron's gallery image offers that image's neurons on the Images page
    k = int(np.argmax((top >= 0).sum(1)))
    pg.goto(f"{url}/?tab=neuron&neuron={k}")
    pg.wait_for_function("(k) => { const h = document.querySelector('#neuron-header h3');"
                         " return !!h && h.innerText === 'Neuron ' + k; }", arg=k)
    assert not pg.locator("#gallery-image-open").is_visible()
    gallery_widths(pg)
    pg.locator("#top-gallery .thumbnail-item").nth(1).click()
    button = pg.locator("#gallery-image-open")
    button.wait_for(state="visible")
    assert f"Image #{top[k][1]}:" in button.inner_text()
    button.click()
    pg.wait_for_selector(f"#image-neurons-note:has-text('Image #{top[k][1]} is in the top galleries of')")
    pg.wait_for_function(f"(n) => {rows}.length === n", arg=held(top[k][1]))
    # a new search takes the picked image away with its results (the address names the search only) ...
    pg.fill("#image-query textarea", "a photo of a blue object")
    pg.keyboard.press("Enter")
    pg.wait_for_function("() => !document.querySelector('#image-picture')?.checkVisibility()")
    assert pg.inner_text("#image-neurons-note").strip() == ""
    pg.wait_for_function("() => location.search === '?tab=images&query=a+photo+of+a+blue+object'")
    # ... and "Images like this one" shows the image they are like, as its address does
    # on a grid with nothing picked (a result clicked before stayed enlarged, as another image, on the new results)
    result = pg.locator("#image-results .thumbnail-item").nth(3)
    clicked = int(result.inner_text().split()[0].lstrip("#"))
    result.click()
    pg.wait_for_selector("#image-results .preview")
    # the click writes its image's id into the box: typed before that answer came, the id was replaced by
    # the clicked one (seen once in CI, under load: the images like #{clicked} opened instead of #{other})
    pg.wait_for_selector(f"#image-neurons-note:has-text('Image #{clicked} is in')")
    other = next(int(i) for i in top.ravel() if i >= 0 and i not in ids)
    pg.fill("#image-id input", str(other))
    pg.click("#image-like")
    pg.wait_for_selector(f"#image-neurons-note:has-text('Image #{other} is in the top galleries of')")
    pg.wait_for_function("() => !document.querySelector('#image-results .preview')")
    assert pg.locator("#image-results .thumbnail-item").count() == 24
    pg.wait_for_selector("#image-picture img", state="visible")
    pg.wait_for_function("(i) => location.search === '?tab=images&image=' + i", arg=other)


def test_fractional_ids_are_refused_after_a_plain_load(page, explorer_app):
    """A fractional id typed in the browser is refused with the API's sentence after a plain page load: each
    page-load handler gave the id boxes an update, which Gradio answers with a fresh box whose own check rounded
    3.5 to 4 (the Neuron page opened neuron 4, the Images page image #2 for 2.5, Steer clamped neuron 4). No
    load step writes these boxes now, so the test types while the load's answers may still arrive, as a user
    may (it waited for Playwright's "networkidle", which a page whose event stream stays open never reaches:
    seen under load)."""
    pg = page
    pg.goto(explorer_app.url + "/")
    pg.wait_for_selector("#metrics-table [role=gridcell]")
    pg.get_by_role("tab", name="Neuron", exact=True).click()
    pg.wait_for_selector("#neuron-header h3")
    shown = pg.inner_text("#neuron-header h3")
    pg.fill("#neuron-id input", "3.5")
    pg.click("#open-neuron")
    pg.wait_for_selector("text=neuron id 3.5 is not an integer; give an integer between 0 and")
    assert pg.inner_text("#neuron-header h3") == shown and "neuron=4" not in pg.url
    pg.get_by_role("tab", name="Images", exact=True).click()
    type_and_send(pg, "#image-id input", "2.5", "#image-open", "image id 2.5 is not an integer; give an integer between 0 and")
    assert "Image #2 " not in pg.inner_text("#image-neurons-note")
    pg.get_by_role("tab", name="Steer", exact=True).click()
    pg.wait_for_selector("#steer-picture img")
    type_and_send(pg, "#steer-latent-1 input", "7.5", "#steer-button", "neuron id 7.5 is not an integer; give an integer between 0 and")
    assert "latents=" not in pg.url


def type_and_send(pg, box: str, typed: str, button: str, refusal: str):
    """Type into a box of a tab just opened, once it shows its first value, check it holds what was typed, click,
    and wait for the refusal; a failure says what the box held and what the page opened
    (one CI run opened image 0 for "2.5", a box that held 0 at the click, which no run here reproduced)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    pg.wait_for_function("(s) => { const e = document.querySelector(s); return !!e && e.value !== ''; }", arg=box)
    pg.fill(box, typed)
    wait_value(pg, box, typed)
    pg.click(button)
    try:
        pg.wait_for_selector(f"text={refusal}")
    except PlaywrightTimeout:
        raise AssertionError(f"no refusal of {typed!r}: the box holds {pg.input_value(box)!r}, the page is at "
                             f"{pg.url}") from None


def test_a_bad_image_id_is_one_message_without_error_badges(page, explorer_app):
    """A bad image id typed on the Images page (out of range, fractional), sent by Enter, "Neurons that show
    it" or "Steer with this image", is refused with its sentence alone: the boxes of the event (the id, the
    picture, its neurons and their note, the Steer page's image) showed an "Error" badge each, and the
    note of the image shown before was emptied; it stays, and so does the page."""
    pg, n = page, len(np.load(explorer_app.bundle / "images" / "embeddings.npy", mmap_mode="r"))
    badges = ("() => Array.from(document.querySelectorAll('.error')).filter(e => !e.closest('.toast-wrap')"
              " && !e.className.includes('toast') && e.innerText.trim() === 'Error').map(e => e.closest('[id]')?.id)")
    pg.goto(explorer_app.url + "/?tab=images&image=5")
    pg.wait_for_selector("#image-neurons-note:has-text('Image #5 ')")
    note = pg.inner_text("#image-neurons-note")
    for typed, send in (("99999", lambda: pg.press("#image-id input", "Enter")),
                        ("2.5", lambda: pg.click("#image-open")), (str(n + 7), lambda: pg.click("#image-steer"))):
        pg.fill("#image-id input", typed)
        send()
        pg.wait_for_selector(f"text=image id {typed} is")
        pg.wait_for_timeout(300)  # the badges came with the message, in the same update
        assert pg.evaluate(badges) == [], typed
        assert pg.inner_text("#image-neurons-note") == note and pg.locator("#image-picture img").is_visible()
        assert "image=5" in pg.url and pg.get_by_role("tab", name="Images", exact=True).get_attribute("aria-selected") == "true"


def test_a_refused_input_leaves_every_page_as_it_was(page, explorer_app, tmp_path):
    """A refused input on the Neuron, Neurons, Hierarchy and Steer pages is its one message: each output of the
    event showed an "Error" badge and went blank (the galleries and histogram of the neuron shown, the table, the
    drawing, the Steer picture and answers), while the header still named the neuron. The Images page was made
    so first (test_a_bad_image_id_is_one_message_without_error_badges); every page is now."""
    pg, n = page, len(np.load(explorer_app.bundle / "neurons" / "ms.npy"))
    badges = ("() => Array.from(document.querySelectorAll('.error')).filter(e => !e.closest('.toast-wrap')"
              " && !e.className.includes('toast') && e.innerText.trim() === 'Error').map(e => e.closest('[id]')?.id)")

    def refused(send, message):
        send()
        pg.wait_for_selector(f"text={message}")
        pg.wait_for_timeout(300)  # the badges came with the message, in the same update
        assert pg.evaluate(badges) == [], message

    pg.goto(explorer_app.url + "/?tab=neuron&neuron=12")
    pg.wait_for_selector("#neuron-header h3:has-text('12')")
    header, shown = pg.inner_text("#neuron-header h3"), pg.locator("#top-gallery img").count()
    for typed in (str(n), "2.5"):
        pg.fill("#neuron-id input", typed)
        refused(lambda: pg.click("#open-neuron"), f"neuron id {typed} is")
        assert pg.inner_text("#neuron-header h3") == header and pg.locator("#top-gallery img").count() == shown > 0
        assert pg.locator("#hist-plot .js-plotly-plot").count() == 1
    # an image enlarged in a gallery is not carried to the next neuron: Gradio kept the index and enlarged the new
    # neuron's image at that place, one nobody clicked, without the button that opens an image clicked
    pg.locator("#top-gallery .thumbnail-item").nth(1).click()
    pg.wait_for_selector("#top-gallery .preview")
    pg.fill("#neuron-id input", "13")
    pg.click("#open-neuron")
    pg.wait_for_selector("#neuron-header h3:has-text('13')")
    pg.wait_for_function("() => !document.querySelector('#top-gallery .preview')")

    pg.get_by_role("tab", name="Neurons", exact=True).click()
    pg.wait_for_selector("#neuron-table [role=gridcell]")
    rows = pg.locator("#neuron-table tbody tr").count()
    pg.get_by_label("rows").fill("0")
    refused(lambda: pg.get_by_role("button", name="Filter", exact=True).click(), "row limit 0 is out of range")
    assert pg.locator("#neuron-table tbody tr").count() == rows > 0
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    pg.set_input_files("#search-upload input[type=file]", str(text))
    refused(lambda: pg.get_by_role("button", name="Search by image", exact=True).click(), "not an image PIL can read")
    assert pg.locator("#neuron-table tbody tr").count() == rows

    pg.get_by_role("tab", name="Hierarchy", exact=True).click()
    pg.wait_for_selector("#tree-plot .js-plotly-plot")
    pg.fill("#tree-root input", str(n + 40))
    refused(lambda: pg.press("#tree-root input", "Enter"), f"subtree's latent (-1: from the roots) {n + 40} is out of range")
    assert pg.locator("#tree-plot .js-plotly-plot").count() == 1

    pg.get_by_role("tab", name="Steer", exact=True).click()
    pg.wait_for_selector("#steer-picture img")
    pg.fill("#steer-image-index input", "99999")
    refused(lambda: pg.click("#steer-load"), "image index 99999 is out of range")
    assert pg.locator("#steer-picture img").is_visible()
    pg.fill("#steer-image-index input", "0")
    pg.fill("#steer-latent-1 input", str(n + 3))
    refused(lambda: pg.click("#steer-button"), f"neuron id {n + 3} is out of range")
    assert pg.locator("#steer-picture img").is_visible()


def test_a_search_waiting_for_the_text_encoder_says_so(page, tiny_bundle, tmp_path, monkeypatch):
    """A search by text sent before the background load of the text tower ends (here: with none) says that
    the text encoder is loading, once: the wait was a bare spinner (5 to 11 s). The next searches, the Images
    page's too (one embedder for both), answer without it."""
    from app import ui
    from app.server import start

    monkeypatch.setattr(ui, "warm_when_served", lambda demo, searcher: None)
    demo, url = start(tiny_bundle, cache=tmp_path / "cache")
    loading = "text=Loading the text encoder for the first search by text"
    try:
        pg = page
        pg.goto(url + "/?tab=neurons")
        for query in ("a photo of a red object", "a photo of a blue object"):
            pg.fill("#neuron-query textarea", query)
            pg.press("#neuron-query textarea", "Enter")
            if query.endswith("red object"):
                # shown while the search waits (not checked against the results: on a fast host the tower loads
                # before the page is read, and the message stays up a few seconds after)
                pg.wait_for_selector(loading)
            pg.wait_for_function("(q) => location.search.includes(encodeURIComponent(q).replaceAll('%20', '+'))",
                                 arg=query)
        pg.goto(url + "/?tab=images")
        pg.fill("#image-query textarea", "a red star")
        pg.press("#image-query textarea", "Enter")
        pg.wait_for_function("() => document.querySelectorAll('#image-results .thumbnail-item').length === 24")
        assert pg.locator(loading).count() == 0
    finally:
        demo.close()


def test_a_steering_model_that_cannot_load_leaves_the_steer_page_its_picture(page, tiny_bundle, tmp_path,
                                                                                monkeypatch):
    """A bundle whose LLaVA cannot be loaded (a hub id without the network; here the load refuses): opening the
    Steer tab showed an "Error" badge on the picture and on the latents table beside the message, and a steer
    link an error. The picture (which needs no model) shows, the table stays empty, and the reason is one
    warning."""
    from app.server import start
    from sae_core import steering
    from sae_core.errors import UserError

    def offline(*a, **k):
        raise UserError("cannot load the config of llava-hf/llava-1.5-7b-hf (OSError: no network); pass a directory "
                        "written by save_pretrained or a hub id this machine can download.")

    monkeypatch.setattr(steering.SteeringSession, "from_bundle", offline)
    demo, url = start(tiny_bundle, cache=tmp_path / "cache")
    badges = ("() => Array.from(document.querySelectorAll('.error')).filter(e => !e.closest('.toast-wrap')"
              " && !e.className.includes('toast') && e.innerText.trim() === 'Error').map(e => e.closest('[id]')?.id)")
    try:
        pg = page
        pg.goto(url + "/")
        pg.wait_for_selector("#metrics-table [role=gridcell]")
        pg.get_by_role("tab", name="Steer", exact=True).click()
        pg.wait_for_selector("text=the steering model cannot be loaded, so the Steer page cannot answer")
        pg.wait_for_selector("#steer-picture img")
        pg.wait_for_timeout(300)  # badges came with the message, in the same update
        assert pg.evaluate(badges) == []
        assert pg.locator("text=OSError: no network").count() >= 1
        assert pg.locator(".toast-body.warning").count() >= 1 and pg.locator(".toast-body.error").count() == 0
        # a steer link with an image: the same, a warning (it was an error toast: the link's restore failed)
        pg.goto(url + "/?tab=steer&image=3&latents=5&values=2")
        pg.wait_for_selector("text=the steering model cannot be loaded, so the Steer page cannot answer")
        pg.wait_for_selector("#steer-picture img")
        pg.wait_for_timeout(300)
        assert pg.evaluate(badges) == [] and pg.input_value("#steer-latent-1 input") == "5"
        assert pg.locator(".toast-body.warning").count() >= 1 and pg.locator(".toast-body.error").count() == 0
    finally:
        demo.close()


@contextmanager
def fullest_neuron_at(page, explorer_app, **context):
    """A page of its own browser context (`context`: viewport, mobile, ...) on the Neuron page of the neuron with the
    fullest top gallery, its images loaded; yields (page, its gallery's image count)."""
    top = np.load(explorer_app.bundle / "neurons" / "top_images.npy")
    k = int(np.argmax((top >= 0).sum(1)))
    ctx = page.context.browser.new_context(**context)
    try:
        pg = ctx.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(f"{explorer_app.url}/?tab=neuron&neuron={k}")
        pg.wait_for_function("(k) => document.querySelector('#neuron-header h3')?.innerText === 'Neuron ' + k", arg=k)
        gallery_widths(pg)
        yield pg, int((top[k] >= 0).sum())
    finally:
        ctx.close()


def test_phone_layout(page, explorer_app):
    """At 390 x 844 (a phone): the top gallery shows all its images in columns that fit the width (8 of
    100 px showed 6 and scrolled sideways, unmarked) under its label (a two-line label covered the top of
    the first row); the plots' titles fit the width (plotly cut both ends); the Overview's metrics sit
    under the bundle's facts with each value on one line ("0.0444" read "0.0" over "444")."""
    with fullest_neuron_at(page, explorer_app, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                           is_mobile=True, has_touch=True) as (pg, n_images):
        tiles = pg.evaluate("""() => Array.from(document.querySelectorAll('#top-gallery .thumbnail-item'))
                                .map(e => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.top]; })""")
        assert len(tiles) == n_images and min(t[0] for t in tiles) >= 0, tiles
        assert max(t[1] for t in tiles) <= 390, tiles
        label = pg.evaluate("() => document.querySelector('#top-gallery [data-testid=block-label]').getBoundingClientRect().bottom")
        assert label <= min(t[2] for t in tiles), (label, tiles[:4])
        fits = """(id) => { const g = document.querySelector(id + ' .js-plotly-plot'); const t = g?.querySelector('.gtitle');
                  if (!t) return null; const r = t.getBoundingClientRect(), p = g.getBoundingClientRect();
                  return r.width > 0 && r.left >= p.left && r.right <= p.right; }"""
        pg.wait_for_function(f"() => ({fits})('#hist-plot') !== null")
        assert pg.evaluate(fits, "#hist-plot")
        pg.goto(explorer_app.url + "/")
        pg.wait_for_selector("#metrics-table [role=gridcell]:has-text('taxonomy depth per Matryoshka level')")
        pg.wait_for_function(f"() => ({fits})('#scatter-plot') !== null")
        assert pg.evaluate(fits, "#scatter-plot")
        # a reviewer's 412 px phone (2026-12-05): the two plots side by side at 160-278 px each, their titles, axis
        # titles and the "(bar cut)" note cut at the edge; Gradio's two-line label over each plot's title; to a
        # screen reader each plot was its tick numbers
        pg.set_viewport_size({"width": 412, "height": 915})
        pg.wait_for_function("() => document.querySelector('#scatter-plot .js-plotly-plot')?.getAttribute('aria-label')")
        pg.wait_for_timeout(1000)  # plotly's resize to the new width
        plots = pg.evaluate("""() => ['#ms-plot', '#scatter-plot'].map((id) => {
            const g = document.querySelector(id + ' .js-plotly-plot'), p = g.getBoundingClientRect();
            const texts = Array.from(g.querySelectorAll('.gtitle, .g-xtitle text, .annotation-text'))
                .map(t => t.getBoundingClientRect()).filter(r => r.width > 0);
            const label = document.querySelector(id + ' [data-testid=block-label]').getBoundingClientRect();
            return {width: p.width, inside: texts.every(r => r.left >= p.left - 1 && r.right <= p.right + 1),
                    n_texts: texts.length, label_bottom: label.bottom, title_top: g.querySelector('.gtitle').getBoundingClientRect().top,
                    role: g.getAttribute('role'), name: g.getAttribute('aria-label'),
                    title: g.querySelector('.gtitle').textContent}; })""")
        for plot in plots:  # (the whole row: 346 px of 412; side by side each had 170)
            assert plot["width"] >= 330 and plot["inside"] and plot["n_texts"] >= 2, plot
            assert plot["label_bottom"] <= plot["title_top"], plot
            assert plot["role"] == "img" and plot["name"].startswith(plot["title"]), plot
        pg.set_viewport_size({"width": 390, "height": 844})
        # the tiny bundle's raw neurons tower over its latents: the "(bar cut)" note was drawn inside the axes,
        # over the bars, below 768 px (until 2026-12-05)
        note, axes = pg.evaluate("() => ['.annotation', '.nsewdrag'].map(s => document.querySelector('#ms-plot ' + s)"
                                 ".getBoundingClientRect()).map(r => [r.top, r.bottom])")
        assert note[0] >= axes[1], (note, axes)
        facts, table = pg.evaluate("() => ['#bundle-facts', '#metrics-table'].map(s => document.querySelector(s)"
                                   ".getBoundingClientRect()).map(r => [r.top, r.bottom])")
        assert table[0] >= facts[1] - 1, (facts, table)
        lines = pg.evaluate("""() => Array.from(document.querySelectorAll('#metrics-table [role=row]'))
            .map(r => r.querySelectorAll('[role=gridcell]')[1]).filter(c => c && c.innerText.trim())
            .map(c => { const range = document.createRange(); range.selectNodeContents(c.querySelector('span') || c);
                        return [c.innerText.trim(), new Set(Array.from(range.getClientRects())
                                .filter(q => q.width > 0).map(q => Math.round(q.top))).size]; })""")
        # a line breaks between words only ("0.72, 0.62, 0.59, 0.61" may take 4 lines, "0.0444" one)
        assert lines and all(n <= len(text.split()) for text, n in lines), lines
        # measured by a reviewer on 2026-12-05: the metrics' last row was cut inside a scroll box of its own
        # (1,678 px of rows in 1,600); 4 of the 6 tabs were hidden behind a "..." menu; captions were 9 px
        scroll, shown = pg.evaluate("() => { const v = document.querySelector('#metrics-table .virtual-table-viewport');"
                                    " return [v.scrollHeight, v.clientHeight]; }")
        assert scroll <= shown + 1, (scroll, shown)
        tabs = pg.evaluate("() => Array.from(document.querySelectorAll('[role=tab]')).filter(t => t.checkVisibility())"
                           ".map(t => t.innerText.trim())")
        assert tabs == ["Overview", "Neurons", "Neuron", "Images", "Hierarchy", "Steer"], tabs
        pg.goto(f"{explorer_app.url}/?tab=neuron&neuron=0")
        pg.wait_for_selector("#top-gallery .caption-label")
        sizes = pg.evaluate("() => Array.from(document.querySelectorAll('#top-gallery .caption-label'))"
                            ".map(c => parseFloat(getComputedStyle(c).fontSize))")
        assert min(sizes) >= 11, sizes
        # an upload box's label covered its upload icon; the Steer page's options shared one row (cut to
        # "strengt"); its picture was an unnamed button to a screen reader
        pg.goto(f"{explorer_app.url}/?tab=neurons")
        pg.wait_for_selector("#search-upload .icon-wrap")
        label, icon = pg.evaluate("() => ['[data-testid=block-label]', '.icon-wrap'].map(s => document"
                                  ".querySelector('#search-upload ' + s).getBoundingClientRect()).map(r => [r.top, r.bottom])")
        assert label[1] <= icon[0], (label, icon)
        pg.goto(f"{explorer_app.url}/?tab=steer&image=0")
        pg.wait_for_selector("#steer-picture img")
        rows = pg.evaluate("() => ['#steer-keep-error', '#steer-sweep-on', '#steer-tokens'].map(s => document"
                           ".querySelector(s).getBoundingClientRect()).map(r => [r.top, r.bottom, r.width])")
        assert rows[0][1] <= rows[1][0] + 1 and rows[1][1] <= rows[2][0] + 1 and min(r[2] for r in rows) > 250, rows
        assert "patches box" in pg.get_attribute("#steer-picture img", "alt")


def test_tablet_layout(page, explorer_app):
    """At 768 x 1024 (a tablet, a half-screen window): the top gallery's 16 images all lie inside its box (8
    columns of Gradio's minimum width ran 856 px into a 686 px box: the last two columns were cut off, no
    scroll bar), the Overview's MS distribution spans MS 0 to 1 (its axis ran to 2.8 at that width), and the
    Steer page's question shows whole."""
    with fullest_neuron_at(page, explorer_app, viewport={"width": 768, "height": 1024}) as (pg, n_images):
        box, tiles = pg.evaluate("""() => [document.querySelector('#top-gallery').getBoundingClientRect().right,
            Array.from(document.querySelectorAll('#top-gallery .thumbnail-item'))
                 .map(e => { const r = e.getBoundingClientRect(); return [r.left, r.right]; })]""")
        assert len(tiles) == n_images and min(t[0] for t in tiles) >= 0, tiles
        assert max(t[1] for t in tiles) <= min(box, 768), (box, tiles)
        pg.goto(explorer_app.url + "/")
        ms_plot = "document.querySelector('#ms-plot .js-plotly-plot')"
        pg.wait_for_function(f"() => !!{ms_plot}?._fullLayout?.xaxis")
        lo, hi = pg.evaluate(f"() => {ms_plot}._fullLayout.xaxis.range")
        assert lo <= 0 and hi == pytest.approx(1.0), (lo, hi)
        # the Steer page's question shows whole (beside two checkboxes and a slider: "What is shown in thi")
        pg.goto(explorer_app.url + "/?tab=steer")
        pg.wait_for_function("() => document.querySelector('#steer-question input')?.value.length > 0")
        shown, whole = pg.evaluate("() => { const e = document.querySelector('#steer-question input');"
                                   " return [e.clientWidth, e.scrollWidth]; }")
        assert whole <= shown, (shown, whole)
        # a slider had no keyboard focus at all (0 pixels changed): the arrows moved a strength no one could see
        pg.focus("#steer-tokens input[type=range]")
        pg.keyboard.press("ArrowRight")
        assert pg.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") == "solid"


def test_link_with_a_neuron_and_another_tab(page, explorer_app):
    """?neuron=K&tab=overview opens the Overview (it opened the Neuron tab), with neuron K's page behind
    the Neuron tab, whose address is then K's."""
    pg, k = page, 5
    pg.goto(f"{explorer_app.url}/?neuron={k}&tab=overview")
    pg.wait_for_selector("#metrics-table [role=gridcell]")
    pg.wait_for_timeout(1500)  # the page-load handlers' time to switch tabs, as they did (the Neuron tab is not drawn)
    assert pg.evaluate("() => document.querySelector('button[role=tab][aria-selected=true]').innerText.trim()") == "Overview"
    pg.get_by_role("tab", name="Neuron", exact=True).click()
    pg.wait_for_function("(k) => document.querySelector('#neuron-header h3')?.innerText === 'Neuron ' + k", arg=k)
    pg.wait_for_function("(k) => location.search === '?tab=neuron&neuron=' + k", arg=k)


def test_hierarchy_drawing_is_in_the_address(page, explorer_app):
    """A subtree and the treemap go into the address (it stayed ?tab=hierarchy, and a copied link reopened
    the whole sunburst), which draws them again; a bad subtree in a link is one warning and the whole tree."""
    pg = page
    nodes = json.loads((explorer_app.bundle / "hierarchy.json").read_text())["nodes"]
    parents = {n["parent"] for n in nodes}
    k = next(n["id"] for n in nodes if n["level"] == 1 and n["id"] in parents)
    pg.goto(explorer_app.url + "/?tab=hierarchy")
    pg.wait_for_selector("#tree-plot g.slice")
    pg.fill("#tree-root input", str(k))
    pg.keyboard.press("Enter")
    pg.wait_for_function("(k) => location.search === '?tab=hierarchy&root=' + k", arg=k)
    pg.get_by_label("treemap").check()
    pg.wait_for_function("(k) => location.search === '?tab=hierarchy&root=' + k + '&kind=treemap'", arg=k)
    pg.goto(pg.url)
    pg.wait_for_selector(f"#tree-note:has-text('The subtree of latent {k}')")
    assert pg.get_by_label("treemap").is_checked() and pg.input_value("#tree-root input") == str(k)
    pg.wait_for_selector("#tree-plot g.slice")
    pg.goto(explorer_app.url + "/?tab=hierarchy&root=99999")
    pg.wait_for_selector("text=the link's subtree could not be drawn: subtree's latent 99999 is out of range")
    pg.wait_for_selector("#tree-note:has-text('levels drawn')")
    assert "The subtree" not in pg.inner_text("#tree-note")


def test_back_and_forward_go_through_what_the_user_opened(page, explorer_app):
    """The browser's Back returns to the previous neuron and tab (the address was replaced, so Back left the
    explorer), Forward comes back; a link's own restore (?neuron=K becomes ?tab=neuron&neuron=K) and a
    filter's refinement make no entry of their own."""
    pg, url = page, explorer_app.url

    def shown(k):
        pg.wait_for_function("(k) => document.querySelector('#neuron-header h3')?.innerText === 'Neuron ' + k", arg=k)
        wait_address(pg, tab="neuron", neuron=str(k))

    pg.goto("about:blank")
    pg.goto(f"{url}/?neuron=3")
    shown(3)
    pg.fill("#neuron-id input", "5")
    pg.click("#open-neuron")
    shown(5)
    pg.get_by_role("tab", name="Neurons", exact=True).click()
    wait_address(pg, tab="neurons")
    pg.get_by_label("label contains", exact=False).fill("red")  # a refinement of the same table: no entry
    pg.get_by_role("button", name="Filter", exact=True).click()
    wait_address(pg, tab="neurons", label="red")
    pg.go_back()
    shown(5)
    pg.go_back()
    shown(3)
    pg.go_back()
    assert pg.url == "about:blank"
    pg.go_forward()
    shown(3)
    pg.go_forward()
    shown(5)
    pg.go_forward()
    wait_address(pg, tab="neurons", label="red")
    rows = ("() => Array.from(document.querySelectorAll('#neuron-table [role=row]')).map(r => Array.from("
            "r.querySelectorAll('[role=gridcell]')).map(c => c.innerText)).filter(r => r.length)")
    pg.wait_for_function(f"() => ({rows})().length > 0 && ({rows})().every(r => r[1].includes('red'))")


def test_the_focus_follows_an_action_into_the_page_it_opens(page, explorer_app):
    """Enter on a Neurons table row, or on "Steer with this neuron", opens another tab and hid the focused
    element with its page: the focus fell to the document's body and a screen reader said nothing. It is in
    the page that opened (its heading, or the page itself), and the keyboard goes on from there."""
    pg = page
    pg.goto(explorer_app.url + "/?tab=neurons")
    cell = pg.locator("#neuron-table [role=gridcell]").first
    cell.wait_for()
    k = int(cell.inner_text())
    in_page = ("() => { const a = document.activeElement; const p = Array.from(document.querySelectorAll("
               "'[role=tabpanel]')).find(q => q.checkVisibility()); return !!p && a !== document.body && p.contains(a); }")
    cell.focus()
    pg.keyboard.press("Enter")
    pg.wait_for_function("(k) => document.querySelector('#neuron-header h3')?.innerText === 'Neuron ' + k", arg=k)
    pg.wait_for_function(in_page)
    assert pg.evaluate("() => document.activeElement.tagName") == "H3"
    # without the black outline Chromium drew around the heading (read, not typed into; mouse users took it for a glitch)
    assert pg.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") == "none"
    pg.focus("#steer-with-neuron")
    pg.keyboard.press("Enter")
    wait_address(pg, tab="steer", latents=str(k))
    pg.wait_for_function(in_page)
    assert pg.evaluate("() => document.activeElement.closest('[role=tabpanel]').contains(document.querySelector('#steer-button'))")
    # an image enlarged from the keyboard: its "all the neurons that show it" is the next Tab stop (30 stops away
    # until 2026-12-05: the rest of the preview strip, then the grid), the arrows still go from image to image,
    # and the grid's thumbnails are Tab stops again once the image is closed
    pg.goto(f"{explorer_app.url}/?tab=neuron&neuron={k}")
    pg.wait_for_function("(k) => document.querySelector('#neuron-header h3')?.innerText === 'Neuron ' + k", arg=k)
    pg.wait_for_timeout(1000)  # the link's own answers (a new neuron's galleries close any enlarged image)
    thumbs = pg.locator("#top-gallery .thumbnail-item")
    n = thumbs.count()
    thumbs.nth(1).focus()
    pg.keyboard.press("Enter")
    pg.wait_for_selector("#gallery-image-open:visible")
    pg.keyboard.press("Tab")
    assert pg.evaluate("() => document.activeElement.id") == "gallery-image-open"
    first = pg.inner_text("#gallery-image-open")
    pg.keyboard.press("Shift+Tab")
    pg.keyboard.press("ArrowRight")
    pg.wait_for_function("(was) => document.querySelector('#gallery-image-open').innerText !== was", arg=first)
    pg.keyboard.press("Tab")
    assert pg.evaluate("() => document.activeElement.id") == "gallery-image-open"
    pg.click("#top-gallery button[aria-label=Close]")
    pg.wait_for_function("(n) => Array.from(document.querySelectorAll('#top-gallery .thumbnail-item'))"
                         ".filter(t => t.tabIndex >= 0).length === n", arg=n)


def test_the_ood_tables_descriptions_are_read_whole(page, probe_outputs):
    """The OOD table's descriptions ended in "..." at 1,400 px (e.g. "mean calibrated surprise -log p over every
    single raw detector (p against held-o..."), with no way to read the rest but copying the table: they wrap."""
    from app.server import spawn

    proc, url = spawn(probe_outputs.bundle, extra_env={"OMP_NUM_THREADS": "1"})
    try:
        pg = page
        pg.goto(url + "/")
        pg.wait_for_selector("#ood-table [role=gridcell]")
        cut = pg.evaluate("""() => Array.from(document.querySelectorAll('#ood-table [role=gridcell]'))
            .map(c => [c.innerText.trim(), c.querySelector('span') || c])
            .filter(([t, e]) => t.length > 40 && e.scrollWidth > e.clientWidth + 1).map(([t]) => t.slice(0, 60))""")
        longest = pg.evaluate("() => Math.max(...Array.from(document.querySelectorAll('#ood-table [role=gridcell]'))"
                              ".map(c => c.innerText.trim().length))")
        assert longest > 60 and cut == [], cut  # descriptions as long as these are in the table, none cut
        # at 768 px the ROC takes the width, the table below it: side by side, the legend of its 15 detectors
        # left the axes about 60 px
        pg.set_viewport_size({"width": 768, "height": 1024})
        pg.goto(url + "/")
        pg.wait_for_selector("#roc-plot .nsewdrag")
        pg.wait_for_timeout(1000)
        axes = pg.evaluate("() => document.querySelector('#roc-plot .nsewdrag').getBoundingClientRect().width")
        plot, table = (pg.evaluate(f"() => document.querySelector('{e}').getBoundingClientRect().bottom")
                       for e in ("#roc-plot", "#ood-table"))
        assert axes > 300 and plot < table, (axes, plot, table)
        # on a phone the legend (a column at the right) left the axes 64 of 324 px and pushed the x axis's title
        # off the screen's left edge (until 2026-12-05): below 560 px of plot it goes under the axes, and back
        # to the right when the window widens
        boxes = """() => Object.fromEntries(['.nsewdrag', '.legend', '.g-xtitle', '.main-svg'].map(s => [s,
            (({left, right, top, bottom}) => ({left, right, top, bottom}))(document.querySelector('#roc-plot ' + s)
            .getBoundingClientRect())]))"""
        pg.set_viewport_size({"width": 390, "height": 844})
        pg.goto(url + "/")
        pg.wait_for_selector("#roc-plot .nsewdrag")
        pg.wait_for_function("() => document.querySelector('#roc-plot .legend').getBoundingClientRect().top > "
                             "document.querySelector('#roc-plot .nsewdrag').getBoundingClientRect().bottom")
        pg.wait_for_timeout(800)  # the figure's growth by the legend's height, a second relayout
        b = pg.evaluate(boxes)
        assert b[".nsewdrag"]["right"] - b[".nsewdrag"]["left"] > 200, b
        assert b[".g-xtitle"]["left"] >= b[".main-svg"]["left"] and b[".g-xtitle"]["bottom"] <= b[".legend"]["top"], b
        assert b[".legend"]["bottom"] <= b[".main-svg"]["bottom"], b  # the figure grew to hold it
        below = b[".main-svg"]["bottom"] - b[".main-svg"]["top"]
        right = ("() => document.querySelector('#roc-plot .legend').getBoundingClientRect().left > "
                 "document.querySelector('#roc-plot .nsewdrag').getBoundingClientRect().right")
        height = "() => document.querySelector('#roc-plot .main-svg').getBoundingClientRect().height"
        for _ in range(2):  # a phone turned twice: each turn made the plot a legend taller (a review, 2026-12-05)
            pg.set_viewport_size({"width": 1400, "height": 900})
            pg.wait_for_function(right)
            pg.wait_for_timeout(800)
            assert pg.evaluate(height) == 440
            pg.set_viewport_size({"width": 390, "height": 844})
            pg.wait_for_function(f"() => !({right})()")
            pg.wait_for_timeout(800)
            assert pg.evaluate(height) == below
    finally:
        proc.terminate()
        proc.wait(30)
