"""`natron convert` on small torch models: the ONNX it writes answers as torch does at batch 1
and 5, its config.pbtxt reads back through natron's own parser, a format that misses its
tolerance is reported and not written, and every bad input is one line naming the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as pb

from natron import config as cfg
from natron.convert import cli, repository
from tests import convert_models

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def convert(*args: str) -> int:
    return cli.main(list(args))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natron", "convert", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def onnx_answers(model_dir: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return list(session.run(None, inputs))


def torch_answers(model: torch.nn.Module, *arrays: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        result = model.eval()(*(torch.from_numpy(a) for a in arrays))
    return [r.numpy() for r in (result if isinstance(result, tuple) else (result,))]


@pytest.mark.parametrize("batch", [1, 5])
def test_an_mlp_becomes_an_onnx_model_that_answers_as_torch_at_any_batch(tmp_path: Path, batch: int) -> None:
    out = tmp_path / "repo" / "mlp"
    assert convert("tests.convert_models:mlp", "--input", "INPUT0:FP32:-1,16", "--out", str(out)) == 0
    x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
    (got,) = onnx_answers(out, {"INPUT0": x})
    (want,) = torch_answers(convert_models.mlp(), x)
    assert got.shape == (batch, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_cnn_config_reads_back_with_dims_without_the_batch_axis(tmp_path: Path) -> None:
    out = tmp_path / "repo" / "cnn"
    code = convert(
        "tests.convert_models:cnn", "--input", "image:FP32:-1,3,8,8", "--output", "probs",
        "--out", str(out), "--max-batch-size", "16", "--instances", "2",
    )  # fmt: skip
    assert code == 0
    config = cfg.read_config(out)
    assert config.name == "cnn"
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("image", pb.TYPE_FP32, [3, 8, 8])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("probs", pb.TYPE_FP32, [5])]
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, pb.ModelInstanceGroup.KIND_CPU)]
    assert sorted(p.name for p in (out / "1").iterdir()) == ["model.onnx"]
    x = np.random.default_rng(3).standard_normal((5, 3, 8, 8)).astype(np.float32)
    (got,) = onnx_answers(out, {"image": x})
    np.testing.assert_allclose(got, torch_answers(convert_models.cnn(), x)[0], rtol=1e-4, atol=1e-5)


def test_the_ort_optimised_format_is_preferred_and_the_summary_lists_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "repo" / "cnn"
    assert convert("tests.convert_models:cnn", "--input", "INPUT0:FP32:-1,3,8,8", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "onnx-ort" in printed and "passed" in printed
    assert f"wrote {out} (onnx-ort, fp32)" in printed
    # The basic level folded the BatchNorm into the Conv: a graph of standard ops, one fewer node.
    import onnx

    ops = [node.op_type for node in onnx.load(str(out / "1" / "model.onnx")).graph.node]
    assert "BatchNormalization" not in ops and "Conv" in ops
    assert all(not node.domain for node in onnx.load(str(out / "1" / "model.onnx")).graph.node)


def test_a_model_without_batch_axis_gets_max_batch_size_0_and_full_dims(tmp_path: Path) -> None:
    out = tmp_path / "repo" / "mlp"
    assert convert("tests.convert_models:mlp", "--input", "INPUT0:FP32:3,16", "--out", str(out)) == 0
    config = cfg.read_config(out)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [3, 16] and list(config.output[0].dims) == [3, 4]


def test_two_outputs_take_their_names_in_order(tmp_path: Path) -> None:
    out = tmp_path / "repo" / "heads"
    code = convert(
        "tests.convert_models:two_heads", "--input", "x:FP32:-1,16",
        "--output", "scores:FP32:-1,3", "--output", "gate", "--out", str(out),
    )  # fmt: skip
    assert code == 0
    config = cfg.read_config(out)
    assert [(o.name, list(o.dims)) for o in config.output] == [("scores", [3]), ("gate", [2])]
    x = np.ones((2, 16), dtype=np.float32)
    got = onnx_answers(out, {"x": x})
    for have, want in zip(got, torch_answers(convert_models.two_heads(), x), strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5)


def test_sample_inputs_from_an_npz_are_what_the_check_uses(tmp_path: Path) -> None:
    samples = tmp_path / "samples.npz"
    np.savez(samples, INPUT0=np.zeros((4, 16), dtype=np.float32))
    out = tmp_path / "repo" / "baked"
    # x * batch is 0 for zeros at every batch size: the baked-in batch goes unseen on these.
    code = convert(
        "tests.convert_models:batch_baked", "--input", "INPUT0:FP32:-1,16",
        "--sample-inputs", str(samples), "--out", str(out),
    )  # fmt: skip
    assert code == 0


def test_a_format_that_misses_its_tolerance_is_reported_and_not_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "repo" / "baked"
    code = convert("tests.convert_models:batch_baked", "--input", "INPUT0:FP32:-1,4", "--out", str(out))
    assert code == 1
    captured = capsys.readouterr()
    assert "onnx: failed: output 'OUTPUT0': max abs error" in captured.out
    assert "exporter warning: Converting a tensor to a Python integer" in captured.out
    assert "no format passed its check; nothing written" in captured.err
    assert not out.exists() and not (tmp_path / "natron-values-baked.yaml").exists()


def test_tolerances_given_on_the_command_line_override_the_precisions(tmp_path: Path) -> None:
    out = tmp_path / "repo" / "baked"
    # Batch 1 and 5 differ by at most 4x: a relative tolerance of 5 lets the baked trace pass.
    code = convert(
        "tests.convert_models:batch_baked", "--input", "INPUT0:FP32:-1,4", "--rtol", "5", "--out", str(out)
    )
    assert code == 0 and (out / "1" / "model.onnx").exists()


def test_torchscript_and_exported_program_files_convert(tmp_path: Path) -> None:
    model = convert_models.mlp().eval()
    example = torch.zeros(2, 16)
    scripted = tmp_path / "mlp.pt"
    torch.jit.trace(model, example).save(str(scripted))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), str(program))
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    for source in (scripted, program):
        out = tmp_path / "repo" / source.suffix[1:]
        assert convert(str(source), "--input", "INPUT0:FP32:-1,16", "--out", str(out)) == 0
        (got,) = onnx_answers(out, {"INPUT0": x})
        np.testing.assert_allclose(got, torch_answers(model, x)[0], rtol=1e-4, atol=1e-5)


def test_helm_values_and_a_chart_copy_are_written_beside_the_repository(tmp_path: Path) -> None:
    out = tmp_path / "repo" / "mlp"
    chart = tmp_path / "chart"
    code = convert(
        "tests.convert_models:mlp", "--input", "INPUT0:FP32:-1,16", "--out", str(out), "--chart", str(chart)
    )
    assert code == 0
    values = (tmp_path / "natron-values-mlp.yaml").read_text()
    assert "source: persistentVolumeClaim" in values and 'loadModels: ["mlp"]' in values
    assert "enabled: false" in values and '- model: "mlp"' in values
    assert (chart / "Chart.yaml").exists() and (chart / "values-mlp.yaml").read_text() == values
    assert not (out.parent / "natron-values-mlp.yaml").exists()  # never inside the repository


def test_an_existing_chart_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart = tmp_path / "chart"
    chart.mkdir()
    args = ("tests.convert_models:mlp", "--input", "INPUT0:FP32:-1,16", "--out", str(tmp_path / "r" / "m"))
    assert convert(*args, "--chart", str(chart)) == 1
    assert f"--chart {chart}: already exists" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "refused before converting anything"


def test_a_chart_asked_for_where_natron_has_none_is_refused_before_converting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed from a wheel, natron has no deploy/helm folder: --chart says so at once."""
    monkeypatch.setattr(repository, "CHART", tmp_path / "no-such-chart")
    out = tmp_path / "r" / "m"
    args = ("tests.convert_models:mlp", "--input", "INPUT0:FP32:-1,16", "--out", str(out))
    assert convert(*args, "--chart", str(tmp_path / "chart")) == 1
    err = capsys.readouterr().err
    assert "--chart: no natron chart at" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "chart").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "INPUT0:FP32"], "--input 'INPUT0:FP32': expected NAME:DTYPE:DIMS"),
        (["--input", "INPUT0:FLOAT:-1,16"], "unknown datatype 'FLOAT'"),
        (["--input", "INPUT0:FP32:-1,0"], "dims must be positive sizes or -1"),
        (
            ["--input", "a:FP32:-1,16", "--input", "b:FP32:2,16"],
            "the batch axis (-1 first) must be on every input",
        ),
        (["--input", "INPUT0:FP32:4,16", "--max-batch-size", "4"], "the inputs have no batch axis"),
        (["--input", "INPUT0:FP32:-1,15"], "the model fails on sample inputs {'INPUT0': [1, 15]}"),
        (
            ["--input", "INPUT0:FP32:-1,16", "--output", "a", "--output", "b"],
            "--output: 2 given, the model has 1",
        ),
        (
            ["--input", "INPUT0:FP32:-1,16", "--output", "y:INT64:-1,4"],
            "the model's output 0 is FP32 [-1, 4]",
        ),
        (["--input", "INPUT0:FP32:-1,16", "--instances", "0"], "--instances 0: must be >= 1"),
    ],
)
def test_bad_specs_are_one_line_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "repo" / "mlp"
    assert convert("tests.convert_models:mlp", *args, "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("natron convert: error: ")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_npz_sample_inputs_that_do_not_fit_the_inputs_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = tmp_path / "s.npz"
    np.savez(samples, other=np.zeros((2, 16), dtype=np.float32))
    out = tmp_path / "r" / "m"
    args = ["tests.convert_models:mlp", "--input", "INPUT0:FP32:-1,16", "--out", str(out)]
    assert convert(*args, "--sample-inputs", str(samples)) == 1
    assert "has arrays ['other'], the inputs are ['INPUT0']" in capsys.readouterr().err
    assert convert(*args, "--sample-inputs", str(tmp_path / "missing.npz")) == 1
    assert "missing.npz: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("tests.no_such_module:mlp", "cannot import module 'tests.no_such_module'"),
        ("tests.convert_models:nope", "module 'tests.convert_models' has no callable 'nope'"),
        ("tests.convert_models:not_a_module", "'not_a_module()' returned dict, not a torch nn.Module"),
        ("tests.convert_models:raises", "calling 'raises()' raised RuntimeError: checkpoint missing"),
        ("missing/model.pt", "missing/model.pt: no such file, and not a module:callable"),
    ],
)
def test_sources_that_do_not_load_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, message: str
) -> None:
    assert convert(source, "--input", "INPUT0:FP32:-1,16", "--out", str(tmp_path / "r" / "m")) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_corrupt_torchscript_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "model.pt"
    corrupt.write_bytes(b"not a zip archive")
    assert convert(str(corrupt), "--input", "INPUT0:FP32:-1,16", "--out", str(tmp_path / "r" / "m")) == 1
    assert "not a TorchScript file torch.jit.load can read" in capsys.readouterr().err


