"""Distillation engines behind the ``distill`` step (worker/pipeline/steps/distill.py).

- ``layers``: where a layer's free parameters live in an ONNX graph (a float initializer, or integers
  behind a DequantizeLinear on a fixed grid; a bias in Gemm / Conv / a following Add) and the
  constraints earlier steps left on them (mask, grid, codebook).
- ``layerwise``: closed-form regularized least squares, layer after layer (numpy only).
- ``torch_graph`` and ``kd``: an op-by-op ONNX interpreter in PyTorch and soft-label training on it
  (torch is the optional extra ``featherweight[distill]``; imported only when ``kd`` runs).
"""
