"""An MLflow Projects backend that runs an entry point as a Slurm batch job.

Registered as ``slurm`` through the ``mlflow.project_backend`` entry point, so ``mlflow run . -e distill
--backend slurm --backend-config slurm.json`` and ``kdd combined --backend slurm`` both use it.

The run is created here (as the local backend does), then one ``sbatch`` script is written and submitted:
``#SBATCH`` lines from the backend config, the run's identity (``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_ID``),
the environment's activation, and ``exec`` of the entry point's command, so ``scancel``'s SIGTERM reaches
the stage, which ends its run KILLED. The job inherits the submitting environment (sbatch's default
``--export=ALL``): the tracking URI and credentials travel that way and are never written into the script.
The project directory, the interpreter (``env_manager=local``) and ``log_dir`` must be on a file system the
compute nodes share.

The run is tagged with the job id; its status follows the job's state (``scontrol``, then ``sacct`` once the
controller has forgotten the job), and a job that ended without the stage recording its end (cancelled while
pending, a time limit, a node failure) has its run ended KILLED or FAILED with the job's reason. When the job
ends, its output file is logged to the run as ``slurm/job-ID.out``.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.projects.backend.abstract_backend import AbstractBackend
from mlflow.projects.submitted_run import SubmittedRun
from mlflow.projects.utils import (
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    fetch_and_validate_project,
    get_entry_point_command,
    get_or_create_run,
    load_project,
)
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger(__name__)

JOB_TAG = "kdd.slurm.job_id"
STATE_TAG = "kdd.slurm.state"
ERROR_TAG = "kdd.error"  # the tag a stage records its failure under (kdd_mlflow.tracking.ERROR_TAG)

# Slurm job states (squeue/scontrol/sacct names) -> MLflow run status. COMPLETED means the stage exited 0,
# i.e. it finished its run; every other end is a failure except a cancellation.
PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT",
           "RESIZING", "SUSPENDED", "STOPPED"}
RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}
ENDED = {"COMPLETED": "FINISHED", "CANCELLED": "KILLED", "FAILED": "FAILED", "TIMEOUT": "FAILED",
         "NODE_FAIL": "FAILED", "OUT_OF_MEMORY": "FAILED", "BOOT_FAIL": "FAILED", "DEADLINE": "FAILED",
         "PREEMPTED": "FAILED", "REVOKED": "FAILED"}


class SlurmError(RuntimeError):
    """Slurm refused or does not answer (sbatch, scontrol, scancel)."""


class SlurmConfig(BaseModel):
    """The ``--backend-config`` of the slurm backend (a JSON object; every key optional)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(None, description="#SBATCH --partition")
    time: str | None = Field(None, description="#SBATCH --time, e.g. 02:00:00 or 1-00:00:00")
    gpus: int | None = Field(None, ge=0, description="#SBATCH --gpus (per job)")
    cpus_per_task: int | None = Field(None, ge=1, description="#SBATCH --cpus-per-task")
    mem: str | None = Field(None, description="#SBATCH --mem, e.g. 16G")
    account: str | None = Field(None, description="#SBATCH --account")
    qos: str | None = Field(None, description="#SBATCH --qos")
    sbatch: list[str] = Field(default_factory=list, description="more sbatch options, e.g. --constraint=a100")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the stage, e.g. module load")
    job_name: str = Field("kdd-{entry_point}", description="job name; {entry_point} is replaced")
    log_dir: str = Field("slurm-logs", description="where scripts and job output go (shared by the nodes)")
    poll_s: float = Field(5.0, gt=0, description="seconds between status queries")

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", v):
            raise ValueError(f"time {v!r} is not a Slurm time limit (MINUTES, HH:MM:SS or DAYS-HH:MM:SS)")
        return v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+[KMGT]?", v):
            raise ValueError(f"mem {v!r} is not a Slurm memory size (e.g. 4000, 16G)")
        return v

    @field_validator("sbatch")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for option in v:
            if not option.startswith("-") or "\n" in option:
                raise ValueError(f"sbatch option {option!r} must be one option starting with '-'")
        return v

    def directives(self, entry_point: str) -> list[str]:
        """The ``#SBATCH`` options of a job running ``entry_point`` (output and name included)."""
        options = [f"--job-name={self.job_name.replace('{entry_point}', entry_point)}",
                   f"--output={Path(self.log_dir).resolve()}/%x-%j.out"]
        for key in ("partition", "time", "gpus", "cpus_per_task", "mem", "account", "qos"):
            value = getattr(self, key)
            if value is not None:
                options.append(f"--{key.replace('_', '-')}={value}")
        return options + list(self.sbatch)


