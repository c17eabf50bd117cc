"""Generate the example Triton model repository (config.pbtxt + numbered versions of model.onnx).

Nothing large is committed: every model is built here from `onnx.helper`, with weights drawn
from a seeded generator so that two builds write the same bytes. Usage:

    python examples/build_models.py [--out examples/models] [--only tiny,simple] [--no-check]

`build(out_dir, names)` is the importable entry point; tests call it with `SMALL_MODELS` to
skip the ~70 MB `mlp`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

# ir_version 9 / opset 17: new enough for BF16 Identity, old enough for any onnxruntime >= 1.16.
OPSET: Final = 17
IR_VERSION: Final = 9
DEFAULT_OUT: Final = Path(__file__).resolve().parent / "models"

# Triton datatype -> (ONNX element type, config.pbtxt enum). BYTES is ONNX STRING / TYPE_STRING.
DATATYPES: Final[dict[str, tuple[int, str]]] = {
    "BOOL": (TensorProto.BOOL, "TYPE_BOOL"),
    "INT8": (TensorProto.INT8, "TYPE_INT8"),
    "INT16": (TensorProto.INT16, "TYPE_INT16"),
    "INT32": (TensorProto.INT32, "TYPE_INT32"),
    "INT64": (TensorProto.INT64, "TYPE_INT64"),
    "UINT8": (TensorProto.UINT8, "TYPE_UINT8"),
    "UINT16": (TensorProto.UINT16, "TYPE_UINT16"),
    "UINT32": (TensorProto.UINT32, "TYPE_UINT32"),
    "UINT64": (TensorProto.UINT64, "TYPE_UINT64"),
    "FP16": (TensorProto.FLOAT16, "TYPE_FP16"),
    "FP32": (TensorProto.FLOAT, "TYPE_FP32"),
    "FP64": (TensorProto.DOUBLE, "TYPE_FP64"),
    "BF16": (TensorProto.BFLOAT16, "TYPE_BF16"),
    "BYTES": (TensorProto.STRING, "TYPE_STRING"),
}

MLP_INPUT_SIZE: Final = 256
MLP_HIDDEN_SIZE: Final = 4096
MLP_OUTPUT_SIZE: Final = 10
TINY_SIZE: Final = 16
VERSIONED_VERSIONS: Final = (1, 2, 3)

IDENTITY_MODELS: Final = tuple(f"identity_{dt.lower()}" for dt in DATATYPES)
LARGE_MODELS: Final = frozenset({"mlp"})
ALL_MODELS: Final = (
    "tiny",
    "mlp",
    "simple",
    *IDENTITY_MODELS,
    "autocomplete",
    "versioned",
    "no_batch",
    "broken",
    *(ENSEMBLES := ("ensemble_simple", "ensemble_parallel", "ensemble_nested", "ensemble_missing",
                    "ensemble_failing", "ensemble_chain3")),
)  # fmt: skip
# Everything but the models that take noticeable time and disk to build (for tests).
SMALL_MODELS: Final = tuple(name for name in ALL_MODELS if name not in LARGE_MODELS)

BROKEN_MODEL_BYTES: Final = b"not an onnx model"


# --- config.pbtxt rendering (Triton's protobuf text format, written as plain text) ---


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # config enum, e.g. "TYPE_FP32"
    dims: tuple[int, ...]


def tensor_list(field: str, tensors: Sequence[TensorSpec]) -> str:
    blocks = []
    for tensor in tensors:
        dims = ", ".join(str(d) for d in tensor.dims)
        blocks.append(
            f'  {{\n    name: "{tensor.name}"\n    data_type: {tensor.data_type}\n    dims: [ {dims} ]\n  }}'
        )
    return f"{field} [\n" + ",\n".join(blocks) + "\n]\n"


def render_config(
    name: str,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    extra: str = "",
) -> str:
    # Both platform and backend: Triton accepts the pair, and whichever one a reader keys on is there.
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        + tensor_list("input", inputs)
        + tensor_list("output", outputs)
        + extra
    )


# --- ONNX graph helpers ---


def value_info(name: str, elem_type: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def const(name: str, value: npt.NDArray[np.generic]) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name=name)


def onnx_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="natron-examples",
    )
    onnx.checker.check_model(model)
    return model


def scale_shift_model(
    in_name: str,
    out_name: str,
    shape: Sequence[int | str],
    scale: float,
    shift: float | None = None,
) -> onnx.ModelProto:
    """out = in * scale (+ shift): the shape of most small FP32 test models."""
    nodes = [helper.make_node("Mul", [in_name, "scale"], ["scaled" if shift is not None else out_name])]
    initializers = [const("scale", np.array(scale, dtype=np.float32))]
    if shift is not None:
        nodes.append(helper.make_node("Add", ["scaled", "shift"], [out_name]))
        initializers.append(const("shift", np.array(shift, dtype=np.float32)))
    graph = helper.make_graph(
        nodes,
        "scale_shift",
        [value_info(in_name, TensorProto.FLOAT, shape)],
        [value_info(out_name, TensorProto.FLOAT, shape)],
        initializer=initializers,
    )
    return onnx_model(graph)


def _write_version(model_dir: Path, version: int, model: onnx.ModelProto | bytes) -> None:
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (version_dir / "model.onnx").write_bytes(data)


def _write_config(model_dir: Path, text: str) -> None:
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")


INSTANCE_GROUP_CPU: Final = "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"


# --- the models ---


def _build_tiny(model_dir: Path, name: str) -> None:
    _write_version(model_dir, 1, scale_shift_model("INPUT0", "OUTPUT0", ["batch", TINY_SIZE], 2.0, 1.0))
    spec_in = TensorSpec("INPUT0", "TYPE_FP32", (TINY_SIZE,))
    spec_out = TensorSpec("OUTPUT0", "TYPE_FP32", (TINY_SIZE,))
    extra = INSTANCE_GROUP_CPU + "dynamic_batching { }\n"
    _write_config(model_dir, render_config(name, 128, [spec_in], [spec_out], extra))


def mlp_model(sizes: Sequence[int], *, seed: int, scale: float) -> onnx.ModelProto:
    """FP32 INPUT0 [batch, sizes[0]] -> Gemm+ReLU layers -> OUTPUT0 [batch, sizes[-1]], with
    normal weights times `scale` (small enough to keep activations bounded through the layers)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = "INPUT0"
    layer_count = len(sizes) - 1
    for layer in range(layer_count):
        fan_in, fan_out = sizes[layer], sizes[layer + 1]
        weight = (rng.standard_normal((fan_in, fan_out), dtype=np.float32) * scale).astype(np.float32)
        bias = (rng.standard_normal(fan_out, dtype=np.float32) * scale).astype(np.float32)
        initializers += [const(f"w{layer}", weight), const(f"b{layer}", bias)]
        is_last = layer == layer_count - 1
        gemm_out = "OUTPUT0" if is_last else f"gemm{layer}"
        nodes.append(helper.make_node("Gemm", [current, f"w{layer}", f"b{layer}"], [gemm_out]))
        if not is_last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{layer}"]))
            current = f"relu{layer}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [value_info("INPUT0", TensorProto.FLOAT, ["batch", sizes[0]])],
        [value_info("OUTPUT0", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=initializers,
    )
    return onnx_model(graph)


def _build_mlp(model_dir: Path, name: str) -> None:
    sizes = (MLP_INPUT_SIZE, MLP_HIDDEN_SIZE, MLP_HIDDEN_SIZE, MLP_OUTPUT_SIZE)
    _write_version(model_dir, 1, mlp_model(sizes, seed=1234, scale=0.02))
    spec_in = TensorSpec("INPUT0", "TYPE_FP32", (MLP_INPUT_SIZE,))
    spec_out = TensorSpec("OUTPUT0", "TYPE_FP32", (MLP_OUTPUT_SIZE,))
    extra = (
        INSTANCE_GROUP_CPU
        + "# Starting point only: bench/bench.py sweeps concurrency; tune this delay against its numbers.\n"
        + "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
    )
    _write_config(model_dir, render_config(name, 128, [spec_in], [spec_out], extra))


def _build_simple(model_dir: Path, name: str) -> None:
    shape: list[int | str] = ["batch", 16]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [value_info("INPUT0", TensorProto.INT32, shape), value_info("INPUT1", TensorProto.INT32, shape)],
        [value_info("OUTPUT0", TensorProto.INT32, shape), value_info("OUTPUT1", TensorProto.INT32, shape)],
    )
    _write_version(model_dir, 1, onnx_model(graph))
    ins = [TensorSpec("INPUT0", "TYPE_INT32", (16,)), TensorSpec("INPUT1", "TYPE_INT32", (16,))]
    outs = [TensorSpec("OUTPUT0", "TYPE_INT32", (16,)), TensorSpec("OUTPUT1", "TYPE_INT32", (16,))]
    _write_config(model_dir, render_config(name, 8, ins, outs, "dynamic_batching { }\n"))


