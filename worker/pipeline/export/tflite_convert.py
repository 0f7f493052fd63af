"""The LiteRT conversion, run as its own process (``python -m worker.pipeline.export.tflite_convert
JOB.json``) by ``tflite.convert``: TensorFlow is large, prints freely and keeps threads and memory
for the life of a process, so the worker never imports it.

Reads JOB.json: ``float_onnx`` (the float graph, ``float_graph``), ``folder`` (scratch),
``output`` (model.tflite), ``mode`` (``int8`` full-integer | ``dynamic`` | ``fp16`` | ``float32``),
``shapes`` (each input's shape for one sample), ``keep_ncw`` / ``keep_as_is`` (inputs read as
channel-first / taken exactly as given; both keep ONNX's order), ``calibration`` (an .npz of the feeds of one call each, stacked on a new first axis, for ``int8``). Writes
``output`` and prints one JSON line: the converter's choices and the float32 file's bytes.

onnx2tf builds a TensorFlow graph from the ONNX model (NHWC inside; the inputs keep the order
ONNX gives them, so the file takes the same arrays as the ONNX model) and saves it; TensorFlow's LiteRT converter then writes the flat buffer:
- ``int8``: full-integer: weights int8 per output channel, activations int8 with ranges from the
  calibration samples (the representative data set), float32 inputs and outputs kept;
- ``dynamic``: dynamic-range: weights int8, activations quantized at run time by the kernels that can;
- ``fp16``: weights in float16; ``float32``: no quantization.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _converter(folder: Path, mode: str, calibration: Path | None, inputs: list[str]):
    import numpy as np
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(folder))
    if mode == "float32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        with np.load(str(calibration), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        count = len(next(iter(arrays.values())))

        def representative():
            # keyed by input name: the saved model's signature takes the ONNX input names
            for index in range(count):
                yield {name: arrays[name][index] for name in inputs}

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.float32
    return converter


# onnx2tf checks a model whose every input is an NHWC image ([<= 20, H, W, 3]) on sample images it
# downloads from GitHub unless this file is in the working directory: a worker offline failed there
SAMPLE_IMAGES = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _offline_sample_images(folder: Path) -> None:
    """Work in ``folder`` with the sample file onnx2tf looks for (seeded uniform [0, 1) pixels, the
    download's shape and range): its check then runs without the network."""
    import numpy as np

    os.chdir(folder)
    if not Path(SAMPLE_IMAGES).is_file():
        np.save(SAMPLE_IMAGES, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))


def main(job_file: str) -> int:
    import onnx2tf

    job = json.loads(Path(job_file).read_text())
    for key in ("folder", "float_onnx", "output", "calibration"):      # before the chdir below
        if job.get(key):
            job[key] = str(Path(job[key]).resolve())
    folder = Path(job["folder"])
    _offline_sample_images(folder)
    onnx2tf.convert(
        input_onnx_file_path=job["float_onnx"], output_folder_path=str(folder / "saved_model"),
        overwrite_input_shape=[f"{name}:{','.join(str(d) for d in dims)}" for name, dims in job["shapes"].items()],
        keep_ncw_or_nchw_or_ncdhw_input_names=job["keep_ncw"] or None,
        keep_shape_absolutely_input_names=job["keep_as_is"] or None,
        output_signaturedefs=True, not_use_onnxsim=True, non_verbose=True,
    )
    float_file = next((folder / "saved_model").glob("*_float32.tflite"), None)
    converter = _converter(folder / "saved_model", job["mode"],
                           Path(job["calibration"]) if job.get("calibration") else None, list(job["shapes"]))
    Path(job["output"]).write_bytes(converter.convert())
    import tensorflow as tf

    print(json.dumps({"tensorflow": tf.__version__, "onnx2tf": onnx2tf.__version__,
                      "float32_bytes": float_file.stat().st_size if float_file else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
