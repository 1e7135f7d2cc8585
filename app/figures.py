"""Plotly figures of the explorer. Points carry the neuron id as `customdata` so a click can open it."""
from __future__ import annotations

import html
import math
from typing import NamedTuple

import numpy as np

from .markdown import readable

SVG_POINTS = 5_000
"""Up to this many points the scatter is SVG (each point clickable as an element); WebGL above."""
MAX_SCATTER_POINTS = 20_000
"""Above this many neurons the scatter shows a deterministic sample (the browser stays responsive)."""
MAX_TREE_NODES = 3_000
"""The hierarchy figure keeps the levels that fit in this many nodes (whole levels, from the root)."""
MAX_LABELLED_NODES = 600
"""A tree of more nodes draws no labels inside its wedges (hover still names each): plotly measures every label
to fit it, which froze the page 2.4-4.5 s for a tree of 1,949 nodes (0.5 s without them), and such slivers are
unreadable anyway."""
MAX_TREE_ROOTS = 48
"""More roots than this draw a disc of slivers (K 65,536 has 4,096 level-0 latents): the figure then
keeps the roots with the most descendants, and any other latent's subtree is drawn on request."""


class TreeFigure(NamedTuple):
    """What `hierarchy_figure` drew."""

    figure: object
    """The plotly figure."""
    levels: int
    """Matryoshka levels drawn (from the root; deeper ones are cut when they do not fit)."""
    nodes: int
    """Nodes drawn."""
    by_patches: int
    """Nodes coloured by their MS by the max over patches (no MS by the image score)."""
    uncoloured: int
    """Nodes with no MS at all (drawn dark grey)."""
    roots: int
    """Roots drawn (1 for a subtree)."""
    roots_total: int
    """Roots of the whole tree (latents with no parent in it)."""
    ancestors: list[int]
    """For a subtree: its root's ancestors, the tree's root first (empty otherwise)."""


HOVER_LABEL = {"bgcolor": "white", "bordercolor": "#888", "font": {"color": "#222"}}
"""Every figure's hover box: plotly's own takes the trace's colour, and its white or #444 text on the mid
colours (#636efa, #ab63fa, Viridis greens) was 2.7-4.1:1, below WCAG's 4.5:1 (a reviewer's measurement)."""


def _layout(fig, title: str, height: int = 360):
    fig.update_layout(title=title, height=height, margin=dict(l=50, r=20, t=50, b=45), template="plotly_white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
                      hoverlabel=HOVER_LABEL)
    return fig


def readable_text_colours(values, colorscale: str = "Viridis", cmin: float = 0.0, cmax: float = 1.0) -> list[str]:
    """Black or white, whichever contrasts more (WCAG 2 relative luminance) with each value's colour on the
    colour scale; white where a value is NaN (plotly fills that cell #444). Plotly's own choice put white on
    the mid greens, 2.9:1 (211 of the demo tree's 256 labels were below 4.5:1)."""
    from plotly.colors import sample_colorscale, unlabel_rgb

    def luminance(rgb) -> float:
        c = np.asarray(rgb, np.float64) / 255
        c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return float(c @ [0.2126, 0.7152, 0.0722])

    v = np.asarray(values, np.float64)
    finite = np.isfinite(v)
    at = np.clip((v[finite] - cmin) / (cmax - cmin), 0, 1)
    colours = iter(sample_colorscale(colorscale, at.tolist()) if finite.any() else [])
    out = []
    for ok in finite:
        if not ok:
            out.append("white")
            continue
        L = luminance(unlabel_rgb(next(colours)))
        out.append("black" if (L + 0.05) / 0.05 >= 1.05 / (L + 0.05) else "white")
    return out


def plot_text(text) -> str:
    """A label as plotly text shows it as itself: plotly draws its own <b>, <i>, <br> and <a href> in labels and
    hovers (a bundle's label `<a href="https://...">` was a link in the tree until 2026-12-05), and reads entities."""
    return html.escape(readable(text), quote=False)


MS_BIN = 0.025
"""Width of the MS histogram's bins."""
MS_PEAK_CUT = 3.0
"""A set whose tallest MS bar is over this many times the others' tallest is cut (see ms_histogram)."""


