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
import signal
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


@dataclass
class Slurm:
    """A running one-node cluster: its clients need ``SLURM_CONF``."""
    conf: Path
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def jobs(self) -> dict[str, str]:
        """Every job the controller remembers (finished ones included): id -> state."""
        done = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i %T"], capture_output=True, text=True,
                              env={**os.environ, **self.env}, check=True)
        return dict(line.split() for line in done.stdout.splitlines() if line.strip())


@contextlib.contextmanager
def slurm() -> Iterator[Slurm]:
    """A throw-away Slurm cluster of this machine alone, from Debian's packages: munged with its own key and
    socket, slurmctld and slurmd on 127.0.0.1 with their own ports, state and logs (nothing in /etc touched).
    Jobs are remembered for an hour (``squeue --states=all``) and logged to a job-completion file. As root:
    slurmd starts every job as its user."""
    tools = {name: shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
             for name in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise RuntimeError(f"Slurm is missing ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client "
                           "munge (bash setup.sh --dev does it as root)")
    if os.geteuid() != 0:
        raise RuntimeError("the test Slurm cluster needs root (slurmd starts jobs as their users)")
    root = Path(tempfile.mkdtemp(prefix="kdd-slurm-"))
    root.chmod(0o755)
    munge = root / "munge"
    munge.mkdir()
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (munge, key):
        shutil.chown(path, "munge", "munge")
    socket_path = munge / "munge.sock"
    host = socket.gethostname().split(".")[0]
    ctld_port, slurmd_port = free_port(), free_port()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=kddtest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}", "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root / 'jobcomp.log'}", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "MinJobAge=3600", "ReturnToService=2", "MpiDefault=none", "KillWait=10",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}

    def start(*command: str) -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout).strip()[-2000:]}")

    try:
        start("runuser", "-u", "munge", "--", tools["munged"], f"--socket={socket_path}", f"--key-file={key}",
              f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
              f"--seed-file={munge / 'munged.seed'}")
        start(tools["slurmctld"], "-f", str(conf))
        start(tools["slurmd"], "-f", str(conf))
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                break
            if time.monotonic() > deadline:
                said = (root / "slurmd.log").read_text()[-2000:] if (root / "slurmd.log").exists() else ""
                raise RuntimeError(f"the Slurm node did not come up (state {state!r}): {said}")
            time.sleep(0.5)
        yield Slurm(conf, root)
    finally:
        subprocess.run(["scancel", "--user", "root"], capture_output=True, env=env)
        subprocess.run(["scontrol", "shutdown"], capture_output=True, env=env)
        for pid_file in (root / "slurmctld.pid", root / "slurmd.pid", munge / "munged.pid"):
            stop(pid_file)
        shutil.rmtree(root, ignore_errors=True)


def stop(pid_file: Path, seconds: float = 10) -> None:
    """SIGTERM the daemon whose pid the file holds, and wait until it is gone."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
