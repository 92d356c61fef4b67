"""Which data a run trained, validated and tested on, logged as MLflow dataset inputs.

Each split is logged by name (``fashion-mnist-train``, ``fashion-mnist-subset-ipc10``, ``synthetic-RUN_ID``),
digest and source (the directory its files were read from, or ``runs:/RUN_ID/synthetic`` for a set another
run made), so the runs table lists them and ``datasets.name = '...'`` finds every run that used one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import get_dataset_source_from_json, register_dataset_source

from kdd_mlflow import tracking
from kdd_mlflow.data import Split

DIGEST_BYTES = 4 << 20  # image bytes hashed per split at most: a stage logs its inputs in milliseconds


class RunArtifactSource(DatasetSource):
    """Data read from a run's artifacts (``runs:/RUN_ID/PATH``), which MLflow has no dataset source for."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "mlflow_run_artifact"

    def load(self, dst_path: str | None = None) -> str:
        """Download the artifact; return its local path."""
        return mlflow.artifacts.download_artifacts(self.uri, dst_path=dst_path)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and raw_source.startswith("runs:/")

    @classmethod
    def _resolve(cls, raw_source: Any) -> RunArtifactSource:
        return cls(raw_source)

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> RunArtifactSource:
        return cls(source_dict["uri"])


register_dataset_source(RunArtifactSource)


def dataset_source(location: str) -> DatasetSource:
    """A run's artifact (``runs:/...``) or a local directory as an MLflow dataset source."""
    if RunArtifactSource._can_resolve(location):
        return RunArtifactSource(location)
    # Built by type, not resolved from the string: MLflow registers two local sources and warns on every path.
    return get_dataset_source_from_json(json.dumps({"uri": location}), source_type="local")


def digest(split: Split) -> str:
    """A fingerprint of the split: its shape, every label and evenly spaced images up to ``DIGEST_BYTES``."""
    images = split.images.detach()
    row_bytes = max(images.numel() // max(len(images), 1) * images.element_size(), 1)
    rows = torch.linspace(0, max(len(images) - 1, 0), min(len(images), max(DIGEST_BYTES // row_bytes, 1)))
    sample = images[rows.round().long().to(images.device)]  # picked where the split lives; only these move
    hashed = hashlib.sha256(f"{tuple(images.shape)} {images.dtype}".encode())
    hashed.update(split.labels.detach().cpu().numpy().tobytes())
    hashed.update(sample.cpu().contiguous().numpy().tobytes())
    return hashed.hexdigest()[:16]


def log_inputs(**splits: Split) -> None:
    """Log each split as a dataset input of the active run, keyed by context: ``training=``, ``validation=``,
    ``test=``."""
    for context, split in splits.items():
        # MLflow keeps only the schema and profile (shapes, dtypes, sizes) of the arrays, never their values:
        # zero-strided stand-ins of the right shape give both without copying a set held on the GPU.
        features = np.broadcast_to(np.zeros((), np.float32), tuple(split.images.shape))
        kind = np.float32 if split.labels.is_floating_point() else np.int64  # soft labels: class probabilities
        targets = np.broadcast_to(np.zeros((), kind), tuple(split.labels.shape))
        dataset = mlflow.data.from_numpy(features, source=dataset_source(split.source), targets=targets,
                                         name=split.name, digest=digest(split))
        log_input(dataset, context)


def log_input(dataset, context: str) -> None:
    """``mlflow.log_input``, again when another run logged the same dataset at the same moment (two stages
    running side by side): the next attempt finds the dataset there and only links it."""
    tracking.retry_concurrent(mlflow.log_input, dataset, context=context)
