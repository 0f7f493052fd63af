"""Realistic inputs for the real pretrained bench models, made here without any download.

Owns the synthetic-but-realistic data ``bench.real_models`` feeds its models:

- ``sentences(n)``: English sentences cut from the docstrings of a fixed list of Python standard
  library modules (real prose, different subjects, deterministic for a given Python version).
- ``words(n, rng)``: text snippets for OCR: words from the same prose, numbers, prices, dates, codes.
- ``text_line(text, rng)``: one rendered line of text (RGB uint8) on a varied background: flat
  colour, gradient, noise, paper-like texture; dark-on-light and light-on-dark; several DejaVu faces.
- ``text_scene(height, width, rng)``: a page-like image with several text lines at random places
  and sizes, plus clutter (rectangles, lines) that is not text.
- ``speech_like(seconds, rng)``: 16 kHz audio with speech segments and pauses, mixed with noise at a
  random SNR. Speech comes from espeak-ng (Debian package ``espeak-ng``) when it is installed;
  otherwise from a documented synthetic voice: a glottal pulse train at a gliding F0 (90-220 Hz)
  through three formant resonators that change per syllable, with a syllable-rate amplitude
  envelope. ``SPEECH_SOURCE`` says which one a run used.

Fonts: the DejaVu TTFs that matplotlib ships (``matplotlib/mpl-data/fonts/ttf``) or Debian's
``fonts-dejavu-core``; a clear error names both when neither is found.
"""
from __future__ import annotations

import importlib
import inspect
import io
import re
import shutil
import subprocess
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000

_DOC_MODULES = ("json", "collections", "pathlib", "argparse", "datetime", "textwrap", "statistics", "fractions",
                "decimal", "heapq", "itertools", "functools", "string", "random", "csv", "zipfile", "tarfile",
                "shutil", "subprocess", "threading", "queue", "logging", "difflib", "calendar", "http.client",
                "urllib.parse", "email.message", "sqlite3", "socket", "asyncio", "unittest", "tempfile", "gzip",
                "hashlib", "hmac", "secrets", "locale", "gettext", "inspect", "ast", "dis", "pickle", "copy",
                "pprint", "enum", "dataclasses", "contextlib", "abc", "operator", "bisect", "array", "weakref",
                "types", "typing", "numbers", "math", "cmath", "time", "sched", "signal", "mmap", "codecs",
                "unicodedata", "html", "xml.dom.minidom", "wave", "colorsys", "imaplib", "smtplib", "ftplib",
                "uuid", "ipaddress", "mailbox", "mimetypes", "base64", "binascii", "quopri", "configparser",
                "tomllib", "netrc", "plistlib", "getpass", "curses", "platform", "errno", "ctypes", "os", "io")


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """Every usable sentence of the modules' docstrings, deduplicated, in a fixed order."""
    found: dict[str, None] = {}
    for module_name in _DOC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:     # a module missing on this platform (curses on some builds) is skipped
            continue
        docs = [inspect.getdoc(module) or ""]
        for attribute in sorted(vars(module)):
            if attribute.startswith("_"):
                continue
            value = getattr(module, attribute, None)
            if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
                docs.append(inspect.getdoc(value) or "")
        for doc in docs:
            text = " ".join(doc.split())
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                words = sentence.split()
                # Prose, not code: mostly alphabetic words, starts with a capital, ends with a period.
                if not 6 <= len(words) <= 28 or not sentence[:1].isupper() or not sentence.endswith("."):
                    continue
                if sum(w.strip(",.;:()'\"").isalpha() for w in words) < 0.85 * len(words):
                    continue
                if any(c in sentence for c in "=>[]{}_\\|`*#"):
                    continue
                found.setdefault(sentence, None)
    return tuple(found)


def sentences(n: int, seed: int) -> list[str]:
    """``n`` distinct prose sentences, drawn with ``seed`` from the standard library's docstrings."""
    corpus = _corpus()
    if len(corpus) < n:
        raise RuntimeError(f"only {len(corpus)} sentences found in the standard library's docstrings, {n} asked")
    order = np.random.default_rng(seed).permutation(len(corpus))[:n]
    return [corpus[i] for i in order]


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    words = {w.strip(",.;:()'\"") for s in _corpus() for w in s.split()}
    return tuple(sorted(w for w in words if w.isalpha() and 2 <= len(w) <= 12))


