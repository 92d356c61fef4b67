"""The distilled (synthetic) set of a distill run.

``synthetic/synthetic.safetensors`` holds ``images`` (float32, in the set's input space), ``labels``
(int64 hard labels), optionally ``soft_labels`` (float32 logits per class), the learned step size ``lr``
and the ZCA tensors when the space is whitened; its metadata, repeated in ``synthetic/synthetic.json``,
is the spec: dataset, ipc, shapes, the input space and the network the set was distilled for.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdd_mlflow import data, tracking
from kdd_mlflow.artifacts.space import InputSpace
from kdd_mlflow.distill.labels import targets

DIRECTORY = "synthetic"
TENSORS = f"{DIRECTORY}/synthetic.safetensors"
SPEC = f"{DIRECTORY}/synthetic.json"


@dataclass
class DistilledSet:
    """Images per class learned by distillation, with their labels, step size and input space."""

    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    ipc: int
    model: str  # the network the set was distilled for (and is evaluated with)
    space: InputSpace
    soft_labels: torch.Tensor | None = None
    run_id: str | None = None  # the distill run it was loaded from

    @property
    def targets(self) -> torch.Tensor:
        """What a network trained on the set fits: its soft labels as class probabilities (the softmax of the
        stored logits, as the distillation's inner loop used them), else its hard labels."""
        return self.labels if self.soft_labels is None else targets(self.soft_labels.float())

    @property
    def split(self) -> data.Split:
        """The set as training data (its soft labels where it has them), named after its run."""
        if self.run_id is None:
            return data.Split(self.images, self.targets, f"{self.space.dataset}-synthetic-ipc{self.ipc}")
        return data.Split(self.images, self.targets, f"synthetic-{self.run_id}", f"runs:/{self.run_id}/{DIRECTORY}")

    def spec(self) -> dict:
        meta = self.space.info
        return {**self.space.spec(), "ipc": self.ipc, "num_classes": meta.num_classes, "channels": meta.channels,
                "image_size": meta.image_size, "model": self.model, "learned_lr": self.lr,
                "labels": "soft" if self.soft_labels is not None else "hard"}

    def save(self, directory: Path) -> None:
        """Write ``synthetic.safetensors`` and ``synthetic.json`` into ``directory``."""
        tensors = {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.cpu().contiguous(),
                   "lr": torch.tensor([self.lr]), **self.space.tensors()}
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.detach().cpu().float().contiguous()
        spec = self.spec()
        save_file(tensors, str(directory / Path(TENSORS).name), metadata={"kdd": json.dumps(spec)})
        (directory / Path(SPEC).name).write_text(json.dumps(spec, indent=2))


def check(tensors: dict[str, torch.Tensor], spec: dict) -> None:
    """Raise ValueError when the tensors do not match the spec."""
    n = spec["ipc"] * spec["num_classes"]
    shape = (n, spec["channels"], spec["image_size"], spec["image_size"])
    images, labels, soft = tensors.get("images"), tensors.get("labels"), tensors.get("soft_labels")
    if images is None or tuple(images.shape) != shape or images.dtype != torch.float32:
        raise ValueError(f"images do not match the spec's float32 {shape}")
    if labels is None or tuple(labels.shape) != (n,) or labels.dtype != torch.int64:
        raise ValueError(f"labels do not match the spec's int64 ({n},)")
    if int(labels.min()) < 0 or int(labels.max()) >= spec["num_classes"]:
        raise ValueError(f"labels outside [0, {spec['num_classes']})")
    if (soft is not None) != (spec.get("labels") == "soft"):
        raise ValueError(f"the spec says {spec.get('labels', 'hard')} labels, the file disagrees")
    if soft is not None and (tuple(soft.shape) != (n, spec["num_classes"]) or soft.dtype != torch.float32):
        raise ValueError(f"soft labels do not match the spec's float32 ({n}, {spec['num_classes']})")
    if tuple(tensors.get("lr", torch.zeros(0)).shape) != (1,) or not float(tensors["lr"][0]) > 0:
        raise ValueError("the learned step size is missing or not positive")


def load(run_id: str, expect: dict | None = None) -> DistilledSet:
    """The distilled set of a distill run, checked against its spec and ``expect`` (e.g. dataset)."""
    tracking.require_run(run_id, "distill run", ("distill",))
    with tempfile.TemporaryDirectory() as tmp:
        spec = tracking.load_json(run_id, SPEC, tmp)
        tensors = tracking.load_tensors(run_id, TENSORS, tmp)
    for key, want in (expect or {}).items():
        if spec.get(key) != want:
            raise tracking.ArtifactError(f"run {run_id}: synthetic set has {key}={spec.get(key)!r}, expected {want!r}")
    try:
        check(tensors, spec)
        space = InputSpace.from_stored(spec, tensors)
    except (ValueError, KeyError) as exc:
        raise tracking.ArtifactError(f"run {run_id}: {TENSORS}: {exc}") from None
    return DistilledSet(tensors["images"], tensors["labels"], float(tensors["lr"][0]), spec["ipc"], spec["model"],
                        space, tensors.get("soft_labels"), run_id)


def spec(run_id: str) -> dict:
    """Only the spec of a distill run's set (e.g. the network it was distilled for), without the tensors."""
    tracking.require_run(run_id, "distill run", ("distill",))
    return tracking.load_json(run_id, SPEC)
