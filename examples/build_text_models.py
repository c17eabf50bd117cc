"""The text examples' ONNX models and ensemble (their Python steps live in examples/python_models
and are written by build_backend_models.py):

- `text_encoder`: token ids [16] -> embeddings [16, 32] (an embedding table, seeded);
- `text_pipeline`: an ensemble text_tokenizer (Python) -> text_encoder (ONNX) -> text_pooling
  (Python): TEXT -> a normalised 32-float EMBEDDING;
- `text_decoder`: token id [1] -> next-token logits [1, 64] (a seeded bigram table), which the
  decoupled Python model `text_generator` calls once per token to stream text.

    python examples/build_text_models.py [--out examples/models]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NAMES = ("text_encoder", "text_decoder", "text_pipeline")
VOCABULARY, LENGTH, WIDTH = 1000, 16, 32
SYLLABLES = 64


def _model(nodes: list[onnx.NodeProto], name: str, inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], table: np.ndarray) -> bytes:  # fmt: skip
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _write(out_dir: Path, name: str, config: str, model: bytes | None) -> None:
    folder = out_dir / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    if model is not None:
        (folder / "1" / "model.onnx").write_bytes(model)
    (folder / "config.pbtxt").write_text(config)


def build(out_dir: Path) -> None:
    rng = np.random.default_rng(11)
    table = rng.standard_normal((VOCABULARY, WIDTH)).astype(np.float32)
    encoder = _model(
        [helper.make_node("Gather", ["table", "TOKENS"], ["EMBEDDINGS"])],
        "text_encoder",
        [helper.make_tensor_value_info("TOKENS", TensorProto.INT64, [LENGTH])],
        [helper.make_tensor_value_info("EMBEDDINGS", TensorProto.FLOAT, [LENGTH, WIDTH])],
        table,
    )
    _write(out_dir, "text_encoder", (
        'name: "text_encoder"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        f'input [ {{ name: "TOKENS" data_type: TYPE_INT64 dims: [ {LENGTH} ] }} ]\n'
        f'output [ {{ name: "EMBEDDINGS" data_type: TYPE_FP32 dims: [ {LENGTH}, {WIDTH} ] }} ]\n'
    ), encoder)  # fmt: skip
    bigrams = rng.standard_normal((SYLLABLES, SYLLABLES)).astype(np.float32)
    bigrams[:, 0] = -10.0  # the end token only when nothing else is left: MAX_TOKENS ends the text
    decoder = _model(
        [helper.make_node("Gather", ["table", "TOKEN"], ["LOGITS"])],
        "text_decoder",
        [helper.make_tensor_value_info("TOKEN", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("LOGITS", TensorProto.FLOAT, [1, SYLLABLES])],
        bigrams,
    )
    _write(out_dir, "text_decoder", (
        'name: "text_decoder"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "TOKEN" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
        f'output [ {{ name: "LOGITS" data_type: TYPE_FP32 dims: [ 1, {SYLLABLES} ] }} ]\n'
    ), decoder)  # fmt: skip
    _write(out_dir, "text_pipeline", (
        'name: "text_pipeline"\nplatform: "ensemble"\nmax_batch_size: 0\n'
        'input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        f'output [ {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]\n'
        "ensemble_scheduling { step [\n"
        '  { model_name: "text_tokenizer" model_version: -1 input_map { key: "TEXT" value: "TEXT" }'
        ' output_map { key: "TOKENS" value: "tokens" } output_map { key: "MASK" value: "mask" } },\n'
        '  { model_name: "text_encoder" model_version: -1 input_map { key: "TOKENS" value: "tokens" }'
        ' output_map { key: "EMBEDDINGS" value: "embeddings" } },\n'
        '  { model_name: "text_pooling" model_version: -1 input_map { key: "EMBEDDINGS" value: "embeddings" }'
        ' input_map { key: "MASK" value: "mask" } output_map { key: "EMBEDDING" value: "EMBEDDING" } }\n'
        "] }\n"
    ), None)  # fmt: skip
    for name in NAMES:
        print(f"built {name:<22} {out_dir / name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "models")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