def words(rng: np.random.Generator, max_chars: int = 24) -> str:
    """A short OCR snippet: 1-3 words, or a number, price, date or code, at most ``max_chars``."""
    vocabulary = _vocabulary()
    kind = rng.random()
    if kind < 0.6:
        picked = [vocabulary[i] for i in rng.integers(0, len(vocabulary), rng.integers(1, 4))]
        if rng.random() < 0.3:
            picked[0] = picked[0].capitalize()
        elif rng.random() < 0.15:
            picked = [w.upper() for w in picked]
        text = " ".join(picked)
    elif kind < 0.7:
        text = f"{rng.integers(0, 100000)}"
    elif kind < 0.8:
        text = f"${rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
    elif kind < 0.9:
        text = f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}"
    else:
        letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
        text = "".join(letters[i] for i in rng.integers(0, len(letters), 3)) + f"-{rng.integers(100, 10000)}"
    return text[:max_chars].strip() or "text"


@lru_cache(maxsize=1)
def fonts() -> tuple[Path, ...]:
    """The DejaVu TTF files found (matplotlib's copy first, then Debian's)."""
    folders = []
    try:
        import matplotlib

        folders.append(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf")
    except ImportError:
        pass
    folders.append(Path("/usr/share/fonts/truetype/dejavu"))
    for folder in folders:
        found = sorted(p for p in folder.glob("DejaVu*.ttf") if "Display" not in p.name)
        if found:
            return tuple(found)
    raise RuntimeError("no DejaVu TTF font found: pip install matplotlib (ships DejaVu) or "
                       "apt-get install fonts-dejavu-core")


@lru_cache(maxsize=64)
def _font(path: Path, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size)


def _background(height: int, width: int, rng: np.random.Generator, light: bool) -> np.ndarray:
    """A float RGB background in 0..255: flat, gradient, noisy or textured, light or dark."""
    base = rng.uniform(170, 250, 3) if light else rng.uniform(10, 90, 3)
    image = np.broadcast_to(base, (height, width, 3)).astype(np.float32).copy()
    style = rng.integers(0, 4)
    if style == 1:      # linear gradient
        ramp = np.linspace(-1, 1, width if rng.random() < 0.5 else height, dtype=np.float32)
        ramp = ramp[None, :, None] if ramp.size == width else ramp[:, None, None]
        image += ramp * rng.uniform(10, 40) * rng.choice([-1, 1], 3)
    elif style == 2:    # sensor noise
        image += rng.normal(0, rng.uniform(3, 12), image.shape)
    elif style == 3:    # paper / fabric texture: smoothed noise at a coarse scale
        coarse = rng.normal(0, 1, (height // 8 + 2, width // 8 + 2, 1)).astype(np.float32)
        texture = np.kron(coarse, np.ones((8, 8, 1), np.float32))[:height, :width]
        image += texture * rng.uniform(4, 15)
    return np.clip(image, 0, 255)


def _ink(rng: np.random.Generator, light_background: bool) -> tuple[int, int, int]:
    value = rng.uniform(0, 70, 3) if light_background else rng.uniform(190, 255, 3)
    if rng.random() < 0.25:     # coloured ink
        value[rng.integers(0, 3)] = rng.uniform(100, 200)
    return tuple(int(v) for v in value)


def text_line(text: str, rng: np.random.Generator, height: int = 48) -> np.ndarray:
    """``text`` rendered as one cropped line, ``height`` pixels high (RGB uint8, width as it falls)."""
    from PIL import Image, ImageDraw

    font_path = fonts()[rng.integers(0, len(fonts()))]
    font = _font(font_path, int(height * rng.uniform(0.55, 0.75)))
    left, top, right, bottom = font.getbbox(text)
    margin_x, margin_y = int(rng.integers(2, 12)), int(rng.integers(2, 8))
    width = right - left + 2 * margin_x
    tall = bottom - top + 2 * margin_y
    light = rng.random() < 0.75
    canvas = Image.fromarray(_background(tall, width, rng, light).astype(np.uint8))
    ImageDraw.Draw(canvas).text((margin_x - left, margin_y - top), text, font=font, fill=_ink(rng, light))
    if rng.random() < 0.3:      # a slight tilt, as a crop from a photo would have
        canvas = canvas.rotate(float(rng.uniform(-2.5, 2.5)), resample=Image.BILINEAR, expand=False,
                               fillcolor=tuple(int(v) for v in np.asarray(canvas)[0, 0]))
    scale = height / canvas.height
    canvas = canvas.resize((max(8, int(round(canvas.width * scale))), height), Image.BILINEAR)
    return np.asarray(canvas, dtype=np.uint8)


def text_scene(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A page- or sign-like RGB uint8 image with 3-8 text lines and some non-text clutter."""
    from PIL import Image, ImageDraw

    light = rng.random() < 0.7
    canvas = Image.fromarray(_background(height, width, rng, light).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(1, 5)):    # clutter: boxes and rules that a detector must not call text
        x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
        x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(2, height // 3)
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=int(rng.integers(1, 4)))
        else:
            draw.line((x0, y0, x1, y0 + rng.integers(-10, 10)), fill=colour, width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(3, 9)):
        text = words(rng, max_chars=30)
        font = _font(fonts()[rng.integers(0, len(fonts()))], int(rng.integers(14, 40)))
        left, top, right, bottom = font.getbbox(text)
        if right - left >= width - 8:
            continue
        x = int(rng.integers(4, width - (right - left) - 4))
        y = int(rng.integers(4, max(5, height - (bottom - top) - 4)))
        draw.text((x - left, y - top), text, font=font, fill=_ink(rng, light))
    image = np.asarray(canvas, dtype=np.float32)
    if rng.random() < 0.3:      # mild blur, as from a phone camera: a 3x3 box average
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        image = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9.0
    return np.clip(image, 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------- audio

SPEECH_SOURCE = "espeak-ng" if shutil.which("espeak-ng") else "synthetic voice"


def _espeak(text: str, rng: np.random.Generator) -> np.ndarray:
    """``text`` spoken by espeak-ng with a random voice, speed and pitch, float32 at 16 kHz."""
    from scipy.signal import resample_poly

    voice = ["en", "en-us", "en+f3", "en+m3", "en+f2", "en-gb"][rng.integers(0, 6)]
    command = ["espeak-ng", "-v", voice, "-s", str(int(rng.integers(130, 190))), "-p", str(int(rng.integers(30, 70))),
               "--stdout", text]
    wav_bytes = subprocess.run(command, capture_output=True, check=True, timeout=60).stdout
    with wave.open(io.BytesIO(wav_bytes)) as reader:
        rate = reader.getframerate()
        samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    if rate != SAMPLE_RATE:
        from math import gcd

        g = gcd(rate, SAMPLE_RATE)
        samples = resample_poly(samples, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return samples


def _synthetic_voice(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A vowel-like voice: pulse train at a gliding F0 through per-syllable formant resonators."""
    from scipy.signal import lfilter

    n = int(seconds * SAMPLE_RATE)
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * np.arange(n) / SAMPLE_RATE))
    phase = np.cumsum(f0 / SAMPLE_RATE)
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float32)
    syllable = int(SAMPLE_RATE / rng.uniform(3.5, 6.0))
    out = np.zeros(n, np.float32)
    for start in range(0, n, syllable):
        piece = source[start:start + syllable]
        for formant, bandwidth in ((rng.uniform(300, 900), 80), (rng.uniform(900, 2300), 120), (rng.uniform(2300, 3200), 180)):
            r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
            a = [1, -2 * r * np.cos(2 * np.pi * formant / SAMPLE_RATE), r * r]
            out[start:start + len(piece)] += lfilter([1 - r], a, piece).astype(np.float32)
        out[start:start + len(piece)] *= np.sin(np.linspace(0, np.pi, len(piece))) ** 2
    return out / (np.abs(out).max() + 1e-9) * 0.5


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink (1/f) or hum-plus-hiss background noise, unit RMS."""
    kind = rng.integers(0, 3)
    white = rng.normal(0, 1, n).astype(np.float32)
    if kind == 1:
        spectrum = np.fft.rfft(white)
        spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1))
        white = np.fft.irfft(spectrum, n).astype(np.float32)
    elif kind == 2:
        t = np.arange(n) / SAMPLE_RATE
        white = 0.3 * white + np.sin(2 * np.pi * 50 * t) + 0.5 * np.sin(2 * np.pi * 150 * t)
    return (white / (np.sqrt(np.mean(white ** 2)) + 1e-9)).astype(np.float32)


def speech_like(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """``seconds`` of 16 kHz float32 audio: pauses and utterances, in noise at 0-25 dB SNR."""
    n = int(seconds * SAMPLE_RATE)
    clean = np.zeros(n, np.float32)
    at = int(rng.uniform(0.2, 1.0) * SAMPLE_RATE)
    while at < n - SAMPLE_RATE // 4:
        if SPEECH_SOURCE == "espeak-ng":
            voice = _espeak(sentences(1, int(rng.integers(0, 2 ** 31)))[0], rng)
        else:
            voice = _synthetic_voice(rng.uniform(0.5, 2.0), rng)
        voice = voice[: n - at]
        clean[at:at + voice.size] += voice * rng.uniform(0.3, 1.0) / (np.abs(voice).max() + 1e-9)
        at += voice.size + int(rng.uniform(0.3, 1.5) * SAMPLE_RATE)
    speech_rms = np.sqrt(np.mean(clean[clean != 0] ** 2)) if np.any(clean) else 0.1
    snr_db = rng.uniform(0, 25)
    noisy = clean + _noise(n, rng) * speech_rms / (10 ** (snr_db / 20))
    return np.clip(noisy, -1, 1).astype(np.float32)
