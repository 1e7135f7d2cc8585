"""Text from a bundle, a link or an upload's name, made safe to show in a Markdown component or a toast."""
from __future__ import annotations

import re

from sae_core.errors import readable  # a name not UTF-8 by its bytes: Gradio's JSON encoder failed on the answer


def markdown_text(text) -> str:
    """Text from a bundle or a link (a label, a query) for a Markdown component, shown as itself: one line, HTML's
    three characters as entities, the punctuation that acts anywhere in a line backslashed (_MARKDOWN_INLINE), and
    what starts a block at its start and GFM's bare "www." links. Until 2026-12-05 a link's query put a live link in
    the Images page's note, and a bundle's label `<h1>` a heading in a neuron's header."""
    # one line (a blank line ended the list item it stood in), without the indent that makes a code block
    text = " ".join(readable(text).splitlines()).lstrip()
    out = "".join(_HTML_ENTITIES.get(ch) or ("\\" + ch if ch in _MARKDOWN_INLINE else ch) for ch in text)
    out = re.sub(r"(?i)\b(www)\.", r"\1\\.", out)
    if number := re.match(r"\d+(?=[.)])", out):  # "1. item"
        return out[:number.end()] + "\\" + out[number.end():]
    return "\\" + out if out[:1] in ("#", "+", "-", "=") else out


def markdown_sentence(text) -> str:
    """One of our own sentences that quotes a bundle's text (a path, a spec, a file's field), for Markdown: as
    markdown_text, its backticks dropped (a code span of ours cannot be told from one in the quoted text)."""
    return markdown_text(str(text).replace("`", ""))


def markdown_code(text) -> str:
    """Text as a Markdown code span, whatever backticks it holds (a fence longer than its longest run of them:
    a backtick in a bundle's recorded command ended the span, and what followed was rendered)."""
    text = " ".join(readable(text).splitlines())  # a blank line ended the span and the list item it stood in
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip(" ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# what acts anywhere in a line in Markdown, GFM or KaTeX: emphasis, code, links and images, table cells,
# strikethrough, math, and the "https:" and "a@b" GFM turns into links by themselves
_MARKDOWN_INLINE = set("\\`*_{}[]()!|~$:@")


def toast_text(message: str) -> str:
    """A message for gr.Error/gr.Warning/gr.Info, whose toasts render HTML: a link's `kind=<b>x</b>` was drawn bold
    inside the warning that quoted it (until 2026-12-05). Only what HTML would read is escaped, a "<" that opens a
    tag and a "&" that starts an entity, because API clients get the same message ("|v| < 3.4e38" stays as it is)."""
    text = re.sub(r"&(?=#?\w+;)", "&amp;", readable(message))
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)
