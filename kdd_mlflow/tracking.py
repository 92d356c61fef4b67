"""The MLflow layer: stage runs, params, and fetching artifacts with errors that name the run and file.

Every hand-over between stages goes through a run id and its artifacts; the formats themselves are
owned by ``kdd_mlflow.artifacts``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from pydantic import BaseModel
from safetensors.torch import load_file

from kdd_mlflow.runtime import first_line

log = logging.getLogger(__name__)

STAGE_TAG = "kdd.stage"
ERROR_TAG = "kdd.error"
CODE_TAG = "kdd.code_version"


def retry_concurrent(write: Callable[..., Any], *args: Any, attempts: int = 4, **kwargs: Any) -> Any:
    """``write(*args, **kwargs)``, again when the store refused it as a duplicate key. MLflow's SQL store looks a
    row up and then inserts it (a tag, a latest metric, a dataset), so of two processes writing the same row of
    a shared run at the same moment one may be refused; the next attempt finds the row and updates it."""
    for attempt in range(attempts):
        try:
            return write(*args, **kwargs)
        except MlflowException as exc:
            duplicate = "unique" in str(exc).lower() or "duplicate" in str(exc).lower()
            if not duplicate or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return None


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


class StoreUnavailable(RuntimeError):
    """The tracking store cannot be reached, opened or written."""


def check_store() -> None:
    """Fail at once, in one line, when the tracking store cannot be reached or its artifacts written.

    A tracking server gets one request without MLflow's retries (which would wait minutes before
    failing); a local store is opened and its artifact directory written to.
    """
    uri = mlflow.get_tracking_uri()
    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri, shown)
        return
    try:
        experiment = MlflowClient().get_experiment(mlflow.tracking.fluent._get_experiment_id() or "0")
    except Exception as exc:
        raise StoreUnavailable(f"tracking store {shown} cannot be opened: {first_line(exc)}") from None
    location = experiment.artifact_location if experiment else ""
    if location and urlparse(location).scheme in ("", "file"):  # a server or a cloud bucket checks its own
        directory = Path(local_file_uri_to_path(location))
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise StoreUnavailable(f"artifact store {directory} of {shown} is not writable: {exc}") from None


def _check_server(uri: str, shown: str) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, timeout=15, raise_on_status=False, params={"max_results": 1})
    except Exception as exc:
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", first_line(exc))  # "[Errno 111] Connection refused"
        reason = errno.group(0) if errno else first_line(exc)
        raise StoreUnavailable(f"tracking server {shown} is unreachable ({reason[:200]}); start it, or point "
                               "MLFLOW_TRACKING_URI at a running one") from None
    if response.status_code in (401, 403):
        raise StoreUnavailable(f"tracking server {shown} refused the request (HTTP {response.status_code}); set "
                               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if response.status_code != 200:
        raise StoreUnavailable(f"tracking server {shown} answered HTTP {response.status_code}: "
                               f"{response.text.strip()[:200]}")


def require_run(run_id: str, what: str = "run", stages: tuple[str, ...] = ()) -> Any:
    """The run ``run_id`` (of one of ``stages``, when given), or an error that names it and the store."""
    try:
        run = mlflow.get_run(run_id)
    except Exception:
        raise ArtifactError(f"{what} {run_id!r} not found in {redact(mlflow.get_tracking_uri())}") from None
    stage = run.data.tags.get(STAGE_TAG)
    if stages and stage not in stages:
        raise ArtifactError(f"run {run_id} is {'a kdd ' + stage if stage else 'not a kdd'} run; "
                            f"expected a {what} ({' or '.join(stages)})")
    return run


# Fields that say which run to continue, not how to compute: never params (they differ between the first
# call and a resumed one by design).
# Fields that say how or where a run executes, not what it computes: left out of its params (and of the
# parameters compared when a pipeline looks for a finished run to reuse).
CONTROL_FIELDS = {"run_id", "resume", "shards", "workers", "backend", "backend_config"}


def flat_params(config: BaseModel) -> dict[str, str]:
    """The config as MLflow params (strings; None becomes an empty string; URL passwords masked)."""
    return {k: "" if v is None else redact(str(v)) for k, v in config.model_dump().items() if k not in CONTROL_FIELDS}


def config_dict(config: BaseModel) -> dict[str, Any]:
    """The config as a dict for config.json, URL passwords masked."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in config.model_dump().items()}


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]+:)[^@\s]+@")


def redact(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``, anywhere in ``text``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}***@", text)


def same_value(logged: str, value: str) -> bool:
    """Whether a param already on a run (as `mlflow run` logged it) is this string value."""
    # `mlflow run` logs parameters shell-quoted ("''" for an empty string) and as typed ("0.010", "true").
    if logged in (value, shlex.quote(value)):
        return True
    if "," in logged or "," in value:  # a list typed with spaces ("0, 1"), which the config strips
        return [s.strip() for s in logged.split(",")] == [s.strip() for s in value.split(",")]
    if {logged.lower(), value.lower()} <= {"true"} or {logged.lower(), value.lower()} <= {"false"}:
        return True  # a boolean given as -P zca=true comes back from the config as True
    try:
        return float(logged) == float(value)
    except ValueError:
        return False


