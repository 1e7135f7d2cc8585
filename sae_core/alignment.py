"""Alignment Score (Pach et al. 2025): how often the neuron with the higher MS is the one users preferred."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import UserError, not_utf8

# bins of |MS_x - MS_y|; a pair falls in [lo, hi)
DEFAULT_EDGES = (0.0, 0.05, 0.1, 0.2, 0.4, math.inf)


class AlignmentBin(NamedTuple):
    """Pairs whose |delta MS| lies in [lo, hi): how many, and the share of them MS got right."""
    lo: float
    hi: float
    n: int
    agreement: float


class AlignmentResult(NamedTuple):
    """Agreement of MS with a preference over pairs of neurons, overall and per |delta MS| bin."""
    agreement: float
    n_pairs: int
    n_preference_ties: int
    n_ms_ties: int
    n_missing: int
    bins: tuple

    def to_dict(self) -> dict:
        return {"agreement": json_number(self.agreement), "n_pairs": self.n_pairs,
                "n_preference_ties": self.n_preference_ties, "n_ms_ties": self.n_ms_ties,
                "n_missing": self.n_missing,
                "bins": [{"lo": b.lo, "hi": json_number(b.hi), "n": b.n, "agreement": json_number(b.agreement)} for b in self.bins]}


AlignmentResult.agreement.__doc__ = "share of scored pairs where sign(MS_x - MS_y) = sign(preference); NaN if none"
AlignmentResult.n_pairs.__doc__ = "pairs scored: a strict preference and two different, finite MS"
AlignmentResult.n_preference_ties.__doc__ = "pairs skipped because the preference is 0 (no winner)"
AlignmentResult.n_ms_ties.__doc__ = "pairs skipped because MS_x == MS_y (MS names no winner)"
AlignmentResult.n_missing.__doc__ = "pairs skipped because an MS is NaN (neuron without a score)"
AlignmentResult.bins.__doc__ = "AlignmentBin per |MS_x - MS_y| interval of the edges"


def json_number(v):
    """JSON has no NaN or inf: None for NaN (and None), the string "inf" for inf, else a float."""
    if v is None or math.isnan(v):
        return None
    return "inf" if v == math.inf else float(v)


def check_edges(edges, name: str = "bin edges") -> tuple:
    """The bin edges as floats, refused unless they increase from 0 or above (NaN compares false); `name` is
    what the caller's user gave them as (the command's --bins)."""
    edges = tuple(float(e) for e in edges)
    if len(edges) < 2 or not all(b > a for a, b in zip(edges, edges[1:])) or not edges[0] >= 0:
        shown = ",".join(f"{e:g}" for e in edges)  # as typed: a Python tuple "(0.1,)" before 2026-12-06
        raise UserError(f"{name} {shown} must be two or more numbers increasing from 0 or above, e.g. 0,0.1,0.2,inf.")
    return edges


def alignment_score(ms_x, ms_y, preference, edges=DEFAULT_EDGES) -> AlignmentResult:
    """ms_x, ms_y: (P,) MS of the two neurons of each pair; preference: (P,) > 0 when x is
    preferred, < 0 when y is, 0 for no preference (skipped). Pairs with a NaN MS or equal MS are
    skipped and counted."""
    ms_x, ms_y, pref = (np.asarray(v, np.float64).ravel() for v in (ms_x, ms_y, preference))
    if not ms_x.shape == ms_y.shape == pref.shape:
        raise ValueError(f"ms_x, ms_y and preference must have one value per pair: {ms_x.shape}, {ms_y.shape}, {pref.shape}")
    edges = check_edges(edges)
    missing = ~(np.isfinite(ms_x) & np.isfinite(ms_y))
    pref_tie = (pref == 0) & ~missing
    ms_tie = (ms_x == ms_y) & ~missing & ~pref_tie
    used = ~missing & ~pref_tie & ~ms_tie
    agree = np.sign(ms_x - ms_y) == np.sign(pref)
    # to 12 decimals: 0.3 - 0.2 is 0.09999999999999998 in binary, and pairs of MS written to a few decimals fell
    # in the bin below the edge they sit on (until 2026-12-05)
    delta = np.round(np.abs(ms_x - ms_y), 12)
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        sel = used & (delta >= lo) & (delta < hi)
        bins.append(AlignmentBin(lo, hi, int(sel.sum()), float(agree[sel].mean()) if sel.any() else math.nan))
    return AlignmentResult(agreement=float(agree[used].mean()) if used.any() else math.nan, n_pairs=int(used.sum()),
                           n_preference_ties=int(pref_tie.sum()), n_ms_ties=int(ms_tie.sum()),
                           n_missing=int(missing.sum()), bins=tuple(bins))


def read_pairs_csv(path) -> dict:
    """The paper's `pairs.csv`: columns k_x, k_y, R_user and optional MS_x_NAME / MS_y_NAME pairs.

    Returns {"k_x": int64 (P,), "k_y": int64 (P,), "R_user": float64 (P,), "ms": {NAME: (ms_x, ms_y)}}.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"pairs file {path} is a folder; give the path of pairs.csv in it.")
    if not path.is_file():
        raise UserError(f"pairs file {path} does not exist; give the path of pairs.csv.")
    rows, lines = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel starts its UTF-8 with a BOM
            reader = csv.reader(f)
            cols = [c.strip() for c in next(reader, [])]  # "k_x, k_y, R_user" as activations.csv allows
            for fields in reader:
                if not fields:  # a blank line
                    continue
                if len(fields) == len(cols) + 1 and not fields[-1].strip():
                    fields.pop()  # one trailing comma, as some exporters write: no value (as in activations.csv)
                if len(fields) != len(cols):
                    raise UserError(f"{path} line {reader.line_num} has {len(fields)} fields but the header "
                                    f"{len(cols)}; give every row one value per column.")
                rows.append(dict(zip(cols, fields)))
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    need = [c for c in ("k_x", "k_y", "R_user") if c not in cols]
    if need and len(cols) == 1 and any(sep in cols[0] for sep in ";\t"):
        raise UserError(f"{path} line 1 is not comma-separated; save pairs.csv with commas between columns.")
    if need:
        raise UserError(f"{path} lacks the column(s) {', '.join(need)}; pairs.csv needs k_x,k_y,R_user "
                        f"(and optionally MS_x_NAME,MS_y_NAME).")
    if not rows:
        raise UserError(f"{path} has a header but no pairs; give one row per pair of neurons.")

    def column(name, dtype):
        values = []
        for r, line in zip(rows, lines):
            text = r[name].strip()
            try:
                values.append(float(text) if text else math.nan)
            except ValueError:
                raise UserError(f"{path} line {line} has {text[:40]!r} in column {name}, which is not a number; "
                                "fix that row.") from None
        return np.array(values).astype(dtype)

    names = [c[len("MS_x_"):] for c in cols if c.startswith("MS_x_") and "MS_y_" + c[len("MS_x_"):] in cols]
    out = {"k_x": column("k_x", np.float64), "k_y": column("k_y", np.float64), "R_user": column("R_user", np.float64),
           "ms": {n: (column("MS_x_" + n, np.float64), column("MS_y_" + n, np.float64)) for n in names}}
    for k in ("k_x", "k_y"):
        v = out[k]
        if not np.all(np.isfinite(v)) or not np.all(v == np.round(v)) or (v < 0).any():
            raise UserError(f"column {k} of {path} must hold non-negative integer neuron ids.")
        out[k] = v.astype(np.int64)
    return out


def alignment_figure(results: dict, title: str = "Alignment of MS with user preference"):
    """A plotly figure: agreement per |delta MS| bin, one line per MS variant; overall in the legend.

    results: {name: AlignmentResult}. plotly is imported here, so the module works without it.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, r in results.items():
        labels = [f"[{b.lo:g}, {b.hi:g})" for b in r.bins]
        fig.add_trace(go.Scatter(
            x=labels, y=[None if math.isnan(b.agreement) else b.agreement for b in r.bins], mode="lines+markers",
            name=f"{name} (overall {r.agreement:.3f}, {r.n_pairs} pairs)",
            customdata=[b.n for b in r.bins], hovertemplate="|ΔMS| %{x}<br>agreement %{y:.3f}<br>%{customdata} pairs"))
    fig.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
    fig.update_layout(title=title, xaxis_title="|MS_x - MS_y|", yaxis_title="agreement with preference",
                      yaxis_range=[0, 1.02], template="plotly_white")
    return fig
