"""Where stage runs execute, through MLflow Projects backends.

``local``: a process on this machine (MLflow's local backend). ``slurm``: one batch job per run (this
package's backend, ``kdd_mlflow.backends.slurm``, registered as an ``mlflow.project_backend`` plugin).
``kubernetes``: one Kubernetes Job per run (MLflow's built-in backend), from the docker_env variant of the
MLproject in ``deploy/kubernetes`` (``kdd_mlflow.mlproject --docker IMAGE`` renders it).

    backend = backends.load("slurm", "deploy/slurm/backend.json")   # checked before any work
    submitted = backend.submit("distill", params, experiment_id, run_name, env_manager="local")
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.plugins import get_entry_points
from pydantic import BaseModel

from kdd_mlflow import schedule, tracking
from kdd_mlflow.runtime import first_line

log = logging.getLogger(__name__)

BACKENDS = ("local", "slurm", "kubernetes")
KUBERNETES_DIR = Path("deploy") / "kubernetes"  # under the project directory


def project_dir() -> Path:
    """The directory holding the MLproject file the stages run from."""
    for candidate in (os.environ.get("KDD_PROJECT_DIR"), Path(__file__).resolve().parents[2], Path.cwd()):
        if candidate and (Path(candidate) / "MLproject").is_file():
            return Path(candidate)
    raise FileNotFoundError("stages run from the project directory (MLproject); run from a checkout or set "
                            "KDD_PROJECT_DIR")


def use_this_interpreter() -> None:
    """Stages started with the local environment manager run ``python -m ...``: this interpreter's."""
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@dataclass(frozen=True)
class Backend:
    """A backend and its configuration, validated."""

    name: str = "local"
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        """Runs share this machine's cores (a cluster gives each job its own)."""
        return self.name == "local"

    @property
    def poll_s(self) -> float:
        """Seconds between status checks of started runs: a local process's is one system call, a cluster's a
        query to its controller."""
        return 0.5 if self.local else 2.0

    def describe(self) -> str:
        return self.name if self.local else f"{self.name} ({', '.join(f'{k}={v}' for k, v in self.config.items())})"

    def project(self) -> Path:
        """The project the stages run from: the checkout, or its docker_env variant for Kubernetes."""
        root = project_dir()
        return root / KUBERNETES_DIR if self.name == "kubernetes" else root

    def submit(self, entry_point: str, params: dict[str, str], experiment_id: str, run_name: str,
               env_manager: str | None):
        """Start ``entry_point`` asynchronously; its ``mlflow.projects.SubmittedRun``."""
        # the local backend starts `mlflow run --experiment-id ...`, which refuses an experiment name beside it
        named = os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
        try:
            if self.local and env_manager == "local":
                return start_local(self.project(), entry_point, params, experiment_id, run_name)
            return mlflow.projects.run(
                str(self.project()), entry_point=entry_point, parameters=params, experiment_id=experiment_id,
                env_manager=None if self.name == "kubernetes" else env_manager, run_name=run_name,
                backend=self.name, backend_config=dict(self.config) or None, synchronous=False,
            )
        finally:
            if named is not None:
                os.environ["MLFLOW_EXPERIMENT_NAME"] = named


def start_local(project: Path, entry_point: str, params: dict[str, str], experiment_id: str, run_name: str):
    """Start ``entry_point`` in this environment as MLflow's local backend does (the same run, tags and command),
    without the ``mlflow run`` process that ``mlflow.projects.run(synchronous=False)`` puts between: that process
    cost each stage about two seconds before its own began. The stage's process leads its own process group, so
    cancelling it stops all it started."""
    from mlflow.projects import utils as project_utils
    from mlflow.projects.submitted_run import LocalSubmittedRun
    from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_BACKEND, MLFLOW_RUN_NAME

    work_dir = project_utils.fetch_and_validate_project(str(project), None, entry_point, params)
    spec = project_utils.load_project(work_dir)
    run = project_utils.get_or_create_run(None, str(project), experiment_id, work_dir, None, entry_point, params)
    run_id = run.info.run_id
    client = MlflowClient()
    client.set_tag(run_id, MLFLOW_PROJECT_BACKEND, "local")
    client.set_tag(run_id, MLFLOW_RUN_NAME, run_name)
    command = " ".join(project_utils.get_entry_point_command(spec, entry_point, params, None))
    env = {**os.environ, **project_utils.get_run_env_vars(run_id, experiment_id)}
    log.info("%s: %s", run_name, command)
    process = subprocess.Popen(["bash", "-c", command], cwd=work_dir, env=env, start_new_session=True)
    return LocalSubmittedRun(run_id, process)


