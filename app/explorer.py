"""The data behind the explorer's pages, read from one bundle (no Gradio here, so it is tested directly)."""
from __future__ import annotations

import json
import math
import threading
import unicodedata
from functools import cached_property
from pathlib import Path

import numpy as np

from sae_core.bundle import Bundle
from sae_core.errors import UserError
from sae_core.image_view import model_view

from . import inputs
from .markdown import markdown_text
from .probes import ProbeResults
from .render import DISPLAY, ImageCache, heat_overlay, strip, upscale

TABLE_COLUMNS = ["neuron", "label", "label_score", "ms", "support", "frequency", "max_act", "level"]
TABLE_SORTS = ("ms", "support", "frequency", "max_act", "label_score", "neuron", "level")
PATCH_COLUMNS = ("patch_ms", "patch_support")
"""Added to the table of a CLS-scored bundle: MS and support of the images ranked by the max over patches."""
MAX_TABLE_ROWS = 500
RELATED_COLUMNS = ["relation", "neuron", "label", "ms", "decoder_cos"]
IMAGE_NEURON_COLUMNS = ["neuron", "ranked by", "rank", "act", "label", "ms"]
"""The Images page's table of the neurons whose top galleries hold an image (Explorer.image_neurons)."""

# The Overview's metrics table, in this order: (key in the manifest's metrics or world.json, name, how
# shown). "%" = a fraction shown as a percentage, "n" = a count, an int = decimals. A numeric key not
# listed here (a newer atlas) still shows, under its own name, after these.
METRIC_ROWS = (
    ("fvu", "FVU (fraction of variance unexplained)", 4),
    ("l0", "L0 (active latents per token)", 2),
    ("mean_cosine", "mean cosine of reconstruction and input", 4),
    ("dead_frac", "dead latents: never fire on the measured tokens", "%"),
    ("dense_frac", "dense latents: fire on > 10% of the measured tokens", "%"),
    ("dead_frac_images", "latents whose image score is 0 on every scanned image", "%"),
    ("dense_frac_images", "latents whose image score is > 0 on > 10% of the images", "%"),
    ("metric_rows", "tokens measured", "n"),
    ("ms_mean", "mean MS, SAE latents", 4),
    ("ms_mean_raw", "mean MS, raw neurons of the layer", 4),
    ("ms_nan", "SAE latents without an MS (fire on fewer than 2 images)", "n"),
    ("ms_nan_raw", "raw neurons without an MS", "n"),
    ("ms_mean_patch", "mean MS by the max over patches, SAE latents", 4),
    ("ms_nan_patch", "SAE latents without an MS by the max over patches", "n"),
    ("ms_ground_truth_spearman", "ground truth: Spearman(MS, purity of the top images), SAE latents", 4),
    ("ms_ground_truth_spearman_raw", "ground truth: Spearman(MS, purity of the top images), raw neurons", 4),
    ("ms_agreement", "ground truth: agreement of MS with simulated users, SAE latents", 4),
    ("ms_agreement_raw", "ground truth: agreement of MS with simulated users, raw neurons", 4),
    ("ms_ground_truth_spearman_patch_only", "ground truth: Spearman(MS by patches, purity), latents firing on patches only", 4),
    ("ms_agreement_patch_only", "ground truth: agreement of MS by patches with simulated users, latents firing on patches only", 4),
    ("ms_agreement_factor_embedder", "calibration: agreement, SAE latents under a perfect embedder", 4),
    ("ms_agreement_ideal_neurons", "calibration: agreement, ideal neurons under the bundle's embedder", 4),
    ("purity_mean", "ground truth: mean purity of the top images, SAE latents", 4),
    ("purity_mean_raw", "ground truth: mean purity of the top images, raw neurons", 4),
    ("label_accuracy", "ground truth: label accuracy (label = the value most top images share)", 4),
    ("label_accuracy_patch_gallery", "ground truth: label accuracy, latents labelled from their patch gallery", 4),
    ("label_accuracy_by_patch", "ground truth: accuracy of the labels by patches (every latent with a patch gallery)", 4),
    ("hierarchy_depth", "ground truth: taxonomy depth per Matryoshka level, coarse to fine", 2),
)


