"""The static SVG renderer (audit/report/svg.py): escaping, visible 0% bars, labels that
would collide are angled, loss axes from 0, bounds drawn, byte-stable output."""

from __future__ import annotations

import re

from report_fixtures import XSS_CLASS, class_entry
from robaudit.audit.report.figures import per_class_figure, trajectory_figure, training_curves_figure
from robaudit.audit.report.svg import MIN_BAR_PX, render_svg, text


def _bars(classes):
    entries = [class_entry(name, 0 if k == 0 else 10, 20) for k, name in enumerate(classes)]
    return per_class_figure({"pgd": {"per_class": entries}}, list(classes), list(range(len(classes))), classes[0])


def test_labels_are_literal_text_never_markup():
    svg = str(render_svg("f", _bars(["a", XSS_CLASS, "c"]), 'label "quoted" <x>'))
    assert "<img" not in svg and "&lt;img src=x onerror=alert(1)&gt;" in svg
    assert 'aria-label="label &#34;quoted&#34; &lt;x&gt;"' in svg
    assert text("&lt;b&gt;") == "&lt;b&gt;" and text("<b>bold</b><br>▲ worst") == "bold ▲ worst"


def test_zero_bars_stay_visible_and_output_is_stable():
    spec = _bars(["ring", "cross", "dot"])
    svg = str(render_svg("f", spec, "x"))
    heights = [float(h) for h in re.findall(r'<g><rect [^>]*height="([\d.]+)"', svg)]
    assert min(heights) >= MIN_BAR_PX and len(heights) == 3
    assert svg == str(render_svg("f", spec, "x"))


def test_crowded_labels_are_angled_and_short_ones_are_not():
    demo = ["h-stripes", "v-stripes", "diagonal", "anti-diagonal", "checker", "ring", "dot", "cross", "ramp",
            "fine-stripes"]
    spec = _bars(demo)
    assert spec["layout"]["xaxis"]["tickangle"] == 0        # the spec's own rule let them collide
    assert "rotate(-35" in str(render_svg("f", spec, "x"))
    assert "rotate(-35" not in str(render_svg("f", _bars(["a", "b", "c"]), "x"))


def test_loss_axis_starts_at_zero_and_bounds_are_drawn():
    columns = [{"key": "loss", "label": "Training loss", "is_fraction": False}]
    spec = training_curves_figure(columns, [1, 2, 3], [{"loss": 0.044}, {"loss": 0.03}, {"loss": 0.027}])
    svg = str(render_svg("f", spec, "x"))
    assert re.search(r'text-anchor="start">0</text>', svg)           # right axis has a 0 tick
    classes = [f"c{k}" for k in range(6)]
    trajectory = trajectory_figure(classes, "tau_adv", [[1.0] * 6, [0.5] + [1.1] * 5], bounds=[0.5, 5.0])
    drawn = str(render_svg("t", trajectory, "x"))
    assert drawn.count("<title>bound 0.5</title>") == 6 and "dashed: the bounds" in drawn
