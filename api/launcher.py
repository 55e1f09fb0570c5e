"""Runs the app under uvicorn (uvloop and httptools when installed). SIGINT/SIGTERM stop it
cleanly: uvicorn stops accepting, the lifespan shuts the engine process down, no child is left."""

from __future__ import annotations

import importlib.util
import logging

import uvicorn

from caldera.api.config import ServerConfig
from caldera.api.http_limits import MAX_HEADER_BYTES, protocol_class
from caldera.api.server import create_app
from caldera.engine.config import EngineConfig

logger = logging.getLogger("caldera.api")


class _Server(uvicorn.Server):
    """Logs the one line a user needs once the socket is listening."""

    def __init__(self, config: uvicorn.Config, server_config: ServerConfig) -> None:
        super().__init__(config)
        self.server_config = server_config

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            c = self.server_config
            host = f"[{c.host}]" if ":" in c.host else c.host
            logger.info("Caldera is serving %s at http://%s:%d/v1 (web page at http://%s:%d/)",
                        ", ".join(c.served_model_names), host, c.port, host, c.port)


def serve(server_config: ServerConfig, engine_config: EngineConfig, *,
          uvicorn_log_level: str = "warning") -> int:
    app = create_app(server_config, engine_config)
    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=protocol_class(),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        log_level=uvicorn_log_level,
        access_log=uvicorn_log_level in ("debug", "info", "trace"),
        timeout_graceful_shutdown=30,
        lifespan="on",
    )
    server = _Server(config, server_config)
    server.run()
    # A lifespan that failed (the model did not load) leaves uvicorn stopped, not started.
    return 0 if server.started else 1
