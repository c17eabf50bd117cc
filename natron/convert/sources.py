"""The models `natron convert` reads, each able to run on sample inputs and to export ONNX.

- `pkg.module:callable`: the callable returns a torch `nn.Module`;
- a TorchScript file (`torch.jit.load`), an exported program `.pt2` (`torch.export.load`);
- a TensorFlow SavedModel folder or a `.keras` file, through tf2onnx (the `tensorflow` extra).

PyTorch models go through the TorchScript-based exporter (`dynamo=False`): torch 2.13 still has
it, it needs no onnxscript, exports a small model in milliseconds where the dynamo exporter takes
seconds, and names an op it cannot export in a typed error (`UnsupportedOperatorError`). An
exported program is traced back through `torch.jit.trace` of its module first, since that
exporter takes modules only. The opset is ONNX_OPSET, which ONNX Runtime 1.18 and TensorRT 10
both read.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from natron.convert.spec import Arrays, ConvertError, TensorSpec

ONNX_OPSET = 17
TENSORFLOW_HINT = "install natron[tensorflow] (tensorflow-cpu and tf2onnx) to convert it"
TORCH_HINT = "install natron[torch] to convert it"


class Source(Protocol):
    description: str
    notes: list[str]

    def run(self, inputs: Arrays) -> list[npt.NDArray[Any]]:
        """The model's outputs on one sample, in order."""
        ...

    def export_onnx(
        self, path: Path, inputs: list[TensorSpec], outputs: list[str], example: Arrays, batching: bool
    ) -> None:
        """Write the model as ONNX at `path`, with the given tensor names, its batch axis (and any
        other -1 axis) dynamic."""
        ...


def load_source(text: str) -> Source:
    """The source named on the command line; ConvertError saying why it does not load."""
    path = Path(text)
    if path.exists():
        if path.is_dir():
            if (path / "saved_model.pb").exists():
                return TensorFlowSource.load(path)
            raise ConvertError(f"{text} is a folder but not a TensorFlow SavedModel (no saved_model.pb)")
        if path.suffix in (".keras", ".h5"):
            return TensorFlowSource.load(path)
        if path.suffix == ".pt2":
            return TorchSource.exported_program(path)
        return TorchSource.torchscript(path)
    if ":" in text and not text.endswith((".pt", ".pt2", ".ts", ".keras")):
        return TorchSource.from_callable(text)
    raise ConvertError(f"{text}: no such file, and not a module:callable")


