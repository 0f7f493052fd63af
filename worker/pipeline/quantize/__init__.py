"""Quantizers behind the ``quantize`` step: weight-only (RTN, GPTQ, MatMulNBits), sign, and
(in ``static`` / ``dynamic``) int8 activations."""
