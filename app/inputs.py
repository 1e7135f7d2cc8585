"""Bounds on what users type or send through the API, and the page state kept in the URL query."""
from __future__ import annotations

import math
import re
from urllib.parse import urlencode

import numpy as np

from sae_core.errors import UserError, integer_text

MAX_LATENTS = 8
"""Latents one steering request may clamp at once."""
CLAMP_FACTOR = 10.0
"""Clamp values are bounded to +-CLAMP_FACTOR times their neuron's strength unit; the Steer page's sliders
go from 0 to CLAMP_FACTOR."""
MAX_NEW_TOKENS = 64
MAX_QUESTION_CHARS = 300
MAX_QUERY_CHARS = 200


def yes_no(value, what: str) -> bool:
    """A checkbox's value as sent: a bool (0 and 1, "true" and "false" as an API caller may send them), else
    UserError. Gradio's Checkbox passes anything through, and "false" or "maybe" read as true."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise UserError(f"{what} {shown(value)} is neither true nor false; send true or false.")


def integer(value, what: str, low: int, high: int) -> int:
    """`value` as an int in [low, high]; UserError (one sentence) for NaN, fractions, text or out of range."""
    wanted = f"give an integer between {low} and {high}"
    if value is None:
        raise UserError(f"{what} is missing; {wanted}.")
    if isinstance(value, bool):  # an int to Python, never an id to a user
        raise UserError(f"{what} {value} is not an integer; {wanted}.")
    if isinstance(value, str):
        i = integer_text(value)
        if i is None:
            raise UserError(f"{what} {shown(value)} is not an integer; {wanted}.")
        if abs(i) >= 10 ** 15:  # far outside any bound, and past what a float holds exactly
            raise UserError(f"{what} {shown(value.strip())} is out of range; {wanted}.")
        value = i
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} {shown(value)} is not an integer; {wanted}.") from None
    if not math.isfinite(f) or f != int(f):
        raise UserError(f"{what} {shown(value)} is not an integer; {wanted}.")
    if not low <= f <= high:
        raise UserError(f"{what} {f:.15g} is out of range; {wanted}.")
    return int(f)


def shown(value, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: a pasted page does not come back in the message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def neuron_id(value, n_neurons: int) -> int:
    return integer(value, "neuron id", 0, n_neurons - 1)


def int_list(text, what: str, low: int, high: int, limit: int) -> list[int]:
    """ "3, 17 42" (or a list) -> [3, 17, 42], each bounded; duplicates dropped, order kept."""
    if text is None:
        return []
    items = text if isinstance(text, (list, tuple)) else str(text).replace(",", " ").split()
    out: list[int] = []
    for item in items:
        i = integer(item, what, low, high)
        if i not in out:
            out.append(i)
    if len(out) > limit:
        raise UserError(f"{len(out)} {what}s were given; give at most {limit}.")
    return out


_NUMBER_TEXT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?(?:nan|inf|infinity)",
                          re.IGNORECASE)
"""A number as text, in ASCII only (as `sae_core.errors.integer_text` reads ids): float() also took other scripts'
digits ("\uff13", "\u0661\u0662") and "1_000"."""


def clamp_value(value, max_act: float, what: str = "clamp value") -> tuple[float, bool]:
    """A finite clamp value bounded to +-CLAMP_FACTOR * max_act; returns (value, was_bounded).

    NaN, infinities, booleans and text that is no ASCII number are refused with a message (the value cut to
    40 characters by `shown`); a huge finite number is bounded, and the caller says so on the page.
    """
    wanted = "give a number such as 5"
    if isinstance(value, (bool, np.bool_)):  # a number to Python (True was strength 1), never one to a user
        raise UserError(f"{what} {value} is not a number; {wanted}.")
    if isinstance(value, str) and not _NUMBER_TEXT.fullmatch(value.strip()):
        raise UserError(f"{what} {shown(value)} is not a number; {wanted}.")
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # an int past what a float holds: finite, so bounded as the others
        v = math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        raise UserError(f"{what} {shown(value)} is not a number; {wanted}.") from None
    else:
        if not math.isfinite(v):
            raise UserError(f"{what} {shown(value)} is not a finite number; {wanted}.")
    bound = CLAMP_FACTOR * max(float(max_act), 1e-6)
    bounded = min(max(v, -bound), bound)
    return bounded, bounded != v


LINK_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def share(value, what: str) -> float:
    """A number from 0 to 1 (a filter's minimum MS), from a slider as sent: Gradio's own check refused None or
    "abc" in a paragraph naming its component classes, and -1 in "Value -1 is less than minimum value 0", naming
    no field (until 2026-12-05)."""
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not 0 <= x <= 1:  # NaN fails it too
        raise UserError(f"the {what} {shown(value)} is not a number from 0 to 1; give one, e.g. 0.5.")
    return x


def link_flag(value, what: str) -> bool:
    """A yes/no field of a link (keep_error=1, sweep=0, desc=no): 1/true/yes/on or 0/false/no/off, as the app's
    yes/no settings read; UserError (one sentence) for anything else, where "maybe" read as no until 2026-12-05."""
    word = str(value).strip().lower()
    if word not in LINK_FLAGS:
        raise UserError(f"{what} {shown(value)} is neither yes nor no; give 1 or 0 (true/false, yes/no, on/off "
                        "also do).")
    return LINK_FLAGS[word]


def text(value, what: str, limit: int) -> str:
    # a list or a number from an API call was searched for as its Python text ("['a red object']"), and a
    # steer link named the question as sent while the model answered that text (until 2026-12-05)
    if value is not None and not isinstance(value, str):
        raise UserError(f"the {what} {shown(value)} is not text; give a string.")
    s = "" if value is None else value.strip()
    if len(s) > limit:
        raise UserError(f"the {what} is {len(s)} characters long; keep it to {limit} at most.")
    return s


# ----------------------------------------------------------------------------------------------
# URL query state: ?tab=neuron&neuron=12, ?tab=steer&image=3&latents=5,9&values=4,2&patches=1,2&keep_error=1
# &sweep=0&tokens=30 (the answer's length),
# ?tab=hierarchy&root=3&kind=treemap, ?tab=neurons&min_ms=0.5&label=red&sort=support&desc=0&rows=50 (a filter)
# and ?tab=neurons&search=a+red+star (a text search)
# ----------------------------------------------------------------------------------------------
STATE_KEYS = ("tab", "neuron", "image", "query", "latents", "values", "patches", "keep_error", "sweep", "tokens",
              "question", "root", "kind", "search", "min_ms", "min_support", "level", "label", "sort", "desc", "rows")
TABS = ("overview", "neurons", "neuron", "images", "hierarchy", "steer")


def encode_state(state: dict) -> str:
    """The query string (without '?') for the keys of `state` that are set; lists become "a,b,c"."""
    pairs = []
    for key in STATE_KEYS:
        v = state.get(key)
        if v is None or v == "" or v == []:
            continue
        if isinstance(v, (list, tuple)):
            v = ",".join(_short(x) for x in v)
        elif isinstance(v, bool):
            v = int(v)
        pairs.append((key, _short(v) if isinstance(v, float) else str(v)))
    return urlencode(pairs)


def _short(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def decode_state(params) -> dict:
    """Query parameters (a mapping) -> raw state with the known keys only, lists split, unchecked.

    Values are checked later by the page that uses them, against the bundle's sizes; a flag (keep_error,
    sweep, desc) too, by `link_flag` (keep_error=maybe was taken as false here, silently); an unknown tab is
    dropped, and `link_tab` warns about it.
    """
    state: dict = {}
    for key in STATE_KEYS:
        if key not in params:
            continue
        v = str(params[key])  # whole: a 5,000-character query was cut to 1,000 and called "1000 characters long"
        if key in ("latents", "values", "patches"):
            state[key] = [s for s in v.replace(" ", ",").split(",") if s]
        else:
            state[key] = v
    if state.get("tab") not in TABS:
        state.pop("tab", None)
    return state
