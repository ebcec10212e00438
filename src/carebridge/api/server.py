"""Run the API with uvicorn: on a thread beside the workers, or in processes of its own.

:class:`ApiThread` serves the API from the process that runs the workers,
so both share one interpreter lock. :class:`ApiProcesses` serves it from
processes of its own, which all accept connections on one listening socket.
Each opens its own database engine. On SQLite every write transaction takes
the database's write lock at ``BEGIN`` and on PostgreSQL audit appends take
an advisory lock, so the audit chain stays one chain whichever process
writes (see :mod:`carebridge.audit`).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import secrets
import socket
import threading
import time
from multiprocessing.connection import Connection

import uvicorn
from fastapi import FastAPI
from sqlalchemy import Engine

from carebridge.api.app import create_app
from carebridge.api.security import load_keys
from carebridge.config.model import Configuration

logger = logging.getLogger(__name__)


def _uvicorn_config(app: object, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False,
        lifespan="off", timeout_graceful_shutdown=10,
    )


class ApiThread:
    """The API served on ``host:port`` until :meth:`stop`.

    uvicorn installs no signal handlers off the main thread, so SIGTERM
    reaches the worker's handler, which stops the service as a whole.
    """

    def __init__(self, engine: Engine, config: Configuration, host: str, port: int) -> None:
        app = create_app(engine, config)
        self._server = uvicorn.Server(_uvicorn_config(app, host, port))
        self._thread = threading.Thread(target=self._server.run, name="api", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; raise ``OSError`` if the port cannot be bound in time."""
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"the API could not listen on {self.host}:{self.port}")
            if waited >= timeout:
                raise OSError(f"the API did not start on {self.host}:{self.port} "
                              f"within {timeout:.0f}s")
            self._thread.join(0.05)
            waited += 0.05
        if self.port == 0:
            sockets = self._server.servers[0].sockets
            self.port = sockets[0].getsockname()[1]
        logger.info("API listening on http://%s:%d", self.host, self.port)

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        logger.info("API stopped")


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def share_web_session_key(app: FastAPI, key: bytes | None) -> None:
    """Sign the web UI's session cookies of ``app`` with ``key``, when one is given.

    The web UI derives its cookie key from the HS256 API signing key, the
    same in every process. Without one, each process would draw its own, and
    a cookie set by one API process would be rejected by the others.
    """
    if key is not None:
        app.state.carebridge.extras["web_session_key"] = key


def _shared_session_key(config: Configuration) -> bytes | None:
    """Return a random cookie key for all API processes, or ``None`` when HS256 gives one."""
    for loaded in load_keys(config.api):
        if loaded.algorithm == "HS256" and loaded.signing is not None:
            return None
    logger.warning("no HS256 API signing key: web sessions use a key drawn at start "
                   "and end when the service restarts")
    return secrets.token_bytes(32)


