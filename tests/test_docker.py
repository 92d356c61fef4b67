"""Static checks of docker/: no Docker engine runs here, so the files are checked as far as they can be
without one, and the topology they describe is the one test_team.py runs without containers."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kdd_mlflow import cli
from tests import test_team

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def substitute(text: str) -> str:
    """Compose's ${VAR:-default} with every variable unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def test_compose_file_is_valid_for_compose():
    tool = (["docker-compose"] if shutil.which("docker-compose") else
            ["docker", "compose"] if shutil.which("docker") and subprocess.run(
                ["docker", "compose", "version"], capture_output=True).returncode == 0 else None)
    if tool is None:
        pytest.skip("no docker-compose or docker compose plugin (bash setup.sh --dev installs docker-compose)")
    done = subprocess.run([*tool, "-f", str(DOCKER / "compose.yaml"), "config", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_compose_services_and_readme_agree():
    services = set(compose()["services"])
    assert services == {"postgres", "mlflow", "worker", "worker-gpu"}
    readme = (ROOT / "README.md").read_text().split("## Scale out", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(postgres|mlflow|worker(?:-gpu)?)`", readme))
    assert named == services  # the README describes every service, and only those


def test_ports_bind_loopback_and_no_secret_is_inline():
    spec = compose()
    for name, service in spec["services"].items():
        for port in service.get("ports", []):
            assert substitute(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        text = yaml.safe_dump(service)
        assert not re.search(r"postgresql://[^@/\s]*:[^@/\s]*@", text), f"{name} has a password in a URL"
        for key in service.get("environment", {}):
            assert "PASSWORD" not in key or key.endswith("_FILE"), f"{name} sets {key} inline; use a secret"
    assert set(spec["secrets"]) == {"pg_password", "mlflow_admin_password", "mlflow_secret_key",
                                    "mlflow_tracking_password"}
    assert all(s["file"].startswith("./secrets/") for s in spec["secrets"].values())
    assert "docker/secrets/" in (ROOT / ".gitignore").read_text().splitlines()


def test_service_commands_parse_with_the_cli():
    spec = compose()
    for name in ("worker", "worker-gpu"):
        command = [substitute(part) for part in spec["services"][name]["command"]]
        assert command[:2] == ["kdd", "tune"]
        # parse (no run): a misspelt option or a bad value fails here, not on the team's machines
        ctx = cli.main.make_context("kdd", command[1:], resilient_parsing=False)
        sub = cli.main.get_command(ctx, command[1])
        values = sub.make_context(command[1], command[2:]).params
        cli.build_config("tune", cli.STAGES["tune"], values)
    server = [substitute(part) for part in spec["services"]["mlflow"]["command"]]
    assert server[:2] == ["mlflow", "server"] and "--app-name=basic-auth" in server
    help_text = CliRunner().invoke(__import__("mlflow.cli", fromlist=["cli"]).cli, ["server", "--help"]).output
    for option in server[2:]:
        assert option.split("=")[0] in help_text, f"mlflow server has no {option}"


def test_databases_and_auth_config_match_the_tested_topology():
    created = re.findall(r"CREATE DATABASE (\w+);", (DOCKER / "postgres-init.sql").read_text())
    assert sorted(created) == sorted(test_team.DATABASES)
    used = set(re.findall(r"postgresql://kdd@postgres/(\w+)", (DOCKER / "compose.yaml").read_text()
                          + (DOCKER / "basic_auth.ini").read_text()))
    assert used == set(created)
    auth = configparser.ConfigParser()
    auth.read(DOCKER / "basic_auth.ini")
    assert auth["mlflow"]["database_uri"].endswith("/mlflow_auth") and "admin_password" not in auth["mlflow"]


def test_dockerfile_builds_from_files_that_exist():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)  # CPU by default
    assert re.search(r"^USER kdd$", text, re.M)  # not root
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _ = shlex.split(line)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    entry = DOCKER / "entrypoint.sh"
    assert entry.stat().st_mode & 0o111 and subprocess.run(["sh", "-n", str(entry)]).returncode == 0
    gpu = compose()["services"]["worker-gpu"]
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX"] and gpu["profiles"] == ["gpu"]


def test_entrypoint_turns_secret_files_into_variables(tmp_path):
    """The entrypoint reads /run/secrets/NAME; here the same script reads a copy pointed at tmp_path."""
    script = (DOCKER / "entrypoint.sh").read_text().replace("/run/secrets/", f"{tmp_path}/")
    (tmp_path / "entry.sh").write_text(script)
    (tmp_path / "pg_password").write_text("s3cret\n")
    show = 'echo "$PGPASSWORD|${MLFLOW_AUTH_ADMIN_PASSWORD:-}"'
    done = subprocess.run(["sh", str(tmp_path / "entry.sh"), "sh", "-c", show], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "s3cret|"