def given(params: dict[str, str], key: str) -> str | None:
    """A run's param ``key`` as given, or None where it was left unset (absent, empty, or `mlflow run`'s "''")."""
    value = params.get(key)
    return None if value is None or same_value(value, "") else value


def log_params(params: dict[str, object]) -> None:
    """Log params to the active run; ones it already has must agree (a resumed run cannot change them)."""
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    new = {}
    for key, value in params.items():
        value = "" if value is None else str(value)
        if key not in logged:
            new[key] = value
        elif not same_value(redact(logged[key]), value):  # `mlflow run` logs -P values as given, unmasked
            raise ValueError(f"run {run.info.run_id} has {key}={redact(logged[key])!r}; this call has {value!r}")
    if new:
        mlflow.log_params(new)


def generated_name(name: str) -> bool:
    """Whether ``name`` is one MLflow made up for a run created without a name (``bright-fox-123``)."""
    from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES

    parts = name.split("-")
    return len(parts) == 3 and parts[0] in _GENERATOR_PREDICATES and parts[1] in _GENERATOR_NOUNS \
        and parts[2].isdigit()


def default_experiment(name: str) -> str | None:
    """The id of experiment ``name`` (created if missing) for a new run, or None where the user chose one
    (``mlflow.set_experiment`` in this process, MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID)."""
    if mlflow.tracking.fluent._active_experiment_id or os.environ.get("MLFLOW_EXPERIMENT_NAME") \
            or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return None
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException as exc:  # another worker created it a moment ago
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"experiment {name!r} is deleted: restore it (mlflow experiments restore --experiment-id "
                         f"{experiment.experiment_id}) or choose another with MLFLOW_EXPERIMENT_NAME")
    return experiment.experiment_id


@contextlib.contextmanager
def stage_run(stage: str, config: BaseModel, run_name: str | None = None, nested: bool = False,
              tags: dict[str, str] | None = None, run_id: str | None = None,
              resolved: BaseModel | None = None, experiment: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start the run of one stage (join the one ``mlflow run`` made, or reopen ``run_id``).

    A new run goes to ``experiment`` (default ``kdd-DATASET``) unless the user chose one; a joined run stays
    where it is and keeps the name its launcher gave it (``proposal/seed0``), else gets ``run_name``.
    ``config`` (as asked) is logged as params; ``resolved`` (budget values filled in), or ``config``,
    as config.json. A failure inside ends the run FAILED with the one-line reason as a tag.
    """
    if run_id is not None:
        require_run(run_id)
    if run_id or os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run(run_id=run_id, nested=nested)
        if generated_name(run.info.run_name):
            MlflowClient().update_run(run.info.run_id, name=run_name or stage)
    else:
        run = mlflow.start_run(run_name=run_name or stage, nested=nested,
                               experiment_id=default_experiment(experiment or f"kdd-{config.dataset}"))
    try:
        mlflow.set_tags({STAGE_TAG: stage, CODE_TAG: code_version(), **(tags or {})})
        log_params(flat_params(config))
        mlflow.log_dict(config_dict(resolved or config), "config.json")
        yield run
    except BaseException as exc:
        mlflow.set_tag(ERROR_TAG, first_line(exc)[:5000])
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


def download(run_id: str, path: str, dst: str | Path) -> Path:
    """Download one artifact of a run into ``dst``, with an error that names the run and the file."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))
    except Exception as exc:
        raise ArtifactError(f"run {run_id}: cannot fetch artifact {path!r}: {first_line(exc)}") from None


@contextlib.contextmanager
def fetched(run_id: str, path: str, dst: str | Path | None = None) -> Iterator[Path]:
    """One artifact of a run, local while the block runs: in ``dst``, or in a temporary directory removed after it.
    MLflow downloads into a fresh temporary directory of its own where no destination is given and never removes
    it, so every read of a whitened run's 75 MB input space used to leave a copy behind."""
    if dst is not None:
        yield download(run_id, path, dst)
        return
    with tempfile.TemporaryDirectory(prefix="kdd-artifact-") as tmp:
        yield download(run_id, path, tmp)


def load_json(run_id: str, path: str, dst: str | Path | None = None) -> dict:
    """A JSON artifact (a spec or manifest) as a dict, or an error that names the run and the file."""
    try:
        with fetched(run_id, path, dst) as local:
            loaded = json.loads(local.read_text())
    except ArtifactError:
        raise
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"run {run_id}: {path} is unreadable: {first_line(exc)}") from None
    if not isinstance(loaded, dict):
        raise ArtifactError(f"run {run_id}: {path} holds {type(loaded).__name__}, not an object")
    return loaded


def load_tensors(run_id: str, path: str, dst: str | Path | None = None) -> dict[str, torch.Tensor]:
    """A safetensors artifact (never unpickled), or an error that names the run and the file."""
    with fetched(run_id, path, dst) as local:
        try:
            return load_file(str(local))
        except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
            raise ArtifactError(f"run {run_id}: {path} is unreadable: {first_line(exc)}") from None