def test_a_tensorflow_model_without_tensorflow_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorflow is installed here: tests/unit/test_convert_tensorflow.py covers it")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    for source in (saved, tmp_path / "model.keras"):
        source.touch()
        assert convert(str(source), "--input", "x:FP32:-1,4", "--out", str(tmp_path / "r" / "m")) == 1
        err = capsys.readouterr().err
        assert f"natron convert: error: {source} is a TensorFlow model; install natron[tensorflow]" in err


# -- the command line itself, in a process of its own ------------------------------------------


def test_an_op_onnx_cannot_export_is_named_without_a_traceback(tmp_path: Path) -> None:
    result = run_cli(
        "tests.convert_models:svd", "--input", "X:FP32:4,4", "--out", str(tmp_path / "r" / "svd")
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "natron convert: error: ONNX export failed: the model uses aten::linalg_svd, which the "
        "exporter cannot write at opset 17"
    )
    assert "Traceback" not in result.stderr and "graph" not in result.stdout


def test_a_missing_module_and_a_bad_spec_exit_1_in_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["nosuch.module:build", "--input", "X:FP32:-1,4"], "cannot import module 'nosuch.module'"),
        (["tests.convert_models:mlp", "--input", "X:FP32:-1,a"], "dims must be integers"),
    ):
        result = run_cli(*args, "--out", str(tmp_path / "r" / "m"))
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("natron convert: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_bad_flags_exit_2_with_the_usage() -> None:
    result = run_cli("tests.convert_models:mlp", "--out", "r/m")
    assert result.returncode == 2
    assert "the following arguments are required: --input" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli(
        "tests.convert_models:mlp", "--input", "X:FP32:-1,16", "--out", "r/m", "--precision", "fp8"
    )
    assert result.returncode == 2 and "invalid choice: 'fp8'" in result.stderr


def test_the_command_line_converts_and_prints_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "repo" / "cnn"
    result = run_cli("tests.convert_models:cnn", "--input", "INPUT0:FP32:-1,3,8,8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "onnx-ort" in result.stdout and "passed" in result.stdout
    assert (out / "config.pbtxt").exists() and (out / "1" / "model.onnx").exists()


@pytest.mark.gpu
def test_tensorrt_formats_are_built_and_checked_on_a_gpu(tmp_path: Path) -> None:
    from natron.convert import formats

    if not formats.gpu_available():
        pytest.skip("no NVIDIA GPU with TensorRT on this machine")
    for precision in ("fp32", "fp16", "int8"):
        out = tmp_path / precision / "cnn"
        code = convert(
            "tests.convert_models:cnn", "--input", "INPUT0:FP32:-1,3,8,8", "--out", str(out),
            "--precision", precision,
        )  # fmt: skip
        assert code == 0
        config = cfg.read_config(out)
        assert config.platform == "tensorrt_plan" and (out / "1" / "model.plan").exists()
        assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