@contextlib.contextmanager
def _console_silenced() -> Iterator[None]:
    """Keep the exporter's C++ log off the terminal: on a failure it prints the whole TorchScript
    graph to file descriptor 1 (whatever torch's log setting), and the user gets our one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "wb") as null:
            for fd in saved:
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# The exporter's message names the op: "Exporting the operator 'aten::linalg_svd' to ONNX opset
# version 17 is not supported. ..."
_UNSUPPORTED_OP = re.compile(r"operator '([^']+)'")


@dataclass(slots=True)
class TorchSource:
    model: Any  # torch.nn.Module or torch.jit.ScriptModule
    description: str
    # An exported program's module: traced before export (see the module's docstring).
    trace_first: bool = False
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def _torch() -> Any:
        try:
            import torch
        except ImportError:
            raise ConvertError(
                f"the source is a PyTorch model, and torch is not installed; {TORCH_HINT}"
            ) from None
        return torch

    @staticmethod
    def from_callable(text: str) -> TorchSource:
        module_name, _, attribute = text.partition(":")
        if not module_name or not attribute:
            raise ConvertError(f"{text}: expected pkg.module:callable")
        torch = TorchSource._torch()
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConvertError(f"{text}: cannot import module '{module_name}' ({_first_line(exc)})") from None
        except Exception as exc:
            raise ConvertError(f"{text}: importing '{module_name}' raised {_first_line(exc)}") from None
        target: Any = module
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise ConvertError(f"{text}: module '{module_name}' has no callable '{attribute}'")
            target = getattr(target, part)
        if not callable(target):
            raise ConvertError(f"{text}: '{attribute}' is not callable")
        try:
            model = target()
        except Exception as exc:
            raise ConvertError(f"{text}: calling '{attribute}()' raised {_first_line(exc)}") from None
        if not isinstance(model, torch.nn.Module):
            raise ConvertError(
                f"{text}: '{attribute}()' returned {type(model).__name__}, not a torch nn.Module"
            )
        return TorchSource(model.eval(), f"PyTorch module {type(model).__name__} from {text}")

    @staticmethod
    def torchscript(path: Path) -> TorchSource:
        torch = TorchSource._torch()
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ConvertError(
                f"{path}: not a TorchScript file torch.jit.load can read ({_first_line(exc)})"
            ) from None
        return TorchSource(model.eval(), f"TorchScript {path.name}")

    @staticmethod
    def exported_program(path: Path) -> TorchSource:
        torch = TorchSource._torch()
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise ConvertError(
                f"{path}: not an exported program torch.export.load can read ({_first_line(exc)})"
            ) from None
        return TorchSource(program.module(), f"exported program {path.name}", trace_first=True)

    def _tensors(self, inputs: Arrays) -> tuple[Any, ...]:
        torch = self._torch()
        return tuple(torch.from_numpy(np.ascontiguousarray(array)) for array in inputs.values())

    def run(self, inputs: Arrays) -> list[npt.NDArray[Any]]:
        torch = self._torch()
        try:
            with torch.inference_mode():
                result = self.model(*self._tensors(inputs))
        except Exception as exc:
            shapes = {name: list(array.shape) for name, array in inputs.items()}
            raise ConvertError(
                f"the model fails on sample inputs {shapes}: {_first_line(exc)} (check --input)"
            ) from None
        items = result if isinstance(result, tuple | list) else (result,)
        if not all(isinstance(item, torch.Tensor) for item in items):
            kinds = ", ".join(type(item).__name__ for item in items)
            raise ConvertError(
                f"the model returns {kinds}; natron convert takes tensors or tuples of tensors"
            )
        return [item.detach().cpu().numpy() for item in items]

    def export_onnx(
        self, path: Path, inputs: list[TensorSpec], outputs: list[str], example: Arrays, batching: bool
    ) -> None:
        torch = self._torch()
        args = self._tensors(example)
        dynamic_axes: dict[str, list[int]] = {
            spec.name: [axis for axis, d in enumerate(spec.dims) if d == -1] for spec in inputs
        }
        if batching:
            dynamic_axes.update({name: [0] for name in outputs})
        with warnings.catch_warnings(record=True) as caught, _console_silenced():
            warnings.simplefilter("always")
            try:
                model = torch.jit.trace(self.model, args) if self.trace_first else self.model
                torch.onnx.export(
                    model,
                    args,
                    str(path),
                    dynamo=False,
                    input_names=[spec.name for spec in inputs],
                    output_names=outputs,
                    dynamic_axes={name: axes for name, axes in dynamic_axes.items() if axes},
                    opset_version=ONNX_OPSET,
                )
            except torch.onnx.errors.UnsupportedOperatorError as exc:
                found = _UNSUPPORTED_OP.search(str(exc))
                op = found.group(1) if found else "an operator"
                raise ConvertError(
                    f"ONNX export failed: the model uses {op}, which the exporter cannot write at "
                    f"opset {ONNX_OPSET}"
                ) from None
            except Exception as exc:
                raise ConvertError(f"ONNX export failed: {_first_line(exc)}") from None
        # A trace that turned a shape into a constant is the usual cause of a failed check:
        # keep the exporter's words for it.
        self.notes.extend(
            str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)
        )


@dataclass(slots=True)
class TensorFlowSource:
    """A SavedModel's serving signature, or a Keras model, converted by tf2onnx."""

    function: Any  # a Keras model or a SavedModel's signature
    keras: bool
    description: str
    path: Path
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def _modules(source: str) -> tuple[Any, Any]:
        try:
            import tensorflow as tf
            import tf2onnx
        except ImportError:
            raise ConvertError(f"{source} is a TensorFlow model; {TENSORFLOW_HINT}") from None
        return tf, tf2onnx

    @staticmethod
    def load(path: Path) -> TensorFlowSource:
        tf, _ = TensorFlowSource._modules(str(path))
        try:
            if path.is_dir():
                loaded = tf.saved_model.load(str(path))
                function = loaded.signatures["serving_default"]
                return TensorFlowSource(function, False, f"SavedModel {path.name}", path)
            model = tf.keras.models.load_model(str(path))
        except Exception as exc:
            raise ConvertError(f"{path}: TensorFlow cannot load it ({_first_line(exc)})") from None
        return TensorFlowSource(model, True, f"Keras model {path.name}", path)

    def _call(self, tensors: list[Any]) -> list[Any]:
        """The model on TensorFlow tensors, its outputs as a list (a signature's dict by key)."""
        if self.keras:
            result = self.function(tensors[0] if len(tensors) == 1 else tensors)
        else:
            # A signature takes keyword arguments, in its own names, and answers a dict.
            names = sorted(self.function.structured_input_signature[1])
            result = self.function(**dict(zip(names, tensors, strict=True)))
        if isinstance(result, dict):
            result = [result[key] for key in sorted(result)]
        return list(result) if isinstance(result, tuple | list) else [result]

    def run(self, inputs: Arrays) -> list[npt.NDArray[Any]]:
        tf, _ = self._modules(self.description)
        try:
            items = self._call([tf.constant(a) for a in inputs.values()])
        except Exception as exc:
            raise ConvertError(
                f"the model fails on the sample inputs: {_first_line(exc)} (check --input)"
            ) from None
        return [np.asarray(item) for item in items]

    def export_onnx(
        self, path: Path, inputs: list[TensorSpec], outputs: list[str], example: Arrays, batching: bool
    ) -> None:
        tf, tf2onnx = self._modules(self.description)
        signature = [
            tf.TensorSpec(
                [None if d == -1 else d for d in spec.dims],
                tf.as_dtype(example[spec.name].dtype),
                name=spec.name,
            )
            for spec in inputs
        ]

        # tf2onnx's from_keras does not read Keras 3 models: a tf.function of the model does.
        @tf.function(input_signature=signature)  # type: ignore[untyped-decorator]
        def call(*args: Any) -> list[Any]:
            return self._call(list(args))

        try:
            if self.keras:
                proto, _ = tf2onnx.convert.from_function(call, input_signature=signature, opset=ONNX_OPSET)
            else:
                # A loaded signature's captured variables defeat from_function: tf2onnx reads the
                # SavedModel's graph itself, its inputs and outputs in the signature's key order.
                from tf2onnx import tf_loader

                graph, names_in, names_out = tf_loader.from_saved_model(
                    str(self.path), None, None, tag="serve", signatures=["serving_default"]
                )
                proto, _ = tf2onnx.convert.from_graph_def(
                    graph, input_names=names_in, output_names=names_out, opset=ONNX_OPSET
                )
        except Exception as exc:
            raise ConvertError(f"ONNX export failed (tf2onnx): {_first_line(exc)}") from None
        write_renamed(proto, path, [spec.name for spec in inputs], outputs)


def write_renamed(proto: Any, path: Path, inputs: list[str], outputs: list[str]) -> None:
    """Save an ONNX model with its graph inputs and outputs renamed, by position, to the names
    the config will use (tf2onnx names them after TensorFlow's tensors)."""
    import onnx

    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    graph_inputs = [value for value in graph.input if value.name not in initializers]
    renames = dict(zip((v.name for v in graph_inputs), inputs, strict=False))
    renames.update(zip((v.name for v in graph.output), outputs, strict=False))
    for value in (*graph_inputs, *graph.output):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    onnx.save(proto, str(path))


def python_path(directory: Path) -> None:
    """Let `module:callable` find modules of the folder the tool runs in, as `python -m` does."""
    text = str(directory)
    if text not in sys.path:
        sys.path.insert(0, text)