def ms_summary(ms_sae: np.ndarray, ms_raw: np.ndarray | None, ms_patch: np.ndarray | None = None) -> str:
    """The MS histogram's sets in words, for a screen reader (the plot is an image) and for a quick read: each set's
    scored count, median, middle half and 10th-90th percentiles (numpy's linear quantiles), to 3 decimals."""
    parts = []
    for values, name in ((ms_sae, "SAE latents"), (ms_raw, "raw neurons"), (ms_patch, "SAE latents by patches")):
        if values is None:
            continue
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        if not v.size:
            parts.append(f"{name}: none scored")
            continue
        q10, q25, q50, q75, q90 = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
        parts.append(f"{name} ({v.size:,} scored): median {q50:.3f}, middle half {q25:.3f}-{q75:.3f}, "
                     f"10th-90th percentile {q10:.3f}-{q90:.3f}")
    return "**MS distribution** (the plot below, in words): " + "; ".join(parts) + "." if parts else ""


def ms_histogram(ms_sae: np.ndarray, ms_raw: np.ndarray | None, ms_patch: np.ndarray | None = None):
    """Distribution of MS for the SAE's latents and, when stored, the layer's raw neurons and the SAE
    latents' MS by the max over patches (a CLS-scored bundle): the % of each set's scored neurons per
    0.025 bin from 0 (or below, for a negative MS) to 1.

    The layer's raw neurons are dense, so their MS all sit near the mean cosine of image pairs: on the
    demo 89% of them fall in one bin, which drew the SAE's distribution as a flat line at its foot. When
    one set's tallest bar is over MS_PEAK_CUT times the others' tallest, the y axis stops just above the
    others' and a note gives the cut bar's height."""
    import plotly.graph_objects as go

    sets = [(np.asarray(v, np.float64), name, opacity) for v, name, opacity in
            ((ms_sae, "SAE latents", 0.75), (ms_raw, "raw neurons", 0.6),
             (ms_patch, "SAE latents, by the max over patches", 0.5)) if v is not None]
    sets = [(v[np.isfinite(v)], name, opacity) for v, name, opacity in sets]
    low = min([0.0] + [math.floor(v.min() / MS_BIN) * MS_BIN for v, _, _ in sets if v.size])
    edges = np.arange(low, 1.0 + MS_BIN / 2, MS_BIN)
    fig = go.Figure()
    peaks = []
    for v, name, opacity in sets:
        counts, _ = np.histogram(np.clip(v, low, 1.0), bins=edges)
        pct = 100.0 * counts / max(v.size, 1)
        peaks.append((float(pct.max()) if v.size else 0.0, name, float(edges[np.argmax(pct)])))
        fig.add_bar(x=((edges[:-1] + edges[1:]) / 2).tolist(), y=pct.tolist(), width=MS_BIN, name=name,
                    opacity=opacity, hovertemplate=f"{name}<br>MS %{{x:.3f}} ± {MS_BIN / 2:g}<br>%{{y:.1f}}%<extra></extra>")
    # the range is the bins' (autorange ran to 2.8 in a 342 px wide plot, to make room for a note)
    fig.update_layout(barmode="overlay", bargap=0, xaxis_title="Monosemanticity Score", yaxis_title="% of neurons",
                      xaxis_range=[float(edges[0]), float(edges[-1])])
    if len(peaks) > 1:
        top, name, at = max(peaks)
        rest = max(p for p, n, _ in peaks if n != name)
        if rest > 0 and top > MS_PEAK_CUT * rest:
            fig.update_yaxes(range=[0, 1.15 * rest])
            # the note goes under the x axis: inside the axes it covered the bars below 768 px, and the cut bar
            # itself where that stood at the right (until 2026-12-05); a long set name takes two lines on a phone
            note = f"{name}: {top:.0f}% at MS {at:.3f}-{at + MS_BIN:.3f} (bar cut)"
            # (a 45-character note was cut by 18-63 px at 320-412 px wide: the phone's plot holds about 36)
            note = note if len(note) <= 36 else note.replace(" at MS", "<br>at MS")
            fig.add_annotation(text=note, xref="paper", yref="paper", x=0.5, y=0, yshift=-42, yanchor="top",
                               showarrow=False, font=dict(size=11))
            return _layout(fig, "MS distribution").update_layout(margin_b=62 + 14 * note.count("<br>"))
    return _layout(fig, "MS distribution")


