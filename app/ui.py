"""The explorer's Gradio page: six tabs over one bundle; every event has an `api_name`."""
import functools
import json
import math
import threading
import time

import gradio as gr
import numpy as np
from gradio.components.plot import PlotData

from sae_core.errors import UserError, counted

from . import figures, inputs
from .uploads import load_upload
from .explorer import IMAGE_NEURON_COLUMNS, MAX_TABLE_ROWS, TABLE_COLUMNS, Explorer
from .markdown import markdown_code, markdown_sentence, markdown_text, toast_text
from .probes import CONCEPT_COLUMNS, CROSSMODAL_COLUMNS, ONTOLOGY_COLUMNS, PROBE_COLUMNS

# Plotly clicks open neurons through a hidden button whose js step hands over the clicked id.
OPEN_BOX = "open-neuron-box"
OPEN_BUTTON = "open-neuron-btn"
URL_BOX = "url-state-box"
TAB_URL_BUTTON = "tab-url-btn"

# The galleries grow with their content (no inner scroll bar), and band strips keep their own shape:
# Gradio draws every gallery item in a square cell, which showed a strip as a sliver in a tall box. An
# empty gallery is hidden (the neuron header says why), by CSS so the API's outputs stay plain values. The
# gallery's label floats over its grid (it hid the top 17 px of the first row), so it is put in the flow,
# above the grid, whatever its lines (a fixed 36 px gap assumed one, and a phone wrapped it to two); captions
# wrap rather than end in "..." (an 8-column gallery on a 1,400 px window cut "#872 act 2.06, pa..."), and a
# band strip's sits under it (over it, it hid the last 3 images of the strip); the gallery's buttons sit in
# the label's line, not on the first row's last image. Below 960 px (a tablet, a phone, a half-screen window) the
# galleries take 4 columns that fit the width: Gradio's 8 of at least 100 px showed 6 of 16 images on a
# phone, and at 768 px cut the last two columns off a 686 px box, with no scroll bar either time.
# Measured on a 390 px phone until 2026-12-05: captions there were 9 px (11 now, as on a desktop); the upload
# boxes' floating labels covered their upload icon (in the flow now, as the galleries'); sliders, radio
# buttons and check boxes showed no keyboard focus at all (0 pixels changed), so an arrow key moved a strength
# the user could not see.
CSS = """
[data-sae-focus]:focus {outline: none;}
#open-neuron-box, #open-neuron-btn, #url-state-box, #tab-url-btn {display: none !important;}
.answer textarea {font-size: 1.05em;}
#top-gallery .grid-wrap, #patch-gallery .grid-wrap, #band-gallery .grid-wrap {height: auto !important; min-height: 0 !important; max-height: none !important;}
#band-gallery .thumbnail-item {aspect-ratio: auto !important;}
#band-gallery .thumbnail-item img {height: auto !important; width: 100% !important; object-fit: contain !important;}
#top-gallery [data-testid=block-label], #patch-gallery [data-testid=block-label], #band-gallery [data-testid=block-label], #image-results [data-testid=block-label] {position: relative !important; top: 0 !important; left: 0 !important; max-width: calc(100% - 90px) !important; white-space: normal !important; height: auto !important;}
#steer-picture .image-container {padding-top: 30px; box-sizing: border-box;}
#top-gallery .grid-wrap, #patch-gallery .grid-wrap, #band-gallery .grid-wrap, #image-results .grid-wrap {padding-top: 6px !important; overflow: visible !important;}
#top-gallery .grid-wrap > .icon-button-wrapper, #patch-gallery .grid-wrap > .icon-button-wrapper, #band-gallery .grid-wrap > .icon-button-wrapper, #image-results .grid-wrap > .icon-button-wrapper {top: auto !important; bottom: 100% !important;}
#band-gallery .caption-label {position: static !important; display: block !important; max-width: 100% !important; white-space: normal !important; margin: 2px 0 0 0 !important;}
@media (max-width: 960px) {
  #top-gallery .grid-container, #patch-gallery .grid-container, #image-results .grid-container {grid-template-columns: repeat(4, minmax(0, 1fr)) !important;}
  #top-gallery .thumbnail-item, #patch-gallery .thumbnail-item, #image-results .thumbnail-item {aspect-ratio: auto !important; height: auto !important;}
  #top-gallery .thumbnail-item img, #patch-gallery .thumbnail-item img, #image-results .thumbnail-item img {height: auto !important; width: 100% !important; aspect-ratio: 1 / 1;}
  #top-gallery .thumbnail-item .caption-label, #patch-gallery .thumbnail-item .caption-label, #image-results .thumbnail-item .caption-label {position: static !important; display: block !important; max-width: 100% !important; font-size: 11px !important; padding: 1px 2px !important; margin: 0 !important; transform: none !important;}
}
#top-gallery .caption-label, #patch-gallery .caption-label, #image-results .caption-label {white-space: normal !important; max-width: 92% !important; left: 4% !important; line-height: 1.2 !important; padding: 2px 6px !important; font-size: 11px !important;}
#top-gallery:has(> .empty), #patch-gallery:has(> .empty), #band-gallery:has(> .empty), #image-results:has(> .empty) {display: none !important;}
#search-upload [data-testid=block-label], #image-upload [data-testid=block-label], #steer-upload [data-testid=block-label], #ms-plot [data-testid=block-label], #scatter-plot [data-testid=block-label], #hist-plot [data-testid=block-label], #tree-plot [data-testid=block-label], #roc-plot [data-testid=block-label] {position: relative !important; top: 0 !important; left: 0 !important; white-space: normal !important; height: auto !important;}
@media (max-width: 560px) {#steer-keep-error, #steer-sweep-on, #steer-tokens {flex: 1 1 100% !important; min-width: 100% !important;}}
.tab-container > button.selected {color: var(--primary-700) !important;}
.dark .tab-container > button.selected {color: var(--primary-500) !important;}
input[type=range]:focus-visible, input[type=radio]:focus-visible, input[type=checkbox]:focus-visible {outline: 2px solid var(--color-accent) !important; outline-offset: 2px;}
"""


def theme():
    """Gradio's default theme with its orange a shade darker where text sits on it or is it: white on the primary
    buttons (Filter, Open, Steer) was 2.8:1 on #f97316, and the selected tab's orange label on white 2.8:1, under
    WCAG's 4.5:1 (a reviewer's measurement); orange-700 gives 5.2:1. The subdued grey of the sliders' bounds and
    the footer (#bbbbc2, 1.9:1 on white) is zinc-500 in light mode (4.8:1)."""
    import gradio as gr

    return gr.themes.Default().set(
        # (the selected tab's label is the accent colour, which has no dark-mode variant: CSS makes it orange-700
        # on white and keeps orange-500 where the page is dark)
        body_text_color_subdued="*neutral_500", button_primary_background_fill="*primary_700",
        button_primary_background_fill_dark="*primary_700", button_primary_background_fill_hover="*primary_800",
        button_primary_background_fill_hover_dark="*primary_800")


LEGEND_BELOW_PX = 560  # a plot narrower than this draws its legend under the axes (HOOK_PLOTLY_JS)
PLOT_MIN_WIDTH = 400  # px below which a plot's row stacks it instead of squeezing it beside another

# Installed once on page load: plotly clicks (points, sunburst/treemap nodes) open the clicked neuron.
HOOK_PLOTLY_JS = """
() => {
  // The id goes through a global read by the hidden button's own js step (a programmatic change of a
  // textbox's value does not reach Gradio's state), then the hidden button is clicked.
  const send = (id) => {
    window.__saeOpenNeuron = String(id);
    const btn = document.querySelector('#open-neuron-btn');
    if (btn) btn.click();
  };
  const hook = () => document.querySelectorAll('.js-plotly-plot').forEach((gd) => {
    // a name for screen readers, which read a plot as its tick numbers otherwise: the figure's title and the
    // block's label (which says where its numbers are as text)
    const title = ((((gd.layout || {}).title) || {}).text || '').replace(/<[^>]*>/g, ' ');
    const block = gd.closest('.block'), label = block && block.querySelector('[data-testid=block-label]');
    const said = label ? label.textContent.trim() : '';
    const name = said && said !== title ? [title, said].filter(Boolean).join(': ') : title;
    if (name && gd.getAttribute('aria-label') !== name) { gd.setAttribute('role', 'img'); gd.setAttribute('aria-label', name); }
    if (gd.__saeHooked || typeof gd.on !== 'function') return;
    gd.__saeHooked = true;
    const open = (ev) => {
      const p = ev && ev.points && ev.points[0];
      if (!p) return;
      const id = Array.isArray(p.customdata) ? p.customdata[0] : p.customdata;
      if (id !== undefined && id !== null && id !== '' && !isNaN(Number(id))) send(id);
    };
    gd.on('plotly_click', open);
    // a tree node opens its neuron here, and false stops plotly's own zoom into the node (which left the tree
    // zoomed, so a later click on its centre, to zoom out, opened that neuron again) and its plotly_click
    gd.on('plotly_sunburstclick', (ev) => { open(ev); return false; });
    gd.on('plotly_treemapclick', (ev) => { open(ev); return false; });
  });
  // A legend in a column at the right of a plot narrower than LEGEND_BELOW_PX (a phone) goes under the axes,
  // the figure taller by the legend's height: the ROC's 15 detectors left its axes 64 px of a 324 px plot, and
  // its x title started off the screen. Checked at every tick, as a new figure from the server (Gradio's
  // react) brings the column back, and a window widened again puts the legend back where the figure had it.
  // Plotly.react with a changed layout, not relayout: a relayout of the height fixes the width too, and the
  // plot stopped following the window.
  const KEYS = ['x', 'xanchor', 'y', 'yanchor'];
  const placeLegends = () => document.querySelectorAll('.js-plotly-plot').forEach((gd) => {
    const P = window.Plotly, full = gd._fullLayout, lg = (gd.layout && gd.layout.legend) || {};
    if (!P || !full || !full.showlegend || !full._size || gd.__saeRelayout) return;
    const below = gd.__saeLegend !== undefined && lg.yanchor === 'top' && lg.y < 0 && lg.x === 0;
    if (!below && (lg.orientation === 'h' || (lg.x !== undefined && lg.x < 1))) return;  // not a column at the right
    if (gd.clientWidth === 0 || Math.abs(full.width - gd.clientWidth) > 2) return;  // hidden, or a resize to come
    const narrow = gd.clientWidth < %d;
    if (narrow === below) return;
    gd.__saeRelayout = true;
    const done = () => { gd.__saeRelayout = false; };
    const redraw = (legend, more) => P.react(gd, gd.data, Object.assign({}, gd.layout, {legend: legend}, more));
    if (below) {
      const was = gd.__saeLegend, legend = Object.assign({}, lg);
      delete gd.__saeLegend;
      KEYS.forEach((k) => { if (was[k] === undefined) delete legend[k]; else legend[k] = was[k]; });
      redraw(legend, {height: was.height, margin: was.margin}).then(done, done);
      return;
    }
    // the figure's own height, kept across moves: plotly's resize to a wider window drops layout.height, and
    // the full height then is the grown one (each phone rotation made the plot a legend taller)
    if (gd.layout.height) gd.__saeHeight = gd.layout.height;
    const height = gd.__saeHeight || full.height;
    gd.__saeLegend = {height: height, margin: gd.layout.margin};
    KEYS.forEach((k) => { gd.__saeLegend[k] = lg[k]; });
    // under the x axis's title (about 56 px below the axes, 72 for a title of two lines), the right margin kept
    // for the column (80 px of plotly's template) down to 20; then the figure grows by the legend's own height
    const lines = (((full.xaxis || {}).title || {}).text || '').split('<br>').length;
    const legend = Object.assign({}, lg, {x: 0, xanchor: 'left', yanchor: 'top', y: -(62 + 16 * (lines - 1)) / full._size.h});
    const margin = Object.assign({}, gd.layout.margin, {r: Math.min(full.margin.r, 20)});
    redraw(legend, {margin: margin})
      .then(() => redraw(legend, {margin: margin, height: height + ((gd._fullLayout.legend || {})._height || 0) + 10}))
      .then(done, done);
  });
  setInterval(() => { hook(); placeLegends(); }, 400);
}
""" % LEGEND_BELOW_PX

