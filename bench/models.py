"""Bench models trained here on real data, exported to ONNX, with fixed calibration / evaluation splits.

Owns the two models every quality and speed bench compares on:

- ``digits_cnn()``: Conv+BatchNorm+ReLU twice, max pooling, two Gemm layers, trained on
  scikit-learn's 8x8 digits. Input ``input`` [batch, 1, 8, 8] float32, output ``logits`` [batch, 10].
- ``transformer_encoder()``: a 2-layer pre-norm transformer encoder classifier (token embedding,
  learned positions, multi-head attention with an additive float mask, LayerNorm, GELU MLP) trained
  on the same digits read as a *variable-length sequence*: one token per non-zero pixel,
  ``token = 1 + 4 * position + (intensity - 1) // 4``
  (intensity in four levels, so each token is seen often enough to learn), padded with token 0 up to the longest image.
  Inputs ``tokens`` [batch, seq] int64 and ``attention_mask`` [batch, seq] float32 (0 where a
  token is real, float32's minimum -3.4e38 where padded — what real exported models feed and what
  wrecks naive activation ranges); output ``logits`` [batch, 10].

Each returns ``(onnx.ModelProto, calibration, evaluation)`` where the data sets are dicts in the
docs/datasets.md layout (one array per input, concatenated along the batch axis, plus ``_labels``).
Everything is cached under ``bench/out/models`` keyed by ``VERSION``: the second call only loads.
Seeds are fixed, so a cache rebuilt elsewhere holds the same splits (weights match up to torch's
CPU kernels' float non-associativity).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

VERSION = 1
CACHE_DIR = Path(__file__).resolve().parent / "out" / "models"

SEED = 0
EVAL_SIZE = 450          # held out from training: accuracy and fidelity are measured here
CALIBRATION_SIZE = 256   # drawn from the training split, as a user would calibrate
FLOAT_MIN = float(np.finfo(np.float32).min)


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, eval images, eval labels); images float32 [N, 8, 8] in 0..16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    train, held = order[:-EVAL_SIZE], order[-EVAL_SIZE:]
    return images[train], labels[train], images[held], labels[held]


def _cached(name: str, build) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    model_path = CACHE_DIR / f"{name}-v{VERSION}.onnx"
    data_path = CACHE_DIR / f"{name}-v{VERSION}.npz"
    if not (model_path.exists() and data_path.exists()):
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        model_bytes, calibration, evaluation = build()
        # Written under temporary names and renamed, so two processes racing leave whole files.
        tmp_model = model_path.with_name(f"{model_path.name}.{os.getpid()}.partial")
        tmp_data = data_path.with_name(f"{data_path.stem}.{os.getpid()}.partial.npz")
        tmp_model.write_bytes(model_bytes)
        np.savez(tmp_data, **{f"cal/{k}": v for k, v in calibration.items()},
                 **{f"eval/{k}": v for k, v in evaluation.items()})
        tmp_data.replace(data_path)
        tmp_model.replace(model_path)
    model = onnx.load(str(model_path))
    with np.load(str(data_path), allow_pickle=False) as archive:
        calibration = {k[4:]: archive[k] for k in archive.files if k.startswith("cal/")}
        evaluation = {k[5:]: archive[k] for k in archive.files if k.startswith("eval/")}
    return model, calibration, evaluation


def _export(module, args: tuple, input_names: list[str], dynamic_axes: dict) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    module.eval()
    # The TorchScript exporter needs no onnxscript; PRESERVE keeps BatchNormalization as its own
    # node (EVAL would fold it into the Conv), so the cleanup step has something real to fold.
    torch.onnx.export(module, args, buffer, input_names=input_names, output_names=["logits"],
                      dynamic_axes=dynamic_axes, opset_version=17, do_constant_folding=True,
                      training=torch.onnx.TrainingMode.PRESERVE, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _train(module, inputs: tuple, labels, *, epochs: int, lr: float, batch_size: int = 64) -> None:
    import torch

    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * (
        (len(labels) + batch_size - 1) // batch_size))
    generator = torch.Generator().manual_seed(SEED)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            index = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(module(*(x[index] for x in inputs)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    module.eval()


# --------------------------------------------------------------------------------------------- CNN

def _build_digits_cnn():
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    train_x, train_y, eval_x, eval_y = _digits_split()
    # Pixel values 0..16 scaled to 0..1: what a user's preprocessing would feed.
    train_x, eval_x = train_x[:, None] / 16.0, eval_x[:, None] / 16.0

    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )
    with torch.random.fork_rng():
        _train(net, (torch.from_numpy(train_x),), torch.from_numpy(train_y), epochs=12, lr=3e-3)
    model_bytes = _export(net, (torch.zeros(1, 1, 8, 8),), ["input"],
                          {"input": {0: "batch"}, "logits": {0: "batch"}})
    calibration = {"input": train_x[:CALIBRATION_SIZE].astype(np.float32), "_labels": train_y[:CALIBRATION_SIZE]}
    evaluation = {"input": eval_x.astype(np.float32), "_labels": eval_y}
    return model_bytes, calibration, evaluation


def digits_cnn() -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The digits CNN and its calibration (256 training images) / evaluation (450 held-out) splits."""
    return _cached("digits_cnn", _build_digits_cnn)


