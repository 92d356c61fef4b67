"""The MLflow layer: stage runs, params, models and artifacts that later stages load and check.

Every hand-over between stages goes through a run id and its artifacts. Weights travel as
safetensors plus a JSON spec, so loading never unpickles anything and every load is checked
against what the caller expects.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.tracking import MlflowClient
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from kdd_mlflow import models
from kdd_mlflow.data import ZCA

log = logging.getLogger(__name__)

STAGE_TAG = "kdd.stage"
ERROR_TAG = "kdd.error"
CODE_TAG = "kdd.code_version"
WEIGHTS_DIR = "weights"


@functools.cache
def code_version() -> str:
    """A hash of the package's source files: runs are reused only when it matches (uncommitted edits count)."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class ArtifactError(RuntimeError):
    """An artifact is missing, truncated or not what the caller expected."""


# Fields that say which run to continue, not how to compute: never params (they differ between the first
# call and a resumed one by design).
CONTROL_FIELDS = {"run_id", "resume"}


def flat_params(config: BaseModel) -> dict[str, str]:
    """The config as MLflow params (strings; None becomes an empty string; URL passwords masked)."""
    return {k: "" if v is None else redact(str(v)) for k, v in config.model_dump().items() if k not in CONTROL_FIELDS}


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]+:)[^@\s]+@")


def redact(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``, anywhere in ``text``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}***@", text)


def same_value(logged: str, value: str) -> bool:
    """Whether a param already on a run (as `mlflow run` logged it) is this string value."""
    # `mlflow run` logs parameters shell-quoted ("''" for an empty string) and as typed ("0.010").
    if logged in (value, shlex.quote(value)):
        return True
    try:
        return float(logged) == float(value)
    except ValueError:
        return False


def log_params(params: dict[str, object]) -> None:
    """Log params to the active run; ones it already has must agree (a resumed run cannot change them)."""
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    new = {}
    for key, value in params.items():
        value = "" if value is None else str(value)
        if key not in logged:
            new[key] = value
        elif not same_value(logged[key], value):
            raise ValueError(f"run {run.info.run_id} has {key}={logged[key]!r}; this call has {value!r}")
    if new:
        mlflow.log_params(new)


@contextlib.contextmanager
def stage_run(stage: str, config: BaseModel, run_name: str | None = None, nested: bool = False,
              tags: dict[str, str] | None = None, run_id: str | None = None,
              resolved: BaseModel | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start the run of one stage (join the one ``mlflow run`` made, or reopen ``run_id``).

    ``config`` (as asked) is logged as params; ``resolved`` (budget values filled in), or ``config``,
    as config.json. A failure inside ends the run FAILED with the one-line reason as a tag.
    """
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except Exception:
            raise ArtifactError(f"run {run_id!r} not found in {mlflow.get_tracking_uri()}") from None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else (run_name or stage), nested=nested)
    try:
        mlflow.set_tags({STAGE_TAG: stage, CODE_TAG: code_version(), **(tags or {})})
        log_params(flat_params(config))
        mlflow.log_dict((resolved or config).model_dump(), "config.json")
        yield run
    except BaseException as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mlflow.set_tag(ERROR_TAG, reason[:5000])
        mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def mark_failed(reason: str) -> None:
    """Record a failure on the run ``mlflow run`` created for us (MLFLOW_RUN_ID), if any."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        client = MlflowClient()
        client.set_tag(run_id, ERROR_TAG, reason[:5000])
        client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # the store itself may be the problem; the exit code still says it
        log.warning("could not mark run %s failed: %s", run_id, exc)


def log_model(model: nn.Module, spec: dict[str, Any], example: torch.Tensor, name: str = "model",
              zca: ZCA | None = None) -> None:
    """Log ``model`` twice: as an MLflow model (pt2, with signature and input example) for users, and
    as safetensors weights plus ``spec`` for the stages, which load it without unpickling. A model that
    takes ZCA-whitened inputs carries its whitening (``{name}.zca.safetensors``)."""
    model.eval()
    cpu_model = copy.deepcopy(model).to("cpu")
    example = example[:2].detach().cpu()
    mlflow.pytorch.log_model(
        cpu_model, name=name, input_example=example.numpy(), serialization_format="pt2",
    )
    spec = {**spec, "zca": zca is not None}
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in cpu_model.state_dict().items()}, f"{tmp}/{name}.safetensors")
        if zca is not None:
            save_file({k: v.contiguous() for k, v in zca.tensors().items()}, f"{tmp}/{name}.zca.safetensors")
        Path(f"{tmp}/{name}.json").write_text(json.dumps(spec, indent=2))
        mlflow.log_artifacts(tmp, WEIGHTS_DIR)


def download(run_id: str, path: str, dst: str | Path | None = None) -> Path:
    """Download one artifact of a run, with an error that names the run and the file."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst))
    except Exception as exc:
        raise ArtifactError(f"run {run_id}: cannot fetch artifact {path!r}: {str(exc).splitlines()[0]}") from None


def load_model(run_id: str, name: str = "model", expect: dict[str, Any] | None = None
               ) -> tuple[nn.Module, dict, ZCA | None]:
    """Rebuild a model logged by ``log_model``, check its spec against ``expect``; return it, its spec
    and the ZCA whitening its inputs need (or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = download(run_id, f"{WEIGHTS_DIR}/{name}.json", tmp)
        weights_path = download(run_id, f"{WEIGHTS_DIR}/{name}.safetensors", tmp)
        try:
            spec = json.loads(spec_path.read_text())
            state = load_file(str(weights_path))
            zca = None
            if spec.get("zca"):
                zca = ZCA.from_tensors(load_file(str(download(run_id, f"{WEIGHTS_DIR}/{name}.zca.safetensors", tmp))))
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(f"run {run_id}: {name} weights are unreadable: {exc}") from None
    for key, want in (expect or {}).items():
        if spec.get(key) != want:
            raise ArtifactError(f"run {run_id}: model {name} has {key}={spec.get(key)!r}, expected {want!r}")
    model = models.create(spec["model"], spec["channels"], spec["num_classes"], spec["image_size"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"run {run_id}: {name} weights do not fit {spec['model']}: {exc}") from None
    return model, spec, zca
