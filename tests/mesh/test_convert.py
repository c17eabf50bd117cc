"""A model converted by `natron convert` is served by `natron serve` and answers a Triton client
as the torch model it came from, at the batch sizes its config allows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from natron import config as cfg
from natron.convert import cli
from tests import convert_models
from tests.harness import Served, natron_serve

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repository = tmp_path_factory.mktemp("converted") / "repo"
    code = cli.main(
        ["tests.convert_models:cnn", "--input", "image:FP32:-1,3,8,8", "--output", "probs",
         "--out", str(repository / "cnn"), "--max-batch-size", "8"]
    )  # fmt: skip
    assert code == 0
    with natron_serve(repository, ["cnn"], tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.mark.parametrize("batch", [1, 6])
def test_a_converted_cnn_answers_a_triton_client_as_torch_does(served: Served, batch: int) -> None:
    client = httpclient.InferenceServerClient(served.host_port)
    x = np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    request = httpclient.InferInput("image", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    result = client.infer("cnn", [request])
    with torch.inference_mode():
        want = convert_models.cnn().eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.as_numpy("probs"), want, rtol=1e-4, atol=1e-5)


def test_the_served_config_is_the_one_convert_wrote(served: Served) -> None:
    config = httpclient.InferenceServerClient(served.host_port).get_model_config("cnn")
    assert config["max_batch_size"] == 8
    assert [(i["name"], i["dims"]) for i in config["input"]] == [("image", [3, 8, 8])]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [("probs", [5])]
    assert Path(served.repository, "cnn", "1", "model.onnx").exists()


def test_analyze_serves_every_format_that_passed_and_keeps_the_fastest(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    code = cli.main(
        ["tests.convert_models:mlp", "--input", "INPUT0:FP32:-1,16", "--out", str(repository / "mlp"),
         "--analyze", "--max-configs", "1"]
    )  # fmt: skip
    assert code == 0
    reports = tmp_path / "natron-convert-mlp-analysis"
    # Both CPU formats were served and measured, each with a report of its own.
    for name in ("onnx", "onnx-ort"):
        rows = (reports / name / "measurements.csv").read_text().splitlines()
        assert len(rows) >= 2, rows  # the header and at least one level
        assert (reports / name / "index.html").exists()
    written = (repository / "mlp" / "config.pbtxt").read_text()
    config = cfg.parse_config_text(written, "config.pbtxt")
    assert config.name == "mlp" and config.max_batch_size == 8
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert (repository / "mlp" / "1" / "model.onnx").exists()