def ms_frequency_scatter(columns: dict):
    """MS against firing frequency (log x), one trace per Matryoshka level; in a CLS-scored bundle the
    latents without an MS by CLS but with one by the max over patches are one more trace (open grey
    circles, both axes by patches); click a point to open it."""
    import plotly.graph_objects as go

    ms, freq, level = columns["ms"], columns["frequency"], columns["level"]
    patch_ms = columns.get("patch_ms")
    only_patch = np.zeros(len(ms), bool) if patch_ms is None else ~np.isfinite(ms) & np.isfinite(patch_ms)
    ids = np.flatnonzero((np.isfinite(ms) & (freq > 0)) | only_patch)
    scored = len(ids)
    if scored > MAX_SCATTER_POINTS:
        ids = np.sort(np.random.default_rng(0).choice(ids, MAX_SCATTER_POINTS, replace=False))
    fig = go.Figure()
    add = fig.add_scatter if len(ids) <= SVG_POINTS else fig.add_scattergl
    by_cls = ids[~only_patch[ids]]
    traces = [(by_cls[level[by_cls] == g], f"level {int(g)}", freq, ms, {}) for g in np.unique(level[by_cls])]
    if only_patch.any():
        traces.append((ids[only_patch[ids]], "by patches (no MS by CLS)", columns.get("patch_frequency"),
                       patch_ms, {"symbol": "circle-open", "color": "#7f7f7f"}))
    for sel, name, x, y, marker in traces:
        if len(sel):
            add(x=x[sel], y=y[sel], mode="markers", name=name, customdata=sel.tolist(),
                text=[f"#{k} {plot_text(lab)}" for k, lab in zip(sel, columns["label"][sel])],
                marker=dict(size=6, opacity=0.7, **marker),
                hovertemplate="%{text}<br>frequency %{x:.3g}<br>MS %{y:.3f}<extra></extra>")
    # two lines: on one, a 320 px window cut it by 18-19 px at both ends
    fig.update_layout(xaxis_type="log", xaxis_title="firing frequency<br>(fraction of images)",
                      yaxis_title="Monosemanticity Score", clickmode="event")
    # short: plotly does not wrap a title, and a phone cut this one at both ends (the page's label says what a
    # click does); a sample says so all the same (it showed 20,000 of 63,064 latents as if they were all)
    sample = f": a sample of {len(ids):,} of {scored:,}" if len(ids) < scored else ""
    fig = _layout(fig, f"MS versus firing frequency{sample}", height=420).update_layout(margin_b=62)
    # six or more entries wrap a horizontal legend into the title: a column on the right instead
    return fig.update_layout(legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.02))


def log_ticks(lo: float, hi: float) -> dict:
    """Tick values and labels for a log axis spanning 10**lo .. 10**hi: powers of 10 over more than 4
    decades, else 1-2-5 steps, else every digit; {} (plotly's own) where even digits give fewer than 2.

    Over less than a decade plotly labels its ticks by their first digit only ("3 4 5 ... 1 2" for
    0.3 ... 2), which reads as a broken axis."""
    e = range(math.floor(lo), math.ceil(hi) + 1)
    for digits in (((1,),) if hi - lo > 4 else ()) + ((1, 2, 5), range(1, 10)):
        vals = [m * 10.0 ** p for p in e for m in digits if lo <= math.log10(m) + p <= hi]
        if len(vals) >= 3:
            break
    if len(vals) < 2:  # a sliver of a decade: plotly's own ticks
        return {}
    return {"tickvals": vals, "ticktext": [f"{v:.3g}" for v in vals]}


