"""Tabular networks and the loaded model that serving and batch prediction use.

On disk a tabular model is ``model.safetensors`` (weights, never pickle),
``config.json`` (enough to rebuild the module) and ``preprocess.json`` (the
fitted :class:`~maas_ray.data.Preprocessor`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from maas_ray.data.preprocess import Preprocessor

WEIGHTS, CONFIG, PREPROCESS = "model.safetensors", "config.json", "preprocess.json"
FORMAT = "tabular-torch"


def build_module(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from its config: ``{"kind", "n_features", "n_outputs", ...}``."""
    n_in, n_out = int(config["n_features"]), int(config["n_outputs"])
    if config["kind"] == "linear":
        return nn.Sequential(nn.Linear(n_in, n_out))
    layers: list[nn.Module] = []
    width = n_in
    for hidden in config.get("hidden_sizes", [64, 64]):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if config.get("dropout", 0.0) > 0:
            layers.append(nn.Dropout(config["dropout"]))
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


@dataclass
class TabularModel:
    """A trained network plus its preprocessing: raw rows in, predictions out."""

    module: nn.Module
    config: dict[str, Any]
    preprocessor: Preprocessor

    def __post_init__(self) -> None:
        # Inference runs in float64: float32 results depend on the batch's shape
        # (BLAS picks kernels by size), so a row batched with others could differ
        # from the same row alone by more than 1e-5 after un-standardising.
        self.module = self.module.double().eval()

    @property
    def n_features(self) -> int:
        return self.preprocessor.n_features

    @torch.inference_mode()
    def forward_raw(self, rows: np.ndarray) -> np.ndarray:
        """Raw feature rows ``(B, F)`` → network outputs ``(B, n_outputs)`` (no inversion)."""
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ValueError(
                f"expected rows of {self.n_features} features, got shape {tuple(rows.shape)}"
            )
        x = torch.from_numpy(self.preprocessor.transform_x(rows, np.float64))  # (B, F)
        return self.module(x).numpy()  # (B, n_outputs)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Raw rows → predictions in target units (regression) or class labels."""
        return self.preprocessor.inverse_y(self.forward_raw(rows))

    def predict_proba(self, rows: np.ndarray) -> np.ndarray:
        """Class probabilities ``(B, C)`` for classifiers."""
        return torch.softmax(torch.from_numpy(self.forward_raw(rows)), dim=-1).numpy()

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        # Weights are stored as trained (float32); inference upcasts on load.
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps(self.config, indent=2))
        (folder / PREPROCESS).write_text(json.dumps(self.preprocessor.to_dict(), indent=2))

    @classmethod
    def load(cls, folder: Path) -> TabularModel:
        config = json.loads((folder / CONFIG).read_text())
        module = build_module(config)
        module.load_state_dict(load_file(str(folder / WEIGHTS)))
        pre = Preprocessor.from_dict(json.loads((folder / PREPROCESS).read_text()))
        return cls(module, config, pre)
