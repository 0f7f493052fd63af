"""report.html (worker.pipeline.report_html): valid, self-contained, shows report.json's figures,
escapes names from untrusted models, and renders to a non-blank picture in headless Chromium."""
from __future__ import annotations

import copy
import math
import os
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from worker.pipeline.report_html import MAX_BARS, layer_bytes, render_comparison, render_html


def sample_report(**overrides) -> dict:
    report = {
        "original": {"bytes": 4_000_000, "params": 1_000_000, "macs": 7_000_000,
                     "latency_ms": {"p50": 2.5, "p95": 3.25}},
        "compressed": {"bytes": 1_050_000, "params": 1_000_000, "nonzero_params": 500_000,
                       "macs": 7_000_000, "latency_ms": {"p50": 1.25, "p95": 1.5}},
        "size_ratio": 3.81,
        "transport_size_ratio": 6.27,
        "latency_ratio": 2.0,
        "fidelity": {"rel_l2": 0.0312, "cosine": 0.9987, "top1_agreement": 0.975},
        "accuracy": {"original": 0.912, "compressed": 0.904},
        "target": "cpu-x86",
        "provider": "CPUExecutionProvider",
        "fidelity_data": "evaluation", "fidelity_samples": 64,
        "steps": [{"op": "cleanup", "seconds": 0.01},
                  {"op": "quantize", "seconds": 1.5, "bits": 8, "method": "rtn", "block_size": None,
                   "formats": {"encoder/fc_worst": "qdq"}}],
        "layers": [
            {"name": "encoder/conv_first", "op": "Conv", "params": 4608, "bits": 8, "sparsity": 0.5,
             "rank": None, "sqnr_db": 38.25, "output_rel_l2": 0.0123},
            {"name": "encoder/fc_worst", "op": "Gemm", "params": 65536, "bits": 4, "sparsity": 0.0,
             "rank": 16, "sqnr_db": 19.5, "output_rel_l2": 0.4321},
            {"name": "head/untouched", "op": "MatMul", "params": 2048, "bits": 32, "sparsity": 0.0,
             "rank": None, "sqnr_db": math.inf, "output_rel_l2": 0.0},
        ],
    }
    report.update(overrides)
    return report


def parse_strictly(page: str) -> ET.Element:
    """The page must be well-formed XML after its doctype: every element closed, no bare '&' or '<'."""
    assert page.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(page.split("\n", 1)[1])


def visible_text(root: ET.Element) -> str:
    return " ".join("".join(root.itertext()).split())


def assert_self_contained(page: str) -> None:
    root = parse_strictly(page)
    for element in root.iter():
        for attribute in ("src", "href", "srcset", "action", "data", "poster", "xlink:href"):
            assert attribute not in element.attrib, f"<{element.tag} {attribute}=...> would load something"
        assert element.tag not in {"script", "link", "iframe", "object", "embed", "img"}
    assert "url(" not in page and "@import" not in page
    assert "http://" not in page and "https://" not in page
    csp = [e for e in root.iter("meta") if e.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0].get("content")


def test_page_is_well_formed_and_self_contained():
    page = render_html(sample_report(), title="resnet18 int8")
    assert_self_contained(page)
    root = parse_strictly(page)
    assert root.find("head/title").text == "resnet18 int8"
    # Three plots: output error, SQNR, size by layer.
    assert len(list(root.iter("svg"))) == 3


def test_headline_figures_and_table_show_the_reports_numbers():
    page = render_html(sample_report(), title="t")
    text = visible_text(parse_strictly(page))
    for expected in ("3.81\u00d7", "6.27\u00d7", "2.00\u00d7", "0.9987", "0.0312", "97.5%",
                     "91.2% \u2192 90.4%", "3.81 MiB", "1.00 MiB", "2.500 ms", "1.250 ms", "3.250 ms",
                     "1,000,000", "500,000", "7,000,000", "cleanup", "quantize", "1.500 s",
                     "cpu-x86", "CPUExecutionProvider", "fidelity measured on evaluation data, 64 samples",
                     "bits 8, method rtn"):
        assert expected in text, expected
    # Per-layer table: every layer, each with op, params, bits, sparsity, rank, SQNR, output error.
    rows = [row for row in parse_strictly(page).iter("tr")
            if row.find("td") is not None and row.find("td").get("class") == "name"]
    cells = {row[0].text: [c.text for c in row[1:]] for row in rows}
    assert cells["encoder/fc_worst"] == ["Gemm", "65,536", "4", "0.0%", "16", "19.50", "0.4321"]
    assert cells["encoder/conv_first"] == ["Conv", "4,608", "8", "50.0%", "\u2014", "38.25", "0.0123"]
    assert cells["head/untouched"][5] == "\u221e"


