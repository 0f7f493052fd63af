"""report.html: the compression report as one self-contained page (docs/report.md, issue 8).

Owns turning a report.json dict into HTML: headline figures, the per-layer table and inline SVG
plots (per-layer error, size by layer before/after, and for several reports accuracy against size
and against latency). Pure string building: no numpy, no matplotlib, no JavaScript.

Why it is built this way:
- The page must open with no network (a report is mailed around, archived, opened offline), so
  there is no external script, font, stylesheet or image: plots are SVG elements written here and
  a Content-Security-Policy forbids fetching anything at all.
- Layer and tensor names come from an uploaded, untrusted model, and the API serves this page, so
  every piece of text goes through ``html.escape``; nothing from the report becomes markup.
- The output is also well-formed XML (numeric entities only, every element closed), which lets a
  test parse it strictly.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Sequence

from worker.pipeline.report_cost import cost_section

# The plots stay readable with this many bars; the table below them always lists every layer.
MAX_BARS = 40
PLOT_WIDTH = 760
BAR_HEIGHT = 16
LABEL_WIDTH = 230

# No fetches of any kind: inline styles only, images only from data: URLs (none are used today).
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px;
       color: #1d2433; background: #ffffff; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
h2 { font-size: 17px; margin: 28px 0 8px 0; border-bottom: 1px solid #d7dce5; padding-bottom: 4px; }
.meta { color: #5b6475; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 16px; }
.card { border: 1px solid #d7dce5; border-radius: 6px; padding: 10px 14px; min-width: 150px;
        background: #f6f8fb; }
.card .label { font-size: 12px; color: #5b6475; }
.card .value { font-size: 22px; font-weight: 600; }
.card .sub { font-size: 12px; color: #5b6475; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d7dce5; padding: 3px 8px; text-align: right; }
th { background: #eef1f6; }
td.name, th.name { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; }
td.text { text-align: left; }
.note { color: #5b6475; font-size: 12px; }
.notice { border: 2px solid #c8413b; background: #fdf0ef; color: #7a1f1a; border-radius: 6px;
          padding: 8px 12px; margin-top: 12px; font-weight: 600; }
svg text { font-family: system-ui, sans-serif; font-size: 11px; fill: #1d2433; }
"""

_BLUE = "#3b6fd8"
_ORANGE = "#e8833a"
_RED = "#c8413b"
_GREY = "#8a93a6"
EM_DASH = "\u2014"


# ------------------------------------------------------------------------------ formatting


def _num(value: Any) -> float | None:
    """A number from a report field, or None for missing / non-numeric (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3, suffix: str = "") -> str:
    """A number for people: ``n/a`` when absent, the infinity sign for an exact (lossless) layer."""
    number = _num(value)
    if number is None:
        return "n/a"
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return ("\u221e" if number > 0 else "-\u221e") + suffix
    if number == int(number) and abs(number) < 1e15 and digits == 0:
        return f"{int(number):,}{suffix}"
    return f"{number:,.{digits}f}{suffix}"


def _fmt_ratio(value: Any) -> str:
    number = _num(value)
    if number is None or not math.isfinite(number):
        return _fmt(value)
    return f"{number:.2f}\u00d7"


def _fmt_bytes(value: Any) -> str:
    number = _num(value)
    if number is None or not math.isfinite(number):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(number) < 1024 or unit == "GiB":
            return f"{number:,.0f} {unit}" if unit == "B" else f"{number:,.2f} {unit}"
        number /= 1024
    return f"{number:,.2f} GiB"


def _fmt_macs(side: dict) -> str:
    """MACs, with "at least" where the report says a dim was guessed or a layer's shape unknown."""
    text = _fmt(side.get("macs"), 0)
    return f"\u2265 {text} (lower bound)" if side.get("macs_lower_bound") and text != "n/a" else text


def _fmt_percent(value: Any) -> str:
    number = _num(value)
    if number is None or not math.isfinite(number):
        return _fmt(value)
    return f"{number * 100:.1f}%"