def read_config(path: str | None, backend: str) -> dict[str, Any]:
    if not path:
        return {}
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{backend} backend config {path}: {exc.strerror or first_line(exc)}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{backend} backend config {path} is not JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{backend} backend config {path} must hold a JSON object")
    return loaded


def load(name: str, config_path: str | None = None) -> Backend:
    """The backend ``name`` with the config in ``config_path`` (JSON), checked now, before any work: a
    ValueError or RuntimeError with one line says what is wrong."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use {', '.join(BACKENDS)}")
    config = read_config(config_path, name)
    if name == "local":
        if config:
            raise ValueError("the local backend takes no backend config")
        return Backend()
    if name == "slurm":
        from kdd_mlflow.backends import slurm

        slurm.parse_config(config)
        slurm.check_available()
        registered = {e.name for e in get_entry_points("mlflow.project_backend")}
        if "slurm" not in registered:
            raise RuntimeError("the slurm backend is not registered with MLflow; reinstall kdd-mlflow "
                               "(pip install -e .) so its mlflow.project_backend entry point exists")
        return Backend("slurm", config)
    from kdd_mlflow.backends import kubernetes

    return Backend("kubernetes", kubernetes.check_config(config, Path(config_path).parent if config_path else None))


class StageFailed(RuntimeError):
    """A stage's run ended FAILED (its reason is in the message)."""


class StageRun:
    """A stage started asynchronously (``schedule.Handle``). Its run's status in the tracking store is
    settled when its process or job ends or is cancelled, for a stage that ended before it could record it
    (killed during start-up, say), as ``mlflow.projects`` does for synchronous runs."""

    def __init__(self, submitted):
        self.submitted = submitted

    @property
    def run_id(self) -> str:
        return self.submitted.run_id

    def get_status(self) -> str:
        status = self.submitted.get_status()
        if status not in ("RUNNING", "SCHEDULED"):
            self.settle(status)
        return status

    def cancel(self) -> None:
        self.submitted.cancel()
        self.settle("KILLED")

    def settle(self, status: str) -> None:
        client = MlflowClient()
        if client.get_run(self.run_id).info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(self.run_id, status)


def failure_reason(run_id: str) -> str:
    """Why a stage run failed: the reason it recorded, else its status."""
    run = MlflowClient().get_run(run_id)
    if tracking.ERROR_TAG in run.data.tags:
        return f"run {run_id}: {run.data.tags[tracking.ERROR_TAG]}"
    return f"run {run_id} ended {run.info.status} without recording a reason (see its stage's output above)"


def run_all(backend: Backend, entry_point: str, runs: dict[str, dict[str, str]], experiment_id: str,
            env_manager: str | None, jobs: int | None = None) -> dict[str, str]:
    """Start one run of ``entry_point`` per item of ``runs`` (run name -> parameters), at most ``jobs`` at a
    time (None: all at once), and wait for all; their run ids by name. The first failure cancels the
    others and raises StageFailed with its reason; so does an interrupt (KeyboardInterrupt)."""
    def launch(name: str, params: dict[str, str], _done: dict[str, str]) -> StageRun:
        try:
            return StageRun(backend.submit(entry_point, params, experiment_id, name, env_manager))
        except mlflow.projects.ExecutionException as exc:
            raise StageFailed(f"{entry_point} run {name} could not start: {first_line(exc)}") from None

    tasks = [schedule.Task(name, (), partial(launch, name, params)) for name, params in runs.items()]
    try:
        return schedule.run(tasks, jobs, poll_s=backend.poll_s)
    except schedule.TaskFailed as exc:
        raise StageFailed(f"{entry_point} run {exc.key} failed: {failure_reason(exc.run_id)}") from None


def start_copies(cfg: BaseModel, entry_point: str, option: str, backend: Backend, runs: dict[str, dict[str, str]],
                 experiment: str, env_manager: str | None) -> dict[str, str]:
    """Runs of the command's own ``entry_point`` (``experts --shards``, ``tune --workers``): ``cfg``'s parameters
    (its control fields left out), each item of ``runs`` (run name -> parameters) on top, started on ``backend``
    and waited for (``run_all``) in experiment ``experiment`` unless the user chose one. ``option`` names the
    command option in the refusal to start them from inside an MLflow run."""
    if mlflow.active_run() or os.environ.get("MLFLOW_RUN_ID"):
        raise ValueError(f"{option} starts runs of its own; run it with kdd {entry_point}, not inside an MLflow run")
    params = {k: "" if v is None else str(v) for k, v in cfg.model_dump().items() if k not in tracking.CONTROL_FIELDS}
    experiment_id = tracking.default_experiment(experiment) or mlflow.tracking.fluent._get_experiment_id()
    return run_all(backend, entry_point, {name: {**params, **extra} for name, extra in runs.items()}, experiment_id,
                   env_manager)