def _build_identity(model_dir: Path, name: str) -> None:
    datatype = name.removeprefix("identity_").upper()
    elem_type, config_type = DATATYPES[datatype]
    shape: list[int | str] = ["batch", "n"]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [value_info("INPUT0", elem_type, shape)],
        [value_info("OUTPUT0", elem_type, shape)],
    )
    _write_version(model_dir, 1, onnx_model(graph))
    ins = [TensorSpec("INPUT0", config_type, (-1,))]
    outs = [TensorSpec("OUTPUT0", config_type, (-1,))]
    _write_config(model_dir, render_config(name, 8, ins, outs, "dynamic_batching { }\n"))


def _build_autocomplete(model_dir: Path, name: str) -> None:
    # Deliberately no config.pbtxt: the server has to derive it from the graph.
    _write_version(model_dir, 1, scale_shift_model("x", "y", ["batch", 4], 3.0))


def _build_versioned(model_dir: Path, name: str) -> None:
    for version in VERSIONED_VERSIONS:
        _write_version(
            model_dir, version, scale_shift_model("INPUT0", "OUTPUT0", ["batch", 4], float(version))
        )
    ins = [TensorSpec("INPUT0", "TYPE_FP32", (4,))]
    outs = [TensorSpec("OUTPUT0", "TYPE_FP32", (4,))]
    extra = "version_policy {\n  latest {\n    num_versions: 2\n  }\n}\n"
    _write_config(model_dir, render_config(name, 8, ins, outs, extra))