def _get(mapping: Any, *path: str) -> Any:
    """``report[a][b]...`` that answers None instead of raising when a level is absent."""
    for key in path:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


# ------------------------------------------------------------------------------ SVG plots


def _svg(width: int, height: int, body: Iterable[str], label: str) -> str:
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_esc(label)}">' + "".join(body) + "</svg>")


def _text(x: float, y: float, content: str, *, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_esc(content)}</text>')


def _shorten(name: str, limit: int = 36) -> str:
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1):]


def _nice_max(value: float) -> float:
    """A round axis end at or above ``value`` (1, 2, 2.5, 5 times a power of ten)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def bar_chart(rows: Sequence[tuple[str, float | None]], *, title: str, unit: str = "",
              color: str = _BLUE, digits: int = 4) -> str:
    """Horizontal bars, one per (label, value); infinite values are drawn full length, marked ∞.

    Horizontal because layer names are long and there can be dozens of them.
    """
    finite = [v for _, v in rows if v is not None and math.isfinite(v)]
    top = _nice_max(max([abs(v) for v in finite], default=0.0))
    plot_width = PLOT_WIDTH - LABEL_WIDTH - 70
    height = 30 + BAR_HEIGHT * len(rows) + 24
    body = [_text(0, 14, title, extra=' font-weight="600"')]
    for index, (label, value) in enumerate(rows):
        y = 24 + index * BAR_HEIGHT
        body.append(_text(LABEL_WIDTH - 6, y + BAR_HEIGHT * 0.72, _shorten(label), anchor="end"))
        if value is None or math.isnan(value):
            body.append(_text(LABEL_WIDTH + 4, y + BAR_HEIGHT * 0.72, "n/a", extra=f' fill="{_GREY}"'))
            continue
        length = plot_width if math.isinf(value) else plot_width * min(abs(value) / top, 1.0)
        body.append(f'<rect x="{LABEL_WIDTH}" y="{y + 2}" width="{max(length, 1.0):.1f}" '
                    f'height="{BAR_HEIGHT - 4}" fill="{color}"><title>{_esc(label)}: '
                    f'{_esc(_fmt(value, digits, unit))}</title></rect>')
        body.append(_text(LABEL_WIDTH + length + 4, y + BAR_HEIGHT * 0.72, _fmt(value, digits, unit)))
    axis_y = 24 + BAR_HEIGHT * len(rows) + 2
    body.append(f'<line x1="{LABEL_WIDTH}" y1="{axis_y}" x2="{LABEL_WIDTH + plot_width}" '
                f'y2="{axis_y}" stroke="{_GREY}"/>')
    for fraction in (0.0, 0.5, 1.0):
        x = LABEL_WIDTH + plot_width * fraction
        body.append(_text(x, axis_y + 14, _fmt(top * fraction, 3 if top < 10 else 0), anchor="middle"))
    return _svg(PLOT_WIDTH, height, body, title)


def paired_bar_chart(rows: Sequence[tuple[str, float, float]], *, title: str,
                     legend: tuple[str, str] = ("before", "after")) -> str:
    """Two horizontal bars per label (before in grey-blue, after in orange), values in bytes."""
    largest = max([max(a, b) for _, a, b in rows], default=0.0)
    # Round the axis in the unit it is printed in (KiB, MiB, ...), so its end reads 200 KiB, not 195.31.
    unit = 1024 ** min(3, int(math.log(largest, 1024))) if largest >= 1 else 1
    top = _nice_max(largest / unit) * unit
    plot_width = PLOT_WIDTH - LABEL_WIDTH - 90
    pair_height = BAR_HEIGHT * 1.6
    height = int(44 + pair_height * len(rows) + 24)
    body = [_text(0, 14, title, extra=' font-weight="600"'),
            f'<rect x="{LABEL_WIDTH}" y="22" width="10" height="10" fill="{_BLUE}"/>',
            _text(LABEL_WIDTH + 14, 31, legend[0]),
            f'<rect x="{LABEL_WIDTH + 90}" y="22" width="10" height="10" fill="{_ORANGE}"/>',
            _text(LABEL_WIDTH + 104, 31, legend[1])]
    for index, (label, before, after) in enumerate(rows):
        y = 40 + index * pair_height
        body.append(_text(LABEL_WIDTH - 6, y + pair_height * 0.6, _shorten(label), anchor="end"))
        for offset, value, color in ((0.0, before, _BLUE), (pair_height / 2 - 1, after, _ORANGE)):
            length = plot_width * min(value / top, 1.0) if top else 0.0
            body.append(f'<rect x="{LABEL_WIDTH}" y="{y + offset + 1:.1f}" width="{max(length, 1.0):.1f}" '
                        f'height="{pair_height / 2 - 2:.1f}" fill="{color}"><title>{_esc(label)}: '
                        f'{_esc(_fmt_bytes(value))}</title></rect>')
            body.append(_text(LABEL_WIDTH + length + 4, y + offset + pair_height / 2 - 3,
                              _fmt_bytes(value)))
    axis_y = 40 + pair_height * len(rows) + 2
    body.append(f'<line x1="{LABEL_WIDTH}" y1="{axis_y:.1f}" x2="{LABEL_WIDTH + plot_width}" '
                f'y2="{axis_y:.1f}" stroke="{_GREY}"/>')
    for fraction in (0.0, 0.5, 1.0):
        body.append(_text(LABEL_WIDTH + plot_width * fraction, axis_y + 14, _fmt_bytes(top * fraction),
                          anchor="middle"))
    return _svg(PLOT_WIDTH, height, body, title)


def scatter_plot(points: Sequence[tuple[str, float, float]], *, title: str, x_label: str,
                 y_label: str, reference: tuple[str, float, float] | None = None) -> str:
    """Labelled points (label, x, y); ``reference`` (the original model) is drawn as a hollow mark."""
    width, height = 520, 340
    left, right, top_margin, bottom = 60, 20, 30, 50
    everything = list(points) + ([reference] if reference else [])
    xs = [x for _, x, _ in everything]
    ys = [y for _, _, y in everything]
    x_low, x_high = _padded_range(xs)
    y_low, y_high = _padded_range(ys)
    inner_w, inner_h = width - left - right, height - top_margin - bottom

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * inner_w

    def sy(y: float) -> float:
        return top_margin + (1 - (y - y_low) / (y_high - y_low)) * inner_h

    body = [_text(0, 14, title, extra=' font-weight="600"'),
            f'<rect x="{left}" y="{top_margin}" width="{inner_w}" height="{inner_h}" fill="none" '
            f'stroke="{_GREY}"/>']
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        x_value = x_low + (x_high - x_low) * fraction
        y_value = y_low + (y_high - y_low) * fraction
        body.append(_text(sx(x_value), top_margin + inner_h + 14, f"{x_value:.3g}", anchor="middle"))
        body.append(_text(left - 4, sy(y_value) + 4, f"{y_value:.3g}", anchor="end"))
    body.append(_text(left + inner_w / 2, height - 8, x_label, anchor="middle"))
    body.append(_text(12, top_margin + inner_h / 2, y_label, anchor="middle",
                      extra=f' transform="rotate(-90 12 {top_margin + inner_h / 2:.1f})"'))
    if reference:
        label, x, y = reference
        body.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="none" stroke="{_GREY}" '
                    f'stroke-width="2"><title>{_esc(label)}</title></circle>')
        body.append(_text(sx(x) + 7, sy(y) - 6, label, extra=f' fill="{_GREY}"'))
    for label, x, y in points:
        body.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{_RED}"><title>'
                    f'{_esc(label)}: ({x:.4g}, {y:.4g})</title></circle>')
        body.append(_text(sx(x) + 7, sy(y) - 6, _shorten(label, 24)))
    return _svg(width, height, body, title)


def _padded_range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    span = high - low
    pad = span * 0.1 if span > 0 else max(abs(high) * 0.05, 0.05)
    return low - pad, high + pad


# ------------------------------------------------------------------------------ report parts


def _layers(report: dict) -> list[dict]:
    layers = report.get("layers")
    return [layer for layer in layers if isinstance(layer, dict)] if isinstance(layers, list) else []


def layer_bytes(layer: dict) -> tuple[float, float] | None:
    """(bytes before, bytes after) of one layer's weights.

    Uses ``bytes_original`` / ``bytes_compressed`` where the report has them; otherwise estimates
    dense storage as params x bits / 8 with 32-bit originals (``original_bits`` where given), which
    is what the ONNX file holds. Sparsity is not subtracted: zeros cost bytes in a dense file (they
    show in the transport size instead).
    """
    before, after = _num(layer.get("bytes_original")), _num(layer.get("bytes_compressed"))
    if before is not None and after is not None:
        return before, after
    params, bits = _num(layer.get("params")), _num(layer.get("bits"))
    if params is None or bits is None:
        return None
    original_bits = _num(layer.get("original_bits")) or 32.0
    return params * original_bits / 8, params * bits / 8


def _card(label: str, value: str, sub: str = "") -> str:
    sub_html = f'<div class="sub">{_esc(sub)}</div>' if sub else ""
    return (f'<div class="card"><div class="label">{_esc(label)}</div>'
            f'<div class="value">{_esc(value)}</div>{sub_html}</div>')


def latency_card(report: dict, original: dict, compressed: dict) -> str:
    """The latency ratio, or where the timings were emulated (qemu), no figure: an emulator's
    timings say nothing about the target, so the headline never quotes them as one."""
    timings = (f"p50 {_fmt(_get(original, 'latency_ms', 'p50'), 3, ' ms')} \u2192 "
               f"{_fmt(_get(compressed, 'latency_ms', 'p50'), 3, ' ms')}")
    if (report.get("measured_on") or {}).get("emulated"):
        return _card("Latency ratio", "emulated", f"no performance figure ({timings} under emulation)")
    return _card("Latency ratio", _fmt_ratio(report.get("latency_ratio")), timings)


def headline_cards(report: dict) -> str:
    """The figures people decide from, each with the absolute numbers beneath."""
    original, compressed = report.get("original") or {}, report.get("compressed") or {}
    fidelity = report.get("fidelity") or {}
    accuracy = report.get("accuracy")
    if isinstance(accuracy, dict) and (_num(accuracy.get("original")) is not None
                                       or _num(accuracy.get("compressed")) is not None):
        accuracy_value = f"{_fmt_percent(accuracy.get('original'))} \u2192 {_fmt_percent(accuracy.get('compressed'))}"
        accuracy_sub = "original \u2192 compressed"
    else:
        accuracy_value, accuracy_sub = "n/a", "no _labels in the evaluation data"
    cards = [
        _card("Size ratio", _fmt_ratio(report.get("size_ratio")),
              f"{_fmt_bytes(_get(original, 'bytes'))} \u2192 {_fmt_bytes(_get(compressed, 'bytes'))}"),
        _card("Transport size ratio", _fmt_ratio(report.get("transport_size_ratio")), "after zstd"),
        latency_card(report, original, compressed),
        _card("Fidelity (cosine)", _fmt(fidelity.get("cosine"), 4),
              f"rel. L2 {_fmt(fidelity.get('rel_l2'), 4)}, top-1 agreement "
              f"{_fmt_percent(fidelity.get('top1_agreement'))}"),
        _card("Accuracy", accuracy_value, accuracy_sub),
    ]
    return '<div class="cards">' + "".join(cards) + "</div>"


def summary_table(report: dict) -> str:
    original, compressed = report.get("original") or {}, report.get("compressed") or {}
    rows = [
        ("File bytes", _fmt_bytes(original.get("bytes")), _fmt_bytes(compressed.get("bytes"))),
        ("Parameters", _fmt(original.get("params"), 0), _fmt(compressed.get("params"), 0)),
        ("Non-zero parameters", _fmt(original.get("nonzero_params", original.get("params")), 0),
         _fmt(compressed.get("nonzero_params"), 0)),
        ("MACs", _fmt_macs(original), _fmt_macs(compressed)),
        ("Latency p50", _fmt(_get(original, "latency_ms", "p50"), 3, " ms"),
         _fmt(_get(compressed, "latency_ms", "p50"), 3, " ms")),
        ("Latency p95", _fmt(_get(original, "latency_ms", "p95"), 3, " ms"),
         _fmt(_get(compressed, "latency_ms", "p95"), 3, " ms")),
    ]
    body = "".join(f'<tr><td class="text">{_esc(a)}</td><td>{_esc(b)}</td><td>{_esc(c)}</td></tr>'
                   for a, b, c in rows)
    return ('<table><thead><tr><th class="name"></th><th>Original</th><th>Compressed</th></tr></thead>'
            f"<tbody>{body}</tbody></table>")


def outputs_table(report: dict) -> str:
    """Fidelity per model output, where there are several (one output's figures are the headline's)."""
    outputs = [o for o in report.get("fidelity_outputs") or [] if isinstance(o, dict)]
    if len(outputs) < 2:
        return ""
    body = "".join(f'<tr><td class="text">{_esc(o.get("name", ""))}</td><td>{_esc(_fmt(o.get("rel_l2"), 4))}</td>'
                   f'<td>{_esc(_fmt(o.get("cosine"), 5))}</td><td>{_esc(_fmt(o.get("agreement"), 4))}</td></tr>'
                   for o in outputs)
    return ('<h2>Fidelity per output</h2><table><thead><tr><th class="name">Output</th><th>rel_l2</th>'
            f"<th>cosine</th><th>agreement (integer outputs)</th></tr></thead><tbody>{body}</tbody></table>")


def steps_table(report: dict) -> str:
    steps = [s for s in report.get("steps") or [] if isinstance(s, dict)]
    if not steps:
        return '<p class="note">No steps recorded.</p>'
    body = "".join(f'<tr><td class="text">{index + 1}</td><td class="text">{_esc(step.get("op", ""))}</td>'
                   f'<td>{_esc(_fmt(step.get("seconds"), 3, " s"))}</td>'
                   f'<td class="text">{_esc(step_details(step))}</td></tr>'
                   for index, step in enumerate(steps))
    return ('<table><thead><tr><th>#</th><th>Step</th><th>Time</th><th class="name">Details</th></tr></thead>'
            f"<tbody>{body}</tbody></table>")


def step_details(step: dict, limit: int = 160) -> str:
    """The step's scalar settings and counts (``bits 8, method rtn``); nested values are left out."""
    parts = [f"{key} {value}" for key, value in step.items()
             if key not in ("op", "seconds") and value is not None and not isinstance(value, (dict, list))]
    text = ", ".join(parts)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def layer_table(report: dict) -> str:
    layers = _layers(report)
    if not layers:
        return '<p class="note">The report lists no layers.</p>'
    header = ("<tr><th class=\"name\">Layer</th><th>Op</th><th>Params</th><th>Bits</th>"
              "<th>Sparsity</th><th>Rank</th><th>SQNR (dB)</th><th>Output error (rel. L2)</th></tr>")
    rows = []
    for layer in layers:
        rank = layer.get("rank")
        rank_text = _fmt(rank, 0) if rank is not None else EM_DASH
        rows.append(
            f'<tr><td class="name">{_esc(layer.get("name", ""))}</td>'
            f'<td class="text">{_esc(layer.get("op", ""))}</td>'
            f'<td>{_esc(_fmt(layer.get("params"), 0))}</td>'
            f'<td>{_esc(_fmt(layer.get("bits"), 0))}</td>'
            f'<td>{_esc(_fmt_percent(layer.get("sparsity")))}</td>'
            f'<td>{_esc(rank_text)}</td>'
            f'<td>{_esc(_fmt(layer.get("sqnr_db"), 2))}</td>'
            f'<td>{_esc(_fmt(layer.get("output_rel_l2"), 4))}</td></tr>')
    return f"<table><thead>{header}</thead><tbody>{''.join(rows)}</tbody></table>"


