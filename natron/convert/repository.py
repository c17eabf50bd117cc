"""What `natron convert` writes: the model's folder in a Triton repository (config.pbtxt built as
Triton's ModelConfig protobuf and printed in its text format, the model in version 1), and Helm
values that serve the repository with the natron chart.

The Helm values: a repository holding a binary model cannot be the chart's `configMap` source
(text files only, 1 MiB), and `image` needs an image built with it; so the values mount a
PersistentVolumeClaim (`modelRepository.source: persistentVolumeClaim`, claim `natron-models`,
to be filled with the repository's contents), load the model explicitly, point the autoscaler's
queue-depth trigger at it, and ask for GPU workers when the format runs on a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from natron import datatypes
from natron.config import CONFIG_FILE
from natron.convert.formats import Candidate
from natron.convert.spec import ConvertError, TensorSpec

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "natron"
CLAIM_NAME = "natron-models"

_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}


def make_config(
    name: str,
    candidate: Candidate,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    instances: int,
    kind: str,
) -> pb.ModelConfig:
    """The model's config: dims without the batch axis when it batches, a dynamic batcher, one
    instance group of `instances` of `kind` (cpu or gpu)."""
    config = pb.ModelConfig(
        name=name,
        platform=candidate.platform,
        backend=_BACKENDS[candidate.platform],
        max_batch_size=max_batch_size,
    )
    for entries, specs in ((config.input, inputs), (config.output, outputs)):
        for spec in specs:
            entries.add(
                name=spec.name,
                data_type=pb.DataType.Value(datatypes.datatype_to_config(spec.datatype)),
                dims=spec.dims[1:] if max_batch_size > 0 else spec.dims,
            )
    if max_batch_size > 0:
        config.dynamic_batching.SetInParent()
    group_kind = pb.ModelInstanceGroup.KIND_GPU if kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=instances, kind=group_kind)
    if candidate.accelerator is not None:
        accelerators = config.optimization.execution_accelerators
        accelerators.gpu_execution_accelerator.add(name="tensorrt", parameters=candidate.accelerator)
    return config


def config_text(config: pb.ModelConfig) -> str:
    return str(text_format.MessageToString(config))


def write_model(repository: Path, config: pb.ModelConfig, candidate: Candidate) -> Path:
    """REPO/NAME/config.pbtxt and REPO/NAME/1/<model file>; an existing model folder is replaced
    whole, so no file of an older conversion (a model.plan beside a new model.onnx) stays."""
    model_dir = repository / config.name
    try:
        if model_dir.exists():
            shutil.rmtree(model_dir)
        (model_dir / "1").mkdir(parents=True)
        shutil.copyfile(candidate.version_dir / candidate.filename, model_dir / "1" / candidate.filename)
        (model_dir / CONFIG_FILE).write_text(config_text(config), encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"cannot write {model_dir}: {exc.strerror or exc}") from None
    return Path(model_dir)


def helm_values(name: str, candidate: Candidate) -> str:
    """The natron chart's values for serving this repository (see the module's docstring)."""
    q = json.dumps  # JSON scalars are YAML scalars, quoted where YAML needs it
    return "\n".join(
        [
            f"# natron chart values for model {q(name)} ({candidate.format}, {candidate.precision}),",
            "# written by `natron convert`. Copy the model repository into the claim below, then",
            "#   helm install natron deploy/helm/natron -f <this file>",
            "modelRepository:",
            "  path: /models",
            "  source: persistentVolumeClaim",
            "  persistentVolumeClaim:",
            f"    claimName: {q(CLAIM_NAME)}",
            "router:",
            "  modelControlMode: explicit",
            f"  loadModels: [{q(name)}]",
            "worker:",
            "  gpu:",
            f"    enabled: {q(candidate.on_gpu)}",
            "autoscaling:",
            "  models:",
            f"    - model: {q(name)}",
            '      version: "1"',
            "",
        ]
    )


def check_chart(chart: Path) -> None:
    """Refuse a `--chart` folder that cannot be written, before any work is done for it."""
    if chart.exists():
        raise ConvertError(f"--chart {chart}: already exists; give a new folder")
    if not CHART.is_dir():
        # The chart is a part of the source tree (deploy/helm/natron), not of the wheel.
        raise ConvertError(f"--chart: no natron chart at {CHART}; run natron from its source tree for it")


def write_helm(
    repository: Path, name: str, candidate: Candidate, chart: Path | None
) -> tuple[Path, Path | None]:
    """REPO/../natron-values-NAME.yaml (beside the repository, not in it, where the server would
    read it as a model folder); with `chart`, a copy of the natron chart there, these values as
    its values.yaml's overrides (`values-NAME.yaml` beside it)."""
    if chart is not None:
        check_chart(chart)
    values = helm_values(name, candidate)
    values_path = repository.resolve().parent / f"natron-values-{name}.yaml"
    try:
        values_path.write_text(values, encoding="utf-8")
        copied: Path | None = None
        if chart is not None:
            shutil.copytree(CHART, chart)
            copied = chart
            (chart / f"values-{name}.yaml").write_text(values, encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"cannot write the Helm values: {exc}") from None
    return values_path, copied