# ------------------------------------------------------------------------------------- transformer

D_MODEL = 128
HEADS = 4
FFN = 512
LAYERS = 2
VOCAB = 1 + 64 * 4       # pad + (position, intensity level) pairs


def digits_as_sequences(images: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's non-zero pixels in raster order as tokens, padded with 0 to ``length``.
    Returns (tokens int64 [N, length], additive mask float32 [N, length]: 0 real, float min padded)."""
    flat = np.rint(images.reshape(len(images), -1)).astype(np.int64)
    tokens = np.zeros((len(images), length), dtype=np.int64)
    mask = np.full((len(images), length), FLOAT_MIN, dtype=np.float32)
    for row, pixels in enumerate(flat):
        positions = np.flatnonzero(pixels)[:length]
        tokens[row, :len(positions)] = 1 + 4 * positions + (pixels[positions] - 1) // 4
        mask[row, :len(positions)] = 0.0
    return tokens, mask


def _transformer_module():
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
            self.out = nn.Linear(D_MODEL, D_MODEL)

        def forward(self, x, mask):
            batch, seq, _ = x.shape
            q, k, v = self.qkv(x).reshape(batch, seq, 3, HEADS, D_MODEL // HEADS).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-1, -2) * (D_MODEL // HEADS) ** -0.5
            # The mask is additive, as exported models feed it: float min where padded.
            weights = torch.softmax(scores + mask[:, None, None, :], dim=-1)
            return self.out((weights @ v).transpose(1, 2).reshape(batch, seq, D_MODEL))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
            self.attention = Attention()
            self.mlp = nn.Sequential(nn.Linear(D_MODEL, FFN), nn.GELU(), nn.Linear(FFN, D_MODEL))

        def forward(self, x, mask):
            x = x + self.attention(self.norm1(x), mask)
            return x + self.mlp(self.norm2(x))

    class Encoder(nn.Module):
        def __init__(self, length: int):
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, D_MODEL)
            self.position = nn.Parameter(torch.randn(1, length, D_MODEL) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
            self.norm = nn.LayerNorm(D_MODEL)
            self.head = nn.Linear(D_MODEL, 10)

        def forward(self, tokens, mask):
            x = self.embedding(tokens) + self.position[:, :tokens.shape[1]]
            for block in self.blocks:
                x = block(x, mask)
            # Mean over real tokens only: the mask's zeros mark them.
            keep = (mask == 0).to(x.dtype)[:, :, None]
            pooled = (self.norm(x) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
            return self.head(pooled)

    return Encoder


def _build_transformer_encoder():
    import torch

    torch.manual_seed(SEED)
    train_x, train_y, eval_x, eval_y = _digits_split()
    length = int(max((train_x.reshape(len(train_x), -1) > 0).sum(1).max(),
                     (eval_x.reshape(len(eval_x), -1) > 0).sum(1).max()))
    train_tokens, train_mask = digits_as_sequences(train_x, length)
    eval_tokens, eval_mask = digits_as_sequences(eval_x, length)
    net = _transformer_module()(length)
    with torch.random.fork_rng():
        _train(net, (torch.from_numpy(train_tokens), torch.from_numpy(train_mask)), torch.from_numpy(train_y),
               epochs=30, lr=2e-3, batch_size=32)
    model_bytes = _export(net, (torch.from_numpy(train_tokens[:2]), torch.from_numpy(train_mask[:2])),
                          ["tokens", "attention_mask"],
                          {"tokens": {0: "batch"}, "attention_mask": {0: "batch"}, "logits": {0: "batch"}})
    calibration = {"tokens": train_tokens[:CALIBRATION_SIZE], "attention_mask": train_mask[:CALIBRATION_SIZE],
                   "_labels": train_y[:CALIBRATION_SIZE]}
    evaluation = {"tokens": eval_tokens, "attention_mask": eval_mask, "_labels": eval_y}
    return model_bytes, calibration, evaluation


def transformer_encoder() -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The digits-as-sequences transformer classifier and its calibration / evaluation splits."""
    return _cached("transformer_encoder", _build_transformer_encoder)


def accuracy(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (with ``_labels``) in ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in data.items() if k != "_labels"}
    logits = session.run(None, feeds)[0]
    return float((logits.argmax(1) == data["_labels"]).mean())


if __name__ == "__main__":
    import time

    for build in (digits_cnn, transformer_encoder):
        started = time.perf_counter()
        model, calibration, evaluation = build()
        ops = sorted({node.op_type for node in model.graph.node})
        print(f"{build.__name__}: {time.perf_counter() - started:.1f}s, accuracy "
              f"{accuracy(model, evaluation):.4f}, {model.ByteSize()} bytes, ops {ops}")