def _worst(layers: list[dict], key: str, *, largest: bool) -> tuple[list[dict], int]:
    """The layers with a value for ``key``, the MAX_BARS worst first; and how many had a value."""
    measured = [layer for layer in layers if _num(layer.get(key)) is not None]

    def badness(layer: dict) -> float:
        value = _num(layer.get(key))
        if math.isnan(value):
            return math.inf
        return value if largest else -value

    ranked = sorted(measured, key=badness, reverse=True)
    return ranked[:MAX_BARS], len(measured)


def error_plots(report: dict) -> str:
    layers = _layers(report)
    parts = []
    worst_output, measured_output = _worst(layers, "output_rel_l2", largest=True)
    if worst_output:
        parts.append(bar_chart([(str(l.get("name", "")), _num(l.get("output_rel_l2"))) for l in worst_output],
                               title="Per-layer output error (relative L2, higher is worse)", color=_RED))
        parts.append(_shown_note(len(worst_output), measured_output, "largest output error"))
    worst_sqnr, measured_sqnr = _worst(layers, "sqnr_db", largest=False)
    if worst_sqnr:
        parts.append(bar_chart([(str(l.get("name", "")), _num(l.get("sqnr_db"))) for l in worst_sqnr],
                               title="Per-layer weight SQNR (dB, lower is worse)", unit=" dB",
                               digits=1))
        parts.append(_shown_note(len(worst_sqnr), measured_sqnr, "lowest SQNR"))
    if not parts:
        return '<p class="note">No per-layer error was measured.</p>'
    return "".join(parts)