def activation_histogram(counts: np.ndarray, edges: np.ndarray, k: int, score: str = "image score",
                         patch_hist: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The neuron's image-score histogram over the images it fires on (log10 bins from the bundle);
    `score` names the image score (the x axis); a CLS-scored bundle's histogram of the max over patches
    (`patch_hist`: counts, edges) is drawn over it as a second trace. A neuron that fires on no image
    gets a note, not axes.

    A plain plotly JSON dict, not a go.Figure: building and validating a Figure costs about 100 ms,
    which every neuron page would pay; the dict costs microseconds and draws the same."""
    def bars(counts, edges, name, colour):
        counts, edges = np.asarray(counts, dtype=np.int64), np.asarray(edges, dtype=np.float64)
        # the hover gives the bin's edges (its centre matched no figure the header quotes, which are edges)
        return {"type": "bar", "x": (10 ** ((edges[:-1] + edges[1:]) / 2)).tolist(), "y": counts.tolist(),
                "width": (10 ** edges[1:] - 10 ** edges[:-1]).tolist(), "name": name,
                "customdata": np.stack([10 ** edges[:-1], 10 ** edges[1:]], 1).tolist(),
                "marker": {"color": colour},
                "hovertemplate": f"{name}<br>act %{{customdata[0]:.3g}} to %{{customdata[1]:.3g}}<br>%{{y}} "
                                 "images<extra></extra>"}

    hists = [(counts, edges)] + ([patch_hist] if patch_hist is not None else [])
    data = [bars(*h, name, colour) for h, name, colour in zip(hists, (score, "max over patches"), ("#636efa", "#ef553b"))]
    if patch_hist is not None:
        data[0]["opacity"] = data[1]["opacity"] = 0.6
    grid = "#e5e5e5"
    two = len(data) > 1
    # short, as the scatter's (the page's label says which images it counts)
    layout = {"title": {"text": f"Neuron {k}: activations"}, "height": 300, "hoverlabel": HOVER_LABEL,
              "bargap": 0, "barmode": "overlay", "margin": {"l": 50, "r": 20, "t": 50, "b": 45},
              "plot_bgcolor": "white", "showlegend": two,
              "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
              "xaxis": {"type": "log", "title": {"text": "activation" if two else f"activation ({score})"},
                        "gridcolor": grid},
              "yaxis": {"title": {"text": "images"}, "gridcolor": grid}}
    # the axis spans the occupied bins and a quarter decade each side, not the 6 decades of the edges
    occupied = [(float(e[i]), float(e[i + 1])) for c, e in hists for i in np.flatnonzero(np.asarray(c))]
    if occupied:
        lo, hi = min(o[0] for o in occupied) - 0.25, max(o[1] for o in occupied) + 0.25
        layout["xaxis"].update(range=[lo, hi], **log_ticks(lo, hi))
    if sum(sum(d["y"]) for d in data) == 0:  # empty axes read as a drawing bug
        layout["xaxis"] = layout["yaxis"] = {"visible": False}
        by = f"its {score}" + (" or the max over patches" if two else "")
        layout["annotations"] = [{"text": f"fires on no image by {by}", "showarrow": False,
                                  "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5, "font": {"size": 15}}]
    return {"data": data, "layout": layout}


def hierarchy_figure(nodes: list[dict], kind: str = "sunburst", patch_ms: np.ndarray | None = None,
                     root: int | None = None, patch_labels=None) -> TreeFigure:
    """The Matryoshka tree as a sunburst/treemap; whole levels are kept while they fit MAX_TREE_NODES.

    `root`: draw that latent's subtree only; else the whole tree, or, when it has more than
    MAX_TREE_ROOTS roots, the MAX_TREE_ROOTS roots with the most descendants (ties: lower id) and theirs.
    Colour is a node's MS by the bundle's image score; where that is NaN (a latent that fires on
    patches but on fewer than 2 images by its CLS), its MS by the max over patches (`patch_ms`, indexed
    by neuron id) when given, so that patch-only latents are not all drawn as missing. `patch_labels`
    (by neuron id): a CLS-scored bundle's labels from the gallery by the max over patches, shown on
    hover where they differ from the node's label."""
    import plotly.graph_objects as go

    from sae_core.errors import UserError

    by_id = {int(n["id"]): n for n in nodes}
    children: dict[int, list[int]] = {}
    for i, n in by_id.items():
        children.setdefault(int(n.get("parent", -1)), []).append(i)

    def subtree(top: int) -> list[int]:
        out, stack = [], [top]
        while stack:
            i = stack.pop()
            out.append(i)
            stack += children.get(i, [])
        return out

    tops_all = sorted(i for i, n in by_id.items() if int(n.get("parent", -1)) not in by_id)
    if root is not None:
        if int(root) not in by_id:
            raise UserError(f"latent {root} is not in the tree; give a latent id from 0 to {max(by_id)}.")
        keep = subtree(int(root))
        tops = [int(root)]
        ancestors, up = [], int(by_id[int(root)].get("parent", -1))
        while up in by_id:
            ancestors.insert(0, up)
            up = int(by_id[up].get("parent", -1))
    else:
        sizes = {t: subtree(t) for t in tops_all}
        tops = tops_all if len(tops_all) <= MAX_TREE_ROOTS else \
            sorted(tops_all, key=lambda t: (-len(sizes[t]), t))[:MAX_TREE_ROOTS]
        keep = [i for t in tops for i in sizes[t]]
        ancestors = []
    by_level: dict[int, list[dict]] = {}
    for i in sorted(keep):
        n = by_id[i]
        by_level.setdefault(int(n["level"]), []).append(n)
    kept: list[dict] = []
    levels = 0
    for lv in sorted(by_level):
        if kept and len(kept) + len(by_level[lv]) > MAX_TREE_NODES:
            break
        kept += by_level[lv]
        levels += 1
    ids = {int(n["id"]) for n in kept}
    # A node whose parent is not drawn hangs from the root ring (the parent's level was cut or it has none).
    parents = [str(int(n["parent"])) if int(n.get("parent", -1)) in ids else "" for n in kept]
    text = [f"#{int(n['id'])} {plot_text(n.get('label') or '')}".strip() for n in kept]
    ms = np.array([float(n["ms"]) if n.get("ms") is not None else np.nan for n in kept], np.float64)
    by_patches = np.zeros(len(kept), bool)
    if patch_ms is not None:
        fallback = np.asarray(patch_ms, np.float64)[[int(n["id"]) for n in kept]]
        by_patches = ~np.isfinite(ms) & np.isfinite(fallback)
        ms[by_patches] = fallback[by_patches]
    # the hover's MS as text: plotly printed a missing colour as "0.000", the worst score, for neurons without one
    source = [f"{'MS by patches' if p else 'MS'} {m:.3f}" if np.isfinite(m) else "no MS (fires on fewer than 2 images)"
              for p, m in zip(by_patches, ms)]
    by_patch = [None if patch_labels is None else patch_labels[int(n["id"])] for n in kept]
    on_patches = [f"<br>on patches: {plot_text(p)}" if p and p != n.get("label") else ""
                  for n, p in zip(kept, by_patch)]
    trace_cls = go.Sunburst if kind == "sunburst" else go.Treemap
    fig = go.Figure(trace_cls(
        ids=[str(int(n["id"])) for n in kept], parents=parents, labels=text,
        customdata=[[int(n["id"]), src, extra] for n, src, extra in zip(kept, source, on_patches)],
        marker=dict(colors=ms.tolist(), colorscale="Viridis", cmin=0, cmax=1, colorbar=dict(title="MS")),
        # every level drawn shows at once (maxdepth 3 hid the 4th ring, and a click opens the neuron rather
        # than zooming in, so it could not be reached)
        hovertemplate="%{label}%{customdata[2]}<br>%{customdata[1]}<extra></extra>", maxdepth=-1,
        insidetextfont=dict(color=readable_text_colours(ms)),
        **({"textinfo": "none"} if len(kept) > MAX_LABELLED_NODES else {})))
    # short: plotly does not wrap a title, and a phone cut this one at "click a noc" (the page's label says it)
    fig = _layout(fig, "Matryoshka tree", height=640)  # the colour bar says MS ("(colour = MS)" was cut at 320 px)
    return TreeFigure(fig, levels, len(kept), int(by_patches.sum()), int((~np.isfinite(ms)).sum()), len(tops),
                      len(tops_all), ancestors)
