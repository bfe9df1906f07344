"""The pictures a person reads: the tuning plot and the attribution view (checked in a browser too,
in tests/test_docs_site.py)."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import matplotlib.colors
import pytest

from hf_knnlm.knnlm.attribution_view import render_html, share_colour
from hf_knnlm.knnlm.tuning_plot import sweep_figure

TEMPERATURES = [0.36, 1.0, 1.2, 2.4, 6.0, 10.0, 12.0, 24.0, 60.0]  # the default grid's shape: 9 values
KS = [8, 32, 128, 256, 512, 1024]


@pytest.fixture(scope="module")
def sweep() -> dict:
    points = [
        {
            "k": k,
            "temperature": t,
            "lmbda": lmbda,
            "knn_ppl": 17 - 9 * lmbda + 20 * lmbda**2 + abs(t - 2.4) / 20,
        }
        for k, t, lmbda in itertools.product(KS, TEMPERATURES, [0.05, 0.1, 0.25, 0.5, 0.8])
    ]
    best = min(points, key=lambda p: p["knn_ppl"])
    return {"points": points, "best": best, "base_ppl": 17.0, "median_nn_distance": 12.0}


def test_every_panel_of_the_tuning_plot_has_data(sweep):
    fig = sweep_figure(sweep)
    assert len(fig.axes) == 2  # whatever the number of ks: no empty panel
    for ax in fig.axes:
        curves = [line for line in ax.lines if len(line.get_xdata()) > 1]
        assert len(curves) >= len(TEMPERATURES)


def test_tuning_plot_temperatures_have_distinct_colours_and_one_legend(sweep):
    fig = sweep_figure(sweep)
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)  # one place to look
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels[: len(TEMPERATURES)][3] == "T=2.4 (0.2 m)" and labels[-2:] == ["base LM", "best"]
    colours = [matplotlib.colors.to_rgb(line.get_color()) for line in fig.axes[0].lines[: len(TEMPERATURES)]]
    for a, b in itertools.combinations(colours, 2):  # no two temperatures in near-identical colours
        assert sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5 > 0.15


def _token(token: str, share: float, neighbours=()) -> SimpleNamespace:
    return SimpleNamespace(
        token=token,
        prob=0.3,
        lm_prob=0.3,
        knn_prob=0.3,
        lmbda=0.15,
        knn_share=share,
        searched=True,
        neighbours=list(neighbours),
    )


def test_attribution_colours_span_the_texts_own_range():
    page = render_html("Long live", [_token(" the", 0.01), _token(" king", 0.11), _token("!", 0.06)])
    backgrounds = re.findall(r'class="tok[^"]*" data-i="\d" tabindex="0" style="background: ([^;]+);', page)
    assert backgrounds == [share_colour(0.0), share_colour(1.0), share_colour(0.5)]  # not near-white at 11%
    assert re.findall(r"<span>([\d.]+%)</span>", page) == ["1.0%", "3.5%", "6.0%", "8.5%", "11.0%"]


def test_attribution_view_lists_every_tokens_neighbours_one_shown_at_a_time():
    near = SimpleNamespace(
        entry=3,
        token=" king",
        weight=0.7,
        distance=2.0,
        matches=True,
        document="plays.txt",
        char_start=40,
        char_end=45,
        context="Long live the",
        span_text=" king",
    )
    page = render_html("Long live", [_token(" the", 0.01), _token(" king", 0.11, [near])])
    sections = re.findall(r'<section class="detail" data-i="(\d)"( hidden)?>', page)
    assert sections == [("0", " hidden"), ("1", "")]  # the token of the largest share is shown first
    assert "plays.txt[40:45]" in page and "0.700" in page and '<span class="span"> king</span>' in page