def _shown_note(shown: int, measured: int, what: str) -> str:
    if shown < measured:
        return f'<p class="note">The {shown} layers with the {_esc(what)} of {measured}; the table lists all.</p>'
    return f'<p class="note">All {measured} measured layers, worst first.</p>'


def size_plot(report: dict) -> str:
    sized = [(str(layer.get("name", "")), sizes) for layer in _layers(report)
             if (sizes := layer_bytes(layer)) is not None]
    if not sized:
        return '<p class="note">No per-layer sizes in the report.</p>'
    biggest = sorted(sized, key=lambda item: item[1][0], reverse=True)[:MAX_BARS]
    rows = [(name, before, after) for name, (before, after) in biggest]
    chart = paired_bar_chart(rows, title="Weight storage by layer", legend=("original", "compressed"))
    estimated = any(_num(layer.get("bytes_compressed")) is None for layer in _layers(report))
    note = (" Estimated as params \u00d7 bits / 8 (32-bit originals); zeros still occupy a dense file."
            if estimated else "")
    shown = f"The {len(rows)} largest of {len(sized)} layers." if len(rows) < len(sized) else ""
    return chart + f'<p class="note">{_esc((shown + note).strip()) or "Every layer with weights."}</p>'


def target_notice(report: dict) -> str:
    """A visible box when latency was not measured on the target's hardware (``target_match``
    false): the page must not pass off this host's timings as the target's."""
    if report.get("target_match", True) is not False:
        return ""
    text = report.get("target_notice") or (f"Latency was not measured on the target's hardware "
                                           f"(target {report.get('target', 'n/a')}).")
    return f'<div class="notice" role="alert">{_esc(text)}</div>'


