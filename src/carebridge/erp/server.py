"""Create Tryton databases and run a trytond server as a child process.

This drives the ``trytond`` and ``trytond-admin`` scripts of an installed
trytond 8.2; nothing here imports trytond. The scripts are looked up next
to the running Python interpreter unless ``bin_dir`` names another folder.

Two facts about trytond 8.2.1 shape the runner:

* A server started without ``-d DATABASE`` refuses the first logins with
  the error ``'res.user'``, so :class:`TrytonServer` always preloads its
  database.
* SQLite databases run in WAL mode. A plain file copy next to a live
  ``-wal`` file gives a malformed database, so copy one only while no
  server has it open, with SQLite's backup API (:func:`copy_sqlite_database`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

from carebridge.erp.rpc import TrytonClient, TrytonError

log = logging.getLogger(__name__)

MODULES = (
    "account",
    "account_invoice",
    "analytic_account",
    "analytic_invoice",
    "analytic_purchase",
    "purchase",
    "purchase_request",
    "purchase_requisition",
    "stock",
    "carebridge",
)
"""Modules activated in a database set up for carebridge (with their dependencies)."""


class TrytonServerError(RuntimeError):
    """trytond or trytond-admin failed; the message ends with their output."""


def scripts_dir(bin_dir: Path | None = None) -> Path:
    """Return the folder holding ``trytond`` and ``trytond-admin``."""
    return bin_dir or Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True, slots=True)
class TrytonSite:
    """Where a trytond instance keeps its data and how it is reached.

    ``database_uri`` is ``sqlite://`` (databases are files
    ``data_dir/NAME.sqlite``) or ``postgresql://USER@HOST:PORT/``.
    ``data_dir`` also contains attachments, the configuration file and the
    server log.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    database_uri: str = "sqlite://"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "trytond.conf"

    @property
    def is_sqlite(self) -> bool:
        return self.database_uri.startswith("sqlite:")

    def sqlite_path(self, database: str) -> Path:
        """Return the file of SQLite database ``database``."""
        return self.data_dir / f"{database}.sqlite"

    def write_config(self) -> Path:
        """Write ``trytond.conf`` for this site and return its path."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "[database]",
            f"uri = {self.database_uri}",
            f"path = {self.data_dir}",
            "",
            "[web]",
            f"listen = {self.host}:{self.port}",
            "",
            "[session]",
            # The delivery engine logs in again when a session expires;
            # a long timeout keeps re-logins rare during long drains.
            "timeout = 86400",
            "",
        ]
        self.config_path.write_text("\n".join(lines), encoding="utf-8")
        return self.config_path

    def client(
        self,
        database: str,
        user: str = "admin",
        password: str = "admin",
        *,
        timeout: float = 120.0,
    ) -> TrytonClient:
        """Return a JSON-RPC client for ``database`` on this site."""
        return TrytonClient(
            self.host, self.port, database, user, password, timeout=timeout
        )


def create_database(
    site: TrytonSite,
    database: str,
    *,
    admin_password: str = "admin",
    admin_email: str = "admin@example.org",
    modules: Sequence[str] = MODULES,
    bin_dir: Path | None = None,
) -> None:
    """Create ``database`` with the ``admin`` user and activate ``modules``.

    For SQLite the file is created first (trytond expects it to exist).
    For PostgreSQL the database must already exist (``createdb``), empty.
    Takes about 20 s with the default modules on SQLite.

    Raises:
        TrytonServerError: trytond-admin failed.
    """
    site.write_config()
    if site.is_sqlite:
        site.sqlite_path(database).touch()
    password_file = site.data_dir / f".{database}.admin-password"
    password_file.write_text(admin_password + "\n", encoding="utf-8")
    password_file.chmod(0o600)
    admin = scripts_dir(bin_dir) / "trytond-admin"
    env = {**os.environ, "TRYTONPASSFILE": str(password_file)}
    steps = [
        ["--all", "--email", admin_email],
        ["-u", *modules, "--activate-dependencies"],
    ]
    try:
        for arguments in steps:
            command = [
                str(admin),
                "-c",
                str(site.config_path),
                "-d",
                database,
                *arguments,
            ]
            started = time.monotonic()
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                output = (done.stderr or done.stdout)[-2000:]
                raise TrytonServerError(
                    f"trytond-admin {' '.join(arguments[:2])} failed with "
                    f"status {done.returncode}:\n{output}"
                )
            log.info(
                "trytond-admin step finished",
                extra={
                    "action": "tryton_admin",
                    "database": database,
                    "step": arguments[0],
                    "seconds": round(time.monotonic() - started, 1),
                },
            )
    finally:
        password_file.unlink(missing_ok=True)


def copy_sqlite_database(source: Path, target: Path) -> None:
    """Copy a SQLite database with SQLite's backup API (safe with WAL files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    with sqlite3.connect(source) as origin, sqlite3.connect(target) as copy:
        origin.backup(copy)
    # sqlite3's context manager commits but does not close.
    origin.close()
    copy.close()


@dataclass
class TrytonServer:
    """One ``trytond`` process serving ``database`` of ``site``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The
    server's output goes to ``site.data_dir / "trytond.log"``.
    """

    site: TrytonSite
    database: str
    bin_dir: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log_file: IO[bytes] | None = field(default=None, init=False)

    @property
    def log_path(self) -> Path:
        return self.site.data_dir / "trytond.log"

    def start(self, *, timeout: float = 60.0) -> None:
        """Start trytond and wait until it responds to JSON-RPC calls.

        Raises:
            TrytonServerError: The process exited, or did not respond within
                ``timeout`` seconds.
        """
        if self.process is not None and self.process.poll() is None:
            return
        self.site.write_config()
        command = [
            str(scripts_dir(self.bin_dir) / "trytond"),
            "-c",
            str(self.site.config_path),
            "-d",
            self.database,
        ]
        # Open for the life of the process, and closed by stop().
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # The version call needs no credentials. A failed login probe would
        # count towards trytond's login rate limit (HTTP 429).
        client = self.site.client(self.database, timeout=5.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TrytonServerError(
                    f"trytond exited with status {self.process.returncode}:\n"
                    + self._log_tail()
                )
            if _answers(client):
                log.info(
                    "trytond started",
                    extra={
                        "action": "tryton_start",
                        "pid": self.process.pid,
                        "port": self.site.port,
                        "database": self.database,
                    },
                )
                return
            time.sleep(0.2)
        self.stop()
        raise TrytonServerError(
            f"trytond did not respond within {timeout:.0f} s:\n" + self._log_tail()
        )

    def stop(self, *, timeout: float = 20.0) -> None:
        """Stop trytond (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.info(
                "trytond stopped", extra={"action": "tryton_stop", "pid": process.pid}
            )
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _answers(client: TrytonClient) -> bool:
    try:
        client.server_version()
    except TrytonError:
        return False
    return True