def test_error_plot_puts_the_worst_layer_first():
    root = parse_strictly(render_html(sample_report(), title="t"))
    error_svg = next(svg for svg in root.iter("svg") if "output error" in svg.get("aria-label"))
    labels = [t.text for t in error_svg.iter("text")]
    assert labels.index("encoder/fc_worst") < labels.index("encoder/conv_first") < labels.index("head/untouched")
    bars = {r.find("title").text.split(":")[0]: float(r.get("width")) for r in error_svg.iter("rect")}
    assert bars["encoder/fc_worst"] > bars["encoder/conv_first"] > 0


def test_size_plot_estimates_bytes_from_params_and_bits_unless_given():
    assert layer_bytes({"params": 1000, "bits": 4}) == (4000.0, 500.0)
    assert layer_bytes({"params": 1000, "bits": 4, "bytes_original": 10, "bytes_compressed": 3}) == (10.0, 3.0)
    assert layer_bytes({"name": "no params"}) is None
    root = parse_strictly(render_html(sample_report(), title="t"))
    size_svg = next(svg for svg in root.iter("svg") if svg.get("aria-label") == "Weight storage by layer")
    titles = [r.find("title").text for r in size_svg.iter("rect") if r.find("title") is not None]
    assert "encoder/fc_worst: 256.00 KiB" in titles and "encoder/fc_worst: 32.00 KiB" in titles


def test_hostile_layer_names_are_escaped_not_markup():
    report = sample_report()
    report["layers"][0]["name"] = '<script>fetch("https://evil.example/x")</script>&<img src=x onerror=alert(1)>'
    page = render_html(report, title='"><script>alert(1)</script>')
    root = parse_strictly(page)
    assert not list(root.iter("script")) and not list(root.iter("img"))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert report["layers"][0]["name"] in visible_text(root)


def test_missing_and_non_finite_fields_render_as_na_without_failing():
    report = sample_report(accuracy=None, latency_ratio=None, fidelity={"rel_l2": math.nan},
                           steps=[], layers=[{"name": "odd", "op": "Conv", "params": "many",
                                              "sqnr_db": None, "output_rel_l2": math.nan}])
    del report["compressed"]
    page = render_html(report, title="partial")
    text = visible_text(parse_strictly(page))
    assert "no _labels in the evaluation data" in text
    assert "n/a" in text and "NaN" in text and "No steps recorded." in text
    assert render_html({}, title="empty").count("<svg") == 0


def test_many_layers_plot_the_worst_but_table_all():
    layers = [{"name": f"layer{i}", "op": "Conv", "params": 100 + i, "bits": 8, "sparsity": 0.0,
               "rank": None, "sqnr_db": 30.0 + i, "output_rel_l2": i / 1000} for i in range(MAX_BARS + 25)]
    root = parse_strictly(render_html(sample_report(layers=layers), title="big"))
    table_rows = [r for r in root.iter("tr") if r.find("td") is not None and r.find("td").get("class") == "name"]
    assert len(table_rows) == MAX_BARS + 25
    error_svg = next(svg for svg in root.iter("svg") if "output error" in svg.get("aria-label"))
    plotted = [r for r in error_svg.iter("rect") if r.find("title") is not None]
    assert len(plotted) == MAX_BARS
    assert plotted[0].find("title").text.startswith(f"layer{MAX_BARS + 24}:")
    assert f"The {MAX_BARS} layers with the largest output error of {MAX_BARS + 25}" in visible_text(root)


