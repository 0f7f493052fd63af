"""Odd arguments to every kernel raise KernelError (or TypeError for a malformed call), never
crash: the fuzzer runs in a subprocess so a crash fails this test instead of killing pytest."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))


def test_fuzz_arguments_never_crash():
    r = subprocess.run([sys.executable, os.path.join(HERE, "fwk_fuzz.py")], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, (r.returncode, r.stdout[-4000:], r.stderr[-4000:])
    assert " 0 unexpected exceptions" in r.stdout