def measured_on_table(report: dict) -> str:
    """Where the figures were measured and the choices made from this host's CPU."""
    where = report.get("measured_on")
    if not isinstance(where, dict):
        return '<p class="note">Not recorded.</p>'
    isa = ", ".join(f"{name} {'yes' if flag else 'no'}" for name, flag in (where.get("isa") or {}).items())
    rows = [("architecture", where.get("architecture")), ("CPU", where.get("cpu_model")), ("ISA", isa),
            ("cores used", where.get("cores")), ("ONNX Runtime", where.get("onnxruntime")),
            ("execution provider", where.get("execution_provider")),
            ("emulated", "yes" if where.get("emulated") else "no"),
            ("target matched", "yes" if report.get("target_match") else "no")]
    body = "".join(f'<tr><th class="name">{_esc(k)}</th><td class="text">{_esc(v)}</td></tr>' for k, v in rows)
    choices = where.get("choices") or []
    table = f"<table>{body}</table>"
    if choices:
        items = "".join(f'<tr><td class="text">{_esc(c.get("choice"))}</td><td class="text">{_esc(c.get("value"))}</td>'
                        f'<td class="text">{_esc(c.get("read"))}</td></tr>' for c in choices)
        table += ('<p class="note">Choices made from this host\'s CPU:</p><table><tr><th class="name">choice</th>'
                  f'<th class="name">value</th><th class="name">read</th></tr>{items}</table>')
    return table


