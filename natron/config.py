"""Triton model configuration: config.pbtxt parsed by protobuf's text format against Triton's
own ModelConfig schema (shipped by `tritonclient`), completed from the model file where Triton
would, the version policy, and Triton's JSON form of a config.

Files a config names stay in the model's folder. Every config, from a repository or a load
request, must name its model file (`default_model_filename`, `cc_model_filenames`) as a
relative path inside the version folder: no '..', no absolute path. A config sent with a load
request (`check_override`) may moreover set no parameter whose value is a host path (TensorRT's
cache and plugin paths, the python backend's EXECUTION_ENV_PATH, any key that says "path"):
those belong to the operator, in config.pbtxt, not to an API client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as pb

from natron import datatypes
from natron.errors import InvalidArgument

ModelConfig = pb.ModelConfig

CONFIG_FILE = "config.pbtxt"

# Default model file name of each platform / backend, as Triton names them.
DEFAULT_FILENAMES: dict[str, str] = {
    "onnxruntime_onnx": "model.onnx",
    "onnxruntime": "model.onnx",
    "pytorch_libtorch": "model.pt",
    "pytorch": "model.pt",
    "tensorrt_plan": "model.plan",
    "tensorrt": "model.plan",
    "python": "model.py",
}

# Triton's ONNX Runtime backend gives an auto-completed batching model this max_batch_size
# (its `default-max-batch-size` backend setting).
DEFAULT_MAX_BATCH_SIZE = 4


class ConfigError(InvalidArgument):
    """A config.pbtxt that cannot be parsed or contradicts itself."""


def parse_config_text(text: str, source: str) -> pb.ModelConfig:
    try:
        config = text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    check_file_names(config)
    return config


def _inside(name: str) -> bool:
    """A relative path that stays in the folder it is joined to."""
    parts = name.split("/")
    return (
        bool(name)
        and "\\" not in name
        and "\0" not in name
        and not any(part in ("", ".", "..") for part in parts)
    )


def check_file_names(config: pb.ModelConfig) -> None:
    """The model files a config names are inside its version folder (ConfigError otherwise):
    a config must not make a backend read or run a file elsewhere on the host."""
    named = (
        [("default_model_filename", str(config.default_model_filename))]
        if config.default_model_filename
        else []
    )
    named += [
        (f"cc_model_filenames['{key}']", str(value)) for key, value in config.cc_model_filenames.items()
    ]
    for field, value in named:
        if not _inside(value):
            raise ConfigError(
                f"model '{config.name}': {field} '{value}' must be a file name inside the version folder "
                "(relative, without '..')"
            )


def _names_a_path(key: str) -> bool:
    return "path" in key.lower() or key in _PATH_VALUED


# Parameters whose value is read as a file on the host, though their key does not say "path".
_PATH_VALUED = frozenset({"int8_calibration_table_name", "trt_engine_cache_prefix"})


def check_override(raw: dict[str, Any]) -> None:
    """A config sent with a load request: no parameter that names a host path (ConfigError
    naming it). A config that does not parse is left to the load, which reports it."""
    try:
        config = _parse_json(raw)
    except ConfigError:
        return
    check_file_names(config)
    found = [f"parameters '{key}'" for key in config.parameters if _names_a_path(key)]
    accelerators = config.optimization.execution_accelerators
    for accel in (*accelerators.gpu_execution_accelerator, *accelerators.cpu_execution_accelerator):
        found += [
            f"execution accelerator '{accel.name}' parameter '{key}'"
            for key in accel.parameters
            if _names_a_path(key)
        ]
    found += [f"model_repository_agents '{agent.name}'" for agent in config.model_repository_agents.agents]
    if found:
        raise ConfigError(
            f"a config sent with a load request may not set {', '.join(found)}: it names a file of the "
            "server's host; set it in the model's config.pbtxt in the repository instead"
        )


def read_config(model_dir: Path) -> pb.ModelConfig:
    """The model's config.pbtxt, or an empty config named after the directory."""
    path = model_dir / CONFIG_FILE
    if path.exists():
        config = parse_config_text(path.read_text(encoding="utf-8"), str(path))
    else:
        config = pb.ModelConfig()
    if not config.name:
        config.name = model_dir.name
    elif config.name != model_dir.name:
        raise ConfigError(f"{path}: name '{config.name}' does not match its directory '{model_dir.name}'")
    return config


