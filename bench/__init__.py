"""Benchmarks (not tests): bench models trained here, quality vs ONNX Runtime's quantizers."""
