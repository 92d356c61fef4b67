"""A trained network of a train, teacher or kd run.

Logged twice: as an MLflow model (pt2, with signature and input example) for users, and as
``weights/model.safetensors`` plus ``weights/model.json`` (architecture, shapes, input space) for the
stages, which rebuild it from the registry without unpickling. A model trained in a whitened space
carries its whitening (``weights/model.zca.safetensors``), so its inputs can always be mapped there.
The stage that trained it also keeps its logits on the test split with the labels they were measured
against (``weights/model.test.safetensors``), so a report reads them instead of running the model again.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import torch
from safetensors.torch import save_file
from torch import nn

from kdd_mlflow import models, tracking
from kdd_mlflow.artifacts.space import InputSpace
from kdd_mlflow.runtime import environment
from kdd_mlflow.train import predict_logits

DIRECTORY = "weights"
STAGES = ("train", "teacher", "kd")  # the stages whose runs hold a model


@dataclass
class TrainedModel:
    """A rebuilt network, its spec and the input space it takes."""

    module: nn.Module
    spec: dict
    space: InputSpace
    test: dict[str, torch.Tensor] | None = None  # the stored test logits and labels, where the run kept them

    @property
    def name(self) -> str:
        return self.spec["model"]

    @property
    def parameters(self) -> int:
        return models.count_parameters(self.module)

    def test_logits(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu"
                    ) -> torch.Tensor:
        """Logits on the test split (``images``, ``labels``): the stored ones when they were measured against
        these very labels, else computed now."""
        stored = self.stored_test_logits(labels, device)
        return stored if stored is not None else self.logits(images, device)

    def stored_test_logits(self, labels: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The logits its run stored on the test split, if measured against these very ``labels``; else None."""
        if self.test is not None and torch.equal(self.test["labels"], labels.cpu()):
            return self.test["logits"].to(device)
        return None

    def logits(self, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Logits for normalised images, mapped into the model's input space first."""
        self.module.to(device)
        return predict_logits(self.module, self.space.apply(images.to(device)))


def spec_for(name: str, space: InputSpace) -> dict:
    """What a logged model is, checked again when a later stage loads it."""
    meta = space.info
    return {"model": name, "channels": meta.channels, "num_classes": meta.num_classes,
            "image_size": meta.image_size, **space.spec()}


@functools.cache
def requirements() -> list[str]:
    """What loading the logged MLflow model needs, pinned to this environment's versions (local build tags such
    as ``+cpu`` dropped). Given explicitly, MLflow does not infer them by loading the model again in a
    subprocess, which cost about 6 of a 100-image arm's 30 seconds."""
    return [f"{name}=={metadata.version(name).split('+')[0]}"
            for name in ("mlflow", "torch", "numpy", "pandas", "cloudpickle")]


def predicting_on_cpu():
    """MLflow checks a logged model's input example by loading it as a pyfunc on its default prediction device, which is
    CUDA wherever there is one, and a pt2 program exported from a CPU copy loads on the CPU only: on a GPU machine the
    check failed and left a warning for every model. Inside this block it loads where the program was exported."""
    return environment({"MLFLOW_DEFAULT_PREDICTION_DEVICE": "cpu"})


def log(model: nn.Module, name: str, space: InputSpace, example: torch.Tensor, artifact: str = "model",
        test: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Log ``model`` (registry name ``name``, taking inputs in ``space``) to the active run; ``test``: its
    logits on the test split and the labels of that split. The MLflow model is exported on the CPU, so it loads on
    any machine; on a GPU machine load it with ``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`` (or
    ``MLFLOW_DEFAULT_PREDICTION_DEVICE=cpu``), as MLflow otherwise moves a pyfunc to CUDA and refuses a CPU program."""
    model.eval()
    cpu_model = copy.deepcopy(model).to("cpu")
    with predicting_on_cpu():
        mlflow.pytorch.log_model(cpu_model, name=artifact, input_example=example[:2].detach().cpu().numpy(),
                                 serialization_format="pt2", pip_requirements=requirements())
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in cpu_model.state_dict().items()}, f"{tmp}/{artifact}.safetensors")
        if space.zca is not None:
            save_file(space.tensors(), f"{tmp}/{artifact}.zca.safetensors")
        if test is not None:
            logits, labels = test
            save_file({"logits": logits.detach().float().cpu().contiguous(), "labels": labels.cpu().contiguous()},
                      f"{tmp}/{artifact}.test.safetensors")
        spec = {**spec_for(name, space), "test_logits": test is not None}
        Path(f"{tmp}/{artifact}.json").write_text(json.dumps(spec, indent=2))
        mlflow.log_artifacts(tmp, DIRECTORY)


def load(run_id: str, expect: dict | None = None, artifact: str = "model") -> TrainedModel:
    """Rebuild the model of a run and check its spec against ``expect`` (e.g. dataset)."""
    tracking.require_run(run_id, "model run", STAGES)
    with tempfile.TemporaryDirectory() as tmp:
        spec = tracking.load_json(run_id, f"{DIRECTORY}/{artifact}.json", tmp)
        state = tracking.load_tensors(run_id, f"{DIRECTORY}/{artifact}.safetensors", tmp)
        zca = tracking.load_tensors(run_id, f"{DIRECTORY}/{artifact}.zca.safetensors", tmp) if spec.get("zca") else {}
        test = tracking.load_tensors(run_id, f"{DIRECTORY}/{artifact}.test.safetensors", tmp) \
            if spec.get("test_logits") else None
    for key, want in (expect or {}).items():
        if spec.get(key) != want:
            raise tracking.ArtifactError(f"run {run_id}: model {artifact} has {key}={spec.get(key)!r}, "
                                         f"expected {want!r}")
    try:
        space = InputSpace.from_stored(spec, zca)
        module = models.create(spec["model"], spec["channels"], spec["num_classes"], spec["image_size"])
        module.load_state_dict(state, strict=True)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise tracking.ArtifactError(f"run {run_id}: {DIRECTORY}/{artifact}: {exc}") from None
    if test is not None:
        logits, labels = test.get("logits"), test.get("labels")
        if (logits is None or labels is None or logits.dtype != torch.float32 or labels.dtype != torch.int64
                or logits.shape != (len(labels), spec["num_classes"])):
            raise tracking.ArtifactError(f"run {run_id}: {DIRECTORY}/{artifact}.test.safetensors does not hold "
                                         f"float32 logits for {spec['num_classes']} classes and int64 labels")
    return TrainedModel(module, spec, space, test)
