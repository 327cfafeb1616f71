"""Real services for the scale-out tests: a PostgreSQL server and an MLflow tracking server, each started
on a free loopback port in a temporary folder and stopped (with its whole process group) afterwards.

PostgreSQL refuses to run as root, which is what CI runs as: as root, its commands run as the `postgres`
user (Debian's package creates it) through `runuser`, in a data folder that user owns. Nothing here is
mocked; `postgres_absent()` says why the tests that need PostgreSQL cannot run, and `.ci/run` makes sure
that never happens on CI.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "postgres"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_bound(port: int) -> bool:
    """Whether something still listens on (or holds) 127.0.0.1:port. Connections the server closed linger
    in TIME_WAIT for a minute; they hold nothing (SO_REUSEADDR binds past them, as servers do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def postgres_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


def _run_as_service_user() -> bool:
    return os.geteuid() == 0


def postgres_absent() -> str | None:
    """None when a PostgreSQL server can be started here; else why not (the skip reason)."""
    if postgres_bin_dir() is None:
        return "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); .ci/run installs it"
    if _run_as_service_user():
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return f"running as root and there is no {SERVICE_USER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


def _as_service_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", SERVICE_USER, "--", *command] if _run_as_service_user() else command


def stop_process_group(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM a server's process group, SIGKILL it if it lingers, and reap the leader."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # Workers of the group may outlive the leader: make sure none is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@dataclass
class Postgres:
    """A PostgreSQL server of the test session: `database(name)` creates a database and gives its URL."""

    folder: Path
    port: int
    bin_dir: Path
    user: str = "workbench"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        """A new, empty database `name` (dropped first if it exists); returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self) -> None:
        log = self.folder / "postgres.log"
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        subprocess.run(_as_service_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(log),
                                         "-o", options, "-w", "-t", str(int(START_TIMEOUT_S)), "start"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        subprocess.run(_as_service_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                                         "-w", "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def postgres_server():
    """A fresh PostgreSQL cluster on a free loopback port (trust authentication, loopback only), removed
    with its folder on exit."""
    bin_dir = postgres_bin_dir()
    assert bin_dir is not None, postgres_absent()
    # Not under pytest's tmp folder: that one is private to root, and the server runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="workbench-pg-"))
    if _run_as_service_user():
        account = pwd.getpwnam(SERVICE_USER)
        os.chown(folder, account.pw_uid, account.pw_gid)
    server = Postgres(folder, free_port(), bin_dir)
    try:
        subprocess.run(_as_service_user([str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", server.user,
                                         "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for attempt in range(3):  # another process may take the free port before the server binds it
            try:
                server.start()
                break
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
                server.port = free_port()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class MlflowServer:
    """`mlflow server` on loopback with proxied artifacts; `stop()` and `start()` again keep its store."""

    backend_uri: str
    artifacts: Path
    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        # No job runner: the workbench never submits server jobs, and it costs four worker processes.
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                 "--artifacts-destination", str(self.artifacts), "--serve-artifacts", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}): {self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} not ready after {START_TIMEOUT_S:.0f} s: "
                           f"{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, folder: Path):
    """An MLflow tracking server over `backend_uri`, artifacts proxied into `folder`/artifacts."""
    folder.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(backend_uri, folder / "artifacts", free_port(), folder / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