def _page(title: str, sections: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8"/>'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}"/>'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>"
            + "".join(sections) + "</body></html>\n")


def exports_table(report: dict) -> str:
    """One row per exported format: state, file bytes and size ratio, agreement with the compressed
    ONNX model and fidelity to the original, latency; a failed format's reason in its row."""
    header = ("<tr><th class=\"name\">Format</th><th>State</th><th>Bytes</th><th>Size ratio</th>"
              "<th>Cosine vs ONNX</th><th>Top-1 vs ONNX</th><th>Cosine vs original</th><th>p50 ms</th></tr>")
    rows = []
    for fmt, row in (report.get("exports") or {}).items():
        state = row.get("state", "n/a") + (f": {row['reason']}" if row.get("reason") else "")
        rows.append(f'<tr><td class="name">{_esc(fmt)}</td><td class="name">{_esc(state)}</td>'
                    f'<td>{_esc(_fmt_bytes(row.get("bytes")))}</td><td>{_esc(_fmt_ratio(row.get("size_ratio")))}</td>'
                    f'<td>{_esc(_fmt(_get(row, "agreement", "cosine"), 4))}</td>'
                    f'<td>{_esc(_fmt_percent(_get(row, "agreement", "top1_agreement")))}</td>'
                    f'<td>{_esc(_fmt(_get(row, "fidelity", "cosine"), 4))}</td>'
                    f'<td>{_esc(_fmt(_get(row, "latency_ms", "p50"), 3))}</td></tr>')
    return f"<table><thead>{header}</thead><tbody>{''.join(rows)}</tbody></table>"