def parse_config(given: dict | None) -> SlurmConfig:
    """A backend config (``mlflow run`` reads the JSON file into a dict) as a ``SlurmConfig``; MLflow's own keys
    are ignored. Raises ValueError with one line naming what is wrong."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ValueError(f"slurm backend config must be a JSON object, not {type(given).__name__}")
    mlflow_keys = {k for k in given if k.isupper() or k.startswith("_") or k in ("build_image", "docker_auth")}
    try:
        return SlurmConfig(**{k: v for k, v in given.items() if k not in mlflow_keys})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"slurm backend config: {where}: {first['msg']}") from None


def check_available() -> None:
    """Fail in one line when this machine cannot submit jobs."""
    missing = [tool for tool in ("sbatch", "scontrol", "scancel") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"the slurm backend needs Slurm's client commands on PATH ({', '.join(missing)} not "
                           "found); run from a login node of the cluster")


def _slurm(*command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{command[0]}: {exc}") from None


def environment_lines(project, env_manager: str | None, work_dir: Path) -> list[str]:
    """Shell lines that put the project's environment in place inside the job.

    ``local``: this very interpreter (its directory first on PATH); ``virtualenv``/``uv``/``conda``: the
    environment MLflow builds for the project, created here before submission (on the shared file system)
    and activated in the job, as MLflow's local backend does."""
    from mlflow.utils import env_manager as managers

    if env_manager in (None, managers.LOCAL):
        return [f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\""]
    if env_manager in (managers.VIRTUALENV, managers.UV):
        from mlflow.utils.environment import _PythonEnv
        from mlflow.utils.virtualenv import _create_virtualenv, _get_mlflow_virtualenv_root, _get_virtualenv_name

        python_env = (_PythonEnv.from_conda_yaml(project.env_config_path) if project.env_type == "conda_env"
                      else _PythonEnv.from_yaml(project.env_config_path) if project.env_config_path
                      else _PythonEnv())
        env_dir = Path(_get_mlflow_virtualenv_root()) / _get_virtualenv_name(python_env, work_dir)
        return [_create_virtualenv(local_model_path=work_dir, python_env=python_env, env_dir=env_dir,
                                   env_manager=env_manager)]
    if env_manager == managers.CONDA:
        from mlflow.utils.conda import get_or_create_conda_env

        return list(get_or_create_conda_env(project.env_config_path).get_activate_command())
    raise ValueError(f"the slurm backend cannot use env_manager {env_manager!r}")


def render_script(cfg: SlurmConfig, entry_point: str, command: str, work_dir: Path, run_id: str,
                  experiment_id: str, environment: list[str]) -> str:
    """The sbatch script of one run."""
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in cfg.directives(entry_point)),
             f"# MLflow run {run_id} (experiment {experiment_id}), entry point {entry_point}",
             "set -e",
             f"export MLFLOW_RUN_ID={run_id} MLFLOW_EXPERIMENT_ID={shlex.quote(str(experiment_id))}",
             # as many compute threads as CPUs the job was given (PyTorch would otherwise start one per core of
             # the node, and jobs sharing a node would spin against each other); an explicit setting wins
             'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
             'export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"',
             f"cd {shlex.quote(str(work_dir))}",
             *cfg.setup, *environment,
             f"exec {command}", ""]
    return "\n".join(lines)


def submit(script: Path) -> str:
    """``sbatch SCRIPT``; the job id."""
    done = _slurm("sbatch", "--parsable", str(script))
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        raise SlurmError(f"sbatch refused the job: {said[-1] if said else f'exit code {done.returncode}'}")
    return done.stdout.strip().split(";")[0]


UNREACHABLE = "UNREACHABLE"  # the controller did not answer: the job's state is unknown for now, not changed