def _num(x, digits: int = 3):
    """A float for tables and JSON: rounded, None for NaN (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return None if not math.isfinite(x) else round(x, digits) + 0.0  # + 0.0: no "-0.0" in a table


def _significant(x, figures: int):
    """`_num` to significant figures, for figures as small as 1e-6 (a frequency over a million images)."""
    return None if x is None or not math.isfinite(float(x)) else float(f"{float(x):.{figures}g}") + 0.0


def _comparable(text) -> str:
    """Text as the label filter compares it: one Unicode form (NFC) and case-folded. A class folder macOS named
    "cafe" + a combining accent (NFD) matched no "café" typed on a keyboard (NFC) until 2026-12-05."""
    return unicodedata.normalize("NFC", str(text)).casefold()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shown(v, how) -> str:
    """A metric as the Overview shows it: "%" a fraction as a percentage, "n" a count, an int decimals."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if how == "%":
        return f"{100 * v:.2f}%"
    if how == "n":
        return f"{int(v):,}"
    return f"{v:.{how}f}"


SPREAD_MIN_IMAGES = 5
"""The neuron header's spread line (the histogram in words) needs this many firing images."""


def binned_quantile_bound(counts, edges, q: float, top: float) -> float | None:
    """An upper bound of the q-quantile (numpy's: linear between order statistics, so the median of an even
    count is the mean of the middle two) of the scores a log10 histogram counts (LogHistogram: bin 0 also holds
    what lies below its edges, the last bin what lies above): the upper edge of the bin holding the order
    statistic at 0-based rank ceil(q (N - 1)), or `top` (the largest score) for the last bin. None when the
    histogram counts nothing. Until 2026-12-05 the bin where the count reached q N, whose edge the median of
    an even count exceeds when exactly half the scores lie below it."""
    cum = np.cumsum(np.asarray(counts, np.int64))
    if cum.size == 0 or cum[-1] == 0:
        return None
    rank = math.ceil(q * (int(cum[-1]) - 1))
    i = int(np.searchsorted(cum, rank + 1, side="left"))
    return float(top) if i >= cum.size - 1 else min(float(10 ** float(edges[i + 1])), float(top))


def rounded_up(x: float, digits: int = 3) -> str:
    """`x` > 0 to `digits` significant figures, rounded up: a bound printed to the nearest ("1.3335" as "1.33")
    fell below the figure it bounds."""
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return f"{math.ceil(round(x / step, 9)) * step:.{digits}g}"


