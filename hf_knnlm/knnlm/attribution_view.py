"""The attribution view (``hf-knnlm explain --html``): a standalone HTML page a person reads.

Each generated token is shaded by the share of its probability that came from the datastore
(lmbda p_kNN / p), on a scale stretched to the text's own range (at lmbda 0.15 most shares are a few
percent, and an absolute 0-100% scale would leave most of the text white); a legend gives the range.
Clicking a token (or Tab + Enter) shows, below the text, its nearest stored contexts: weight in
p_kNN, stored value, source document and character span, and the text before the span. Without
JavaScript every token's table is listed below the text.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

# A sequential scale (light yellow -> orange -> red): colour stops at 0, 0.5 and 1.
_STOPS = ((255, 247, 214), (253, 141, 60), (189, 0, 38))
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 56em; margin: 2em auto; padding: 0 1em; color: #222; }
.text { font-size: 1.15em; line-height: 2; white-space: pre-wrap; border: 1px solid #ddd; padding: .8em; }
.prompt { color: #555; font-weight: 600; }
.tok { cursor: pointer; border-radius: 3px; padding: .1em 0; }
.tok:focus, .tok.selected { outline: 2px solid #1f4e99; }
.tok.nosearch { text-decoration: underline dotted #888; }
.legend { display: flex; align-items: center; gap: .6em; margin: .8em 0; font-size: .9em; }
.bar { width: 16em; height: 1em; border: 1px solid #999; }
.ticks { display: flex; justify-content: space-between; width: 16em; color: #555; }
.ticks span { font-size: .8em; }
.src { white-space: nowrap; }
table { border-collapse: collapse; width: 100%; font-size: .9em; margin-top: .4em; }
th, td { border-bottom: 1px solid #e3e3e3; padding: .25em .5em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.span { background: #ffe08a; font-weight: 600; }
.match { color: #0a6b2d; font-weight: 700; }
"""
_SCRIPT = """
function show(i) {
  document.querySelectorAll('section.detail').forEach(s => { s.hidden = s.dataset.i !== i; });
  document.querySelectorAll('.tok').forEach(t => t.classList.toggle('selected', t.dataset.i === i));
}
document.querySelectorAll('.tok').forEach(t => {
  t.addEventListener('click', () => show(t.dataset.i));
  t.addEventListener('keydown', e => {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); show(t.dataset.i); }
  });
});
show(document.querySelector('.tok.selected')?.dataset.i ?? '0');
"""


def share_colour(value: float) -> str:
    """CSS colour of a position in [0, 1] of the scale (0 lightest, 1 darkest).

    Examples:

    ```python
    >>> from hf_knnlm.knnlm.attribution_view import share_colour
    >>> share_colour(0.0), share_colour(0.5), share_colour(1.0)
    ('rgb(255, 247, 214)', 'rgb(253, 141, 60)', 'rgb(189, 0, 38)')
    ```
    """
    value = min(1.0, max(0.0, value)) * (len(_STOPS) - 1)
    i = min(int(value), len(_STOPS) - 2)
    low, high, f = _STOPS[i], _STOPS[i + 1], value - i
    return "rgb({}, {}, {})".format(*(round(a + (b - a) * f) for a, b in zip(low, high, strict=True)))


def share_range(attributions: Sequence[Any]) -> tuple[float, float]:
    """The (lowest, highest) datastore share of the tokens that searched: the ends of the colour scale.

    Examples:

    ```python
    >>> from types import SimpleNamespace as T
    >>> from hf_knnlm.knnlm.attribution_view import share_range
    >>> tokens = [T(knn_share=0.02, searched=True), T(knn_share=0.11, searched=True)]
    >>> share_range(tokens + [T(knn_share=0.0, searched=False)])  # a token without a search is left out
    (0.02, 0.11)
    ```
    """
    shares = [a.knn_share for a in attributions if a.searched] or [0.0]
    return min(shares), max(shares)


def _position(share: float, low: float, high: float) -> float:
    return 0.5 if high - low < 1e-12 else (share - low) / (high - low)


def _token_span(i: int, a: Any, low: float, high: float, selected: bool) -> str:
    t = _position(a.knn_share, low, high)
    classes = "tok" + (" selected" if selected else "") + ("" if a.searched else " nosearch")
    colour = "#fff" if t > 0.8 else "#111"
    tip = f"p={a.prob:.3f}, from the datastore {a.knn_share:.1%}"
    return (
        f'<span title="{html.escape(tip)}" class="{classes}" data-i="{i}" tabindex="0" '
        f'style="background: {share_colour(t)}; color: {colour}">{html.escape(a.token)}</span>'
    )