def infer_platform(config: pb.ModelConfig, version_dirs: list[Path]) -> None:
    """Fill `platform`/`backend` from the model files when the config names neither."""
    if config.platform or config.backend:
        if config.backend == "onnxruntime" and not config.platform:
            config.platform = "onnxruntime_onnx"
        if config.platform == "onnxruntime_onnx" and not config.backend:
            config.backend = "onnxruntime"
        return
    for version_dir in version_dirs:
        if (version_dir / "model.onnx").exists():
            config.platform, config.backend = "onnxruntime_onnx", "onnxruntime"
            return
        if (version_dir / "model.plan").exists():
            config.platform, config.backend = "tensorrt_plan", "tensorrt"
            return
        if (version_dir / "model.pt").exists() or (version_dir / "model.pt2").exists():
            config.platform, config.backend = "pytorch_libtorch", "pytorch"
            return
        if (version_dir / "model.py").exists():
            config.backend = "python"
            return
    raise ConfigError(f"model '{config.name}': no platform or backend given and no known model file found")


def model_filename(config: pb.ModelConfig) -> str:
    if config.default_model_filename:
        return str(config.default_model_filename)
    key = config.platform or config.backend
    try:
        return DEFAULT_FILENAMES[key]
    except KeyError:
        raise ConfigError(f"model '{config.name}': unsupported platform/backend '{key}'") from None


def autocomplete_onnx(config: pb.ModelConfig, model_path: Path) -> None:
    """Complete inputs, outputs and batching from the ONNX graph, as Triton's ORT backend does.

    A config that lists inputs and outputs is kept as written. When every input and output
    of the graph has a dynamic first dimension and the config says nothing about batching,
    the model batches with DEFAULT_MAX_BATCH_SIZE and a default dynamic batcher.
    """
    if config.input and config.output:
        return
    import onnx  # the router is the only caller; workers never need it

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:
        raise ConfigError(f"model '{config.name}': cannot read {model_path.name}: {exc}") from None
    initializers = {init.name for init in graph.initializer}
    graph_inputs = [i for i in graph.input if i.name not in initializers]

    def io_dims(value: Any) -> tuple[str, list[int]]:
        tensor_type = value.type.tensor_type
        datatype = datatypes.datatype_to_config(_ONNX_TO_TRITON.get(tensor_type.elem_type, ""))
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        return datatype, dims

    ios = [io_dims(v) for v in (*graph_inputs, *graph.output)]
    batching = config.max_batch_size > 0
    if not config.input and not config.output and config.max_batch_size == 0:
        batching = bool(ios) and all(dims and dims[0] == -1 for _, dims in ios)
        if batching:
            config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
            if not config.HasField("dynamic_batching"):
                config.dynamic_batching.SetInParent()
    if not config.input:
        for value in graph_inputs:
            datatype, dims = io_dims(value)
            entry = config.input.add(name=value.name, data_type=pb.DataType.Value(datatype))
            entry.dims.extend(dims[1:] if batching else dims)
    if not config.output:
        for value in graph.output:
            datatype, dims = io_dims(value)
            entry = config.output.add(name=value.name, data_type=pb.DataType.Value(datatype))
            entry.dims.extend(dims[1:] if batching else dims)


# onnx.TensorProto element types -> Triton datatypes.
_ONNX_TO_TRITON: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
    16: "BF16",
}


# Boolean config parameters, as Triton's backends spell them (ORT's "1"/"0", PyTorch's
# "true"/"false"): one reading for every backend, so a value means the same everywhere.
_TRUE = frozenset({"true", "1", "on", "yes"})
_FALSE = frozenset({"false", "0", "off", "no"})


def parse_bool(model: str, key: str, value: str) -> bool:
    """A boolean parameter's text; ConfigError naming the model, key and value otherwise."""
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(
        f"model '{model}': parameter '{key}' must be true/1/on/yes or false/0/off/no, got '{value}'"
    )


def parameter_bool(config: pb.ModelConfig, key: str, default: bool) -> bool:
    """The config's `parameters { key: ... }` as a boolean, or `default` when absent."""
    if key not in config.parameters:
        return default
    return parse_bool(config.name, key, config.parameters[key].string_value)


