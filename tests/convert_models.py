"""Small torch models for `natron convert`'s tests, importable as `tests.convert_models:NAME`
from a subprocess run in the repository's root too."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MLP_FEATURES = 16
IMAGE_SHAPE = (3, 8, 8)


def _seeded() -> None:
    torch.manual_seed(0)  # the same weights in every process: the tests compare across them


def mlp() -> nn.Module:
    _seeded()
    return nn.Sequential(nn.Linear(MLP_FEATURES, 32), nn.ReLU(), nn.Linear(32, 4))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.features(x).flatten(1)), dim=1)


def cnn() -> nn.Module:
    _seeded()
    model = SmallCNN()
    # Non-trivial running statistics, so the BatchNorm the optimiser folds into the Conv matters.
    model.features[1].running_mean.uniform_(-0.5, 0.5)
    model.features[1].running_var.uniform_(0.5, 2.0)
    return model


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(MLP_FEATURES, 3)
        self.b = nn.Linear(MLP_FEATURES, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), torch.sigmoid(self.b(x))


def two_heads() -> nn.Module:
    _seeded()
    return TwoHeads()


class BatchBaked(nn.Module):
    """Scales by its batch size read as a Python int: the trace bakes the export batch in, so
    the ONNX disagrees with torch at every other batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * int(x.shape[0])


def batch_baked() -> nn.Module:
    return BatchBaked()


class Svd(nn.Module):
    """torch.linalg.svd: the ONNX exporter has no translation for aten::linalg_svd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x)[1]


def svd() -> nn.Module:
    return Svd()


def not_a_module() -> Any:
    return {"weights": [1, 2, 3]}


def raises() -> nn.Module:
    raise RuntimeError("checkpoint missing")
