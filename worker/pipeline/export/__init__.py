"""Deploy formats converted from the compressed ONNX model (the recipe's ``export`` list).

One module per format (``ort_format``, ``torchscript``, ``tflite``), each with ``FILES`` (the
artifact names, ``FILES[0]`` the model itself), ``convert(ctx) -> dict`` (writes the files, returns
what the converter chose) and ``runner(ctx) -> runtime.Runner`` (loads the main file in that
format's own runtime). ``exports.run_exports`` converts, measures each against the compressed and
the original ONNX models, and fails one format (its files removed, its reason reported) without
touching the others or model.onnx. The registry is closed (``FORMAT_MODULES``): a recipe names a
format, never code.
"""