# Keeps the address bar in step with the page state (so a copied URL restores it), and remembers each tab's
# last address for a switch back to it by hand (TAB_ADDRESS_JS). What the user opened (another tab, neuron,
# image, search or subtree: NAVIGATION_KEYS) is a new history entry, so the browser's Back returns to it
# (HISTORY_JS); a refinement of the same view (a filter, a strength, the sort) and whatever the page writes
# before the user's first click or key (a link's restore) replace the entry. The page has a <base href>, so
# plotly writes its gradient fills (the colour bars) as url("ADDRESS#id"): those are re-pointed at the new
# address, or every colour bar drawn before the change went blank.
NAVIGATION_KEYS = ("tab", "neuron", "image", "query", "search", "root")
SET_URL_JS = """
(q) => {
  if (typeof q !== 'string') return;
  const tab = new URLSearchParams(q).get('tab');
  if (tab) (window.__saeTabQuery = window.__saeTabQuery || {})[tab] = q;
  const from = window.location.href.split('#')[0];
  const u = new URL(window.location.href);
  const before = new URLSearchParams(u.search), after = new URLSearchParams(q);
  const moved = %s.some((k) => before.get(k) !== after.get(k));
  u.search = q ? '?' + q : '';
  if (u.toString() === window.location.href) return;
  if (moved && window.__saeUserActed) window.history.pushState(null, '', u.toString());
  else window.history.replaceState(null, '', u.toString());
  if (window.__saeAddressShown) window.__saeAddressShown(window.location.search);
  const to = window.location.href.split('#')[0];
  if (from === to) return;
  document.querySelectorAll('.js-plotly-plot').forEach((gd) => {
    if (gd._context) gd._context._baseUrl = to;
    gd.querySelectorAll('[style*="url("], [fill^="url("], [clip-path^="url("]').forEach((el) => {
      for (const attr of ['style', 'fill', 'clip-path']) {
        const v = el.getAttribute(attr);
        if (v && v.includes(from + '#')) el.setAttribute(attr, v.split(from + '#').join(to + '#'));
      }
    });
  });
}
""" % json.dumps(list(NAVIGATION_KEYS))

# Installed once on page load: the browser's Back and Forward. An entry's address is a whole link, which the
# page-load restores draw, so going to one loads it; the user's first click or key marks what follows as theirs.
HISTORY_JS = """
() => {
  if (window.__saeHistory) return;
  window.__saeHistory = true;
  const acted = () => { window.__saeUserActed = true; };
  document.addEventListener('pointerdown', acted, true);
  document.addEventListener('keydown', acted, true);
  // an anchor's #fragment is an entry of the same address: nothing to draw again
  let shown = window.location.search;
  window.addEventListener('popstate', () => {
    if (window.location.search !== shown) window.location.reload();
  });
  window.__saeAddressShown = (search) => { shown = search; };
}
"""

# Installed once on page load: an action that opens another tab (a table row's Enter, "Steer with this neuron", an
# image's "all the neurons that show it") hid the element that had the focus with its page, so the focus fell to
# the document's top and a screen reader said nothing of the new page. It goes to the new page's first heading
# (or the page itself), unless the user is on the tab strip or already in that page.
FOCUS_JS = """
() => {
  if (window.__saeFocus) return;
  window.__saeFocus = true;
  const selected = () => document.querySelector('[role=tab][aria-selected=true]');
  let last = selected();
  const lost = (el, panel) => !el || el === document.body || !el.checkVisibility() || !panel.contains(el);
  new MutationObserver(() => {
    const now = selected();
    if (!now || now === last) return;
    last = now;
    if (document.activeElement && document.activeElement.closest('[role=tablist]')) return;
    let tries = 0;
    const move = () => {
      const panel = Array.from(document.querySelectorAll('[role=tabpanel]')).find((q) => q.checkVisibility());
      if (!panel) { if (++tries < 30) setTimeout(move, 100); return; }
      if (!lost(document.activeElement, panel)) return;
      const target = panel.querySelector('h1, h2, h3') || panel;
      if (!target.hasAttribute('tabindex')) target.setAttribute('tabindex', '-1');
      target.setAttribute('data-sae-focus', '');  // no outline (CSS): a heading is read, not typed into
      target.focus({preventScroll: true});
    };
    setTimeout(move, 50);
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['aria-selected']});
}
"""

# Installed once on page load: while a gallery shows an enlarged image, the arrow keys (Gradio's) go from image to
# image, so its strip's other thumbnails and the grid under it leave the Tab order: "all the neurons that show it",
# under the gallery, was 30 Tab stops from the enlarged image (the rest of the strip, then the whole grid) until
# 2026-12-05, and is the next one now. The grid's thumbnails come back when the enlarged image is closed.
GALLERY_KEYS_JS = """
() => {
  if (window.__saeGalleryKeys) return;
  window.__saeGalleryKeys = true;
  let queued = false;
  const update = () => {
    queued = false;
    document.querySelectorAll('.thumbnail-item').forEach((t) => {
      const gallery = t.closest('.block');
      const enlarged = !!gallery && !!gallery.querySelector('.preview');
      const skip = enlarged && !(t.classList.contains('thumbnail-small') && t.classList.contains('selected'));
      if (skip && t.getAttribute('tabindex') !== '-1') {
        t.setAttribute('tabindex', '-1');
        t.setAttribute('data-sae-skipped', '');
      } else if (!skip && t.hasAttribute('data-sae-skipped')) {
        t.removeAttribute('tabindex');
        t.removeAttribute('data-sae-skipped');
      }
    });
  };
  new MutationObserver(() => { if (!queued) { queued = true; requestAnimationFrame(update); } })
    .observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['class']});
}
"""

# Installed once on page load: a tab picked by hand puts that tab's last address in the address bar (or
# just ?tab=ID), through the hidden url box, so that the box always holds the address: a later event that
# writes the box's old value must still be a change. The tabs that events open (a neuron from a plot,
# "Steer with this neuron") write their own, fuller address, so only clicks on the tab strip act here.
TAB_ADDRESS_JS = """
() => {
  if (window.__saeTabAddress) return;
  window.__saeTabAddress = true;
  const memory = (window.__saeTabQuery = window.__saeTabQuery || {});
  const first = window.location.search.slice(1);
  const firstTab = new URLSearchParams(first).get('tab');
  if (firstTab && !(firstTab in memory)) memory[firstTab] = first;  // the link the page was opened with
  // a link's neuron with another tab is opened behind the Neuron tab (ui.restore), whose address it is
  const firstNeuron = new URLSearchParams(first).get('neuron');
  if (firstNeuron !== null && firstTab !== 'neuron' && !('neuron' in memory))
    memory.neuron = new URLSearchParams({tab: 'neuron', neuron: firstNeuron}).toString();
  const tabs = %s;
  document.addEventListener('click', (ev) => {
    const btn = ev.target && ev.target.closest ? ev.target.closest('button') : null;
    if (!btn) return;
    // the tab strip's buttons carry their id (it wraps in a narrow window: no "More tabs" menu since 2026-12-05)
    const id = btn.getAttribute('role') === 'tab' ? btn.dataset.tabId : null;
    if (!id || !tabs.includes(id)) return;
    window.__saeTabUrl = memory[id] !== undefined ? memory[id] : 'tab=' + id;
    const hidden = document.querySelector('#%s');
    if (hidden) hidden.click();
  }, true);
}
""" % (json.dumps(list(inputs.TABS)), TAB_URL_BUTTON)


def as_sent(component):
    """`component` (a gr.Number, gr.Slider or gr.Textbox) handing its events the value as sent, for the explorer's
    checks (`inputs.integer`, `inputs.clamp_value`, `inputs.share`, `inputs.text`) to judge: Gradio's own rounded
    neuron 3.5 to 4 and steered it, refused -1 or text in a sentence naming no field, refused strengths beyond the
    slider that the API bounds with a note, and made a list sent as a query its Python text ("['a red object']",
    searched for; until 2026-12-05). Its minimum and maximum still bound the browser's spinner. (Set on the
    instance: Gradio writes a .pyi stub beside any module that subclasses a component.)"""
    component.preprocess = lambda payload: payload
    return component


def initial(component):
    """What a page-load handler gives an `as_sent` box it leaves alone: the box's first value. Not gr.update():
    Gradio answers any update, an empty one too, with a fresh instance of the component for that page, whose
    preprocess is the class's own again (after a plain page load the browser's 3.5 opened neuron 4)."""
    return component.value


def link_state(request) -> dict:
    """The page address's fields (inputs.decode_state of its query); {} for a call that has no request."""
    return inputs.decode_state(dict(request.query_params) if request else {})


def on_link(demo, is_link):
    """A page-load step with no outputs; what is chained after it with .success runs only for an address that
    `is_link` (given `link_state`) accepts. The restores that write `as_sent` boxes run behind it:
    a load that wrote such a box for every address (its first value: see `initial`) replaced what the user had
    typed there meanwhile when the server answered late (a CI dry run: "2.5" typed, image 0 opened). Queued, as
    every load step: one sent outside the queue made the browser open a second event stream that could stay
    open (the page never went idle: 6 of 20 loads here, 0 of 15 with every step queued)."""
    def check(request: gr.Request):
        if not is_link(link_state(request)):
            raise gr.Error("not that kind of link", visible=False, print_exception=False)
    return demo.load(check, None, None, api_name=False, show_progress="hidden")


def plotly_json(fig: dict) -> PlotData:
    """A plotly figure given as a JSON dict, handed to gr.Plot without building a go.Figure."""
    return PlotData(type="plotly", plot=json.dumps(fig))


