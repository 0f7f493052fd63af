"""Run a module as ``python -m`` runs it, then write this process's peak RSS (VmHWM, KiB) to a file.

    python bench/peak_child.py OUT MODULE [ARGS...]

Why not ``wait4``'s ``ru_maxrss`` in the parent: Linux carries a process's high-water mark over fork
and exec, so a child started from a bench process of 1 GB reports at least 1 GB whatever it used
(``bench.cost``'s three recognizer rows all read 1035 MB, the bench's own size). VmHWM belongs to the
address space exec made, so it is the child's own. Started as a file, not with ``-m``, so that a
``--baseline`` checkout without this file can be measured too.
"""
from __future__ import annotations

import atexit
import os
import runpy
import sys


def _write_peak(path: str) -> None:
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(path, "w") as sink:
        sink.write(str(peak_kib))


def main() -> None:
    out, module, *args = sys.argv[1:]
    sys.path[0] = os.getcwd()          # as ``python -m``: the working directory first, not bench/
    atexit.register(_write_peak, out)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