def fill_defaults(config: pb.ModelConfig) -> None:
    """Defaults Triton applies: one instance group, `latest 1` version policy."""
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    if not config.instance_group:
        config.instance_group.add(count=1)
    for group in config.instance_group:
        if group.count < 1:
            group.count = 1
    if config.max_batch_size < 0:
        raise ConfigError(f"model '{config.name}': max_batch_size must be >= 0, got {config.max_batch_size}")
    if config.HasField("dynamic_batching"):
        for size in config.dynamic_batching.preferred_batch_size:
            if size < 1 or size > max(config.max_batch_size, 1):
                raise ConfigError(
                    f"model '{config.name}': preferred_batch_size {size} must be in "
                    f"1..max_batch_size ({config.max_batch_size})"
                )
        _check_priorities(config)


# Each priority level is a queue (a JetStream consumer) of its own per model version, and every
# instance polls each of them: Triton allows any count, natron this many.
MAX_PRIORITY_LEVELS = 16


def _check_priorities(config: pb.ModelConfig) -> None:
    """Triton's checks of the dynamic batcher's priority levels (core's model_config_utils.cc,
    with its messages), and natron's bound on their number."""
    batching = config.dynamic_batching
    levels = batching.priority_levels
    if levels > MAX_PRIORITY_LEVELS:
        raise ConfigError(
            f"model '{config.name}': priority_levels {levels} is more than natron serves "
            f"({MAX_PRIORITY_LEVELS}: each level is a queue of its own)"
        )
    if levels == 0:
        if batching.priority_queue_policy:
            raise ConfigError(
                f"model '{config.name}': priority_queue_policy needs priority_levels, which is 0"
            )
        return
    if not 1 <= batching.default_priority_level <= levels:
        raise ConfigError(f"default priority level must be in range [1, {levels}] for {config.name}")
    for level in batching.priority_queue_policy:
        if not 1 <= level <= levels:
            raise ConfigError(
                f"priority queue policy must have priority level in range [1, {levels}] for {config.name}"
            )


def select_versions(config: pb.ModelConfig, available: list[int]) -> list[int]:
    """The versions the version policy serves, highest first."""
    ordered = sorted(available, reverse=True)
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return ordered
    if kind == "specific":
        wanted = set(policy.specific.versions)
        missing = wanted - set(available)
        if missing:
            raise ConfigError(
                f"model '{config.name}': version_policy names versions {sorted(missing)} that have no folder"
            )
        return [v for v in ordered if v in wanted]
    count = policy.latest.num_versions if kind == "latest" else 1
    if count < 1:
        raise ConfigError(f"model '{config.name}': latest num_versions must be >= 1, got {count}")
    return ordered[:count]


def config_to_json(config: pb.ModelConfig) -> dict[str, Any]:
    """Triton's JSON form of a config: every field with its default, int64 as numbers."""
    data = json_format.MessageToDict(
        config,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return _int64_as_numbers(data, pb.ModelConfig.DESCRIPTOR)  # type: ignore[no-any-return]


def config_from_json(data: dict[str, Any]) -> pb.ModelConfig:
    config = _parse_json(data)
    check_file_names(config)
    return config


def _parse_json(data: dict[str, Any]) -> pb.ModelConfig:
    try:
        return json_format.ParseDict(data, pb.ModelConfig(), ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise ConfigError(f"invalid model config JSON: {exc}") from None
    except (TypeError, ValueError, AttributeError, RecursionError) as exc:
        # ParseDict lets some wrongly typed values through as Python errors.
        raise ConfigError(f"invalid model config JSON: {exc}") from None


def _int64_as_numbers(data: Any, descriptor: Any) -> Any:
    """protobuf's JSON mapping writes int64 fields as strings; Triton writes numbers.

    Walks the message descriptor so that only int64 fields convert, never a string field
    that happens to hold digits.
    """
    from google.protobuf.descriptor import FieldDescriptor as F

    int64_types = (F.CPPTYPE_INT64, F.CPPTYPE_UINT64)
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.cpp_type in int64_types:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.cpp_type == F.CPPTYPE_MESSAGE:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                if value_field.cpp_type == F.CPPTYPE_MESSAGE:
                    for item in value.values():
                        _int64_as_numbers(item, value_field.message_type)
                elif value_field.cpp_type in int64_types:
                    data[field.name] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                for item in value:
                    _int64_as_numbers(item, sub)
            elif isinstance(value, dict):
                _int64_as_numbers(value, sub)
    return data