# ------------------------------------------------------------------------------ public API


def render_html(report: dict, *, title: str, extra: Sequence[str] = ()) -> str:
    """One job's report.json as a self-contained HTML page."""
    meta = (f"Target {report.get('target', 'n/a')} \u00b7 provider {report.get('provider', 'n/a')}")
    evaluated_on = report.get("fidelity_data")
    if evaluated_on:
        samples = _num(report.get("fidelity_samples"))
        count = f", {int(samples)} samples" if samples is not None and math.isfinite(samples) else ""
        meta += f" \u00b7 fidelity measured on {evaluated_on} data{count}"
    sections = [
        f"<h1>{_esc(title)}</h1>",
        f'<div class="meta">{_esc(meta)}</div>',
        target_notice(report),
        headline_cards(report),
        "<h2>Before and after</h2>", summary_table(report), outputs_table(report),
        "<h2>Steps</h2>", steps_table(report),
        "<h2>Cost</h2>", cost_section(report),
        "<h2>Which layers lose the most</h2>", error_plots(report),
        "<h2>Size by layer</h2>", size_plot(report),
        "<h2>Layers</h2>", layer_table(report),
        "<h2>Measured on</h2>", measured_on_table(report),
    ]
    if report.get("exports"):
        at = sections.index("<h2>Cost</h2>")     # after the steps
        sections[at:at] = ["<h2>Deploy formats</h2>", exports_table(report)]
    sections[4:4] = list(extra)     # after the steps: sensitivity, error bound, goal candidates
    return _page(title, sections)


