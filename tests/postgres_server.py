"""A real PostgreSQL server for the tests, from Debian's postgresql package.

:class:`PostgresServer` runs ``initdb`` and ``postgres`` in a temporary directory,
listening only on a Unix socket in that (private) directory, as an unprivileged user
(``nobody``, through ``setpriv``) when the tests run as root, since PostgreSQL refuses
to run as root.  Each test gets its own database (:meth:`PostgresServer.new_database`).
Durability is off (fsync, synchronous_commit): the tests check logic, not crashes of
the database server.

If the binaries are missing, :func:`postgres_binaries` fails in CI (``CI`` set) and
skips elsewhere with the package to install.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

PACKAGE = "postgresql"      # Debian's; scripts/setup.sh installs it with the test packages


def postgres_binaries() -> Path:
    """The bin directory of the newest installed PostgreSQL (``/usr/lib/postgresql/N/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    env_bin = os.environ.get("SMSBLOCK_PG_BIN")
    if env_bin and (Path(env_bin) / "postgres").is_file():
        return Path(env_bin)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    if which:
        return Path(which).parent
    message = (f"PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/postgres); "
               f"install Debian's {PACKAGE} package (scripts/setup.sh --debug does)")
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _free_port() -> int:
    # the port only names the socket file (.s.PGSQL.PORT); free on loopback for clarity
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One postgres process over a fresh cluster; :meth:`stop` removes everything."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="smsblock-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.port = _free_port()
        self.user = "postgres"
        self._names = itertools.count(1)
        self._as_user: list[str] = []
        self._shared: str | None = None
        if os.geteuid() == 0:
            # postgres refuses root: run it as nobody on a directory nobody owns
            self._as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            os.chown(self.root, 65534, 65534)
        os.chmod(self.root, 0o700)
        self.proc: subprocess.Popen | None = None
        try:
            self._run_as(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                         "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
            os.makedirs(self.socket_dir, mode=0o700)
            if self._as_user:
                os.chown(self.socket_dir, 65534, 65534)
            self.log = open(self.root / "postgres.log", "wb")
            self.proc = subprocess.Popen(
                [*self._as_user, str(self.bin / "postgres"), "-D", str(self.data),
                 "-p", str(self.port), "-k", str(self.socket_dir), "-c", "listen_addresses=",
                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _run_as(self, *cmd: str) -> None:
        proc = subprocess.run([*self._as_user, *cmd], capture_output=True, text=True,
                              cwd=self.root, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout}")

    def _wait_ready(self, timeout: float = 30) -> None:
        import psycopg
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): "
                                   f"{(self.root / 'postgres.log').read_text()[-2000:]}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def url(self, dbname: str) -> str:
        """A connection URL for ``dbname`` over the server's Unix socket."""
        return (f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}"
                f"&port={self.port}")

    def new_database(self) -> str:
        """A new, empty database; returns its URL."""
        import psycopg
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def new_schema(self) -> str:
        """A new, empty schema of the shared database ``smsblock`` (a few ms, where a
        database takes tens); returns the URL that makes it the connection's own."""
        import psycopg
        if not self._shared:
            self._shared = self.new_database()
        name = f"s{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self._shared, autocommit=True) as db:
            db.execute(f"CREATE SCHEMA {name}")
        return f"{self._shared}&options=-csearch_path%3D{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # immediate shutdown: no checkpoint (the cluster is deleted next), no waiting
            # for sessions a test left open
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def state_target(state) -> tuple[str, dict[str, str]]:
    """What a subprocess gives as ``--state`` (or ``SmsService(...)``) to open the same
    state as ``state`` (a :class:`smsblock.service.state.State`), and the environment it
    needs: the directory, or the database URL with the local directory."""
    if state.dialect == "sqlite":
        return str(state.dir), {}
    return state._url, {"SMSBLOCK_HOME": str(state.dir)}
