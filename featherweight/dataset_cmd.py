"""``featherweight dataset``: builds the .npz a model needs from images, audio or text (docs/cli.md).

    featherweight dataset images FOLDER -o OUT.npz [--model M.onnx] [--size HxW] [--layout nchw|nhwc]
                                 [--channels rgb|bgr|gray] [--mean M[,M,M]] [--std S[,S,S]] [--scale X]
                                 [--resize crop|stretch] [--input NAME] [--no-labels] [--limit N]
    featherweight dataset audio  FOLDER -o OUT.npz [--model M.onnx] [--sample-rate HZ] [--length N]
                                 [--hop N] [--input NAME] [--no-labels] [--limit N]
    featherweight dataset text   LINES.txt --tokenizer tokenizer.json -o OUT.npz [--model M.onnx]
                                 [--max-length N] [--inputs input_ids,attention_mask,...] [--limit N]

The work is ``featherweight.dataset_files``; this module parses flags and prints. On success it
prints what it wrote (each array's name, dtype, shape and range) and exits 0; a file it cannot read
or a flag that does not fit the model prints one line naming the file and exits 2.
"""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH (e.g. 224x224)")
    return values[0], values[1]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or comma-separated numbers") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_subcommands(commands: argparse._SubParsersAction) -> None:
    dataset = commands.add_parser("dataset", help="build a data set (.npz) from images, audio or text lines",
                                  description="Build the .npz data set a model needs (docs/datasets.md). With "
                                              "--model, shapes, layout, dtype and input names come from the "
                                              "model's input; flags give the rest.")
    kinds = dataset.add_subparsers(dest="dataset_kind", required=True)

    def common(parser: argparse.ArgumentParser, what: str) -> None:
        parser.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="the data set to write")
        parser.add_argument("--model", metavar="MODEL.onnx", help=f"read the input's shape and dtype from this model")
        parser.add_argument("--limit", type=_positive, metavar="N", help=f"use at most N {what}")

    images = kinds.add_parser("images", help="a folder of images (class sub-folders give _labels)")
    images.add_argument("source", metavar="FOLDER")
    common(images, "files")
    images.add_argument("--input", dest="input_name", metavar="NAME", help="the input's name (needed without --model)")
    images.add_argument("--size", type=_size, metavar="HxW", help="height x width (read from the model when fixed)")
    images.add_argument("--layout", choices=("nchw", "nhwc"), help="read from the model when its channel axis is clear")
    images.add_argument("--channels", choices=("rgb", "bgr", "gray"),
                        help="channel order (default: gray for 1 channel, rgb for 3)")
    images.add_argument("--scale", type=float, default=1 / 255, help="pixel multiplier before mean/std (default 1/255)")
    images.add_argument("--mean", type=_floats, default=(0.0,), metavar="M[,M,M]",
                        help="subtracted after scaling, per channel in the channel order fed (default 0)")
    images.add_argument("--std", type=_floats, default=(1.0,), metavar="S[,S,S]",
                        help="divided by after the mean, per channel (default 1)")
    images.add_argument("--resize", choices=("crop", "stretch"), default="crop",
                        help="crop: shorter side to the size, then the centre (default); stretch: to the size")
    images.add_argument("--no-labels", dest="labels", action="store_false", help="do not write _labels")
    images.set_defaults(handler=main)

    audio = kinds.add_parser("audio", help="a folder of audio files (WAV, FLAC, OGG ...), cut into frames")
    audio.add_argument("source", metavar="FOLDER")
    common(audio, "files")
    audio.add_argument("--input", dest="input_name", metavar="NAME", help="the input's name (needed without --model)")
    audio.add_argument("--sample-rate", type=_positive, default=16000, metavar="HZ",
                       help="resample to this rate (default 16000)")
    audio.add_argument("--length", type=_positive, metavar="SAMPLES",
                       help="samples per frame (read from the model when fixed)")
    audio.add_argument("--hop", type=_positive, metavar="SAMPLES", help="samples between frame starts (default: --length)")
    audio.add_argument("--no-labels", dest="labels", action="store_false", help="do not write _labels")
    audio.set_defaults(handler=main)

    text = kinds.add_parser("text", help="a text file, one sample per line, tokenized with a tokenizer.json")
    text.add_argument("source", metavar="LINES.txt")
    text.add_argument("--tokenizer", required=True, metavar="tokenizer.json", help="a Hugging Face tokenizers file")
    common(text, "lines")
    text.add_argument("--max-length", type=_positive, metavar="N",
                      help="tokens per sample (read from the model when fixed; else the longest line)")
    text.add_argument("--inputs", type=_names, default=("input_ids", "attention_mask"), metavar="NAMES",
                      help="without --model: the arrays to write (default input_ids,attention_mask)")
    text.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from featherweight import dataset_files as files

    try:
        if args.dataset_kind == "images":
            built = files.build_from_images(args.source, args.output, model=args.model, options=files.ImageOptions(
                size=args.size, layout=args.layout, channels=args.channels, mean=args.mean, std=args.std,
                scale=args.scale, resize=args.resize, input_name=args.input_name, labels=args.labels,
                limit=args.limit))
        elif args.dataset_kind == "audio":
            built = files.build_from_audio(args.source, args.output, model=args.model, options=files.AudioOptions(
                sample_rate=args.sample_rate, length=args.length, hop=args.hop, input_name=args.input_name,
                labels=args.labels, limit=args.limit))
        else:
            built = files.build_from_text(args.source, args.tokenizer, args.output, model=args.model,
                                          options=files.TextOptions(max_length=args.max_length, inputs=args.inputs,
                                                                    limit=args.limit))
    except files.DatasetBuildError as exc:
        print(f"featherweight: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:   # the output's folder missing or not writable
        print(f"featherweight: error: {exc.filename or args.output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(built.describe())
    return EXIT_OK