def _accuracy_axis(reports: Sequence[dict]) -> tuple[str, list[float | None], float | None]:
    """The y axis for comparisons: accuracy where every report has it, else top-1 agreement."""
    accuracies = [_num(_get(r, "accuracy", "compressed")) for r in reports]
    if accuracies and all(a is not None for a in accuracies):
        originals = [a for r in reports if (a := _num(_get(r, "accuracy", "original"))) is not None]
        return "accuracy (compressed)", accuracies, (originals[0] if originals else None)
    agreement = [_num(_get(r, "fidelity", "top1_agreement")) for r in reports]
    if any(a is not None for a in agreement):
        return "top-1 agreement with the original", agreement, 1.0
    return "output cosine similarity", [_num(_get(r, "fidelity", "cosine")) for r in reports], 1.0


def render_comparison(reports: list[dict], *, title: str = "Featherweight recipe comparison",
                      labels: Sequence[str] | None = None) -> str:
    """Several reports of the same model (one per recipe) on one page: a table and two scatters.

    Each report's label is taken from ``labels``, else its own ``label`` or ``recipe_name`` key,
    else "recipe N".
    """
    if not reports:
        raise ValueError("render_comparison needs at least one report")
    if labels is not None and len(labels) != len(reports):
        raise ValueError(f"{len(labels)} labels for {len(reports)} reports")
    names = [str(labels[i]) if labels is not None else
             str(r.get("label") or r.get("recipe_name") or f"recipe {i + 1}") for i, r in enumerate(reports)]
    y_label, y_values, y_reference = _accuracy_axis(reports)

    header = ("<tr><th class=\"name\">Recipe</th><th>Size ratio</th><th>Transport ratio</th>"
              "<th>Latency ratio</th><th>Cosine</th><th>Top-1 agreement</th><th>Accuracy</th></tr>")
    rows = "".join(
        f'<tr><td class="name">{_esc(name)}</td><td>{_esc(_fmt_ratio(r.get("size_ratio")))}</td>'
        f'<td>{_esc(_fmt_ratio(r.get("transport_size_ratio")))}</td>'
        f'<td>{_esc(_fmt_ratio(r.get("latency_ratio")))}</td>'
        f'<td>{_esc(_fmt(_get(r, "fidelity", "cosine"), 4))}</td>'
        f'<td>{_esc(_fmt_percent(_get(r, "fidelity", "top1_agreement")))}</td>'
        f'<td>{_esc(_fmt_percent(_get(r, "accuracy", "compressed")))}</td></tr>'
        for name, r in zip(names, reports))
    sections = [f"<h1>{_esc(title)}</h1>",
                f'<div class="meta">{len(reports)} recipes; the hollow mark is the original model.</div>',
                "<h2>Recipes</h2>", f"<table><thead>{header}</thead><tbody>{rows}</tbody></table>"]
    for x_key, x_label in (("size_ratio", "size ratio (original / compressed bytes)"),
                           ("latency_ratio", "latency ratio (original / compressed p50)")):
        points = [(name, x, y) for name, r, y in zip(names, reports, y_values)
                  if (x := _num(r.get(x_key))) is not None and y is not None
                  and math.isfinite(x) and math.isfinite(y)]
        heading = f"{y_label.capitalize()} against {x_label.split(' (')[0]}"
        sections.append(f"<h2>{_esc(heading)}</h2>")
        if not points:
            sections.append(f'<p class="note">No report has both {_esc(x_key)} and {_esc(y_label)}.</p>')
            continue
        reference = ("original", 1.0, y_reference) if y_reference is not None else None
        sections.append(scatter_plot(points, title=heading, x_label=x_label, y_label=y_label,
                                     reference=reference))
    return _page(title, sections)
