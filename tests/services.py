"""Real services for the team-deployment tests: a private PostgreSQL cluster and an `mlflow server`.

The topology is docker/compose.yaml's without containers: PostgreSQL holds MLflow's tracking store,
its basic-auth users and the Optuna storage; the tracking server listens on 127.0.0.1 only, serves
the artifacts and asks for a user and password; nothing secret is written into a URL.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass
class Finished:
    """What a ``kdd`` command that exited 0 left: the run id it printed, its stdout and its log."""
    run_id: str
    out: str
    err: str


def start_kdd(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """``kdd ARGS`` in the background, output captured, progress bars off."""
    return subprocess.Popen([str(BIN / "kdd"), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**(env or os.environ), "TQDM_DISABLE": "1"})


def finish(*processes: subprocess.Popen, timeout: float = 900) -> list[Finished]:
    """Wait for every process; each must exit 0."""
    outputs = [p.communicate(timeout=timeout) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [Finished(printed_run_id(out), out, err) for out, err in outputs]


def printed_run_id(stdout: str) -> str:
    """The run id a ``kdd`` command prints last (``run_id: ...``)."""
    return stdout.strip().split("run_id: ")[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and shutil.which("pg_config"):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        found = [f"{bindir}/initdb"] if Path(bindir, "initdb").is_file() else []
    if not found:
        raise RuntimeError("PostgreSQL's server binaries are missing: apt-get install postgresql "
                           "(bash setup.sh --dev does it as root)")
    return Path(found[-1]).parent


def wait_for_health(base: str, server: subprocess.Popen, log: Path | None = None, seconds: float = 120) -> None:
    """Return once ``base``/health answers; fail if the server exits or stays silent for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-3000:] if log else ''}")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer /health in {seconds:.0f} s")


@dataclass
class Postgres:
    port: int
    user: str
    password: str

    def url(self, database: str) -> str:
        """A URL without the password: libpq (psycopg) takes it from PGPASSWORD."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def postgres(databases: tuple[str, ...], password: str) -> Iterator[Postgres]:
    """A throw-away cluster on 127.0.0.1 with password authentication and ``databases`` created."""
    bindir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="kdd-postgres-"))  # not under pytest's tmp: its owner may not enter that
    as_owner: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the cluster belongs to the postgres user
        as_owner = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    (root / "pwfile").write_text(password + "\n")
    if as_owner:
        shutil.chown(root / "pwfile", "postgres")
    data, port = root / "data", free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_owner, *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr.strip()[-2000:]}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "kdd", "--pwfile", str(root / "pwfile"),
            "-A", "scram-sha-256", "-E", "UTF8")
        (root / "pwfile").unlink()
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-w",
            "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start")
        try:
            import psycopg

            with psycopg.connect(host="127.0.0.1", port=port, user="kdd", password=password, dbname="postgres",
                                 autocommit=True) as conn:
                for name in databases:
                    conn.execute(f'CREATE DATABASE "{name}"')
            yield Postgres(port, "kdd", password)
        finally:
            subprocess.run([*as_owner, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(root: Path, pg: Postgres, admin_password: str, secret_key: str) -> Iterator[str]:
    """``mlflow server`` with the basic-auth app, its stores on ``pg``, bound to 127.0.0.1; yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    auth_ini = root / "basic_auth.ini"
    auth_ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {pg.url('mlflow_auth')}\n"
                        "admin_username = admin\nauth_cache_ttl_seconds = 60\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**os.environ, "PGPASSWORD": pg.password, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key}
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed below, after the server)
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2", "--backend-store-uri", pg.url("mlflow"), "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, server, root / "server.log")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
