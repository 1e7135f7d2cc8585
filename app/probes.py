"""The probe results on the Overview (no Gradio here, so it is tested directly).

Reads what the probe commands write into a bundle, without changing their schemas:
- BUNDLE/probes/ood.json (`precompute ood`): the ROC figure (plotly JSON) and the AUROC / FPR@95 table;
- BUNDLE/probes/ontology.json (`precompute ontology`) and probes.json (`precompute probes`): tables;
- BUNDLE/crossmodal.json and manifest["crossmodal"] (`precompute crossmodal`): the cross-modal summary,
  the counts per concept and the table of cross-modal latents.

A missing file is one line with the command that writes it; a file that cannot be used (bad JSON, a
missing or non-numeric field) is one sentence saying so and what to do, never an exception. Results are
cached per file and re-read when the file changes (the commands may run while the app serves).
"""
from __future__ import annotations

import json
import math
import shlex
import threading
from pathlib import Path

from sae_core.bundle import PROBES

from .figures import HOVER_LABEL
from .markdown import markdown_code, markdown_sentence, markdown_text

CROSSMODAL_FILE = "crossmodal.json"

OOD_COLUMNS = ["method", "family", "AUROC", "FPR@95"]
ONTOLOGY_COLUMNS = ["view", "units", "clustering", "placed units", "agreement", "null mean", "null std", "z"]
PROBE_COLUMNS = ["factor", "SAE codes", "raw", "chance"]
CONCEPT_COLUMNS = ["concept", "cross-modal latents"]
CROSSMODAL_COLUMNS = ["neuron", "concept", "score", "image on", "image off", "text on", "text off",
                      "AUROC image", "AUROC text", "top words"]


class Unreadable(Exception):
    """A probe file that exists but cannot be used; the message says what is wrong with it."""