def _neighbour_row(rank: int, n: Any) -> str:
    where = f"{n.document}[{n.char_start}:{n.char_end}]" if n.document else f"entry {n.entry}"
    context = f'…{html.escape(n.context[-80:])}<span class="span">{html.escape(n.span_text)}</span>'
    mark = '<span class="match" title="its stored value is this token">✓</span>' if n.matches else ""
    return (
        f'<tr><td class="num">{rank}</td><td class="num">{n.weight:.3f}</td>'
        f'<td>{html.escape(repr(n.token))} {mark}</td><td class="src">{html.escape(where)}</td>'
        f'<td class="num">{n.distance:.4g}</td><td class="ctx">{context if n.document else ""}</td></tr>'
    )


def _detail(i: int, a: Any, selected: bool) -> str:
    head = (
        f"<h3>{html.escape(repr(a.token))}: p = {a.prob:.3f} (LM {a.lm_prob:.3f}, kNN {a.knn_prob:.3f},"
        f" lmbda {a.lmbda:.3g}); {a.knn_share:.1%} from the datastore</h3>"
    )
    if not a.neighbours:
        body = "<p>No search at this step (the gate or RetoMaton skipped it).</p>"
    else:
        rows = "".join(_neighbour_row(r, n) for r, n in enumerate(a.neighbours, 1))
        body = (
            "<table><tr><th>#</th><th>weight in p_kNN</th><th>stored value</th><th>source[span]</th>"
            f"<th>distance</th><th>stored context … [span]</th></tr>{rows}</table>"
        )
    return f'<section class="detail" data-i="{i}"{"" if selected else " hidden"}>{head}{body}</section>'


def _legend(low: float, high: float) -> str:
    stops = ", ".join(share_colour(x / 4) for x in range(5))
    ticks = "".join(f"<span>{low + (high - low) * x / 4:.1%}</span>" for x in range(5))
    return (
        '<div class="legend"><span>share of p(token) from the datastore, lmbda p_kNN / p:</span>'
        f'<div><div class="bar" style="background: linear-gradient(to right, {stops})"></div>'
        f'<div class="ticks">{ticks}</div></div>'
        '<span><span class="tok nosearch">dotted</span> = no search</span></div>'
    )


def render_html(prompt: str, attributions: Sequence[Any], title: str = "kNN-LM attribution") -> str:
    """A standalone HTML page: the prompt, each generated token shaded by its datastore share (scaled
    to the text's range, with a legend), and a token's nearest stored contexts on click.

    Args:
        prompt (`str`): the text generation started from (shown unshaded).
        attributions (`list[TokenAttribution]`): from [`explain_generation`][hf_knnlm.explain_generation].
        title (`str`, *optional*): the page title.

    Returns:
        `str`: the HTML page (no external resources).

    Examples:

    ```python
    >>> from types import SimpleNamespace as T
    >>> from hf_knnlm import render_html
    >>> near = T(entry=7, token=" king", weight=0.6, distance=1.5, matches=True, document="plays.txt",
    ...          char_start=120, char_end=125, context="Long live the", span_text=" king")
    >>> tokens = [T(token=" the", prob=0.5, lm_prob=0.52, knn_prob=0.4, lmbda=0.15, knn_share=0.02,
    ...             searched=True, neighbours=[]),
    ...           T(token=" king", prob=0.3, lm_prob=0.25, knn_prob=0.6, lmbda=0.15, knn_share=0.11,
    ...             searched=True, neighbours=[near])]
    >>> page = render_html("Long live", tokens)
    >>> "2.0%" in page and "11.0%" in page  # the legend spans the text's own range
    True
    >>> "plays.txt[120:125]" in page  # the neighbour's source and span, shown on click
    True
    ```
    """
    low, high = share_range(attributions)
    first = max(range(len(attributions)), key=lambda i: attributions[i].knn_share, default=0)
    spans = "".join(_token_span(i, a, low, high, i == first) for i, a in enumerate(attributions))
    details = "".join(_detail(i, a, i == first) for i, a in enumerate(attributions))
    return (
        f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style><noscript><style>section.detail[hidden] {{ display: block; }}</style>"
        f"</noscript><body><h1>{html.escape(title)}</h1>"
        "<p>Each generated token is shaded by how much of its probability came from the datastore. "
        "Click a token to see the stored contexts its prediction was retrieved from.</p>"
        f"{_legend(low, high)}<div class='text'><span class='prompt'>{html.escape(prompt)}</span>"
        f"{spans}</div>"
        f"<div id='neighbours'>{details}</div><script>{_SCRIPT}</script></body></html>"
    )
