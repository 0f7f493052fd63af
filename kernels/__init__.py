"""Featherweight's C kernel library (cffi, out-of-line API mode): numpy in, numpy out.

Every function checks dtype, shape, contiguity and ranges before calling C and raises
`KernelError` (a ValueError) carrying the C message on bad input; no argument can crash the
process. See kernels/README.md for the API contract.

This module only re-exports: ``_load`` builds (in a source checkout) and loads the library and
checks its ABI, ``_args`` holds the argument checks, and one wrapper module per C source
(``_quant``, ``_select``, ``_hist``, ``_kmeans``, ``_gptq``, ``_dispatch``, ``_common``) the
functions over it.
"""

from __future__ import annotations

__all__ = [
    "KernelError",
    "Histogram",
    "apply_mask",
    "channel_norms",
    "choose_qparams",
    "dequantize",
    "entropy_threshold",
    "gptq_quantize",
    "histogram",
    "isa",
    "isa_supported",
    "kmeans1d",
    "kth_smallest_abs",
    "magnitude_mask",
    "minmax",
    "nm_mask",
    "pack",
    "pack_signs",
    "percentile_from_histogram",
    "quantize",
    "set_isa",
    "set_threads",
    "sign_quantize",
    "sparsegpt_prune",
    "threads",
    "unpack",
    "unpack_signs",
    "use_isa",
]

from kernels._args import KernelError
from kernels._common import _memcpy, minmax, set_threads, threads
from kernels._dispatch import isa, isa_supported, set_isa, use_isa
from kernels._gptq import gptq_quantize, sparsegpt_prune
from kernels._hist import Histogram, entropy_threshold, histogram, percentile_from_histogram
from kernels._kmeans import kmeans1d
from kernels._quant import choose_qparams, dequantize, pack, quantize, unpack
from kernels._select import (apply_mask, channel_norms, kth_smallest_abs, magnitude_mask, nm_mask, pack_signs,
                             sign_quantize, unpack_signs)