def _serve(sock: socket.socket, db_url: str, config: Configuration, log_level: int,
           parent: int, ready: Connection, session_key: bytes | None) -> None:
    """Run one API process: open the database, build the app and serve until stopped."""
    from carebridge.api.fhir.validation import preload_models, validate_in_this_process
    from carebridge.logs import configure
    from carebridge.store.db import open_engine

    # A process group of its own: Ctrl-C in a terminal reaches the service
    # process only, which then stops its API processes with SIGTERM.
    os.setpgrp()
    configure(log_level)
    engine = open_engine(db_url, create=False)
    # This process is one of several: validation on other cores would compete
    # with them, and with the workers, for the same cores.
    validate_in_this_process()
    preload_models()
    app = create_app(engine, config)
    share_web_session_key(app, session_key)
    server = uvicorn.Server(_uvicorn_config(app, "", 0))
    # Objects alive now (modules, models, the app) live as long as the process.
    # Frozen, they are skipped by every full garbage collection, and a request
    # with a large Bundle allocates enough objects to start several.
    gc.collect()
    gc.freeze()

    def watch() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        # A pipe, not a multiprocessing Event: Event.set() blocks forever when
        # the process waiting on the event has died.
        try:
            ready.send(True)
        except OSError:
            pass  # The parent is gone, which the loop below notices.
        ready.close()
        # A parent that dies without stopping its API processes (SIGKILL)
        # leaves them to another parent: then they stop by themselves.
        while not server.should_exit:
            if os.getppid() != parent:
                logger.warning("API process stopping: the service process is gone")
                server.should_exit = True
            time.sleep(0.5)

    threading.Thread(target=watch, name="api-watch", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.dispose()


class ApiProcesses:
    """The API served on ``host:port`` by ``count`` processes of its own, until :meth:`stop`.

    The listening socket is bound here and shared: each process accepts
    connections from it, so a client's requests go to whichever process
    accepts its connection. Each process keeps its own rate-limit buckets
    and credential cache, so a client may get up to ``count`` times
    ``api.rate_limit_per_minute`` requests a minute. A process that dies is
    started again.
    """

    def __init__(self, db_url: str, config: Configuration, host: str, port: int,
                 count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.host = host
        self.port = port
        self.count = count
        self._db_url = db_url
        self._config = config
        self._session_key = _shared_session_key(config)
        # spawn, not fork: the parent runs threads, and a forked child could
        # inherit a lock that one of them holds.
        self._context = multiprocessing.get_context("spawn")
        self._socket: socket.socket | None = None
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._stopping = threading.Event()
        self._keeper: threading.Thread | None = None

    def _launch(self) -> tuple[multiprocessing.process.BaseProcess, Connection]:
        """Start one API process; return it and the pipe end that reports it serves."""
        assert self._socket is not None
        ready, sender = self._context.Pipe(duplex=False)
        # Daemonic: if this process exits without stop(), multiprocessing
        # terminates the API processes instead of waiting for them.
        process = self._context.Process(
            target=_serve, name="carebridge-api", daemon=True,
            args=(self._socket, self._db_url, self._config,
                  logging.getLogger().getEffectiveLevel(), os.getpid(), sender,
                  self._session_key),
        )
        process.start()
        sender.close()
        return process, ready

    def _await(self, process: multiprocessing.process.BaseProcess, ready: Connection,
               timeout: float) -> None:
        """Wait until ``process`` serves; raise ``OSError`` if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        try:
            while not ready.poll(0.1):
                if self._stopping.is_set():
                    process.terminate()
                    raise OSError("the API is stopping")
                if not process.is_alive():
                    raise OSError(f"an API process exited with status {process.exitcode} "
                                  "before it served")
                if time.monotonic() > deadline:
                    process.kill()
                    raise OSError(f"an API process did not start within {timeout:.0f}s; "
                                  "its log lines tell how far it got")
            ready.recv()
        except EOFError:
            raise OSError("an API process exited before it served") from None
        finally:
            ready.close()

    def start(self, timeout: float = 60.0) -> None:
        """Bind the port and start the processes; raise ``OSError`` if either fails."""
        self._socket = _listening_socket(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        try:
            waiting = []
            for _ in range(self.count):
                process, ready = self._launch()
                self._processes.append(process)
                waiting.append((process, ready))
            for process, ready in waiting:
                self._await(process, ready, timeout)
        except BaseException:
            self.stop()
            raise
        self._keeper = threading.Thread(target=self._keep, name="api-keeper", daemon=True)
        self._keeper.start()
        logger.info("API listening on http://%s:%d in %d processes",
                    self.host, self.port, self.count)

    def _keep(self) -> None:
        """Replace each process that exits while the API runs."""
        while not self._stopping.wait(1.0):
            for index, process in enumerate(self._processes):
                if process.is_alive() or self._stopping.is_set():
                    continue
                logger.error("API process exited; starting another",
                             extra={"action": "api_process_restart",
                                    "exit_code": process.exitcode})
                try:
                    self._processes[index], ready = self._launch()
                    self._await(self._processes[index], ready, 60.0)
                except OSError as exc:
                    logger.error("API process could not be started again: %s", exc)

    def stop(self, timeout: float = 15.0) -> None:
        """Ask every process to finish its requests and exit; kill those that do not."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._keeper is not None:
            self._keeper.join(5.0)
        for process in self._processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn finishes open requests
        deadline = time.monotonic() + timeout
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning("API process did not stop in time; killing it")
                process.kill()
                process.join(5.0)
        if self._socket is not None:
            self._socket.close()
        logger.info("API stopped")
