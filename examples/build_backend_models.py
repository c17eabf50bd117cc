"""Generate the example models of the PyTorch and Python backends into a model repository.

Nothing binary is committed: TorchScript and torch.export models are written here from small
modules (torch is needed only for them), and the Python models are copied from
`examples/python_models/<name>/`. Usage:

    python examples/build_backend_models.py [--out examples/models] [--only add_sub,repeat]

`build(out_dir, names)` is the importable entry point. The BLS models call the ONNX model
`simple`, which `examples/build_models.py` writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
PYTHON_SOURCES: Final = HERE / "python_models"
DEFAULT_OUT: Final = HERE / "models"

# Fixed-size datatypes in torch's terms, in the order of torch_identity's inputs INPUT__<i>.
TORCH_DATATYPES: Final = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
)
PYTHON_DATATYPES: Final = (*TORCH_DATATYPES, "BYTES")


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _tensors(field: str, entries: Sequence[tuple[str, str, Sequence[int]]], optional: bool = False) -> str:
    blocks = []
    for name, datatype, dims in entries:
        extra = "\n    optional: true" if optional else ""
        blocks.append(
            f'  {{\n    name: "{name}"\n    data_type: {_config_type(datatype)}\n'
            f"    dims: [ {', '.join(str(d) for d in dims)} ]{extra}\n  }}"
        )
    return f"{field} [\n" + ",\n".join(blocks) + "\n]\n"


def _config(
    name: str,
    platform: str,
    max_batch_size: int,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    extra: str = "",
    optional_inputs: bool = False,
) -> str:
    head = f'name: "{name}"\n'
    head += 'backend: "python"\n' if platform == "python" else f'platform: "{platform}"\n'
    return (
        head
        + f"max_batch_size: {max_batch_size}\n"
        + _tensors("input", inputs, optional_inputs)
        + _tensors("output", outputs)
        + "instance_group [ { kind: KIND_CPU } ]\n"
        + extra
    )


# --- TorchScript and torch.export models ---


def _torch_modules() -> dict[str, Any]:
    """The torch modules, defined only once torch is imported (it is optional)."""
    import torch
    from torch import Tensor, nn

    class AddSub(nn.Module):
        def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            return x + y, x - y

    class Named(nn.Module):
        # Config names the inputs after these arguments, in the other order.
        def forward(self, values: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
            return values + offsets, values * 2

    class DictInput(nn.Module):
        def forward(self, inputs: dict[str, Tensor]) -> Tensor:
            return inputs["a"] * inputs["b"]

    class Strings(nn.Module):
        def forward(self, texts: list[str]) -> tuple[list[str], Tensor]:
            return [t.upper() for t in texts], torch.tensor([len(t) for t in texts], dtype=torch.int64)

    class Raises(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            if bool(x.min() < 0):
                raise ValueError("torch_raises refuses negative input")
            return x * 2

    class Identity(nn.Module):
        def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
            return tuple(inputs)

    class MulAdd(nn.Module):
        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return a * b + 1

    return {
        "AddSub": AddSub,
        "Named": Named,
        "DictInput": DictInput,
        "Strings": Strings,
        "Raises": Raises,
        "Identity": Identity,
        "MulAdd": MulAdd,
    }


def _save_script(model_dir: Path, module: Any) -> None:
    import torch

    (model_dir / "1").mkdir(parents=True)
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch, yet it is the format Triton's PyTorch backend
        # serves: the examples are written in it on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(model_dir / "1" / "model.pt"))


def _build_torch_add_sub(model_dir: Path, name: str) -> None:
    _save_script(model_dir, _torch_modules()["AddSub"]())
    io = [("INPUT__0", "FP32", [16]), ("INPUT__1", "FP32", [16])]
    outs = [("OUTPUT__0", "FP32", [16]), ("OUTPUT__1", "FP32", [16])]
    text = _config(name, "pytorch_libtorch", 8, io, outs, "dynamic_batching { }\n")
    (model_dir / "config.pbtxt").write_text(text)


def _build_torch_named(model_dir: Path, name: str) -> None:
    _save_script(model_dir, _torch_modules()["Named"]())
    ins = [("offsets", "FP32", [4]), ("values", "FP32", [4])]
    outs = [("shifted", "FP32", [4]), ("doubled", "FP32", [4])]
    (model_dir / "config.pbtxt").write_text(_config(name, "pytorch_libtorch", 0, ins, outs))


def _build_torch_dict(model_dir: Path, name: str) -> None:
    _save_script(model_dir, _torch_modules()["DictInput"]())
    ins = [("a", "INT64", [3]), ("b", "INT64", [3])]
    outs = [("product", "INT64", [3])]
    (model_dir / "config.pbtxt").write_text(_config(name, "pytorch_libtorch", 0, ins, outs))


def _build_torch_strings(model_dir: Path, name: str) -> None:
    _save_script(model_dir, _torch_modules()["Strings"]())
    ins = [("TEXT__0", "BYTES", [-1])]
    outs = [("UPPER__0", "BYTES", [-1]), ("LENGTH__1", "INT64", [-1])]
    (model_dir / "config.pbtxt").write_text(_config(name, "pytorch_libtorch", 0, ins, outs))


def _build_torch_raises(model_dir: Path, name: str) -> None:
    _save_script(model_dir, _torch_modules()["Raises"]())
    ins = [("INPUT__0", "FP32", [2])]
    outs = [("OUTPUT__0", "FP32", [2])]
    (model_dir / "config.pbtxt").write_text(_config(name, "pytorch_libtorch", 4, ins, outs))


def _build_torch_identity(model_dir: Path, name: str) -> None:
    import torch

    dtypes = {
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
        "UINT16": torch.uint16,
        "UINT32": torch.uint32,
        "UINT64": torch.uint64,
        "INT8": torch.int8,
        "INT16": torch.int16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "FP16": torch.float16,
        "FP32": torch.float32,
        "FP64": torch.float64,
        "BF16": torch.bfloat16,
    }
    examples = tuple(torch.zeros(2, 3, dtype=dtypes[dt]) for dt in TORCH_DATATYPES)
    # Traced, since TorchScript cannot script a variadic forward(); the graph is the identity.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(_torch_modules()["Identity"](), examples, check_trace=False)  # type: ignore[no-untyped-call]
    (model_dir / "1").mkdir(parents=True)
    traced.save(str(model_dir / "1" / "model.pt"))
    ins = [(f"INPUT__{i}", dt, [-1]) for i, dt in enumerate(TORCH_DATATYPES)]
    outs = [(f"OUTPUT__{i}", dt, [-1]) for i, dt in enumerate(TORCH_DATATYPES)]
    (model_dir / "config.pbtxt").write_text(_config(name, "pytorch_libtorch", 4, ins, outs))


def _build_torch_export(model_dir: Path, name: str) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(
        _torch_modules()["MulAdd"](),
        (torch.ones(2, 4), torch.ones(2, 4)),
        dynamic_shapes={"a": {0: batch}, "b": {0: batch}},
    )
    (model_dir / "1").mkdir(parents=True)
    torch.export.save(program, str(model_dir / "1" / "model.pt2"))
    ins = [("a", "FP32", [4]), ("b", "FP32", [4])]
    outs = [("OUTPUT__0", "FP32", [4])]
    text = _config(name, "pytorch_libtorch", 8, ins, outs, "dynamic_batching { }\n")
    (model_dir / "config.pbtxt").write_text(text)


def _build_torch_wrong_inputs(model_dir: Path, name: str) -> None:
    # A config that lists three inputs in front of a model that takes two: UNAVAILABLE, with why.
    _save_script(model_dir, _torch_modules()["AddSub"]())
    ins = [("INPUT__0", "FP32", [4]), ("INPUT__1", "FP32", [4]), ("INPUT__2", "FP32", [4])]
    outs = [("OUTPUT__0", "FP32", [4])]
    (model_dir / "config.pbtxt").write_text(_config(name, "pytorch_libtorch", 0, ins, outs))


# --- Python models ---


def _build_python(model_dir: Path, name: str) -> None:
    shutil.copytree(PYTHON_SOURCES / name, model_dir, dirs_exist_ok=True)
    for cache in model_dir.rglob("__pycache__"):
        shutil.rmtree(cache)
    if name == "py_identity":
        ins = [(f"INPUT_{dt}", dt, [-1]) for dt in PYTHON_DATATYPES]
        outs = [(f"OUTPUT_{dt}", dt, [-1]) for dt in PYTHON_DATATYPES]
        text = _config(name, "python", 0, ins, outs, optional_inputs=True)
        (model_dir / "config.pbtxt").write_text(text)


TORCH_MODELS: Final[dict[str, Callable[[Path, str], None]]] = {
    "torch_add_sub": _build_torch_add_sub,
    "torch_named": _build_torch_named,
    "torch_dict": _build_torch_dict,
    "torch_strings": _build_torch_strings,
    "torch_raises": _build_torch_raises,
    "torch_identity": _build_torch_identity,
    "torch_export": _build_torch_export,
    "torch_wrong_inputs": _build_torch_wrong_inputs,
}
PYTHON_MODELS: Final = tuple(
    sorted(p.name for p in PYTHON_SOURCES.iterdir() if (p / "1" / "model.py").exists())
)
ALL_MODELS: Final = (*TORCH_MODELS, *PYTHON_MODELS)


def build(out_dir: Path, names: Iterable[str] | None = None, *, quiet: bool = False) -> None:
    """Write the named models (all that can be built here when `names` is None) under `out_dir`,
    each folder replaced as a whole so nothing of an earlier build survives."""
    if names is None:
        # Everything this environment can build: the PyTorch models need torch (an extra).
        have_torch = importlib.util.find_spec("torch") is not None
        wanted = [n for n in ALL_MODELS if have_torch or n not in TORCH_MODELS]
        if not have_torch and not quiet:
            print("torch is not installed: skipping the PyTorch models")
    else:
        wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in ALL_MODELS]
    if unknown:
        raise ValueError(f"unknown example model(s) {unknown}; known: {', '.join(ALL_MODELS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        model_dir = out_dir / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        if name in TORCH_MODELS:
            model_dir.mkdir(parents=True)
            TORCH_MODELS[name](model_dir, name)
        else:
            _build_python(model_dir, name)
        if not quiet:
            print(f"built {name:<20} {model_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="repository folder (default: %(default)s)"
    )
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(ALL_MODELS)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    try:
        build(args.out, names)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