def _build_no_batch(model_dir: Path, name: str) -> None:
    _write_version(model_dir, 1, scale_shift_model("INPUT0", "OUTPUT0", [2, 3], 1.0, 1.0))
    ins = [TensorSpec("INPUT0", "TYPE_FP32", (2, 3))]
    outs = [TensorSpec("OUTPUT0", "TYPE_FP32", (2, 3))]
    _write_config(model_dir, render_config(name, 0, ins, outs))


def _build_broken(model_dir: Path, name: str) -> None:
    # A valid config in front of an unloadable file: the server must report UNAVAILABLE with a reason.
    _write_version(model_dir, 1, BROKEN_MODEL_BYTES)
    ins = [TensorSpec("INPUT0", "TYPE_FP32", (4,))]
    outs = [TensorSpec("OUTPUT0", "TYPE_FP32", (4,))]
    _write_config(model_dir, render_config(name, 8, ins, outs))


def _ensemble(model_dir: Path, name: str, ios: str, steps: list[str], max_batch_size: int = 8) -> None:
    # An ensemble has a version folder and no model file, as in Triton.
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    step_text = ",\n".join(steps)
    _write_config(
        model_dir,
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n{ios}\n'
        f"ensemble_scheduling {{\n  step [\n{step_text}\n  ]\n}}\n",
    )


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str], version: int = -1) -> str:
    maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
    maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
    return f'    {{ model_name: "{model}" model_version: {version}{maps} }}'


def _ios(kind: str, dtype: str, dims: str, *names: str) -> str:
    entries = ", ".join(f'{{ name: "{n}" data_type: {dtype} dims: [ {dims} ] }}' for n in names)
    return f"{kind} [ {entries} ]"


_INT_PAIR = (
    _ios("input", "TYPE_INT32", "16", "INPUT0", "INPUT1")
    + "\n"
    + _ios("output", "TYPE_INT32", "16", "OUTPUT0", "OUTPUT1")
)


def _build_ensemble_simple(model_dir: Path, name: str) -> None:
    # Two `simple` steps in a row: (a+b) + (a-b) = 2a and (a+b) - (a-b) = 2b.
    _ensemble(model_dir, name, _INT_PAIR, [
        _step("simple", {"INPUT0": "INPUT0", "INPUT1": "INPUT1"}, {"OUTPUT0": "sum", "OUTPUT1": "diff"}),
        _step("simple", {"INPUT0": "sum", "INPUT1": "diff"}, {"OUTPUT0": "OUTPUT0", "OUTPUT1": "OUTPUT1"}),
    ])  # fmt: skip