def user_errors(fn):
    """Turn UserError into gr.Error: the one-sentence message reaches the page and API clients. Running out of
    memory (LLaVA answering on a full GPU, say) is one sentence too, where it was Gradio's bare "Error"."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(toast_text(str(e)), print_exception=False) from None
        except (MemoryError, RuntimeError) as e:
            from sae_core.precision import out_of_memory

            said = out_of_memory(e)
            if said is None:
                raise
            raise gr.Error(f"the server ran out of memory for this request ({said}); try again when other requests "
                           "are done (on the Steer page, with fewer answer tokens), and tell whoever runs it if this "
                           "repeats.",
                           print_exception=False) from None
    return wrapper


# Every event whose function runs the steering session's model (LLaVA, its vision tower included) waits for one
# worker: two at once hold two copies of their activations, which on a GPU with a 7B LLaVA is the memory the
# model left free (the image search of neurons ran beside the Steer page's events until 2026-12-05).
MODEL_QUEUE = dict(concurrency_limit=1, concurrency_id="model")


def checked_first(trigger, check, inputs, fn, outputs, api_name, **kwargs):
    """`trigger` runs `check(*inputs)` (a user_errors function) with no outputs, then `fn` where it passed: a
    refused input is one message and the page keeps what it shows, where an event whose function raises marks
    each of its outputs with an "Error" badge and blanks it (the galleries, tables, picture and answers went).
    `fn` still checks for the API's callers. Returns `fn`'s event, for the steps that follow it."""
    return trigger(check, inputs, None, api_name=False).success(fn, inputs, outputs, api_name=api_name, **kwargs)


class Click(gr.SelectData):
    """gr.SelectData that an API call also builds: a script cannot send a click, and Gradio's own class
    failed on the missing data ("'NoneType' object is not subscriptable"); `clicked` then says what to call."""

    def __init__(self, target, data):
        super().__init__(target, {"index": None, "value": None, **(data if isinstance(data, dict) else {})})


def clicked(evt: Click, instead: str) -> Click:
    """The click an event answers; UserError naming what to call instead for an API call, which has none."""
    if evt is None or evt.index is None:
        raise UserError(f"this endpoint answers a click on the page, which an API call cannot send; {instead}.")
    return evt


def clicked_neuron(evt: Click, columns, instead: str = "call /neuron_page with the neuron id instead"):
    """The "neuron" cell of a clicked table row (None where the row has none)."""
    row, i = clicked(evt, instead).row_value or [], list(columns).index("neuron")
    return row[i] if i < len(row) else None


N_SLOTS = 3
"""Latent slots on the Steer page (the API takes the same three; inputs.MAX_LATENTS bounds any list)."""
UPLOADED = "upload"  # a steer address's image when the page shows an upload, which a link cannot carry


def link_field_lost(problem: str, instead: str = "it is left at its default") -> str:
    """The warning for a link's field that could not be restored: what was wrong, and what the page did instead."""
    return f"part of the link could not be restored: {problem.rstrip('.')}; {instead}"


