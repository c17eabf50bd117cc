"""`natron convert` on TensorFlow models (a .keras file, a SavedModel) through tf2onnx: runs
where the `tensorflow` extra is installed, skipped elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from natron import config as cfg
from natron.convert import cli

if os.environ.get("CI"):
    # `make test` installs the extra: in CI a skip would hide a broken install.
    import tensorflow as tf
    import tf2onnx  # noqa: F401
else:
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
pytestmark = pytest.mark.unit


def keras_model() -> object:
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential(
        [tf.keras.Input((6,)), tf.keras.layers.Dense(8, activation="relu"), tf.keras.layers.Dense(3)]
    )


def test_a_keras_file_becomes_onnx_that_answers_as_keras(tmp_path: Path) -> None:
    model = keras_model()
    source = tmp_path / "model.keras"
    model.save(source)  # type: ignore[attr-defined]
    out = tmp_path / "repo" / "dense"
    assert cli.main([str(source), "--input", "x:FP32:-1,6", "--output", "y", "--out", str(out)]) == 0
    config = cfg.read_config(out)
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [6])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [3])]
    session = ort.InferenceSession(str(out / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(session.run(["y"], {"x": x})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)  # type: ignore[operator]


def test_a_saved_model_converts_through_its_serving_signature(tmp_path: Path) -> None:
    model = keras_model()
    source = tmp_path / "saved"
    model.export(str(source))  # type: ignore[attr-defined]
    out = tmp_path / "repo" / "saved"
    assert cli.main([str(source), "--input", "x:FP32:-1,6", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones((2, 6), dtype=np.float32)
    np.testing.assert_allclose(session.run(["OUTPUT0"], {"x": x})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)  # type: ignore[operator]
