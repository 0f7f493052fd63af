"""report.html sections for what the measuring and searching parts of a job add to report.json:
per-layer sensitivity (``sensitivity``), the error-bound loop of a quantize step
(``steps[i].mixed_precision``) and the goal search's verified candidates (``candidates``, ``goal``).
Drawn with report_html's own SVG helpers; nothing here runs a model."""
from __future__ import annotations

import math

from worker.pipeline.report_html import _RED, _esc, _fmt, _fmt_bytes, _num, bar_chart, scatter_plot

SHOWN = 25


def sensitivity_section(report: dict) -> str:
    rows = report.get("sensitivity") or []
    if not rows:
        return ""
    parts = ["<h2>Sensitivity: each layer alone</h2>"]
    for row in rows:
        entries = row.get("entries") or []
        shown = entries[:SHOWN]
        bars = [(f"{e.get('name')} ({e.get('kind')})", _num(e.get("error"))) for e in shown]
        title = (f"step {row.get('step')}: {row.get('op')} at {row.get('setting')}, "
                 f"{row.get('metric')} of the output")
        parts.append(bar_chart(bars, title=title, color=_RED))
        parts.append(f'<p class="note">{_esc(len(shown))} of {_esc(len(entries))} listed here, measured on '
                     f'{_esc(row.get("samples"))} {_esc(row.get("data", "calibration"))} samples in '
                     f'{_esc(_fmt(row.get("seconds"), 3, " s"))}. Copy an entry\'s exclude patterns from '
                     f'sensitivity.json into the step to keep it float.</p>')
    return "".join(parts)


def mixed_precision_section(report: dict) -> str:
    parts = []
    for index, step in enumerate(report.get("steps") or []):
        mixed = step.get("mixed_precision") if isinstance(step, dict) else None
        if not mixed:
            continue
        met = "met" if mixed.get("met") else "MISSED (the best model found is kept)"
        parts.append(f"<h2>Error bound of step {index}: rel_l2 &le; {_esc(_fmt(mixed.get('bound'), 4))}, {met}</h2>")
        rows = ["<table><thead><tr><th>moved</th><th>kind</th><th>from</th><th>to</th><th>why (alone)</th>"
                "<th>rel_l2 after</th><th>bytes +</th><th>latency + (ms)</th></tr></thead><tbody>"]
        for move in mixed.get("moves") or []:
            rows.append("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in (
                move.get("name"), move.get("kind"), move.get("from"), move.get("to"),
                _fmt(move.get("alone_error"), 4), _fmt(move.get("rel_l2_after"), 4),
                _fmt_bytes(move.get("bytes_cost")), _fmt(move.get("latency_cost_ms"), 3))) + "</tr>")
        rows.append("</tbody></table>")
        parts.append("".join(rows))
        parts.append(f'<p class="note">rel_l2 of the output on {_esc(mixed.get("samples"))} calibration samples: '
                     f'{_esc(_fmt(mixed.get("initial_rel_l2"), 4))} with every layer at the recipe\'s setting, '
                     f'{_esc(_fmt(mixed.get("final_rel_l2"), 4))} at the end.</p>')
    return "".join(parts)


def candidates_section(report: dict) -> str:
    candidates = report.get("candidates") or []
    goal = report.get("goal") or {}
    if not candidates:
        return ""
    objective = goal.get("minimize", "size")
    key = {"size": "bytes", "transport_size": "transport_bytes", "latency": "latency_ms"}.get(objective, "bytes")
    points, chosen = [], None
    for c in candidates:
        x, y = _num(c.get(key)), _num(c.get("score"))
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        label = f"#{c.get('id')} {c.get('label', '')}"
        if c.get("chosen"):
            chosen = (f"chosen: {label}", x, y)
        else:
            points.append((label, x, y))
    head = [f"<h2>Goal search: {_esc(goal.get('metric'))} drop &le; {_esc(goal.get('max_drop'))}, "
            f"smallest {_esc(objective)}</h2>"]
    if points or chosen:
        plot = scatter_plot(points or [chosen], title="verified candidates (chosen: hollow mark)",
                            x_label=key, y_label=str(goal.get("metric")), reference=chosen)
        head.append(plot)
    table = ["<table><thead><tr><th>#</th><th>candidate</th><th>score</th><th>meets</th><th>bytes</th>"
             "<th>zstd bytes</th><th>latency ms</th><th>pareto</th><th>artifact</th></tr></thead><tbody>"]
    for c in candidates:
        style = ' style="font-weight:600"' if c.get("chosen") else ""
        table.append(f"<tr{style}>" + "".join(f"<td>{_esc(v)}</td>" for v in (
            c.get("id"), c.get("label"), _fmt(c.get("score"), 4), "yes" if c.get("meets") else "no",
            _fmt_bytes(c.get("bytes")), _fmt_bytes(c.get("transport_bytes")), _fmt(c.get("latency_ms"), 3),
            "yes" if c.get("pareto") else "", c.get("artifact") or "")) + "</tr>")
    table.append("</tbody></table>")
    note = (f'<p class="note">{_esc(goal.get("summary", ""))}</p>')
    return "".join(head) + "".join(table) + note


def sections(report: dict) -> list[str]:
    return [s for s in (candidates_section(report), mixed_precision_section(report), sensitivity_section(report)) if s]