class SteerTab:
    """The Steer page: image, latents that fire on it, clamp sliders, three answers, sweep, score."""

    def __init__(self, ex: Explorer, steer):
        from .steer import DEFAULT_QUESTIONS, LATENT_COLUMNS, LATENT_ROWS

        self.ex, self.steer = ex, steer
        other = steer.other_tower()
        unit = ex.bundle.strength_unit_problem()
        gr.Markdown("Pick a dataset image or upload one, choose latents and strengths (in multiples of each "
                    "neuron's largest activation on one token of the dataset), then **Steer**. Click the picture "
                    "to restrict the clamp to patches. One model serves everyone: requests wait their turn."
                    + (f"\n\n**Warning**: {markdown_sentence(other)} (a bundle built on that tower steers here)."
                       if other else "")
                    + (f"\n\n**Warning**: {markdown_text(unit)}." if unit else ""),
                    elem_id="steer-intro")
        with gr.Row():
            self.image_index = as_sent(gr.Number(value=0, precision=0, minimum=-1, maximum=ex.n_images - 1,
                                         label=f"dataset image index (0 to {ex.n_images - 1}; -1 = the upload)",
                                         elem_id="steer-image-index"))
            self.load_button = gr.Button("Load dataset image", elem_id="steer-load")
            # gr.File, not gr.Image: Gradio would decode an image upload itself before our checks run.
            self.upload = gr.File(file_types=["image"], type="filepath", label="or upload an image", height=120,
                                  elem_id="steer-upload")
        with gr.Row():
            # alt text: the picture is a Tab stop, which screen readers announced as an unnamed button
            self.picture = gr.Image(type="filepath", interactive=False, label="the image (click patches to restrict)",
                                    elem_id="steer-picture", height=340,
                                    alt_text="the image to steer with its patch grid; type patch numbers in the "
                                             "patches box to restrict the clamp")
            self.latents_df = gr.Dataframe(headers=LATENT_COLUMNS, interactive=False, elem_id="steer-latents",
                                           label=f"the {LATENT_ROWS} latents that fire most on it: max and mean "
                                                 "over patches, the patch where most, the max in strength units "
                                                 "(click one to put it in the first slot)")
        with gr.Row():
            # where they are, for those who type them (a screen reader or a keyboard cannot click the picture)
            rows, cols = ex.grid
            where = f"; row by row from 0 at the top left of the {rows} x {cols} grid" if rows else ""
            self.patches = gr.Textbox(value="", label=f"patches (empty = every token{where})", elem_id="steer-patches")
            self.clear_patches = gr.Button("All patches", elem_id="steer-all-patches")
        self.slots = []
        for i in range(N_SLOTS):
            with gr.Row():
                lat = as_sent(gr.Number(value=-1, precision=0, minimum=-1, maximum=ex.n_neurons - 1,
                                label=f"latent {i + 1} (-1 = unused)", elem_id=f"steer-latent-{i + 1}"))
                val = as_sent(gr.Slider(0, inputs.CLAMP_FACTOR, value=4.0, step=0.1, label=f"strength {i + 1} (x token max)",
                                elem_id=f"steer-value-{i + 1}"))
                self.slots.append((lat, val))
        # a row of its own: beside the checkboxes and the slider it showed "What is shown in thi" at 768 px, and
        # the default question's instruction ("Use exactly one word!") shapes every answer
        self.question = gr.Dropdown(list(DEFAULT_QUESTIONS), value=DEFAULT_QUESTIONS[0], allow_custom_value=True,
                                    label="question", elem_id="steer-question")
        # below 560 px each on a line of its own (CSS: Gradio puts the three in one form box, where min_width does
        # nothing): on a 390 px phone they shared a row, which cut "strength sweep" to "strengt" and put "keep
        # the SAE error term" one word a line
        with gr.Row():
            self.keep_error = gr.Checkbox(value=False, label="keep the SAE error term", elem_id="steer-keep-error")
            self.sweep = gr.Checkbox(value=True, label="strength sweep", elem_id="steer-sweep-on")
            self.max_tokens = as_sent(gr.Slider(1, inputs.MAX_NEW_TOKENS, value=5, step=1, label="answer tokens",
                                                elem_id="steer-tokens"))
        self.steer_button = gr.Button("Steer", variant="primary", elem_id="steer-button")
        with gr.Row():
            self.original = gr.Textbox(label="original model", elem_id="answer-original", elem_classes="answer")
            self.sae_answer = gr.Textbox(label="SAE inserted (nothing clamped)", elem_id="answer-sae",
                                         elem_classes="answer")
            self.steered = gr.Textbox(label="steered", elem_id="answer-steered", elem_classes="answer")
        with gr.Row():  # the sweep over the score on a phone (beside it, its answers were scrolled out of view)
            self.sweep_df = gr.Dataframe(headers=["strength (x token max)", "answer"], interactive=False,
                                         label="strength sweep", elem_id="steer-sweep", min_width=340)
            self.score_md = gr.Markdown(elem_id="steer-score")
        with gr.Accordion("details (JSON)", open=False):
            self.details = gr.JSON()

    def slot_inputs(self):
        return [c for pair in self.slots for c in pair]

    def wire(self, demo, tabs, steer_tab, url_box, shown_neuron, steer_with_button, image_id, steer_with_image_button):
        from .steer import LATENT_COLUMNS

        ex, svc = self.ex, self.steer

        def state_query(image_index, latents, strengths, patches, keep_error, question, sweep, tokens):
            """The address of a steer request, from its checked latents and strengths (the boxes hand over what
            was sent: "3" as text, a strength bounded into range), with the answer's length and the sweep (a link
            lost both until 2026-12-05, and so gave another answer; None leaves one out). An upload is
            `image=upload`, which a link cannot carry: opened, it says so (it opened dataset image 0 without a
            word)."""
            return inputs.encode_state({"tab": "steer", "image": UPLOADED if image_index is None or image_index < 0
                                        else int(image_index), "latents": [int(k) for k in latents],
                                        "values": [float(v) for v in strengths], "patches": patches or "",
                                        "keep_error": bool(keep_error), "sweep": sweep, "tokens": tokens,
                                        "question": question})

        def answer_tokens(value) -> int:
            return inputs.integer(value, "answer tokens", 1, inputs.MAX_NEW_TOKENS)

        def steer_address(image_index, latent_1, value_1, latent_2, value_2, latent_3, value_3, patches, keep_error,
                          question, sweep, max_new_tokens):
            """The address of what the page shows after a load, an upload, a latent picked from the table or a
            patch click (only Steer and the buttons that lead here wrote it, so a copied link opened another image,
            latent or patch set): the boxes as they are, less what the Steer button would refuse."""
            def valid(read, default=None):
                try:
                    return read()
                except UserError:
                    return default

            image = -1 if image_index in (None, "") else valid(lambda: inputs.integer(image_index, "image index", -1,
                                                                                       ex.n_images - 1))
            latents, strengths = [], []
            for k, v in pairs([latent_1, value_1, latent_2, value_2, latent_3, value_3]):
                k = valid(lambda: inputs.integer(k, "latent", -1, ex.n_neurons - 1), -1)
                if k >= 0 and k not in latents:
                    latents.append(k)
                    strengths.append(valid(lambda: slider_strength(v), 4.0))
            return state_query(image, latents, strengths, valid(lambda: ",".join(map(str, patch_list(patches))), ""),
                               valid(lambda: inputs.yes_no(keep_error, "keep_error"), False),
                               valid(lambda: inputs.text(question, "question", inputs.MAX_QUESTION_CHARS)),
                               valid(lambda: inputs.yes_no(sweep, "sweep")),
                               valid(lambda: answer_tokens(max_new_tokens)))

        address_inputs = [self.image_index, *self.slot_inputs(), self.patches, self.keep_error, self.question,
                          self.sweep, self.max_tokens]

        def then_address(event):
            event.success(steer_address, address_inputs, url_box, api_name=False, queue=False)

        def pairs(flat):
            return list(zip(flat[0::2], flat[1::2]))

        def slider_strength(value) -> float:
            """A strength of a link or a box, bounded into the sliders' range, 0 to CLAMP_FACTOR (the API bounds to
            +-CLAMP_FACTOR, with a note); UserError for one that is no number."""
            return min(max(inputs.clamp_value(value, 1.0, "strength")[0], 0.0), inputs.CLAMP_FACTOR)

        def patch_list(text):
            return inputs.int_list(text, "patch", 0, max(ex.n_patches - 1, 0), max(ex.n_patches, 1))

        def picture_and_latents(image_index, upload, patches, page_load=False):
            """The image with its patch grid, and the latents that fire on it (most first). For the loads the page
            makes itself (`page_load`: a first visit, a link), where the model cannot load: the picture (which needs
            none), an empty table and the reason as a warning (the picture and the table each showed an "Error"
            badge beside the message)."""
            from .steer import ModelUnavailable

            pil, key, _ = svc.image(image_index, upload)
            try:
                rows, _ = svc.latents(key)
            except ModelUnavailable as e:
                if not page_load:
                    raise
                gr.Warning(toast_text(str(e)))
                rows = []
            return svc.picture(pil, patch_list(patches)), rows

        @user_errors
        def steer_load_image(image_index, upload, patches):
            """The image, its patch grid and the latents that fire on it (most first)."""
            return picture_and_latents(image_index, upload, patches)

        @user_errors
        def check_steer_image(image_index, upload, patches):
            svc.image(image_index, upload)
            patch_list(patches)

        load_out = [self.picture, self.latents_df]
        for trigger, api_name in ((self.load_button.click, "steer_load_image"), (self.image_index.submit, False)):
            then_address(checked_first(trigger, check_steer_image, [self.image_index, self.upload, self.patches],
                                       steer_load_image, load_out, api_name, **MODEL_QUEUE))

        @user_errors
        def steer_first_visit(image_index, upload, patches, picture):
            """The Steer tab opened with no picture yet: load the image in the box, as the button would."""
            return (picture_and_latents(image_index, upload, patches, page_load=True) if picture is None
                    else (gr.update(), gr.update()))

        steer_tab.select(steer_first_visit, [self.image_index, self.upload, self.patches, self.picture], load_out,
                         api_name=False, **MODEL_QUEUE)

        @user_errors
        def steer_upload_image(upload, patches):
            return -1, *picture_and_latents(-1, upload, patches)

        @user_errors
        def check_steer_upload(upload, patches):
            check_steer_image(-1, upload, patches)

        then_address(checked_first(self.upload.upload, check_steer_upload, [self.upload, self.patches],
                                   steer_upload_image, [self.image_index] + load_out, "steer_upload_image", **MODEL_QUEUE))

        @user_errors
        def steer_select_patch(image_index, upload, patches, evt: Click):
            """Toggle the clicked patch in the patch list and redraw the grid."""
            from .render import patch_at

            pil, _, _ = svc.image(image_index, upload)
            where = clicked(evt, "give the patches to /steer as text instead").index
            p = patch_at(where, svc.picture_size(pil), ex.grid)
            chosen = patch_list(patches)
            chosen = [q for q in chosen if q != p] if p in chosen else chosen + [p]
            return ",".join(str(q) for q in sorted(chosen)), svc.picture(pil, chosen)

        then_address(self.picture.select(steer_select_patch, [self.image_index, self.upload, self.patches],
                                         [self.patches, self.picture], api_name="steer_select_patch"))

        @user_errors
        def check_typed_patches(image_index, upload, patches, picture):
            patch_list(patches)
            if picture is not None:
                svc.image(image_index, upload)

        @user_errors
        def steer_type_patches(image_index, upload, patches, picture):
            """Patches typed in the box, the keyboard's way to pick them (Enter): the list in order and the grid
            redrawn with it, as clicks draw it (the picture showed no choice until Steer). Not on leaving the box:
            a click on "All patches" or the picture that left it was answered first, then undone by this."""
            chosen = sorted(patch_list(patches))
            if picture is None:
                return ",".join(map(str, chosen)), gr.update()
            pil, _, _ = svc.image(image_index, upload)
            return ",".join(map(str, chosen)), svc.picture(pil, chosen)

        then_address(checked_first(self.patches.submit, check_typed_patches,
                                   [self.image_index, self.upload, self.patches, self.picture],
                                   steer_type_patches, [self.patches, self.picture], False))

        @user_errors
        def steer_all_patches(image_index, upload):
            pil, _, _ = svc.image(image_index, upload)
            return "", svc.picture(pil)

        then_address(self.clear_patches.click(steer_all_patches, [self.image_index, self.upload],
                                              [self.patches, self.picture], api_name="steer_all_patches"))

        @user_errors
        def steer_pick_latent(image_index, upload, patches, evt: Click):
            """Put the clicked latent in slot 1 and show where it fires on the image."""
            k = ex.check_neuron(clicked_neuron(evt, LATENT_COLUMNS, "give the neuron to /steer as latent_1 instead"))
            pil, key, _ = svc.image(image_index, upload)
            _, maps = svc.latents(key)
            m = maps.get(k)
            pic = svc.picture(pil, patch_list(patches), None if m is None else m.reshape(-1),
                              float(m.max()) if m is not None and m.max() > 0 else 1.0)
            return k, pic

        then_address(self.latents_df.select(steer_pick_latent, [self.image_index, self.upload, self.patches],
                                            [self.slots[0][0], self.picture], api_name="steer_pick_latent", **MODEL_QUEUE))

        @user_errors
        def steer(image_index, upload, latent_1, value_1, latent_2, value_2, latent_3, value_3, patches,
                  keep_error, question, sweep, max_new_tokens, progress=gr.Progress()):
            """Original, SAE-inserted and steered answers, the strength sweep and the steering score."""
            slots = [(latent_1, value_1), (latent_2, value_2), (latent_3, value_3)]
            progress(0.0, desc="loading the model" if not svc.loaded else "encoding the image")
            _, key, where = svc.image(image_index, upload)
            out = svc.steer(key, [k for k, _ in slots], [v for _, v in slots], patch_list(patches), keep_error,
                            question, sweep, max_new_tokens, progress=progress)
            sc = out["scores"]
            if "unavailable" in sc:
                score = f"steering score unavailable: {sc['unavailable']}"
            else:
                fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
                score = (f"**steering score** (CLIP cosine between the answer and neuron {out['clamp']['latents'][0]}'s "
                         f"top images): steered {fmt(sc.get('steered'))} vs original {fmt(sc.get('original'))}")
            if out["notes"]:
                score += "\n\n" + "; ".join(out["notes"]) + "."
            # keep_error as the steering read it: bool("false") wrote keep_error=1 for a script's "false" (until 2026-12-05)
            q = state_query(where["image"], out["clamp"]["latents"], out["strengths"], patches,
                            out["clamp"]["keep_error"], question,
                            inputs.yes_no(sweep, "sweep"), answer_tokens(max_new_tokens))
            return out["original"], out["sae"], out["steered"], out["sweep"], score, out, q

        @user_errors
        def check_steer(image_index, upload, latent_1, value_1, latent_2, value_2, latent_3, value_3, patches,
                        keep_error, question, sweep, max_new_tokens):
            check_steer_image(image_index, upload, patches)
            svc.checked_request([latent_1, latent_2, latent_3], [value_1, value_2, value_3], question, max_new_tokens)
            inputs.yes_no(keep_error, "keep_error"), inputs.yes_no(sweep, "sweep")

        checked_first(self.steer_button.click, check_steer,
                      [self.image_index, self.upload, *self.slot_inputs(), self.patches, self.keep_error,
                       self.question, self.sweep, self.max_tokens],
                      steer, [self.original, self.sae_answer, self.steered, self.sweep_df, self.score_md, self.details,
                              url_box], "steer", **MODEL_QUEUE)

        @user_errors
        def steer_with_neuron(neuron):
            """Go to the Steer page with this neuron in the first latent slot."""
            k = ex.check_neuron(neuron)
            q = inputs.encode_state({"tab": "steer", "latents": [k]})
            return k, gr.Tabs(selected="steer"), q

        steer_with_button.click(steer_with_neuron, shown_neuron, [self.slots[0][0], tabs, url_box],
                                api_name="steer_with_neuron")

        @user_errors
        def steer_with_image(image):
            """Go to the Steer page with this dataset image (the Images page's), loaded with its latents."""
            i = ex.check_image(image)
            return i, gr.Tabs(selected="steer"), inputs.encode_state({"tab": "steer", "image": i})

        @user_errors
        def check_image(image):
            ex.check_image(image)

        # checked first, with no outputs, as the Images page's other buttons: a bad id is one message, not
        # also an "Error" badge on the Steer page's image box
        checked_first(steer_with_image_button.click, check_image, image_id, steer_with_image,
                      [self.image_index, tabs, url_box], "steer_with_image").success(
            steer_load_image, [self.image_index, self.upload, self.patches], load_out, api_name=False, **MODEL_QUEUE)

        @user_errors
        def steer_restore_from_url(request: gr.Request):
            state = link_state(request)
            if state.get("tab") != "steer":  # the number boxes keep their first values (see `initial`)
                return ((initial(self.image_index),) + (gr.update(),) * 6 + (initial(self.max_tokens),)
                        + tuple(initial(c) for c in self.slot_inputs()))
            refused = []

            def field(read, default):
                """One field of the link, or `default` and a warning: a bad field loses only itself."""
                try:
                    return read()
                except UserError as e:
                    refused.append(link_field_lost(str(e)))
                    return default

            def flag(key, default):
                given = state.get(key)
                return default if given in (None, "") else field(lambda: inputs.link_flag(given, key), default)

            lat = field(lambda: [inputs.integer(k, "latent", 0, ex.n_neurons - 1) for k in state.get("latents") or []], [])
            vals = field(lambda: [slider_strength(v) for v in state.get("values") or []], [])
            slots, again = {}, {}  # latent -> strength, the i-th strength with the i-th latent; latents repeated
            for i, k in enumerate(lat):
                if k in slots:
                    again[k] = None
                else:
                    slots[k] = vals[i] if i < len(vals) else 4.0
            if again:  # one warning for them all (a link naming latent 1 400 times showed 399 until 2026-12-05)
                named = ", ".join(map(str, list(again)[:5])) + (f" and {len(again) - 5} more" if len(again) > 5 else "")
                refused.append(link_field_lost(f"latent {named} is given more than once", "its first strength is kept")
                               if len(again) == 1 else
                               link_field_lost(f"latents {named} are given more than once",
                                               "the first strength of each is kept"))
            if len(slots) > N_SLOTS:
                refused.append(link_field_lost(f"{len(slots)} latents were given and the page has {N_SLOTS} slots",
                                               f"the first {N_SLOTS} are kept"))
            chosen = list(slots.items())[:N_SLOTS]
            slot_vals = []
            for i in range(N_SLOTS):
                slot_vals += list(chosen[i]) if i < len(chosen) else [-1, 4.0]
            # in order, as typed ones are put (a link of "5,3,5" showed "5,3")
            patches = field(lambda: ",".join(str(p) for p in sorted(patch_list(state.get("patches")))), "")
            image, picture = initial(self.image_index), gr.update()
            if state.get("image") == UPLOADED:
                refused.append(link_field_lost("its image was an upload, which a link cannot carry",
                                               f"upload it again (dataset image {image} is shown)"))
            elif state.get("image") not in (None, ""):
                i = field(lambda: ex.check_image(state["image"], "image index"), None)
                shown = None if i is None else field(lambda: svc.picture(svc.image(i, None)[0], patch_list(patches)), None)
                if shown is not None:
                    image, picture = i, shown
            question = field(lambda: inputs.text(state.get("question"), "question", inputs.MAX_QUESTION_CHARS), "")
            keep_error, sweep = flag("keep_error", False), flag("sweep", self.sweep.value)
            tokens = initial(self.max_tokens)
            if state.get("tokens") not in (None, ""):
                tokens = field(lambda: answer_tokens(state["tokens"]), tokens)
            for message in refused:
                gr.Warning(toast_text(message))
            return (image, patches, keep_error, question or gr.update(), picture, gr.Tabs(selected="steer"), sweep,
                    tokens, *slot_vals)

        @user_errors
        def steer_restore_latents(image_index, upload, patches, request: gr.Request):
            """A restored steer link with an image: the latents that fire on it, as the Load button gives."""
            state = link_state(request)
            try:  # the link's image, where it was restored (a refused one was warned about)
                restored = ex.check_image(state.get("image"), "image index") == image_index
            except UserError:
                restored = False
            if state.get("tab") != "steer" or not restored:
                return gr.update(), gr.update()
            return picture_and_latents(image_index, upload, patches, page_load=True)

        on_link(demo, lambda state: state.get("tab") == "steer").success(steer_restore_from_url, None,
                  [self.image_index, self.patches, self.keep_error, self.question, self.picture, tabs, self.sweep,
                   self.max_tokens, *self.slot_inputs()], api_name="steer_restore_from_url").success(
            steer_restore_latents, [self.image_index, self.upload, self.patches], load_out, api_name=False, **MODEL_QUEUE)