def test_comparison_plots_accuracy_against_size_and_latency():
    small = sample_report(size_ratio=7.9, latency_ratio=1.4, accuracy={"original": 0.912, "compressed": 0.85})
    page = render_comparison([sample_report(), small], labels=["int8 static", "int4 gptq"])
    assert_self_contained(page)
    root = parse_strictly(page)
    svgs = list(root.iter("svg"))
    assert [s.get("aria-label") for s in svgs] == ["Accuracy (compressed) against size ratio",
                                                   "Accuracy (compressed) against latency ratio"]
    # Each scatter: the original (hollow) and one filled point per recipe, higher accuracy drawn higher.
    points = {c.find("title").text.split(":")[0]: (float(c.get("cx")), float(c.get("cy")))
              for c in svgs[0].iter("circle")}
    assert set(points) == {"original", "int8 static", "int4 gptq"}
    assert points["int4 gptq"][0] > points["int8 static"][0] > points["original"][0]
    assert points["int4 gptq"][1] > points["int8 static"][1]  # SVG y grows downwards
    assert "int4 gptq" in visible_text(root) and "7.90\u00d7" in visible_text(root)


def test_comparison_without_labels_uses_top1_agreement():
    reports = [sample_report(accuracy=None, label="a"), sample_report(accuracy=None, recipe_name="b")]
    root = parse_strictly(render_comparison(reports))
    assert [s.get("aria-label") for s in root.iter("svg")][0].startswith("Top-1 agreement with the original")
    with pytest.raises(ValueError):
        render_comparison([])
    with pytest.raises(ValueError):
        render_comparison(reports, labels=["only one"])


def test_render_does_not_mutate_the_report():
    report = sample_report()
    before = copy.deepcopy(report)
    render_html(report, title="t")
    render_comparison([report])
    assert repr(report) == repr(before)


# ----------------------------------------------------------------------------- headless Chromium


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw pixel bytes) of an 8-bit RGB/RGBA/grey PNG, without PIL."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, bytearray(), None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        chunk = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        position += 12 + length
    width, height, depth, color_type, _, _, interlace = header
    assert depth == 8 and interlace == 0, "only 8-bit, non-interlaced PNGs are decoded here"
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    raw = zlib.decompress(bytes(idat))
    stride = width * channels
    pixels = bytearray(height * stride)
    previous = bytearray(stride)
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            up_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else up_left)
                line[i] = (line[i] + predictor) & 0xFF
        pixels[row * stride:(row + 1) * stride] = line
        previous = line
    return width, height, channels, bytes(pixels)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_chromium_renders_a_non_blank_page(tmp_path: Path):
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    page = tmp_path / "report.html"
    page.write_text(render_html(sample_report(), title="Chromium render"), encoding="utf-8")
    screenshot = tmp_path / "shot.png"
    result = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=800,1000",
         f"--screenshot={screenshot}", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert screenshot.exists(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"
    width, height, channels, pixels = decode_png(screenshot.read_bytes())
    assert (width, height) == (800, 1000)
    colours = set()
    dark = 0
    for offset in range(0, len(pixels), channels * 7):  # every 7th pixel is plenty to count
        pixel = pixels[offset:offset + min(channels, 3)]
        colours.add(pixel)
        dark += max(pixel) < 128
    sampled = len(pixels) // (channels * 7)
    # A blank (all white) or failed page has one colour; text, cards and bars give many, and ink.
    assert len(colours) > 20, f"only {len(colours)} colours: the page looks blank"
    assert dark / sampled > 0.005, "almost no dark pixels: no text was drawn"


def test_macs_marked_as_a_lower_bound_say_so():
    report = sample_report()
    report["original"]["macs_lower_bound"] = True
    text = visible_text(parse_strictly(render_html(report, title="t")))
    assert "\u2265 7,000,000 (lower bound)" in text
    assert text.count("(lower bound)") == 1   # the compressed side is not marked


def test_emulated_latency_is_no_headline_figure():
    """Timings taken under qemu (measured_on.emulated) say nothing about the target: the latency card
    says so instead of quoting a ratio; the milliseconds stay visible, marked."""
    from worker.pipeline.report_html import headline_cards

    def cards(report: dict) -> str:
        return visible_text(parse_strictly(f"<!DOCTYPE html>\n<div>{headline_cards(report)}</div>"))

    native, emulated = cards(sample_report()), cards(sample_report(measured_on={"emulated": True}))
    assert "2.00\u00d7" in native and "emulated" not in native
    assert "2.00\u00d7" not in emulated
    assert "emulated" in emulated and "no performance figure" in emulated and "2.500 ms" in emulated