def _build_ensemble_parallel(model_dir: Path, name: str) -> None:
    # Two independent `tiny` steps on the same input, then one on the first's result:
    # A = 2x+1, B = 2x+1, C = 2A+1 = 4x+3.
    ios = _ios("input", "TYPE_FP32", "16", "X") + "\n" + _ios("output", "TYPE_FP32", "16", "A", "B", "C")
    _ensemble(model_dir, name, ios, [
        _step("tiny", {"INPUT0": "X"}, {"OUTPUT0": "A"}),
        _step("tiny", {"INPUT0": "X"}, {"OUTPUT0": "B"}),
        _step("tiny", {"INPUT0": "A"}, {"OUTPUT0": "C"}),
    ])  # fmt: skip


def _build_ensemble_nested(model_dir: Path, name: str) -> None:
    # An ensemble of an ensemble: ensemble_simple twice gives 4a and 4b.
    _ensemble(model_dir, name, _INT_PAIR, [
        _step("ensemble_simple", {"INPUT0": "INPUT0", "INPUT1": "INPUT1"},
              {"OUTPUT0": "a2", "OUTPUT1": "b2"}),
        _step("ensemble_simple", {"INPUT0": "a2", "INPUT1": "b2"},
              {"OUTPUT0": "OUTPUT0", "OUTPUT1": "OUTPUT1"}),
    ])  # fmt: skip


def _build_ensemble_missing(model_dir: Path, name: str) -> None:
    # A composing model that is not in the repository: UNAVAILABLE, naming it.
    _ensemble(model_dir, name, _INT_PAIR, [
        _step("does_not_exist", {"INPUT0": "INPUT0", "INPUT1": "INPUT1"},
              {"OUTPUT0": "OUTPUT0", "OUTPUT1": "OUTPUT1"}),
    ])  # fmt: skip


def _build_ensemble_failing(model_dir: Path, name: str) -> None:
    # The second step gets a tensor of the wrong shape for `no_batch` ([1, 4] where it takes [2, 3]):
    # every request fails in that step, with an error naming it.
    ios = (
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]'
    )  # fmt: skip
    _ensemble(model_dir, name, ios, [
        _step("versioned", {"INPUT0": "X"}, {"OUTPUT0": "scaled"}),
        _step("no_batch", {"INPUT0": "scaled"}, {"OUTPUT0": "Y"}),
    ])  # fmt: skip


def _build_ensemble_chain3(model_dir: Path, name: str) -> None:
    # Three `tiny` steps one after another: Y = ((2x+1)*2+1)*2+1 = 8x+7. bench/pipelines.py
    # weighs it against a client calling `tiny` three times itself.
    ios = _ios("input", "TYPE_FP32", "16", "X") + "\n" + _ios("output", "TYPE_FP32", "16", "Y")
    _ensemble(model_dir, name, ios, [
        _step("tiny", {"INPUT0": "X"}, {"OUTPUT0": "once"}),
        _step("tiny", {"INPUT0": "once"}, {"OUTPUT0": "twice"}),
        _step("tiny", {"INPUT0": "twice"}, {"OUTPUT0": "Y"}),
    ])  # fmt: skip


_BUILDERS: Final[dict[str, Callable[[Path, str], None]]] = {
    "tiny": _build_tiny,
    "mlp": _build_mlp,
    "simple": _build_simple,
    **{name: _build_identity for name in IDENTITY_MODELS},
    "autocomplete": _build_autocomplete,
    "versioned": _build_versioned,
    "no_batch": _build_no_batch,
    "broken": _build_broken,
    "ensemble_simple": _build_ensemble_simple,
    "ensemble_parallel": _build_ensemble_parallel,
    "ensemble_nested": _build_ensemble_nested,
    "ensemble_missing": _build_ensemble_missing,
    "ensemble_failing": _build_ensemble_failing,
    "ensemble_chain3": _build_ensemble_chain3,
}