def build(explorer: Explorer, steer=None, searcher=None, image_search=None) -> gr.Blocks:
    """The whole page. `steer` (app.steer.SteerService), `searcher` (app.search.NeuronSearch) and
    `image_search` (app.search.ImageSearch) are optional services."""
    ex = explorer
    level_choices = ["all"] + [str(g) for g in ex.levels]

    with gr.Blocks(title="SAE explorer", analytics_enabled=False) as demo:
        gr.Markdown("# SAE explorer\nBrowse the neurons of a sparse autoencoder on a vision encoder, "
                    "and steer a multimodal model by clamping them.")
        open_box = gr.Textbox(visible="hidden", elem_id=OPEN_BOX, label="open neuron")
        open_button_hidden = gr.Button("open", visible="hidden", elem_id=OPEN_BUTTON)
        url_box = gr.Textbox(visible="hidden", elem_id=URL_BOX, label="url state")
        tab_url_button = gr.Button("tab address", visible="hidden", elem_id=TAB_URL_BUTTON)
        # the tab strip wraps to a second row: Gradio's default menu hid 4 of the 6 pages of a phone behind a
        # 34 x 26 px "..." button whose items a screen reader was not told were tabs
        with gr.Tabs(selected="overview", overflow_behavior="wrap") as tabs:
            # ---------------------------------------------------------------- Overview
            with gr.Tab("Overview", id="overview"):
                # the two sides stack on a phone (side by side, the values' column was 60 px wide and split
                # 0.0444 into "0.0" over "444")
                with gr.Row():
                    with gr.Column(min_width=320):
                        facts_md = gr.Markdown(elem_id="bundle-facts")
                    with gr.Column(min_width=320):
                        # tall enough for the demo bundle's 27 rows (1,422 px drawn), most wrapped to two
                        # lines, without an inner scroll bar (1,000 px hid the last 4 of 23), also on a phone,
                        # where they wrap to 3-4 lines (1,600 px cut the last row of the tiny bundle's there)
                        metrics_df = gr.Dataframe(headers=["metric", "value"], interactive=False,
                                                  label="SAE metrics", max_height=4000, wrap=True,
                                                  column_widths=["72%", "28%"], elem_id="metrics-table")
                with gr.Row():
                    # min_width: two plots side by side below 2 x 400 px were squeezed to 160-278 px each, their
                    # titles and notes cut (a reviewer's 412 px phone); narrower, each takes the whole row
                    ms_hist_plot = gr.Plot(label="MS distribution", elem_id="ms-plot", min_width=PLOT_MIN_WIDTH)
                    scatter_plot = gr.Plot(label="MS versus frequency (click a point to open its neuron)",
                                           elem_id="scatter-plot", min_width=PLOT_MIN_WIDTH)
                # cross-modal bundles (precompute crossmodal): the latents shared by image and text tokens
                with gr.Column(visible=ex.probes.is_crossmodal):
                    cm_note = gr.Markdown(elem_id="crossmodal-note")
                    with gr.Row():
                        cm_counts = gr.Dataframe(headers=CONCEPT_COLUMNS, interactive=False, scale=1,
                                                 label="cross-modal latents per concept", elem_id="crossmodal-counts")
                        cm_table = gr.Dataframe(headers=CROSSMODAL_COLUMNS, interactive=False, scale=4,
                                                label="cross-modal latents (click a row to open it)",
                                                elem_id="crossmodal-table")
                # probe results (precompute ood / ontology / probes) when the bundle holds them
                ood_note = gr.Markdown(elem_id="ood-note")
                # min_width: below two of them (a tablet, a phone) each takes the whole width, where side by side the
                # ROC's legend of 15 detectors left its axes 60 px at 768 px
                with gr.Row():
                    roc_plot = gr.Plot(label="OOD detection: ROC", elem_id="roc-plot", visible=False, scale=1,
                                       min_width=560)
                    # wrap: a detector's description ended in "..." with no way to read the rest but a copy
                    ood_df = gr.Dataframe(interactive=False, visible=False, scale=1, elem_id="ood-table", wrap=True,
                                          label="AUROC and FPR@95 per detector (sort from a column header's ⋮ menu)",
                                          min_width=560)
                with gr.Accordion("Ontology recovery and linear probes", open=False, elem_id="probe-accordion",
                                  visible=not ex.probes.is_crossmodal):
                    onto_note = gr.Markdown()
                    onto_df = gr.Dataframe(headers=ONTOLOGY_COLUMNS, interactive=False, visible=False,
                                           label="tree agreement with the taxonomy")
                    probes_note = gr.Markdown()
                    probes_df = gr.Dataframe(headers=PROBE_COLUMNS, interactive=False, visible=False,
                                             label="linear probe accuracy")
            # ---------------------------------------------------------------- Neurons
            with gr.Tab("Neurons", id="neurons"):
                with gr.Row():
                    f_min_ms = as_sent(gr.Slider(0, 1, value=0, step=0.01, label="minimum MS"))
                    by_patch = "; by patches for a latent never firing by CLS" if "patch_support" in ex.columns else ""
                    f_min_support = as_sent(gr.Number(value=ex.default_min_support, precision=0, minimum=0,
                                              label=f"minimum support (images{by_patch}; an MS over fewer is noisy)"))
                    f_level = gr.Dropdown(level_choices, value="all", label="Matryoshka level")
                    f_label = as_sent(gr.Textbox(label="label contains" + (" (label or patch_label)" if "patch_label"
                                                                           in ex.columns else ""),
                                                 max_length=inputs.MAX_QUERY_CHARS))
                with gr.Row():
                    f_sort = gr.Dropdown(list(ex.table_sorts), value="ms", label="sort by")
                    f_desc = gr.Checkbox(value=True, label="descending")
                    f_limit = as_sent(gr.Number(value=100, precision=0, minimum=1, maximum=MAX_TABLE_ROWS, label="rows"))
                    f_button = gr.Button("Filter", variant="primary")
                    csv_button = gr.Button("Download the filter's CSV", elem_id="neuron-table-csv")
                csv_file = gr.File(label="neurons (CSV)", interactive=False, visible=False, elem_id="neuron-csv-file")
                with gr.Row():
                    text_query = as_sent(gr.Textbox(label="search neurons by text (CLIP text tower + FAISS)",
                                                    placeholder="a red star", max_length=inputs.MAX_QUERY_CHARS,
                                                    elem_id="neuron-query"))
                    text_button = gr.Button("Search by text")
                with gr.Row():
                    search_image = gr.File(file_types=["image"], type="filepath", label="search neurons by image (upload)",
                                           elem_id="search-upload", height=120, visible=steer is not None)
                    search_where = gr.Image(type="filepath", interactive=False, label="where the top neuron fires",
                                            visible=False, elem_id="search-where")  # shown with an image search's table
                    image_button = gr.Button("Search by image", visible=steer is not None)  # see need_image_model
                search_note = gr.Markdown(elem_id="search-note")
                table = gr.Dataframe(headers=ex.table_columns, interactive=False, label="neurons (click a row to open it)",
                                     elem_id="neuron-table")
            # ---------------------------------------------------------------- Neuron page
            with gr.Tab("Neuron", id="neuron") as neuron_tab:
                with gr.Row():
                    neuron_in = as_sent(gr.Number(value=ex.default_neuron, precision=0, minimum=0, maximum=ex.n_neurons - 1,
                                          label=f"neuron id (0 to {ex.n_neurons - 1})", elem_id="neuron-id"))
                    open_button = gr.Button("Open", variant="primary", elem_id="open-neuron")
                    steer_with_button = gr.Button("Steer with this neuron", elem_id="steer-with-neuron",
                                                  visible=steer is not None)
                    export_button = gr.Button("Export JSON")
                    # shown once there is a file: an empty File box is a 200 px drop area on every page
                    export_file = gr.File(label="neuron JSON", interactive=False, visible=False, elem_id="export-file")
                header_md = gr.Markdown(elem_id="neuron-header")
                # the neuron the page shows, which the id box stops being once another id is typed without
                # Open: the gallery clicks, Export and "Steer with this neuron" act on this one
                # (as sent: Gradio's own rounding turned the API's /neuron_export 3.5 into neuron 4's file)
                shown_neuron = as_sent(gr.Number(value=None, precision=0, visible=False, label="neuron",
                                                 elem_id="shown-neuron"))
                # fit_columns=False: a gallery of 2 images kept 2 columns, so each image was 4x the width of
                # a full gallery's, half the page, and read as another kind of page.
                top_gallery = gr.Gallery(label="top 16 images (red = where it fires, yellow box = best patch)",
                                         columns=8, fit_columns=False, height="auto", object_fit="contain",
                                         elem_id="top-gallery")
                # a click on a gallery image (which also enlarges it) offers that image's other neurons, right
                # under its gallery: the next Tab stop from the enlarged image (GALLERY_KEYS_JS)
                gallery_image_button = gr.Button(visible=False, elem_id="gallery-image-open", size="sm")
                patch_gallery = gr.Gallery(
                    label="top 16 images by the max over patches (not by the CLS token)",
                    columns=8, fit_columns=False, height="auto", object_fit="contain", elem_id="patch-gallery",
                    visible=ex.bundle.has("patch_top_images"))
                patch_image_button = gr.Button(visible=False, elem_id="patch-gallery-image-open", size="sm")
                bands = ("equal shares of the images it fires on, highest first, a random sample of each"
                         if ex.bundle.has("band_counts") else  # a bundle of before 2026-12-04 (said so since 12-05)
                         "runs of the histogram's bins (a bundle of before 2026-12-04: rebuild its scan for equal "
                         "shares), highest first, a sample of each")
                band_gallery = gr.Gallery(label=f"activation bands: {bands} (yellow box = best patch)", columns=1,
                                          height="auto",
                                          object_fit="contain", elem_id="band-gallery")
                with gr.Row():
                    hist_plot = gr.Plot(label="activation histogram (the images where it fires)", elem_id="hist-plot",
                                        min_width=PLOT_MIN_WIDTH)
                    related_df = gr.Dataframe(headers=ex.related_columns, interactive=False, min_width=PLOT_MIN_WIDTH,
                                              label="parent, children and nearest neurons (click to open)")
            # ---------------------------------------------------------------- Images
            with gr.Tab("Images", id="images"):
                gr.Markdown("Find the dataset's images nearest a text, an uploaded image or one of its own images "
                            "(cosine in the MS embedder's space, through the bundle's FAISS index); click one to "
                            "see the neurons whose top-16 galleries hold it."
                            if image_search is not None else
                            "Image search is off: this bundle has no image index (images/index.faiss) or no "
                            "embedder in its manifest; rebuild it with `python -m precompute atlas`.")
                with gr.Row():
                    img_query = as_sent(gr.Textbox(label="search images by text (CLIP text tower + FAISS)",
                                                   placeholder="a red star", max_length=inputs.MAX_QUERY_CHARS,
                                                   elem_id="image-query"))
                    img_text_button = gr.Button("Search by text", elem_id="image-text-search")
                with gr.Row():
                    img_upload = gr.File(file_types=["image"], type="filepath", label="or by an uploaded image",
                                         height=120, elem_id="image-upload")
                    img_upload_button = gr.Button("Search by upload")
                img_note = gr.Markdown(elem_id="image-note")
                # the text whose results the gallery shows ("" for an upload's or an image's), which the text
                # box stops being once edited: a picked result's address names this one
                img_searched = gr.Textbox(visible="hidden", label="searched text", elem_id="image-searched")
                img_results = gr.Gallery(label="nearest images, best first (click one: the neurons that show it)",
                                         columns=8, fit_columns=False, height="auto", object_fit="contain",
                                         elem_id="image-results")
                with gr.Row():
                    img_id = as_sent(gr.Number(value=0, precision=0, minimum=0, maximum=ex.n_images - 1,
                                       label=f"image id (0 to {ex.n_images - 1})", elem_id="image-id"))
                    img_open = gr.Button("Neurons that show it", elem_id="image-open")
                    img_like = gr.Button("Images like this one", elem_id="image-like")
                    img_steer = gr.Button("Steer with this image", elem_id="image-steer", visible=steer is not None)
                img_neurons_note = gr.Markdown(elem_id="image-neurons-note")
                with gr.Row(visible=False) as img_row:  # shown with its first image: no empty boxes before
                    img_picture = gr.Image(type="filepath", interactive=False, label="the image", height=260,
                                           elem_id="image-picture", alt_text="the dataset image opened")
                    img_neurons = gr.Dataframe(headers=IMAGE_NEURON_COLUMNS, interactive=False, scale=2,
                                               label="neurons whose top-16 galleries hold it (click a row to open it)",
                                               elem_id="image-neurons")
            # ---------------------------------------------------------------- Hierarchy
            with gr.Tab("Hierarchy", id="hierarchy"):
                has_tree = len(ex.levels) > 1  # one level (an SAE that is not Matryoshka): no tree, no empty boxes
                with gr.Row(visible=has_tree):
                    tree_kind = gr.Radio(["sunburst", "treemap"], value="sunburst", label="drawing")
                    tree_root = as_sent(gr.Number(value=-1, precision=0, label="subtree of latent (-1: from the roots)",
                                                  elem_id="tree-root"))
                    tree_button = gr.Button("Draw")
                tree_note = gr.Markdown(elem_id="tree-note")
                tree_plot = gr.Plot(label="Matryoshka tree (click a node to open its neuron)", elem_id="tree-plot",
                                    visible=has_tree)
                depth_df = gr.Dataframe(headers=["level", "neurons", "taxonomy depth"], interactive=False,
                                        label="taxonomy depth per Matryoshka level")
            # ---------------------------------------------------------------- Steer
            with gr.Tab("Steer", id="steer") as steer_tab:
                steer_parts = (SteerTab(ex, steer) if steer is not None
                               else gr.Markdown(ex.steer_off_reason() or "Steering is off."))

        # ============================================================== events
        @functools.lru_cache(maxsize=1)
        def overview():
            cols = ex.columns
            raw = np.asarray(ex.bundle.array("raw/ms")) if ex.bundle.has("raw/ms") else None
            facts = "\n".join(f"- **{k}**: {markdown_code(v)}" for k, v in ex.facts().items() if v is not None)
            # the histogram's numbers as text: to a screen reader the plot is an image (until 2026-12-06, nothing)
            summary = figures.ms_summary(cols["ms"], raw, cols.get("patch_ms"))
            return ("### Bundle\n" + facts + (f"\n\n{summary}" if summary else ""), ex.metrics_rows(),
                    figures.ms_histogram(cols["ms"], raw, cols.get("patch_ms")), figures.ms_frequency_scatter(cols))

        demo.load(overview, outputs=[facts_md, metrics_df, ms_hist_plot, scatter_plot], api_name="overview")

        def shown(value, wrap=lambda v: v):
            """An update showing `value` (a table dict or a figure), or hiding the component when it is None."""
            return gr.update(visible=False) if value is None else gr.update(value=wrap(value), visible=True)

        def probes_overview():
            """The probe results: OOD note, ROC figure and table; ontology and linear-probe notes and tables."""
            note, fig, table = ex.probes.ood()
            onto_note, onto = ex.probes.ontology()
            pr_note, pr = ex.probes.probes()
            return (note, shown(fig, plotly_json), shown(table), onto_note, shown(onto), pr_note, shown(pr))

        demo.load(probes_overview, outputs=[ood_note, roc_plot, ood_df, onto_note, onto_df, probes_note, probes_df],
                  api_name="probes_overview")

        def crossmodal_overview():
            """Cross-modal bundles: the summary, the counts per concept and the table of cross-modal latents."""
            cm = ex.probes.crossmodal()
            if cm is None:
                return "This bundle is not a cross-modal bundle (`precompute crossmodal` writes those).", shown(None), shown(None)
            note, counts, table = cm
            return note, shown(counts), shown(table)

        demo.load(crossmodal_overview, outputs=[cm_note, cm_counts, cm_table], api_name="crossmodal_overview")
        demo.load(None, js=HOOK_PLOTLY_JS)

        @user_errors
        def neuron_table(min_ms, min_support, level, label_contains, sort_by, descending, limit):
            return ex.table(min_ms, min_support, level, label_contains, sort_by, descending, limit)

        filters = [f_min_ms, f_min_support, f_level, f_label, f_sort, f_desc, f_limit]
        # a filter's address holds the fields that differ from the page's defaults (a copied link gave the
        # unfiltered table): the URL keys, in the order of `filters`, and their defaults
        filter_keys = ("min_ms", "min_support", "level", "label", "sort", "desc", "rows")
        filter_defaults = tuple(c.value for c in filters)

        def filter_address(*values):
            values = [(0.0 if v in (None, "") else float(v)) if k == "min_ms" else v for k, v in zip(filter_keys, values)]
            return inputs.encode_state({"tab": "neurons", **{k: v for k, v, d in zip(filter_keys, values, filter_defaults)
                                                              if v != d and not (isinstance(v, str) and v.strip() == d)}})

        @user_errors
        def check_filter(*values):
            ex.table(*values)  # a few ms, even at 65,536 neurons

        # Enter in a filter box filters, as in the search boxes; `filtered`: the filter's table is shown
        filtered = [checked_first(trigger, check_filter, filters, neuron_table, table, "neuron_table" if i == 0 else False)
                    for i, trigger in enumerate([f_button.click, f_min_support.submit, f_label.submit, f_limit.submit])]
        for event in filtered:
            event.success(filter_address, filters, url_box, api_name=False, queue=False)

        @user_errors
        def neuron_table_csv(min_ms, min_support, level, label_contains, sort_by, descending):
            """Every neuron the filter keeps, as a CSV file (the table shows at most its row limit)."""
            return ex.table_csv(min_ms, min_support, level, label_contains, sort_by, descending)

        # shown in a second step so that the API's /neuron_table_csv stays a plain file
        checked_first(csv_button.click, check_filter, filters[:-1], neuron_table_csv, csv_file, "neuron_table_csv"
                      ).success(lambda: gr.File(visible=True), None, csv_file, api_name=False, queue=False)

        def checked_query(query) -> str:
            if searcher is None:
                raise UserError("text search is off for this bundle: it has no image embeddings or no embedder; "
                                "rebuild it with `python -m precompute atlas`.")
            return inputs.text(query, "query", inputs.MAX_QUERY_CHARS)

        @user_errors
        def search_neurons_by_text(query):
            """Neurons whose top images match a text (CLIP text tower, FAISS over neuron directions)."""
            q = checked_query(query)
            if not searcher.ready:
                gr.Info(TEXT_TOWER_LOADING)
            ids, sims = searcher.by_text(q)
            table = ex.table(ids=ids, limit=MAX_TABLE_ROWS).set_index("neuron").loc[ids].reset_index()
            table.insert(1, "match", sims)
            return table, (f"{len(ids)} neurons, best match first (cosine between the query's text embedding and "
                           "the mean embedding of each neuron's top 16 images).")

        @user_errors
        def check_neuron_query(query):
            checked_query(query)

        searched_text = [checked_first(trigger, check_neuron_query, text_query, search_neurons_by_text, [table, search_note],
                                       api_name)
                         for trigger, api_name in ((text_button.click, "search_neurons_by_text"),
                                                   (text_query.submit, False))]
        for event in searched_text:
            event.success(lambda q: inputs.encode_state({"tab": "neurons", "search": str(q or "").strip()}), text_query,
                          url_box, api_name=False, queue=False)

        def need_image_model():
            if steer is None:  # the server makes none only for a bundle whose SAE reads the language model
                raise UserError("search by image is off for this bundle: its SAE reads the language model, while the "
                                "search codes an image at the vision layer; use a bundle of a vision layer for it.")

        @user_errors
        def check_search_image(path):
            need_image_model()
            load_upload(path, steer.limits)

        @user_errors
        def search_neurons_by_image(path):
            need_image_model()
            found = steer.fire_on_upload(path)
            return found["table"], found["picture"], found["note"]

        searched_image = checked_first(image_button.click, check_search_image, search_image, search_neurons_by_image,
                                       [table, search_where, search_note], "search_neurons_by_image", **MODEL_QUEUE)
        searched_image.success(lambda: (gr.Image(visible=True), "tab=neurons"), None, [search_where, url_box],
                               api_name=False, queue=False)  # an upload has no address

        def neurons_restore(request: gr.Request):
            """The table on page load: ?tab=neurons&search=Q's text search, or the link's filter fields (each
            checked alone: a bad one is warned about and left at its default), else the default filter. The search
            box is written only with the link's search: "" replaced a search typed before this answer came, which
            Enter then sent empty."""
            state = link_state(request)
            values, query = list(filter_defaults), gr.update()
            if state.get("tab") == "neurons" and state.get("search"):
                try:
                    found, note = search_neurons_by_text(state["search"])
                    return (*values, state["search"], found, note)
                except gr.Error as e:
                    gr.Warning(f"the link's search could not be restored: {e.message}")
            elif state.get("tab") == "neurons":
                def fraction(v):
                    try:
                        f = float(v)
                    except ValueError:
                        f = math.nan
                    if not (math.isfinite(f) and 0 <= f <= 1):
                        raise UserError(f"the minimum MS {inputs.shown(v)} is not a number between 0 and 1")
                    return f

                def one_of(options, what):
                    def check(v):
                        if v not in options:
                            raise UserError(f"{what} {inputs.shown(v)} is not one of {', '.join(options)}")
                        return v
                    return check

                checks = (fraction, lambda v: inputs.integer(v, "minimum support", 0, ex.n_images),
                          one_of(level_choices, "the level"),
                          lambda v: inputs.text(v, "label filter", inputs.MAX_QUERY_CHARS),
                          one_of(list(ex.table_sorts), "the sort column"),
                          lambda v: inputs.link_flag(v, "descending"),
                          lambda v: inputs.integer(v, "row limit", 1, MAX_TABLE_ROWS))
                for i, (key, check) in enumerate(zip(filter_keys, checks)):
                    if key in state:
                        try:
                            values[i] = check(state[key])
                        except UserError as e:
                            gr.Warning(toast_text(link_field_lost(str(e))))
            return (*values, query, neuron_table(*values), "")

        on_link(demo, lambda state: state.get("tab") == "neurons").success(
            neurons_restore, None, filters + [text_query, table, search_note], api_name=False)

        def neurons_default(request: gr.Request):
            """The default filter's table on any other page load (one step: no box of the filter is written)."""
            if link_state(request).get("tab") == "neurons":
                return gr.update(), gr.update()
            return neuron_table(*filter_defaults), ""

        demo.load(neurons_default, None, [table, search_note], api_name=False)
        # what explains one table goes when another is shown (after its check: a refused input changes nothing):
        # the upload's picture, a search's note, and the filter's CSV, which is of the filter it was made with (its
        # button exported the filter while a search's rows were shown under it)
        for event in (*filtered, *searched_text):
            event.success(lambda: gr.Image(visible=False), None, search_where, api_name=False, queue=False)
        for event in filtered:
            event.success(lambda: "", None, search_note, api_name=False, queue=False)
        for event in (*filtered, *searched_text, searched_image):
            event.success(lambda: gr.File(visible=False), None, csv_file, api_name=False, queue=False)

        # --- opening a neuron (from the box, a click on a plot, a table row, the URL)
        def page_outputs(k):
            k = ex.check_neuron(k)
            page = ex.bundle.neuron(k)
            hist = figures.activation_histogram(*page["hist"], k, ex.score_name, page["patch_hist"])
            return (k, ex.neuron_summary(k, page), ex.gallery(k, page), ex.gallery(k, page, by_patch=True),
                    ex.band_gallery(k, page), plotly_json(hist), ex.related(k, page),
                    inputs.encode_state({"tab": "neuron", "neuron": k}), gr.Tabs(selected="neuron"))

        page_targets = [neuron_in, header_md, top_gallery, patch_gallery, band_gallery, hist_plot, related_df, url_box, tabs]

        @user_errors
        def neuron_page(neuron):
            """One neuron's page: summary, top-16 gallery with heatmaps, bands, histogram, relatives."""
            return page_outputs(neuron)

        @user_errors
        def check_neuron(neuron):
            ex.check_neuron(neuron)

        for trigger, api_name in ((open_button.click, "neuron_page"), (neuron_in.submit, False)):
            checked_first(trigger, check_neuron, neuron_in, neuron_page, page_targets, api_name)

        @user_errors
        def first_visit(neuron, header):
            """The Neuron tab opened before any neuron: show the one in the box (the default neuron). The box
            is no output: it holds that neuron already, or what was typed since (see `initial`)."""
            return page_outputs(neuron)[1:] if not header else (gr.update(),) * (len(page_targets) - 1)

        neuron_tab.select(first_visit, [neuron_in, header_md], page_targets[1:], api_name=False)
        # every way of opening a page sets the box and the header together; a new header is a new page
        header_md.change(lambda k: k, neuron_in, shown_neuron, api_name=False, queue=False)

        @user_errors
        def open_neuron_from_click(token):
            return page_outputs(str(token or "").split(":")[0])

        open_button_hidden.click(open_neuron_from_click, open_box, page_targets, api_name="open_neuron_from_plot",
                                 js="(x) => (window.__saeOpenNeuron !== undefined ? window.__saeOpenNeuron : x)")

        @user_errors
        def open_neuron_from_table(evt: Click):
            return page_outputs(clicked_neuron(evt, TABLE_COLUMNS))

        @user_errors
        def open_neuron_from_relatives(evt: Click):
            return page_outputs(clicked_neuron(evt, ex.related_columns))

        table.select(open_neuron_from_table, None, page_targets, api_name="open_neuron_from_table")

        @user_errors
        def open_neuron_from_crossmodal(evt: Click):
            return page_outputs(clicked_neuron(evt, CROSSMODAL_COLUMNS))

        cm_table.select(open_neuron_from_crossmodal, None, page_targets, api_name="open_neuron_from_crossmodal")
        related_df.select(open_neuron_from_relatives, None, page_targets, api_name="open_neuron_from_relatives")

        @user_errors
        def neuron_json(neuron: int) -> dict:
            """A neuron as JSON: everything its page shows, as numbers and image ids."""
            return ex.neuron_record(neuron)

        gr.api(neuron_json, api_name="neuron_json")

        @user_errors
        def neuron_export(neuron):
            return ex.export_json(neuron)

        # shown in a second step so that the API's /neuron_export stays a plain file
        export_button.click(neuron_export, shown_neuron, export_file, api_name="neuron_export").success(
            lambda: gr.File(visible=True), None, export_file, api_name=False, queue=False)
        # the file shown is of the neuron it was exported from: another neuron hides it
        shown_neuron.change(lambda: gr.File(visible=False), None, export_file, api_name=False, queue=False)

        # --- the Images page
        def need_image_search():
            if image_search is None:
                raise UserError("image search is off for this bundle: it has no image index or no embedder; "
                                "rebuild it with `python -m precompute atlas`.")

        def image_results(ids, scores, what):
            """The gallery, the ids behind it and the note for a search's results."""
            tiles = [ex.search_tile(i) for i in ids]
            items = [(t or ex.missing_tile(), f"#{i}  cos {s:.3f}") for t, i, s in zip(tiles, ids, scores)]
            how = "exact search" if image_search.kind == "flat" else "IVF-PQ, re-ranked exactly"
            note = (f"The {len(ids)} images of {ex.n_images:,} nearest {what} ({how}; cosine {scores[0]:.3f} to "
                    f"{scores[-1]:.3f})." if ids else f"No image is near {what}.")
            if None in tiles:
                why = ex.dataset_error[0].lower() + ex.dataset_error[1:]
                note += (f" {tiles.count(None)} of them cannot be shown here: the bundle carries pictures of its "
                         f"gallery images only, and {markdown_sentence(why)}")
            return items, note

        img_search_out = [img_results, img_note, img_searched, url_box]

        @user_errors
        def search_images_by_text(query):
            """The dataset images nearest a text (the embedder's text tower against the image index)."""
            need_image_search()
            q = inputs.text(query, "query", inputs.MAX_QUERY_CHARS)
            if not image_search.embedder.text_loaded:
                gr.Info(TEXT_TOWER_LOADING)
            ids, scores = image_search.by_text(q)
            return (*image_results(ids, scores, f'"{markdown_text(q)}"'), q,
                    inputs.encode_state({"tab": "images", "query": q}))

        def image_search_event(trigger, check, search, box, api_name, by_text=False):
            """A search's event: `check` (no outputs, so a refused input is one message, and the previous
            results, the text box and the rest keep their place rather than each showing an "Error" badge),
            then `search`, then a grid with nothing picked (Gradio kept the previous results' enlarged
            preview open on the new ones, enlarging an image nobody clicked), and the text box emptied
            unless the text was the query."""
            event = checked_first(trigger, check, box, search, img_search_out, api_name)
            grid = lambda: gr.Gallery(selected_index=None)  # noqa: E731
            event.success(grid if by_text else lambda: (grid(), ""), None, img_results if by_text else
                          [img_results, img_query], api_name=False, queue=False)
            return event

        def then_hide_image_row(event):
            """A new search by text or upload: the picked image and its neurons go with the results they were
            picked from (the address, which names the search only, would open without them)."""
            event.success(lambda: (gr.Row(visible=False), ""), None, [img_row, img_neurons_note], api_name=False,
                          queue=False)

        @user_errors
        def check_query(query):
            need_image_search()
            inputs.text(query, "query", inputs.MAX_QUERY_CHARS)

        for trigger, api_name in ((img_text_button.click, "search_images_by_text"), (img_query.submit, False)):
            then_hide_image_row(image_search_event(trigger, check_query, search_images_by_text, img_query, api_name,
                                                   by_text=True))

        @user_errors
        def search_images_by_image(path):
            """The dataset images nearest an uploaded image (the embedder's image tower against the index)."""
            need_image_search()
            ids, scores = image_search.by_upload(path)
            return (*image_results(ids, scores, "the uploaded image"), "", inputs.encode_state({"tab": "images"}))

        @user_errors
        def check_upload(path):
            need_image_search()
            load_upload(path, image_search.limits)

        then_hide_image_row(image_search_event(img_upload_button.click, check_upload, search_images_by_image,
                                               img_upload, "search_images_by_image"))

        @user_errors
        def image_neurons(image, query=""):
            """A dataset image, and the neurons whose top galleries hold it (best rank first)."""
            i = ex.check_image(image)
            q = inputs.text(query, "query", inputs.MAX_QUERY_CHARS)
            table, n, rows = ex.image_neurons(i)
            cut = f" (the {len(table)} best ranks of {rows} shown)" if rows > len(table) else ""
            note = (f"Image #{i} is in the top galleries of {n:,} neuron{'s' if n != 1 else ''}{cut}." if n else
                    f"Image #{i} is in no neuron's top gallery (each keeps its {ex.full_gallery} best images of "
                    f"{ex.n_images:,})" + ("; *Steer with this image* lists the latents that fire on it."
                                           if steer and not ex.dataset_error else "."))
            picture = ex.search_tile(i)
            if picture is None:
                note += f" It cannot be shown here: {markdown_sentence(ex.dataset_error)}"
            return i, picture, table, note, inputs.encode_state({"tab": "images", "query": q, "image": i})

        img_neuron_out = [img_id, img_picture, img_neurons, img_neurons_note, url_box]

        def then_show_image_row(event):
            event.success(lambda: gr.Row(visible=True), None, img_row, api_name=False, queue=False)

        @user_errors
        def check_image(image, query=""):
            ex.check_image(image)
            inputs.text(query, "query", inputs.MAX_QUERY_CHARS)

        # the check first, with no outputs: a bad id typed in the box is one message, and the image shown,
        # its neurons and the box keep their place rather than each showing an "Error" badge (the API's
        # /image_neurons refuses it with the same sentence, from image_neurons itself)
        for trigger, api_name in ((img_open.click, "image_neurons"), (img_id.submit, False)):
            then_show_image_row(checked_first(trigger, check_image, [img_id, img_searched], image_neurons,
                                              img_neuron_out, api_name))

        def pick_image(evt: gr.SelectData):
            """The id of a clicked result, from its caption ("#12  cos 0.412"). Read from the caption, not
            kept in a gr.State: any State makes Gradio hold a heartbeat connection open for every tab."""
            caption = str(evt.value.get("caption") or "") if isinstance(evt.value, dict) else ""
            if not caption.startswith("#"):  # not gr.update(): see `initial`
                raise gr.Error("the clicked result carries no image id; type the id in the box instead.",
                               print_exception=False)
            return int(caption.split()[0][1:])

        then_show_image_row(img_results.select(pick_image, None, img_id, api_name=False, queue=False).success(
            image_neurons, [img_id, img_searched], img_neuron_out, api_name=False))

        @user_errors
        def search_images_like(image):
            """The dataset images nearest one of them (its stored embedding against the index), itself left out."""
            need_image_search()
            i = ex.check_image(image)
            ids, scores = image_search.like(i)
            return (*image_results(ids, scores, f"image #{i}"), "", inputs.encode_state({"tab": "images", "image": i}))

        # the image the results are like is shown with its neurons, as its address (?tab=images&image=I) opens
        @user_errors
        def check_like(image):
            need_image_search()
            ex.check_image(image)

        then_show_image_row(image_search_event(img_like.click, check_like, search_images_like, img_id,
                                               "search_images_like")
                            .success(image_neurons, [img_id, img_searched], img_neuron_out, api_name=False))

        @user_errors
        def open_neuron_from_image(evt: Click):
            return page_outputs(clicked_neuron(evt, IMAGE_NEURON_COLUMNS))

        img_neurons.select(open_neuron_from_image, None, page_targets, api_name="open_neuron_from_image")

        def images_restore_from_url(request: gr.Request):
            """?tab=images&query=Q&image=I: the text search of Q, or else the images like I; I's neurons."""
            state = link_state(request)
            found, shown = (gr.update(),) * 4, (initial(img_id),) + (gr.update(),) * 4
            image, query = state.get("image"), state.get("query")
            # the image and the search are restored apart, a bad field losing only itself, and each field
            # warned about once (a bad image warned as the like-search's and as the image's)
            image_ok = image not in (None, "")
            if image_ok:
                try:
                    shown = (*image_neurons(image, "")[:4], gr.Row(visible=True))
                except gr.Error as e:
                    gr.Warning(f"the link's image could not be shown: {e.message}")
                    image_ok = False
            try:
                if image_search is not None and query:
                    found = search_images_by_text(query)[:3]
                elif image_search is not None and image_ok:
                    found = search_images_like(image)[:3]
                # else nothing to search, or no index: an image's neurons need none
            except gr.Error as e:
                gr.Warning(f"the link's image search could not be restored: {e.message}")
            else:
                found = (*found[:3], found[2])  # the text box holds the searched text too
            return (*found, *shown)

        on_link(demo, lambda state: state.get("tab") == "images").success(
            images_restore_from_url, None, img_search_out[:-1] + [img_query] + img_neuron_out[:-1] + [img_row],
            api_name=False)

        def gallery_picker(which):
            """A click on an image of the Neuron page's top gallery ("top") or patch gallery ("patch_top"): its
            button under that gallery, the other gallery's hidden (one image picked at a time)."""
            def pick_gallery_image(neuron, evt: gr.SelectData):
                shown = ex.bundle.neuron(ex.check_neuron(neuron))[which] or []
                if not 0 <= evt.index < len(shown):  # not gr.update() for the id box: see `initial`
                    raise gr.Error("that image is no longer shown; click one of the gallery's images again.",
                                   print_exception=False)
                i = int(shown[evt.index][0])
                picked = gr.Button(value=f"Image #{i}: all the neurons that show it (Images page)", visible=True)
                hidden = gr.Button(visible=False)
                return (i, picked, hidden) if which == "top" else (i, hidden, picked)
            return pick_gallery_image

        image_buttons = [gallery_image_button, patch_image_button]
        for gallery, which in ((top_gallery, "top"), (patch_gallery, "patch_top")):
            gallery.select(gallery_picker(which), shown_neuron, [img_id, *image_buttons], api_name=False, queue=False)
        shown_neuron.change(lambda: (gr.Button(visible=False),) * 2, None, image_buttons, api_name=False, queue=False)
        # and its galleries are grids with nothing enlarged: Gradio kept the last neuron's enlarged index, which
        # enlarged an image of the new neuron nobody clicked, without the button above to open it
        shown_neuron.change(lambda: (gr.Gallery(selected_index=None),) * 3, None,
                            [top_gallery, patch_gallery, band_gallery], api_name=False, queue=False)

        @user_errors
        def open_image_from_gallery(image):
            return (*image_neurons(image), gr.Tabs(selected="images"))

        for button in image_buttons:
            then_show_image_row(button.click(open_image_from_gallery, img_id, img_neuron_out + [tabs], api_name=False))

        @functools.lru_cache(maxsize=8)
        def hierarchy_cached(kind, root):
            h = ex.bundle.hierarchy() if ex.bundle.has("hierarchy.json") else {}
            nodes = h.get("nodes", [])
            if not nodes:
                return None, [], "This bundle has no Matryoshka tree (hierarchy.json)."
            depth = h.get("depth_per_level") or []
            counts = {}
            for node in nodes:
                counts[int(node["level"])] = counts.get(int(node["level"]), 0) + 1
            rows = [[lv, counts.get(lv, 0), None if i >= len(depth) or depth[i] is None else round(float(depth[i]), 3)]
                    for i, lv in enumerate(sorted(counts))]
            depth_note = ("Taxonomy depth: the mean depth in the dataset's taxonomy of the concept each level's neurons "
                          "pick out (deeper = finer)." if any(r[2] is not None for r in rows) else
                          "No taxonomy depth: the dataset has no taxonomy (the world's, or iNaturalist-style class "
                          "folders).")
            if not has_tree:  # drawn, its latents would be one ring of unrelated wedges
                arch = ex.bundle.manifest["sae"].get("architecture")
                return None, rows, (f"This SAE ({arch}) has one level, so there is no tree to draw: a Matryoshka SAE "
                                    "nests its latents in levels and links each latent to a parent in the level "
                                    f"before. {depth_note}")
            patch_ms = ex.columns.get("patch_ms")
            tree = figures.hierarchy_figure(nodes, "treemap" if kind == "treemap" else "sunburst", patch_ms,
                                            root=None if root < 0 else root, patch_labels=ex.columns.get("patch_label"))
            scores = f"its {ex.score_name}" + (" or the max over patches" if patch_ms is not None else "")
            by_patches = (f"; {tree.by_patches} that fire on fewer than 2 images by their {ex.score_name} are "
                          "coloured by their MS by the max over patches" if tree.by_patches else "")
            if root >= 0:
                chain = " > ".join(f"#{a}" for a in tree.ancestors)
                where = f"The subtree of latent {root} ({f'its ancestors: {chain}' if chain else 'a root'}): "
            elif tree.roots < tree.roots_total:
                where = (f"The {tree.roots} of {tree.roots_total:,} roots with the most descendants, and theirs "
                         "(give a latent above to draw any other subtree): ")
            else:
                where = ""
            note = (f"{where}{counted(tree.nodes, 'node')} in {tree.levels} of {counted(len(counts), 'level')} drawn; "
                    f"colour is MS by the "
                    f"{ex.score_name}{by_patches}; dark grey ({tree.uncoloured}): none, the neuron fires on "
                    f"fewer than 2 images by {scores}. {depth_note}")
            return tree.figure, rows, note

        def checked_root(root) -> int:
            return -1 if root in (None, "") else inputs.integer(root, "subtree's latent (-1: from the roots)", -1,
                                                                 ex.n_neurons - 1)

        @user_errors
        def check_tree(kind, root):
            checked_root(root)

        @user_errors
        def hierarchy(kind, root=-1):
            return hierarchy_cached("treemap" if kind == "treemap" else "sunburst", checked_root(root))

        def tree_address(kind, root):
            """The drawing's address (a copied link reopened the whole sunburst): its subtree and kind."""
            root = None if root in (None, "") or int(float(root)) < 0 else int(float(root))  # checked by `hierarchy`
            return inputs.encode_state({"tab": "hierarchy", "root": root,
                                        "kind": "treemap" if kind == "treemap" else None})

        tree_inputs, tree_outputs = [tree_kind, tree_root], [tree_plot, depth_df, tree_note]
        for trigger, api_name in ((tree_button.click, "hierarchy"), (tree_kind.input, False), (tree_root.submit, False)):
            checked_first(trigger, check_tree, tree_inputs, hierarchy, tree_outputs, api_name).success(
                tree_address, tree_inputs, url_box, api_name=False, queue=False)

        def hierarchy_restore(request: gr.Request):
            """The drawing on page load: ?tab=hierarchy&root=R&kind=treemap's, else the whole sunburst."""
            state = link_state(request)
            kind, root = "sunburst", initial(tree_root)
            if state.get("tab") == "hierarchy":
                if state.get("kind") in ("sunburst", "treemap"):
                    kind = state["kind"]
                elif state.get("kind") not in (None, ""):  # ?kind=pie drew the sunburst without a word until 2026-12-05
                    gr.Warning(toast_text(link_field_lost(f"the drawing {inputs.shown(state['kind'])} is not one of "
                                                          "sunburst, treemap")))
                try:
                    r = state.get("root")
                    r = -1 if r in (None, "") else inputs.integer(r, "subtree's latent", -1, ex.n_neurons - 1)
                    return (kind, r, *hierarchy(kind, r))
                except (UserError, gr.Error) as e:
                    said = e.message if isinstance(e, gr.Error) else toast_text(str(e))  # a gr.Error's is escaped
                    gr.Warning(f"the link's subtree could not be drawn: {said}")
            return (kind, root, *hierarchy(kind, root))

        on_link(demo, lambda state: state.get("tab") == "hierarchy").success(
            hierarchy_restore, None, [tree_kind, tree_root] + tree_outputs, api_name=False)

        def hierarchy_default(request: gr.Request):
            """The whole sunburst on any other page load (one step: the subtree box is not written)."""
            if link_state(request).get("tab") == "hierarchy":
                return (gr.update(),) * len(tree_outputs)
            return hierarchy("sunburst", -1)

        demo.load(hierarchy_default, None, tree_outputs, api_name=False)

        url_box.change(None, url_box, None, js=SET_URL_JS)
        # a tab picked by hand: its address (TAB_ADDRESS_JS) into the url box, in the browser only
        tab_url_button.click(None, url_box, url_box, js="(q) => (window.__saeTabUrl !== undefined ? window.__saeTabUrl : q)")
        demo.load(None, js=TAB_ADDRESS_JS)
        demo.load(None, js=HISTORY_JS)
        demo.load(None, js=FOCUS_JS)
        demo.load(None, js=GALLERY_KEYS_JS)

        if isinstance(steer_parts, SteerTab):
            steer_parts.wire(demo, tabs, steer_tab, url_box, shown_neuron, steer_with_button, img_id, img_steer)

        # --- restore from the URL query on load: a neuron link's page behind `on_link`, and any other link's tab
        def neuron_link(state):
            return state.get("tab") == "neuron" or "neuron" in state

        def link_tab(request: gr.Request):
            """The link's tab, but for the tabs whose restores select them with what they restore: selected
            first, the Neuron and Steer tabs would show the box's neuron or image (their first visit) over the
            link's, when that answer came last."""
            state = link_state(request)
            tab = state.get("tab")
            given = request.query_params.get("tab") if request else None
            if given not in (None, "") and tab is None:  # dropped by decode_state: ?tab=bogus opened the Overview silently
                gr.Warning(toast_text(link_field_lost(f"the tab {inputs.shown(given)} is not one of "
                                                      f"{', '.join(inputs.TABS)}")))
            restored = neuron_link(state) or (tab == "steer" and isinstance(steer_parts, SteerTab))
            return gr.Tabs(selected=tab) if tab and not restored else gr.update()

        demo.load(link_tab, None, tabs, api_name=False, show_progress="hidden")  # queued: see `on_link`

        def restore(request: gr.Request):
            """A neuron link's page (?tab=neuron&neuron=K; the API's /restore_from_url answers any address)."""
            state = link_state(request)
            tab = state.get("tab")
            if neuron_link(state):
                try:
                    page = page_outputs(state.get("neuron", ex.default_neuron))
                except UserError as e:
                    gr.Warning(toast_text(f"the link's neuron could not be opened: {e}"))
                else:
                    # a link naming another tab opens that tab (?neuron=5&tab=overview opened the Neuron tab),
                    # with the neuron's page behind the Neuron tab and the address left as the link's
                    # (TAB_ADDRESS_JS gives the Neuron tab the neuron's address)
                    return page if tab in (None, "neuron") else (*page[:-2], gr.update(), gr.Tabs(selected=tab))
            return ((initial(neuron_in),) + (gr.update(),) * (len(page_targets) - 2)
                    + (gr.Tabs(selected=state["tab"]) if state.get("tab") else gr.update(),))

        on_link(demo, neuron_link).success(
            restore, None, page_targets, api_name="restore_from_url")
    if searcher is not None:
        warm_when_served(demo, searcher)
    return demo


TEXT_TOWER_LOADING = ("Loading the text encoder for the first search by text: a few seconds, once (it loads in "
                      "the background after the start, and this search came first).")
"""Said while a search waits for the text tower, the wait otherwise being a bare spinner."""

WARM_WAIT_S = 600.0
"""How long the warm-up waits for the server to start before giving up (a demo built and never launched)."""


def warm_when_served(demo: gr.Blocks, searcher, wait_s: float = WARM_WAIT_S) -> threading.Thread:
    """Load the text tower in the background once `demo` serves, so that the first search by text is as fast
    as the next (it waited 5 to 11 s for the load). It starts after the server does, which therefore starts
    no later than before; a search sent meanwhile waits on the embedder's lock for the same load, not for a
    second one, and any other model load waits on sae_core's MODEL_LOADING. A failure is left to that
    search, which says it in its one sentence."""
    def run():
        deadline = time.monotonic() + wait_s
        while not getattr(demo, "is_running", False):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        try:
            searcher.warm()
        except Exception:  # noqa: BLE001 - the first search meets it again and says it
            pass

    thread = threading.Thread(target=run, name="sae-warm-text-tower", daemon=True)
    thread.start()
    return thread
