"""The job's cost in report.html: each step's time split into phases, its CPU time and peak memory,
and the slowest phase of the job (report.json's ``steps[i].phases`` / ``phases_cpu`` /
``peak_rss_bytes`` and ``cost``, written by ``worker.pipeline.cost``)."""
from __future__ import annotations

import html
import math
from typing import Any

from worker.pipeline.cost import PHASES

ORDER = (*PHASES, "other")


def _seconds(value: Any) -> str:
    return f"{value:.2f} s" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _megabytes(value: Any) -> str:
    return f"{value / 2**20:.0f} MB" if isinstance(value, (int, float)) and value > 0 else "n/a"


def cost_section(report: dict) -> str:
    """A table of steps x phases (wall seconds), the step's CPU seconds and peak RSS; the slowest
    phase of the job in bold and named above the table."""
    steps = [s for s in report.get("steps") or [] if isinstance(s, dict) and isinstance(s.get("phases"), dict)]
    if not steps:
        return '<p class="note">No cost recorded.</p>'
    cost = report.get("cost") or {}
    slowest = cost.get("slowest_phase") or {}
    shown = [p for p in ORDER if any(p in s["phases"] for s in steps)]
    head = "".join(f"<th>{html.escape(p)}</th>" for p in shown)
    rows = []
    for index, step in enumerate(steps):
        cells = []
        for phase in shown:
            text = _seconds(step["phases"].get(phase)) if phase in step["phases"] else ""
            if slowest.get("step") == index and slowest.get("phase") == phase:
                text = f"<b>{text}</b>"
            cells.append(f"<td>{text}</td>")
        rows.append(f'<tr><td class="text">{index + 1}</td><td class="text">{html.escape(str(step.get("op", "")))}</td>'
                    f'<td>{_seconds(step.get("seconds"))}</td>{"".join(cells)}'
                    f'<td>{_seconds(step.get("cpu_seconds"))}</td><td>{_megabytes(step.get("peak_rss_bytes"))}</td></tr>')
    note = ""
    if slowest:
        note = (f'<p class="note">Slowest phase: step {int(slowest.get("step", 0)) + 1} '
                f'({html.escape(str(slowest.get("op")))}) {html.escape(str(slowest.get("phase")))}, '
                f'{_seconds(slowest.get("seconds"))}. Measuring this report took {_seconds(cost.get("measure_seconds"))}'
                f', peak {_megabytes(cost.get("measure_peak_rss_bytes"))}.</p>')
    return (note + '<table><thead><tr><th>#</th><th>Step</th><th>Time</th>' + head +
            "<th>CPU</th><th>Peak RSS</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