def _number(x, what: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not low <= x <= high:
        raise Unreadable(f"{what} is {x!r}, not a number" + (f" in [{low:g}, {high:g}]" if math.isfinite(low) else ""))
    return float(x)


def _round(x, digits: int = 3):
    """A rounded float for tables; None for missing or non-finite values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return round(float(x), digits)


def _dict(x, what: str) -> dict:
    if not isinstance(x, dict):
        raise Unreadable(f"{what} is not an object")
    return x


def command(kind: str, root: Path, *extra: str) -> str:
    """The command that writes a probe file of the bundle at `root` (as the README gives it)."""
    return shlex.join(["python", "-m", "precompute", kind, "--bundle", str(root), *extra])


class ProbeResults:
    """The probe panels of one bundle; each file is parsed once per change (mtime, size)."""

    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self._cache: dict[str, tuple] = {}
        self._lock = threading.Lock()

    @property
    def is_world(self) -> bool:
        """A bundle of the embedded world: the probe commands have default sets and factor labels."""
        return bool(self.manifest.get("world"))

    @property
    def is_crossmodal(self) -> bool:
        return "crossmodal" in self.manifest or str(self.manifest.get("model", {}).get("layer", "")).startswith("lm:")

    def _read(self, rel: str, build):
        """(status, value): ("missing", None), ("unreadable", reason) or ("ok", build(parsed JSON))."""
        path = self.root / rel
        try:
            st = path.stat()
        except OSError:
            return "missing", None
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(rel)
            if hit is not None and hit[0] == key:
                return hit[1]
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            out = ("ok", build(data))
        except (OSError, UnicodeDecodeError) as e:
            out = ("unreadable", f"it cannot be read ({e.__class__.__name__})")
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError, or nested deeper than json reads
            out = ("unreadable", f"it is not valid JSON ({e})")
        except Unreadable as e:
            out = ("unreadable", str(e))
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            out = ("unreadable", f"it lacks a field the app needs ({e.__class__.__name__}: {e})")
        with self._lock:
            self._cache[rel] = (key, out)
        return out

    def _command(self, kind: str) -> str:
        """The command that can write `kind`'s file here: outside the world there is no default OOD set,
        and the bundle's own images may have no taxonomy paths."""
        if self.is_world:
            return command(kind, self.root)
        extra = {"ood": ("--ood", "imagefolder:PATH"), "ontology": ("--dataset", "imagefolder:PATH")}.get(kind, ())
        return command(kind, self.root, *extra)

    def _missing_hint(self, kind: str) -> str:
        if self.is_world:
            return ""
        return {"ood": " (PATH: a folder of out-of-distribution images)",
                "ontology": " (PATH: iNaturalist-style class folders, whose names give the taxonomy; the "
                            "bundle's own dataset serves if it has them)"}.get(kind, "")

    def _unreadable(self, rel: str, reason: str, kind: str) -> str:
        if kind == "probes" and not self.is_world:
            return f"`{rel}` is unreadable ({markdown_sentence(reason)}); delete it: factor probes need a world bundle."
        return (f"`{rel}` is unreadable ({markdown_sentence(reason)}); re-run {markdown_code(self._command(kind))} to "
                "rewrite it (or delete the file).")

    # ------------------------------------------------------------------------------------------
    # OOD
    # ------------------------------------------------------------------------------------------
    def ood(self) -> tuple[str, dict | None, dict | None]:
        """(note in Markdown, ROC figure as plotly JSON or None, table as {"headers", "data"} or None)."""
        rel = f"{PROBES}/ood.json"
        status, value = self._read(rel, parse_ood)
        if status == "missing":
            if self.is_crossmodal:
                return ("No OOD results: the probe commands (ood, ontology, probes) read vision-layer bundles, and "
                        "this cross-modal bundle's SAE reads the language model.", None, None)
            return (f"No OOD results yet (`{rel}` is missing); run {markdown_code(self._command('ood'))}"
                    f"{self._missing_hint('ood')} to compute them (the page shows them on the next load).", None, None)
        if status == "unreadable":
            return self._unreadable(rel, value, "ood"), None, None
        return value["note"], value["figure"], value["table"]

    # ------------------------------------------------------------------------------------------
    # Ontology and linear probes
    # ------------------------------------------------------------------------------------------
    def ontology(self) -> tuple[str, dict | None]:
        return self._table("ontology", parse_ontology)

    def probes(self) -> tuple[str, dict | None]:
        return self._table("probes", parse_probes)

    def _table(self, kind: str, parse) -> tuple[str, dict | None]:
        rel = f"{PROBES}/{kind}.json"
        status, value = self._read(rel, parse)
        if status == "missing":
            if self.is_crossmodal:
                return "", None
            if kind == "probes" and not self.is_world:
                return ("No factor probes: they need the embedded world's labels (shape, colour, texture of each "
                        "image), and this bundle is not a world bundle (`python -m precompute demo` builds one).", None)
            return f"`{rel}` is missing; run {markdown_code(self._command(kind))}{self._missing_hint(kind)}.", None
        if status == "unreadable":
            return self._unreadable(rel, value, kind), None
        return value

    # ------------------------------------------------------------------------------------------
    # Cross-modal bundles
    # ------------------------------------------------------------------------------------------
    def crossmodal(self) -> tuple[str, dict | None, dict | None] | None:
        """None for other bundles; else (summary in Markdown, counts per concept, cross-modal latents)
        with the tables as {"headers", "data"}. Reads crossmodal.json; falls back to manifest["crossmodal"]
        (counts and the best examples, no top words) when the file is missing or unreadable."""
        if not self.is_crossmodal:
            return None
        status, value = self._read(CROSSMODAL_FILE, parse_crossmodal)
        if status == "ok":
            return value
        what = ("is missing" if status == "missing" else f"is unreadable ({value})")
        fix = "re-run `python -m precompute crossmodal` with this bundle as --out (it resumes) to rewrite it"
        summary = self.manifest.get("crossmodal")
        if isinstance(summary, dict):
            try:
                note, counts, table = parse_crossmodal({"sae": {"n_units": summary["n_latents"],
                                                                 "n_cross_modal": summary["n_cross_modal"],
                                                                 "per_concept": summary["per_concept"],
                                                                 "examples": summary.get("examples") or []},
                                                         "raw": {"n_units": summary.get("raw_n_units"),
                                                                 "n_cross_modal": summary.get("raw_n_cross_modal")},
                                                         "threshold": summary.get("threshold")})
                return (note + f"\n\n`{CROSSMODAL_FILE}` {what}, so this is the manifest's summary (its best examples, "
                        f"no top words); {fix}.", counts, table)
            except (Unreadable, KeyError, TypeError, AttributeError) as e:
                what += f" and the manifest's summary is unusable ({e})"
        return f"This is a cross-modal bundle but `{CROSSMODAL_FILE}` {what}; {fix}.", None, None


def _table(headers: list[str], rows: list[list]) -> dict:
    return {"headers": list(headers), "data": rows}


def parse_ood(d) -> dict:
    """ood.json -> {"note", "figure", "table"}; Unreadable when a field the panel needs is missing or wrong."""
    d = _dict(d, "the file")
    methods = _dict(d.get("methods"), "`methods`")
    if not methods:
        raise Unreadable("`methods` is empty")
    curves = _dict(d.get("curves"), "`curves`")
    groups: list[str] = []
    for name, m in methods.items():
        m = _dict(m, f"method {name!r}")
        _number(m.get("auroc"), f"the AUROC of {name}", 0, 1)
        _number(m.get("fpr95"), f"the FPR@95 of {name}", 0, 1)
        for g, v in _dict(m.get("auroc_by_group") or {}, f"auroc_by_group of {name}").items():
            _number(v, f"the {g} AUROC of {name}", 0, 1)
            if g not in groups:
                groups.append(g)
        c = _dict(curves.get(name), f"the ROC curve of {name}")
        fpr, tpr = c.get("fpr"), c.get("tpr")
        if not isinstance(fpr, list) or not isinstance(tpr, list) or len(fpr) != len(tpr) or len(fpr) < 2:
            raise Unreadable(f"the ROC curve of {name} does not have two equal lists `fpr` and `tpr` of >= 2 points")
        for x in fpr + tpr:
            _number(x, f"a point of the ROC curve of {name}", 0, 1)

    def best(key, family):
        b = d.get(key)
        name = b.get("method") if isinstance(b, dict) else None
        if name in methods:
            return name
        fam = [(-methods[n]["auroc"], n) for n in methods if family_of(n, methods[n]) == family]
        return min(fam)[1] if fam else None  # as `order` below: the highest AUROC, on a tie the first name

    best_sae, best_raw = best("best_sae", "sae"), best("best_raw", "raw")
    groups.sort()
    order = sorted(methods, key=lambda n: (-methods[n]["auroc"], n))
    headers = OOD_COLUMNS + [f"AUROC {g}" for g in groups] + ["description"]
    rows = []
    for n in order:
        m = methods[n]
        by = m.get("auroc_by_group") or {}
        rows.append([n, "SAE" if family_of(n, m) == "sae" else "raw", round(m["auroc"], 3), round(m["fpr95"], 3),
                     *[_round(by.get(g)) for g in groups], str(m.get("description") or "")])
    fmt = lambda n: "none" if n is None else f"**{markdown_text(n)}** {methods[n]['auroc']:.3f}"
    goal = d.get("goal") if isinstance(d.get("goal"), dict) else {}
    bar = goal.get("sae_auroc_at_least")
    goal_s = ("" if "met" not in goal else
              f" Goal (best SAE AUROC >= {bar} and >= the best raw): **{'met' if goal['met'] else 'not met'}**.")
    sets = []
    for key, label in (("id", "ID"), ("ood", "OOD"), ("fit", "fitted on")):
        s = d.get(key)
        if isinstance(s, dict) and s.get("spec"):
            sets.append(f"{label} {markdown_code(s['spec'])} ({markdown_text(s.get('n_images', '?'))} images)")
    note = (f"**OOD detection** (higher score = more out-of-distribution): best SAE detector {fmt(best_sae)}, best raw "
            f"baseline {fmt(best_raw)}.{goal_s}" + (" " + "; ".join(sets) + "." if sets else "")
            + " The two best are drawn; click a legend entry to show another detector.")
    return {"note": note, "figure": roc_figure(methods, curves, {best_sae, best_raw} - {None}),
            "table": _table(headers, rows)}


def family_of(name: str, m: dict) -> str:
    fam = m.get("family")
    return fam if fam in ("sae", "raw") else name.split("_", 1)[0]


def roc_figure(methods: dict, curves: dict, highlight: set[str]) -> dict:
    """ROC curves as a plotly JSON dict: the highlighted detectors drawn (thick), the others in the legend
    only (click to show), SAE solid and raw dashed, the chance diagonal dotted. Points as in the file."""
    order = sorted(methods, key=lambda n: (n not in highlight, family_of(n, methods[n]) != "sae",
                                           -methods[n]["auroc"], n))
    data = []
    for n in order:
        sae = family_of(n, methods[n]) == "sae"
        data.append({"type": "scatter", "mode": "lines", "x": curves[n]["fpr"], "y": curves[n]["tpr"],
                     "name": f"{n} ({methods[n]['auroc']:.3f})", "visible": True if n in highlight else "legendonly",
                     "line": {"dash": "solid" if sae else "dash", "width": 3 if n in highlight else 1.5},
                     "hovertemplate": f"{n}<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}<extra></extra>"})
    data.append({"type": "scatter", "mode": "lines", "x": [0, 1], "y": [0, 1], "name": "chance",
                 "line": {"dash": "dot", "color": "grey"}, "hoverinfo": "skip"})
    grid = "#e5e5e5"
    return {"data": data, "layout": {
        "title": {"text": "ROC: SAE solid, raw dashed"}, "height": 440, "hoverlabel": HOVER_LABEL,
        "margin": {"l": 55, "r": 20, "t": 50, "b": 62}, "plot_bgcolor": "white",  # (two lines: one was cut at 320 px)
        "xaxis": {"title": {"text": "false positive rate<br>(ID images flagged)"}, "range": [0, 1], "gridcolor": grid},
        "yaxis": {"title": {"text": "true positive rate (OOD images caught)"}, "range": [0, 1.02], "gridcolor": grid},
        "legend": {"title": {"text": "detector (AUROC)"}}}}


def parse_ontology(d) -> tuple[str, dict]:
    d = _dict(d, "the file")
    rows = []
    for view, kinds in _dict(d.get("views"), "`views`").items():
        for kind, e in _dict(kinds, f"view {view!r}").items():
            e = _dict(e, f"{view}/{kind}")
            for cname, a in e.items():
                if isinstance(a, dict) and "score" in a:
                    rows.append([view, "SAE" if kind == "sae" else kind, cname, e.get("n_placed"), _round(a["score"]),
                                 _round(a.get("null_mean")), _round(a.get("null_std")), _round(a.get("z"), 1)])
    if not rows:
        raise Unreadable("`views` holds no clustering scores")
    note = (f"**Ontology recovery** on {markdown_code(d.get('dataset'))} ({markdown_text(d.get('n_images'))} images): "
            f"agreement = {markdown_text(d.get('score') or 'tree agreement')}; z against the permutation null.")
    return note, _table(ONTOLOGY_COLUMNS, rows)


def parse_probes(d) -> tuple[str, dict]:
    d = _dict(d, "the file")
    rows = []
    for f, e in _dict(d.get("factors"), "`factors`").items():
        e = _dict(e, f"factor {f!r}")
        rows.append([f, _round(_number(e.get("sae"), f"the SAE accuracy of {f}")),
                     _round(_number(e.get("raw"), f"the raw accuracy of {f}")), _round(e.get("chance"))])
    held = d.get("held_out_combinations") if isinstance(d.get("held_out_combinations"), dict) else {}
    for f in ("shape", "colour"):
        e = held.get(f)
        if isinstance(e, dict):
            for which in ("seen", "unseen"):
                rows.append([f"{f}, {which} (shape, colour) pairs", _round(e.get(f"sae_{which}")),
                             _round(e.get(f"raw_{which}")), None])
    if not rows:
        raise Unreadable("`factors` is empty")
    test = d.get("test") if isinstance(d.get("test"), dict) else {}
    note = (f"**Linear probes**: accuracy on {markdown_code(test.get('spec'))} single-object images "
            f"({markdown_text(test.get('n_single'))}); "
            "chance = the majority class.")
    return note, _table(PROBE_COLUMNS, rows)


def parse_crossmodal(d) -> tuple[str, dict, dict]:
    """crossmodal.json (or the manifest's summary in its shape) -> (summary, counts per concept, latents)."""
    d = _dict(d, "the file")
    sae = _dict(d.get("sae"), "`sae`")
    threshold = _number(d.get("threshold", sae.get("threshold")), "`threshold`")
    n_units = int(_number(sae.get("n_units"), "`sae.n_units`", 0))
    n_cm = int(_number(sae.get("n_cross_modal"), "`sae.n_cross_modal`", 0))
    per = _dict(sae.get("per_concept"), "`sae.per_concept`")
    counts = sorted(((c, int(_number(v, f"the count of {c}", 0))) for c, v in per.items()), key=lambda t: (-t[1], t[0]))
    examples = {}
    for e in sae.get("examples") or []:
        e = _dict(e, "an example")
        examples[int(_number(e.get("unit"), "an example's unit", 0))] = e
    units = d.get("units")
    rows = []
    if isinstance(units, list):  # every latent: those at or above the threshold are cross-modal
        for k, u in enumerate(units):
            u = _dict(u, f"unit {k}")
            s = u.get("score")
            if isinstance(s, (int, float)) and math.isfinite(s) and s >= threshold:
                rows.append((k, u))
    else:  # the manifest's summary: its best examples only
        rows = [(k, {"concept": e.get("concept"), "score": e.get("score"), "auroc_image": e.get("auroc_image"),
                     "auroc_text": e.get("auroc_text")}) for k, e in examples.items()]
    rows.sort(key=lambda t: (-float(t[1]["score"]), t[0]))
    table = []
    for k, u in rows:
        e = examples.get(k, {})
        mi = e.get("mean_image") or [None, None]
        mt = e.get("mean_text") or [None, None]
        words = ", ".join(str(w[0]) for w in (u.get("top_words") or []) if isinstance(w, (list, tuple)) and w)
        table.append([k, u.get("concept"), _round(u.get("score")), _round(mi[0]), _round(mi[1]), _round(mt[0]),
                      _round(mt[1]), _round(u.get("auroc_image")), _round(u.get("auroc_text")), words])
    raw = d.get("raw") if isinstance(d.get("raw"), dict) else {}
    hit = [f"{markdown_text(c)} {n}" for c, n in counts if n]
    note = (f"**Cross-modal latents**: {n_cm} of {n_units} SAE latents fire for the same concept on image patches and "
            f"on its word (score >= {threshold:g})" + (f": {', '.join(hit)}" if hit else "")
            + (f"; raw residual dimensions (either sign): {raw['n_cross_modal']} of {raw['n_units']}"
               if raw.get("n_units") is not None else "")
            + ". Score = the smaller over the two modalities of (on - off) / (on + off), on/off = mean activation on "
              "tokens with / without the concept. Click a row to open the latent's page.")
    if n_cm and len(table) and any(r[3] is None for r in table):
        note += " Mean on/off are given for the best examples the file lists."
    return note, _table(CONCEPT_COLUMNS, [[c, n] for c, n in counts if n]), _table(CROSSMODAL_COLUMNS, table)
