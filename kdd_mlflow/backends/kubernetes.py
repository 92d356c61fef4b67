"""MLflow's built-in kubernetes backend, as the pipeline uses it.

MLflow builds an image FROM the project's ``docker_env`` image with the project directory copied in,
pushes it to ``repository-uri``, and runs each stage as a Job made from ``kube-job-template-path`` (the
container's image, command and MLFLOW_* environment filled in). The project is the docker_env variant of
the MLproject in ``deploy/kubernetes`` (its commands call the ``kdd`` installed in the image), rendered by
``python -m kdd_mlflow.mlproject --docker IMAGE``. The tracking URI the Jobs use is the submitting one, or
``KUBE_MLFLOW_TRACKING_URI`` when the cluster reaches the server under another address.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REQUIRED = ("kube-job-template-path", "repository-uri")
KNOWN = (*REQUIRED, "kube-context")


def check_config(config: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """The backend config with the job template's path made absolute (relative paths are taken from the
    current directory, then from ``base``, the config file's directory), checked: the keys MLflow reads and a
    template that is a batch/v1 Job with one container. ValueError with one line otherwise."""
    unknown = sorted(set(config) - set(KNOWN))
    if unknown:
        raise ValueError(f"kubernetes backend config: unknown key(s) {unknown}; use {', '.join(KNOWN)}")
    missing = [k for k in REQUIRED if not config.get(k)]
    if missing:
        raise ValueError(f"kubernetes backend config: {', '.join(missing)} missing")
    template = Path(config["kube-job-template-path"])
    if not template.is_file() and base is not None and (base / template).is_file():
        template = base / template
    if not template.is_file():
        raise ValueError(f"kubernetes backend config: job template {template} not found")
    load_template(template)
    return {**config, "kube-job-template-path": str(template.resolve())}


def load_template(path: Path) -> dict[str, Any]:
    """The job template, checked as MLflow fills it in: a Job whose pod spec has at least one container."""
    try:
        job = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"kubernetes job template {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(job, dict) or job.get("kind") != "Job" or job.get("apiVersion") != "batch/v1":
        raise ValueError(f"kubernetes job template {path}: must be a batch/v1 Job")
    containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
    if not isinstance(job.get("metadata"), dict) or not containers or not isinstance(containers[0], dict):
        raise ValueError(f"kubernetes job template {path}: needs metadata and spec.template.spec.containers[0]")
    return job


def job_definition(template: dict[str, Any], project_name: str, image: str, digest: str, command: list[str],
                   env: dict[str, str]) -> Any:
    """The Job MLflow would create (its own function fills the template in), parsed into the Kubernetes
    client's ``V1Job`` model, which checks field names, types and required fields offline."""
    from kubernetes.client import ApiClient
    from mlflow.projects.kubernetes import _get_kubernetes_job_definition

    filled = _get_kubernetes_job_definition(project_name, image, digest, command, dict(env), template)

    class Response:  # what ApiClient.deserialize reads
        data = json.dumps(filled)

    return ApiClient().deserialize(Response(), "V1Job")
