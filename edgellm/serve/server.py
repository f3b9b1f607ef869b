"""Load the model(s), build the app and run it under uvicorn until Ctrl-C."""

from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from ..errors import InvalidParameterError
from ..runtime import load
from .app import HttpSettings, create_app
from .engine import Engine, EngineConfig
from .metrics import Metrics
from .pool import SessionPool

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_SESSIONS = 8


@dataclass(frozen=True)
class ServeOptions:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str | None = None  # the id clients see; default the manifest's name
    draft: str | None = None
    sessions: int = 1
    context_length: int | None = None
    threads: int | None = None
    providers: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    http: HttpSettings = field(default_factory=HttpSettings)


class _Server(uvicorn.Server):
    """uvicorn's server, but Ctrl-C first ends running and queued generations, so every open stream
    gets its final event (finish_reason "shutdown") before the connections close."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.shutdown()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # we shut down cleanly: exit 0 instead of re-raising the signal after


def build_engine(options: ServeOptions) -> Engine:
    if not 1 <= options.sessions <= MAX_SESSIONS:
        raise InvalidParameterError(f"--sessions {options.sessions} is out of range: it must be 1..{MAX_SESSIONS} "
                                    "(each one holds its own KV cache and model session).")
    if options.engine.max_queue < 0:
        raise InvalidParameterError(f"--max-queue {options.engine.max_queue} must be >= 0.")
    llms = [load(options.model_dir, providers=options.providers, threads=options.threads,
                 context_length=options.context_length, draft=options.draft, verify=(i == 0))
            for i in range(options.sessions)]
    return Engine(SessionPool(llms), options.engine, Metrics(), options.model_name or llms[0].manifest.name)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidParameterError(f"cannot listen on {host}:{port} ({exc.strerror}). Fix: pick another --port "
                                    "(0 = any free one) or stop what uses it.") from exc
    sock.listen(128)
    return sock


def run_server(options: ServeOptions) -> None:
    """Serve until Ctrl-C (or SIGTERM). Prints the URL and a curl example once it listens."""
    engine = build_engine(options)
    sock = _bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    app = create_app(engine, options.http)
    # Open connections are bounded too (uvicorn answers 503 beyond): the queue bound plus room for
    # /health, /metrics and requests being parsed or answered from the response cache.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10, access_log=False,
                            server_header=False, limit_concurrency=max(64, 4 * options.engine.max_queue))
    server = _Server(config, engine)
    engine.start()
    auth = f" -H 'Authorization: Bearer $EDGELLM_API_KEY'" if options.http.api_key else ""
    print(f"edgellm serve: {engine.model_id} ({engine.pool.first.provider}) at {url}/v1  (Ctrl-C to stop)\n"
          f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'", flush=True)
    if options.host not in LOOPBACK and options.http.api_key is None:
        print("warning: listening beyond this machine without --api-key: anyone who can reach it may use the model.",
              file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown()
        engine.join(timeout=10)
        sock.close()
    print("edgellm serve: stopped", flush=True)
