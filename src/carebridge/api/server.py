"""Run the API with uvicorn on a thread of its own, beside the workers."""

from __future__ import annotations

import logging
import threading

import uvicorn
from sqlalchemy import Engine

from carebridge.api.app import create_app
from carebridge.config.model import Configuration

logger = logging.getLogger(__name__)


class ApiThread:
    """The API served on ``host:port`` until :meth:`stop`.

    uvicorn installs no signal handlers off the main thread, so SIGTERM
    reaches the worker's handler, which stops the service as a whole.
    """

    def __init__(self, engine: Engine, config: Configuration, host: str, port: int) -> None:
        app = create_app(engine, config)
        self._server = uvicorn.Server(uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False,
            lifespan="off", timeout_graceful_shutdown=10,
        ))
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