def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) of a job: from the controller, else from accounting once the controller has forgotten
    the job; ("UNKNOWN", why) when neither knows it; (UNREACHABLE, why) when the controller does not answer
    (restarting, overloaded), so the caller asks again later instead of taking the job for gone."""
    try:
        done = _slurm("scontrol", "show", "job", "-o", job_id)
    except SlurmError as exc:
        return UNREACHABLE, str(exc)
    if done.returncode == 0 and "JobState=" in done.stdout:
        fields = dict(f.split("=", 1) for f in done.stdout.split() if "=" in f)
        state = fields["JobState"]
        reason = fields.get("Reason", "None")
        if state in ENDED and state != "COMPLETED":
            reason = f"{reason}, exit code {fields.get('ExitCode', '?')}"
        return state, reason
    said = (done.stderr or done.stdout).strip()
    if "invalid job id" not in said.lower():
        return UNREACHABLE, said or f"scontrol exit code {done.returncode}"
    if shutil.which("sacct"):
        try:
            acct = _slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,Reason")
        except SlurmError as exc:
            return UNREACHABLE, str(exc)
        rows = [r.split("|") for r in acct.stdout.splitlines() if r.strip()] if acct.returncode == 0 else []
        if rows:
            state, code, reason = (rows[-1] + ["", ""])[:3]
            return state.split()[0], f"{reason or 'None'}, exit code {code}"
    return "UNKNOWN", said or "Slurm does not know the job"


class SlurmSubmittedRun(SubmittedRun):
    """An MLflow run executing as a Slurm job."""

    def __init__(self, run_id: str, job_id: str, output: Path, poll_s: float = 5.0):
        super().__init__()
        self._run_id = run_id
        self.job_id = job_id
        self.output = output  # the job's stdout and stderr
        self.poll_s = poll_s
        self.ended: str | None = None  # the job's final state, once seen
        self.last = RunStatus.to_string(RunStatus.SCHEDULED)  # what the job was when Slurm last answered

    @property
    def run_id(self) -> str:
        return self._run_id

    def get_status(self) -> str:
        if self.ended:
            return self._status_after(self.ended)
        state, reason = job_state(self.job_id)
        base = state.split("+")[0]
        if base == UNREACHABLE:
            log.warning("slurm job %s: the controller did not answer (%s); asking again", self.job_id, reason)
            return self.last
        if base in PENDING:
            self.last = RunStatus.to_string(RunStatus.SCHEDULED)
            return self.last
        if base in RUNNING:
            self.last = RunStatus.to_string(RunStatus.RUNNING)
            return self.last
        if base == "UNKNOWN":  # forgotten without accounting: the run's own record is all there is
            run_status = MlflowClient().get_run(self.run_id).info.status
            if run_status in ("RUNNING", "SCHEDULED"):
                self._end("FAILED", f"slurm job {self.job_id} is gone ({reason}) and its run never ended")
                return "FAILED"
            return run_status
        self._end(base, reason)
        return self._status_after(base)

    def _status_after(self, state: str) -> str:
        if state == "COMPLETED":
            return MlflowClient().get_run(self.run_id).info.status
        return ENDED.get(state, "FAILED")

    def _end(self, state: str, reason: str) -> None:
        """Once, when the job has ended: record its state, keep its output, and end a run the stage left open."""
        self.ended = state
        client = MlflowClient()
        client.set_tag(self.run_id, STATE_TAG, state)
        if self.output.is_file():
            try:
                client.log_artifact(self.run_id, str(self.output), "slurm")
            except Exception as exc:  # noqa: BLE001 (the output is a convenience; the run's status matters)
                log.warning("run %s: could not keep the output of slurm job %s: %s", self.run_id, self.job_id, exc)
        run = client.get_run(self.run_id)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            status = ENDED.get(state, "FAILED")
            if status != "KILLED" and ERROR_TAG not in run.data.tags:
                client.set_tag(self.run_id, ERROR_TAG, f"slurm job {self.job_id} ended {state} ({reason}); its "
                                                       f"output: {self.output}")
            client.set_terminated(self.run_id, "FAILED" if status == "FINISHED" else status)

    def wait(self) -> bool:
        while (status := self.get_status()) in ("RUNNING", "SCHEDULED"):
            time.sleep(self.poll_s)
        return status == "FINISHED"

    def cancel(self) -> None:
        """``scancel`` the job and wait (up to a minute) until Slurm says it ended."""
        if self.ended:
            return
        done = _slurm("scancel", self.job_id)
        if done.returncode != 0:
            log.warning("scancel %s: %s", self.job_id, done.stderr.strip())
        deadline = time.monotonic() + 60
        while self.get_status() in ("RUNNING", "SCHEDULED") and time.monotonic() < deadline:
            time.sleep(min(self.poll_s, 1.0))


class SlurmBackend(AbstractBackend):
    """``mlflow run --backend slurm``: see the module's documentation."""

    def run(self, project_uri, entry_point, params, version, backend_config, tracking_uri, experiment_id):
        backend_config = backend_config or {}
        cfg = parse_config(backend_config)
        check_available()
        work_dir = Path(fetch_and_validate_project(project_uri, version, entry_point, params)).resolve()
        project = load_project(str(work_dir))
        run = get_or_create_run(None, project_uri, experiment_id, str(work_dir), version, entry_point, params)
        run_id = run.info.run_id
        client = MlflowClient()
        try:
            env_manager = backend_config.get(PROJECT_ENV_MANAGER)
            command = " ".join(get_entry_point_command(project, entry_point, params,
                                                       backend_config.get(PROJECT_STORAGE_DIR)))
            environment = environment_lines(project, env_manager, work_dir)
            logs = Path(cfg.log_dir).resolve()
            logs.mkdir(parents=True, exist_ok=True)
            script = logs / f"kdd-{entry_point}-{run_id}.sbatch"
            script.write_text(render_script(cfg, entry_point, command, work_dir, run_id, experiment_id, environment))
            job_id = submit(script)
        except Exception as exc:
            client.set_tag(run_id, ERROR_TAG, f"slurm backend: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            client.set_terminated(run_id, "FAILED")
            raise
        job_name = cfg.job_name.replace("{entry_point}", entry_point)
        client.set_tag(run_id, JOB_TAG, job_id)
        client.set_tag(run_id, "mlflow.project.env", env_manager or "local")
        log.info("run %s: slurm job %s (%s)", run_id, job_id, script)
        return SlurmSubmittedRun(run_id, job_id, logs / f"{job_name}-{job_id}.out", cfg.poll_s)


def backend() -> SlurmBackend:
    """The ``mlflow.project_backend`` entry point."""
    return SlurmBackend()