class Explorer:
    """One bundle, its per-neuron table and the pictures generated from it (cached as PNG files)."""

    def __init__(self, bundle: Bundle, cache_root: str | Path):
        self.bundle = bundle
        m = bundle.manifest
        self.n_neurons = bundle.n_neurons
        self.n_images = bundle.n_images
        model = m.get("model", {})
        self.grid = tuple(int(g) for g in model.get("grid") or (0, 0))
        self.n_patches = int(model.get("n_patches") or self.grid[0] * self.grid[1])
        self.n_prefix = int(model.get("n_tokens") or self.n_patches) - self.n_patches
        self.view = bundle.view
        # Generated pictures are keyed by the bundle's path and creation time: a rebuilt bundle gets new ones.
        self.images = ImageCache(Path(cache_root) / "generated", f"{bundle.root.resolve()}|{m.get('created')}")
        self._lock = threading.Lock()

    @cached_property
    def score_name(self) -> str:
        """What an image's activation is in this bundle (how the atlas scored images), as the page words it."""
        tokens = self.bundle.manifest.get("model", {}).get("tokens")
        return {"cls": "CLS token", "max": "max over patches", "mean": "mean over patches"}.get(tokens, "image score")

    # ------------------------------------------------------------------------------------------
    # Overview
    # ------------------------------------------------------------------------------------------
    @cached_property
    def probes(self) -> ProbeResults:
        """The probe results on the Overview (probes/*.json, crossmodal.json), re-read when they change."""
        return ProbeResults(self.bundle.root, self.bundle.manifest)

    def steer_off_reason(self) -> str | None:
        """Why the Steer page is off for this bundle (one sentence), or None when steering applies."""
        layer = str(self.bundle.manifest["model"].get("layer"))
        if self.probes.is_crossmodal:
            return (f"Steering is off for this bundle: its SAE reads the language model's residual stream (layer "
                    f"{layer}), while steering clamps the vision-tower layer that LLaVA's projector reads.")
        return None

    def facts(self) -> dict:
        """Model, layer, SAE and dataset of the bundle, as the Overview page lists them."""
        m = self.bundle.manifest
        model, sae, data, emb = m["model"], m["sae"], m["dataset"], m.get("embedder", {})
        groups = sae.get("group_sizes") or []
        imported = (sae.get("training") or {}).get("imported")
        shape = f"{sae.get('architecture')} {sae.get('d_in')} -> {sae.get('d_sae')}"
        if sae.get("architecture") in ("topk", "batchtopk", "matryoshka"):  # sae_core.sae.K_ARCHS, without torch
            shape += f", k {sae.get('k')}"
        if imported:
            shape += f", imported from {imported.get('format')} ({imported.get('architecture')}; {imported.get('from')})"
        return {
            "model": model.get("spec"), "layer": model.get("layer"), "tokens": model.get("tokens"),
            "patch grid": "x".join(str(g) for g in self.grid) if self.grid[0] else None,
            "SAE": shape + (f", levels {groups}" if groups else ""),
            "dataset": f"{data.get('spec')} ({data.get('n_images')} images)",
            "MS embedder": emb.get("spec"), "labels": self.bundle.labels.get("method"),
            "built": m.get("created"), "command": m.get("command"),
        }

    def metrics_rows(self) -> list[list[str]]:
        """The Overview's metrics table: [name, value as shown] rows, in METRIC_ROWS order; the manifest's
        metrics and, for world bundles, world.json's figures (each figure once)."""
        figures = dict(self.bundle.manifest.get("metrics", {}))
        figures.update({k: v for k, v in (self.bundle.world_figures() or {}).items() if _is_number(v)})
        listed = {key for key, _, _ in METRIC_ROWS}
        unlisted = tuple((k, k, 4) for k, v in figures.items() if k not in listed and _is_number(v))
        out_of = {"ms_nan": self.n_neurons, "ms_nan_patch": self.n_neurons,
                  "ms_nan_raw": self.bundle.array("raw/ms").size if self.bundle.has("raw/ms") else None}
        rows = []
        for key, name, how in METRIC_ROWS + unlisted:
            val = figures.get(key)
            if val is None:
                continue
            if isinstance(val, list):
                shown = ", ".join(_shown(v, how) for v in val)
            else:
                shown = _shown(val, how)
            if key == "metric_rows" and figures.get("metric_tokens"):
                name += f" ({figures['metric_tokens']} tokens of the scanned images)"
            if out_of.get(key):
                shown += f" of {out_of[key]:,}"
            rows.append([name, shown])
        return rows

    @cached_property
    def full_gallery(self) -> int:
        """How many top images the bundle keeps per neuron (16 by default): a neuron firing on fewer
        has a partial gallery and an MS over few images (over 2 images, the cosine of one pair)."""
        return int(self.bundle.array("top_images").shape[1])

    @cached_property
    def _full_and_scored(self) -> np.ndarray:
        """(K,) bool: neurons with a full gallery (and so an MS)."""
        c = self.columns
        return (c["support"] >= self.full_gallery) & np.isfinite(c["ms"])

    @cached_property
    def default_neuron(self) -> int:
        """The neuron the Neuron tab shows before any is picked: the highest MS among neurons with a full
        gallery, else the neuron with the most top images."""
        c = self.columns
        if not self._full_and_scored.any():
            return int(np.argmax(c["support"]))
        return int(np.argmax(np.where(self._full_and_scored, c["ms"], -np.inf)))

    @cached_property
    def default_min_support(self) -> int:
        """The Neurons table's first minimum support: a full gallery when some neuron has one (else 0),
        so the table does not open on MS values of two images."""
        return self.full_gallery if self._full_and_scored.any() else 0

    # ------------------------------------------------------------------------------------------
    # Neuron table
    # ------------------------------------------------------------------------------------------
    @cached_property
    def columns(self) -> dict[str, np.ndarray]:
        """Whole per-neuron columns in memory (K floats each: small next to the memory-mapped galleries)."""
        b = self.bundle
        K = self.n_neurons
        labels = b.labels.get("labels") or [""] * K
        col = lambda name, dtype, fill: (np.asarray(b.array(name), dtype=dtype) if b.has(name)
                                         else np.full(K, fill, dtype=dtype))
        out = {
            "neuron": np.arange(K), "label": np.asarray(labels, dtype=object),
            "label_score": col("label_score", np.float64, np.nan), "ms": col("ms", np.float64, np.nan),
            "support": col("support", np.int64, 0), "frequency": col("frequency", np.float64, np.nan),
            "max_act": col("max_act", np.float64, np.nan) + 0.0, "level": col("group", np.int64, 0),  # no -0.0
            "strength_unit": b.strength_units(),
        }
        if "labels_by_patch" in b.labels:  # CLS-scored bundles: the label of the gallery by patches
            out["patch_label"] = np.asarray(b.labels["labels_by_patch"], dtype=object)
        if b.has("patch_support"):
            out["patch_support"] = col("patch_support", np.int64, 0)
            out["patch_ms"] = col("patch_ms", np.float64, np.nan)
            out["patch_frequency"] = out["patch_support"] / max(b.n_images, 1)
        return out

    @cached_property
    def table_columns(self) -> list[str]:
        """The table's columns: TABLE_COLUMNS, and a CLS-scored bundle's label by patches after the label
        and MS and support by patches after the support."""
        cols = list(TABLE_COLUMNS)
        if "patch_support" in self.columns:
            i = cols.index("support") + 1
            cols[i:i] = PATCH_COLUMNS
        if "patch_label" in self.columns:
            cols.insert(cols.index("label") + 1, "patch_label")
        return cols

    @cached_property
    def related_columns(self) -> list[str]:
        """The related table's columns: RELATED_COLUMNS, and a CLS-scored bundle's MS by patches after the MS."""
        if "patch_ms" not in self.columns:
            return list(RELATED_COLUMNS)
        i = RELATED_COLUMNS.index("ms") + 1
        return RELATED_COLUMNS[:i] + ["patch_ms"] + RELATED_COLUMNS[i:]

    @cached_property
    def table_sorts(self) -> tuple[str, ...]:
        return TABLE_SORTS + (PATCH_COLUMNS if "patch_support" in self.columns else ())

    @cached_property
    def gallery_support(self) -> np.ndarray:
        """(K,) images in the gallery a neuron is shown and labelled by: its support, or for a latent that
        fires on no image by the CLS token, the images it fires on by the max over patches. The table's
        minimum support reads this, so such latents (e.g. all the demo's "dotted" ones) are not hidden."""
        c = self.columns
        return np.where(c["support"] > 0, c["support"], c.get("patch_support", c["support"]))

    @cached_property
    def levels(self) -> list[int]:
        return sorted(int(g) for g in np.unique(self.columns["level"]))

    def table(self, min_ms=None, min_support=None, level=None, label_contains: str = "", sort_by: str = "ms",
              descending: bool = True, limit: int = 100, ids=None):
        """The neuron table filtered and sorted (NaN MS last), at most `limit` (<= 500) rows, as a DataFrame."""
        import pandas as pd

        limit = inputs.integer(limit, "row limit", 1, MAX_TABLE_ROWS)
        rows = self.select(min_ms, min_support, level, label_contains, sort_by, descending, ids)[:limit]
        return pd.DataFrame({name: [self._cell(name, self.columns[name][k]) for k in rows]
                             for name in self.table_columns})

    def table_csv(self, min_ms=None, min_support=None, level=None, label_contains: str = "", sort_by: str = "ms",
                  descending: bool = True) -> str:
        """Path of a generated CSV of every neuron the table's filter keeps (not only the rows shown), in its
        order, with the table's columns at the bundle's precision (7 significant digits; empty for NaN)."""
        import hashlib

        import pandas as pd

        descending = inputs.yes_no(descending, "descending")  # before naming the file: "false" named True's
        rows = self.select(min_ms, min_support, level, label_contains, sort_by, descending)
        frame = pd.DataFrame({name: np.asarray(self.columns[name])[rows] for name in self.table_columns})
        what = json.dumps([min_ms, min_support, level, label_contains, sort_by, descending], default=str)
        return self.images.write_text(f"neurons_{hashlib.sha1(what.encode()).hexdigest()[:12]}.csv",
                                      frame.to_csv(index=False, float_format="%.7g"))  # float32's digits

    def select(self, min_ms=None, min_support=None, level=None, label_contains: str = "", sort_by: str = "ms",
               descending: bool = True, ids=None) -> np.ndarray:
        """Ids of the neurons the table's filter keeps, sorted by `sort_by` (NaN last either way)."""
        descending = inputs.yes_no(descending, "descending")
        c = self.columns
        keep = np.ones(self.n_neurons, dtype=bool) if ids is None else np.isin(c["neuron"], np.asarray(ids))
        if min_ms not in (None, ""):
            lo = inputs.share(min_ms, "minimum MS")
            if lo > 0:  # 0, the slider's rest, keeps the neurons without an MS (e.g. patch-only latents)
                keep &= np.nan_to_num(c["ms"], nan=-np.inf) >= lo
        if min_support not in (None, ""):
            keep &= self.gallery_support >= inputs.integer(min_support, "minimum support", 0, self.n_images)
        if level not in (None, "", "all"):
            keep &= c["level"] == inputs.integer(level, "Matryoshka level", 0, max(self.levels))
        needle = _comparable(inputs.text(label_contains, "label filter", inputs.MAX_QUERY_CHARS))
        if needle:  # either label of a CLS-scored bundle's latent
            names = [name for name in ("label", "patch_label") if name in c]
            keep &= np.array([any(needle in _comparable(c[name][k]) for name in names) for k in range(self.n_neurons)],
                             dtype=bool)
        if sort_by not in self.table_sorts:
            raise UserError(f"cannot sort by {sort_by!r}; choose one of {', '.join(self.table_sorts)}.")
        idx = np.flatnonzero(keep)
        key = np.asarray(c[sort_by][idx], dtype=np.float64)
        key = np.where(np.isnan(key), -np.inf if descending else np.inf, key)  # NaN last either way
        return idx[np.argsort(-key if descending else key, kind="stable")]

    @staticmethod
    def _cell(name, v):
        if name in ("neuron", "support", "patch_support", "level"):
            return int(v)
        if name in ("label", "patch_label"):
            return str(v)
        # frequency to 4 significant figures: rounded to 5 decimals, a latent firing on 6 of ImageNet's 1.28 M
        # images read 0.0 as a dead one did (until 2026-12-05)
        return _significant(v, 4) if name == "frequency" else _num(v, 3)

    # ------------------------------------------------------------------------------------------
    # One image
    # ------------------------------------------------------------------------------------------
    def image_neurons(self, image, limit: int = MAX_TABLE_ROWS):
        """The neurons whose top galleries hold dataset image `image`, as (table, neurons, rows): the first
        `limit` of IMAGE_NEURON_COLUMNS rows (rank 1 = the neuron's best image; "ranked by" = the gallery's
        image score, a CLS-scored bundle's gallery by the max over patches counting too, with its own label
        and MS), best rank first, then highest activation; and how many distinct neurons and rows there are
        in all. A scan of the (K, 16) id arrays: 1M ids at K 65,536, 6 ms."""
        import pandas as pd

        i = self.check_image(image, "image index")
        b, c = self.bundle, self.columns
        found = []
        for prefix, gallery in (("", self.score_name), ("patch_", "max over patches")):
            if not b.has(f"{prefix}top_images"):
                continue
            k, slot = np.nonzero(np.asarray(b.array(f"{prefix}top_images")) == i)
            acts = np.asarray(b.array(f"{prefix}top_acts"))[k, slot]
            ms, label = c.get(f"{prefix}ms", c["ms"]), c.get(f"{prefix}label", c["label"])  # the gallery's own
            found += [(int(r) + 1, -float(a), int(n), gallery, str(label[n]), self._cell("ms", ms[n]))
                      for n, r, a in zip(k, slot, acts)]
        found.sort()
        shown = found[:inputs.integer(limit, "row limit", 1, MAX_TABLE_ROWS)]
        rows = [[n, gallery, rank, _num(-neg_act, 3), label, ms] for rank, neg_act, n, gallery, label, ms in shown]
        return pd.DataFrame(rows, columns=IMAGE_NEURON_COLUMNS), len({f[2] for f in found}), len(found)

    # ------------------------------------------------------------------------------------------
    # One neuron
    # ------------------------------------------------------------------------------------------
    def check_neuron(self, k) -> int:
        return inputs.neuron_id(k, self.n_neurons)

    def check_image(self, i, what: str = "image id") -> int:
        """A dataset image's id, as typed or sent (UserError, one sentence, for anything else)."""
        return inputs.integer(i, what, 0, self.n_images - 1)

    def patch_index(self, position: int) -> int | None:
        """Token position (CLS first) -> patch index in the grid, None for CLS/register tokens."""
        p = int(position) - self.n_prefix
        return p if 0 <= p < self.n_patches else None

    def gallery(self, k: int, page: dict | None = None, by_patch: bool = False) -> list[tuple[str, str]]:
        """Top images of neuron k with its patch heat drawn over them: [(png path, caption)] best first;
        by_patch: the gallery ranked by the max over patches (CLS-scored bundles; [] where absent)."""
        page = page or self.bundle.neuron(k)
        which = "patch_top" if by_patch else "top"
        if page.get(which) is None:
            return []
        heat = page[f"{which}_heat"]
        vmax = float(np.nanmax(heat)) if heat is not None and heat.size else 1.0
        out = []
        for slot, (img_id, act, pos) in enumerate(page[which]):
            best = self.patch_index(pos) if pos >= 0 else None

            def make(img_id=img_id, slot=slot, best=best):
                img = self.shown(self.bundle.image(img_id))
                if heat is None or not self.grid[0]:
                    return upscale(img)
                return heat_overlay(img, heat[slot], self.grid, vmax, best=best)

            path = self.images.get_or_make(f"{which}|{k}|{slot}|{img_id}", make)
            where = f", patch {best}" if best is not None else ""
            out.append((path, f"#{img_id}  act {act:.3g}{where}"))
        return out

    @staticmethod
    def shown_bands(page: dict) -> tuple[list, list[int] | None, bool]:
        """The bands the page shows, the firing images each holds (None for bundles before 2026-12-04) and
        whether they are by the max over patches: a latent that fires on no image by the atlas's score
        (CLS) shows those of the max over patches, as its label does."""
        if not any(page["bands"]) and page.get("patch_bands") and any(page["patch_bands"]):
            return page["patch_bands"], page.get("patch_band_counts"), True
        return page["bands"], page.get("band_counts"), False

    def band_gallery(self, k: int, page: dict | None = None) -> list[tuple[str, str]]:
        """One strip per activation band (highest band first): its sampled images side by side.

        A strip per band rather than a tile per image keeps a neuron page at about 20 files (each file
        costs the server about 1 ms per response under Gradio)."""
        page = page or self.bundle.neuron(k)
        bands, counts, by_patch = self.shown_bands(page)
        # every strip as wide as the atlas' band size, so the gallery draws them all at one scale
        slots = self.bundle.array("band_images").shape[2] if self.bundle.has("band_images") else 0
        how = " by the max over patches" if by_patch else ""
        out = []
        for b, band in enumerate(bands):
            if not band:
                continue
            ids = [i for i, _, _ in band]
            acts = [a for _, a, _ in band]
            boxes = [self.patch_index(p) if p >= 0 else None for _, _, p in band]
            path = self.images.get_or_make(
                f"band|{k}|{b}|{ids}|{boxes}",
                lambda ids=ids, boxes=boxes: strip([self.shown(self.bundle.image(i)) for i in ids], slots=slots,
                                                   boxes=boxes, grid=self.grid if self.grid[0] else None))
            # a sample: say of how many; a bundle of before 2026-12-04 stored no band sizes, so its strips are
            # samples of bands of unknown size (they read "6 images", as if the whole band, until 2026-12-05)
            of = (" sampled" if counts is None else f" of {counts[b]:,}" if counts[b] > len(ids) else "")
            # of a sample, the range is the sample's ("these"): the band reaches higher and lower (its edges are
            # not stored), and "act 5.34 to 8.49" read as the band's while it held an image at 10.2
            many = len(ids) > 1 or (of and counts is not None)  # "1 of 23 images", "1 sampled image"
            out.append((path, f"band {b + 1}{how}: {len(ids)}{of} image{'s' if many else ''}, "
                              f"{'these ' if of else ''}act {min(acts):.3g} to {max(acts):.3g} "
                              f"(#{', #'.join(str(i) for i in ids)})"))
        return out

    def shown(self, img):
        """`img` as the bundle's model sees it (its centre crop, say), so the patch grid lines up with it; every
        picture of the explorer goes through here."""
        return model_view(img, self.view)

    def image_tile(self, i: int) -> str:
        """A dataset image blown up to the display size, as a generated PNG path."""
        i = self.check_image(i, "image index")
        return self.images.get_or_make(f"img|{i}", lambda: upscale(self.shown(self.bundle.image(i))))

    @cached_property
    def dataset_error(self) -> str | None:
        """Why the bundle's dataset cannot be opened here (one sentence), or None. A bundle copied without
        its dataset still shows its gallery images (their thumbnails travel with it), not the others."""
        try:
            self.bundle.dataset()
        except UserError as e:
            return str(e)
        return None

    def search_tile(self, i: int) -> str | None:
        """image_tile(i), or None for an image with no readable thumbnail when the dataset cannot be opened here."""
        i = self.check_image(i, "image index")
        if not self.dataset_error:
            return self.image_tile(i)
        if not self.bundle.thumb_path(i).is_file():
            return None
        try:
            return self.image_tile(i)
        except UserError:  # a damaged thumbnail and no dataset to draw it from: one grey tile, not a failed search
            return None

    def missing_tile(self) -> str:
        """A grey tile standing in for an image that cannot be shown here (see search_tile)."""
        from PIL import Image, ImageDraw

        def make():
            img = Image.new("RGB", (DISPLAY, DISPLAY), (200, 200, 200))
            ImageDraw.Draw(img).text((DISPLAY // 2, DISPLAY // 2), "not here", fill=(90, 90, 90), anchor="mm")
            return img

        return self.images.get_or_make("missing", make)

    def label_text(self, page: dict) -> str:
        if not page.get("label"):
            method = page.get("label_method") or ""
            if method.startswith("none"):  # the whole bundle has none: its reason, not the neuron's (until 2026-12-05)
                return f"no label: this bundle has no labels ({method.partition(':')[2].strip() or 'none were made'})"
            return "no label (the bundle has none for this neuron)"
        score = page.get("label_score")
        score_s = f"score {round(score, 2) + 0.0:.2f}" if score is not None and math.isfinite(score) else "no score"
        # the method's name only: its whole description is one line of the Overview (and of the JSON export)
        method = (page.get("label_method") or "unknown").split(":")[0]
        source = ", from the gallery by the max over patches" if page.get("label_from_patch") else ""
        read = self._read_from(page["patch_top" if page.get("label_from_patch") else "top"])
        return (f'guess: "{markdown_text(page["label"])}" ({score_s}{read}, method {markdown_text(method)}{source}, '
                "described on the Overview)")

    def _read_from(self, gallery) -> str:
        """", read from 2 images" where a label rests on fewer images than a full gallery (a thin guess)."""
        n = len(gallery or [])
        return f", read from {n} image{'s' if n != 1 else ''}" if 0 < n < self.full_gallery else ""

    def ms_text(self, page: dict) -> str:
        by = " (by its CLS token)" if page.get("patch_support") is not None else ""
        if page["ms"] is None or not math.isfinite(page["ms"]):
            n = page["support"] or 0
            text = (f"no MS: fires on {n} image{'s' if n != 1 else ''}{by}, fewer than the 2 needed" if n < 2 else
                    f"no MS: fires on {n} images{by}, but the min-max normalisation over the images leaves fewer "
                    "than 2 of them a weight")
        else:
            text = f"{page['ms']:.3f} over {page['support']} images it fires on{by}"
        patch_ms = page.get("patch_ms")
        if patch_ms is not None and math.isfinite(patch_ms):
            text += f" · by the max over patches {patch_ms:.3f} over {page['patch_support']} images"
        return text

    def related(self, k: int, page: dict | None = None) -> list[list]:
        """Rows of `related_columns` (relation, neuron, label, ms[, patch_ms], decoder_cos): parent,
        children, nearest by decoder cosine."""
        page = page or self.bundle.neuron(k)
        c = self.columns
        by_patches = "patch_ms" in c
        rows = []

        def row(rel, j, cos=None):
            patch = [_num(c["patch_ms"][j])] if by_patches else []
            rows.append([rel, int(j), str(c["label"][j]), _num(c["ms"][j]), *patch, _num(cos)])

        # the decoder parent's cosine (parent_cos.npy) on its row: blank until 2026-12-05, while the same latent
        # among the decoder neighbours below showed it
        decoder_cos = page.get("parent_cos")
        if page["parent"] >= 0:
            row("parent", page["parent"], decoder_cos if page["parent"] == page.get("parent_decoder") else None)
        if page.get("parent_coact", -1) >= 0 and page["parent_coact"] != page["parent"]:
            row("parent (co-activation)", page["parent_coact"])
        if page.get("parent_decoder", -1) >= 0 and page["parent_decoder"] != page["parent"]:
            row("parent (decoder cosine)", page["parent_decoder"], decoder_cos)
        for j in page["children"][:32]:
            row("child", j)
        for j, cos in page["neighbors"]:
            if j != k:
                row("decoder neighbour", j, cos)
        return rows

    def neuron_summary(self, k: int, page: dict) -> str:
        """The neuron page's header in Markdown."""
        level = page["group"]
        lines = [
            f"### Neuron {k}",
            f"- **label** — {self.label_text(page)}",
            f"- **MS** — {self.ms_text(page)}",
            f"- **firing frequency** {page['frequency']:.4g} · **mean activation where it fires** "
            f"{page['mean_act'] + 0.0:.4g} · "
            f"**max activation** {page['max_act'] + 0.0:.4g} (image score: {self.score_name})"  # + 0.0: no "-0"
            + ((f" · **on one token** {page['token_max'] + 0.0:.4g} (the Steer page's strength 1)"
                if page["token_max"] > 0 else " · **never fires on a token** (the Steer page's strength 1 = 1.0 raw)")
               if page.get("token_max") is not None else ""),
            *self._spread_line(page),
            *([f"- **Matryoshka level** {level}"
               + (f" · parent {page['parent']}" if page["parent"] >= 0 else " (a root)")
               + f" · {len(page['children'])} children"]
              if len(self.levels) > 1 else []),  # one level: no tree ("level 0 (a root) · 0 children" of any relu SAE)
        ]
        if page.get("patch_support") is not None:
            top_act = f" (max {page['patch_top'][0][1]:.3g})" if page["patch_top"] else ""
            bands = " and so do the activation bands below it" if self.shown_bands(page)[2] else ""
            label = ""
            if page.get("label_by_patch") and not page["label_from_patch"]:  # else it is the label above
                score = page.get("label_by_patch_score")
                score_s = f"score {round(score, 2) + 0.0:.2f}" if score is not None and math.isfinite(score) else ""
                read = self._read_from(page["patch_top"])
                detail = (score_s + read).lstrip(", ")
                label = (f'; its label: guess "{markdown_text(page["label_by_patch"])}"'
                         + (f" ({detail})" if detail else ""))
            lines.append(f"- **on patches** — fires on patches of {page['patch_support']} images{top_act}; the "
                         f"second gallery ranks them by the max over patches{bands}{label}")
        no_patch = sum(1 for _, _, pos in page["top"] if pos < 0)
        if no_patch and page["top_heat"] is not None:
            lines.append(f"- **where it fires** — on no patch of {no_patch} of its {len(page['top'])} top images "
                         f"(only on the CLS token): no red and no box on those")
        return "\n".join(lines)

    @staticmethod
    def _spread_line(page: dict) -> list[str]:
        """The activation histogram in words (a plot is out of reach of a screen reader): the scores under which
        half and nine in ten of the firing images lie, read off the histogram's bins."""
        counts, edges = page["hist"]
        if int(np.sum(counts)) < SPREAD_MIN_IMAGES:  # "half" and "nine in ten" of one or two images say nothing
            return []
        bounds = [binned_quantile_bound(counts, edges, q, page["max_act"]) for q in (0.5, 0.9)]
        return [f"- **spread** — over the images where it fires, the median is at most {rounded_up(bounds[0])} and "
                f"the 90th percentile at most {rounded_up(bounds[1])} (upper edges of the histogram's bins, or the "
                "max)"]

    def neuron_record(self, k) -> dict:
        """A JSON-able description of neuron k (the page's JSON export and the `neuron_json` API)."""
        k = self.check_neuron(k)
        page = self.bundle.neuron(k)

        def histogram(counts, edges):
            return {"log10_edges": [_num(e, 4) for e in np.asarray(edges)], "counts": [int(x) for x in np.asarray(counts)]}

        def bands(rows):
            return [[{"image": i, "act": _num(a, 5), "patch": self.patch_index(p) if p >= 0 else None} for i, a, p in band]
                    for band in rows]

        return {
            "bundle": {"model": self.bundle.manifest["model"].get("spec"),
                       "layer": self.bundle.manifest["model"].get("layer"),
                       "sae": self.bundle.manifest["sae"].get("architecture"),
                       "dataset": self.bundle.manifest["dataset"].get("spec")},
            "neuron": k,
            "label": page["label"], "label_score": _num(page["label_score"]), "label_method": page["label_method"],
            "label_from_patch_gallery": page["label_from_patch"],
            **({"label_by_patch": page["label_by_patch"], "label_by_patch_score": _num(page["label_by_patch_score"])}
               if page.get("label_by_patch") is not None else {}),
            "ms": _num(page["ms"], 5), "support": page["support"], "frequency": _significant(page["frequency"], 6),
            "mean_act": _num(page["mean_act"], 5), "max_act": _num(page["max_act"], 5),
            "token_max": _num(page.get("token_max"), 5),
            "level": page["group"], "parent": page["parent"], "parent_coact": page["parent_coact"],
            "children": page["children"],
            "top": [{"image": i, "act": _num(a, 5), "patch": self.patch_index(p) if p >= 0 else None}
                    for i, a, p in page["top"]],
            **({"patch_support": page["patch_support"], "patch_ms": _num(page.get("patch_ms"), 5),
                "top_by_patch": [{"image": i, "act": _num(a, 5), "patch": self.patch_index(p) if p >= 0 else None}
                                 for i, a, p in page["patch_top"]]} if page.get("patch_top") is not None else {}),
            "bands": bands(page["bands"]),
            **({"band_counts": page["band_counts"]} if page.get("band_counts") is not None else {}),
            **({"bands_by_patch": bands(page["patch_bands"])} if page.get("patch_bands") is not None else {}),
            **({"band_counts_by_patch": page["patch_band_counts"]} if page.get("patch_band_counts") is not None
               else {}),
            "histogram": histogram(*page["hist"]),
            **({"histogram_by_patch": histogram(*page["patch_hist"])} if page.get("patch_hist") is not None else {}),
            "neighbors": [{"neuron": j, "decoder_cos": _num(cs, 4)} for j, cs in page["neighbors"]],
        }

    def export_json(self, k) -> str:
        """Path of neuron k's JSON export (a generated file, served for download)."""
        rec = self.neuron_record(k)
        return self.images.write_text(f"neuron_{rec['neuron']}.json", json.dumps(rec, indent=1))