def _resolve_names(names: Iterable[str] | None) -> list[str]:
    if names is None:
        return list(ALL_MODELS)
    wanted = list(dict.fromkeys(names))  # dedupe, keep order
    unknown = [name for name in wanted if name not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown example model(s) {unknown}; known: {', '.join(ALL_MODELS)}")
    return wanted


def build(out_dir: Path, names: Iterable[str] | None = None, *, quiet: bool = False) -> None:
    """Write the named example models (all of them when `names` is None) under `out_dir`.

    Each model's folder is replaced as a whole, so stale files from an earlier build (a
    config.pbtxt next to `autocomplete`, an extra version) never survive.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _resolve_names(names):
        model_dir = out_dir / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        _BUILDERS[name](model_dir, name)
        if not quiet:
            size_bytes = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
            print(f"built {name:<18} {size_bytes / 1e6:8.2f} MB  {model_dir}")


def build_all_but_large(out_dir: Path, *, quiet: bool = False) -> None:
    """Every example model except the large benchmark ones (`mlp`): fast enough for tests."""
    build(out_dir, SMALL_MODELS, quiet=quiet)


# --- verification with onnxruntime ---


def _sample_input(datatype: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        # onnxruntime's binding takes str for STRING tensors (bytes would be str()-ed).
        return np.array([f"s{i}" for i in range(count)], dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        flags: npt.NDArray[np.bool_] = np.arange(count) % 2 == 0
        return flags.reshape(shape)
    numpy_dtype = {
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }[datatype]
    return np.arange(count).astype(numpy_dtype).reshape(shape)


def check(out_dir: Path, names: Iterable[str] | None = None) -> None:
    """Load every built model with onnxruntime (CPU) and run one input; raise on any mismatch."""
    import onnxruntime as ort

    def session(path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # keep warnings about unused initializers out of the output
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(path: Path, feeds: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        outputs: list[npt.NDArray[Any]] = session(path).run(None, feeds)
        return outputs

    out_dir = Path(out_dir)
    for name in _resolve_names(names):
        model_dir = out_dir / name
        first = model_dir / "1" / "model.onnx"
        x4 = np.arange(8, dtype=np.float32).reshape(2, 4)
        if name == "tiny":
            x = np.linspace(-1, 1, 2 * TINY_SIZE, dtype=np.float32).reshape(2, TINY_SIZE)
            np.testing.assert_allclose(run(first, {"INPUT0": x})[0], x * 2 + 1, rtol=1e-6)
        elif name == "mlp":
            x = np.random.default_rng(0).standard_normal((2, MLP_INPUT_SIZE), dtype=np.float32)
            (y,) = run(first, {"INPUT0": x})
            assert y.shape == (2, MLP_OUTPUT_SIZE) and bool(np.isfinite(y).all()), y
        elif name == "simple":
            a = np.arange(32, dtype=np.int32).reshape(2, 16)
            b = np.full((2, 16), 3, dtype=np.int32)
            add, sub = run(first, {"INPUT0": a, "INPUT1": b})
            np.testing.assert_array_equal(add, a + b)
            np.testing.assert_array_equal(sub, a - b)
        elif name in IDENTITY_MODELS:
            datatype = name.removeprefix("identity_").upper()
            if datatype == "BF16":
                # numpy cannot hand bfloat16 to onnxruntime's Python binding: loading must suffice.
                sess = session(first)
                assert sess.get_inputs()[0].type == "tensor(bfloat16)", sess.get_inputs()[0].type
            else:
                value = _sample_input(datatype, (2, 3))
                (y,) = run(first, {"INPUT0": value})
                np.testing.assert_array_equal(y, value)
        elif name == "autocomplete":
            assert not (model_dir / "config.pbtxt").exists()
            np.testing.assert_allclose(run(first, {"x": x4})[0], x4 * 3)
        elif name == "versioned":
            for version in VERSIONED_VERSIONS:
                path = model_dir / str(version) / "model.onnx"
                np.testing.assert_allclose(run(path, {"INPUT0": x4})[0], x4 * version)
        elif name == "no_batch":
            x = np.arange(6, dtype=np.float32).reshape(2, 3)
            np.testing.assert_allclose(run(first, {"INPUT0": x})[0], x + 1)
        elif name in ENSEMBLES:
            assert (model_dir / "config.pbtxt").exists() and (model_dir / "1").is_dir()
        elif name == "broken":
            loaded = True
            try:
                session(first)
            except Exception:  # any load failure is the point of this model
                loaded = False
            if loaded:
                raise AssertionError("the broken model loaded")
        print(f"checked {name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="repository folder (default: %(default)s)"
    )
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(ALL_MODELS)}")
    parser.add_argument("--no-check", action="store_true", help="skip running each model with onnxruntime")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    try:
        build(args.out, names)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_check:
        check(args.out, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
