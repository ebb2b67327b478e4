"""The HTTP server: one FastAPI app serving SGLang's native API, the OpenAI API and /metrics.

``create_app(engine, args)`` builds the app around an existing Engine (tests, embedding);
``launch_server(args)`` builds the Engine and runs uvicorn until interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark_sglang.entrypoints.asgi_limits import BodySizeLimit
from dspark_sglang.entrypoints.auth import install_api_key
from dspark_sglang.entrypoints.engine import Engine
from dspark_sglang.entrypoints.native_api import build_native_router
from dspark_sglang.entrypoints.openai_api import build_openai_router
from dspark_sglang.entrypoints.prometheus import ServerMetrics
from dspark_sglang.entrypoints.protocol import ApiError
from dspark_sglang.entrypoints.router_api import build_router_api
from dspark_sglang.entrypoints.server_state import ServerState
from dspark_sglang.server_args import ServerArgs

logger = logging.getLogger(__name__)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.openai_body(), status_code=err.status,
                        headers=getattr(err, "headers", None))


def create_app(engine: Engine, args: ServerArgs) -> FastAPI:
    """The app; it does not own ``engine`` (the caller shuts it down)."""
    state = ServerState(engine, args)
    metrics = ServerMetrics(engine) if args.enable_metrics else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:  # the engine outlives the app: stop feeding this app's histograms
            if metrics is not None:
                metrics.close()

    app = FastAPI(title="dspark_sglang", version="0.1.0", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.server = state
    app.include_router(build_native_router(state))
    app.include_router(build_openai_router(state))
    app.include_router(build_router_api(state))

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(400, f"invalid request: {err.errors()[:3]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(ApiError(err.status_code, str(err.detail), "not_found_error"
                                        if err.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(RecursionError)
    async def _too_deep(_: Request, err: RecursionError) -> JSONResponse:
        return _error_response(ApiError(400, "the request body is nested too deeply",
                                        param="body"))

    @app.exception_handler(TimeoutError)
    async def _busy(_: Request, err: TimeoutError) -> JSONResponse:
        return _error_response(ApiError(503, "the scheduler did not answer in time (a long "
                                             "step is running); retry", "overloaded_error"))

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        logger.error("internal error: %s", traceback.format_exc())
        return _error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}",
                                        "internal_error"))

    if metrics is not None:
        @app.get("/metrics")
        async def _metrics() -> Response:
            body = await asyncio.to_thread(metrics.render)
            return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

        metrics.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=args.max_request_body_bytes)
    if args.api_key:  # added last so it runs first (Starlette middleware wrap in reverse)
        install_api_key(app, args.api_key)
    return app


class BackgroundServer:
    """Serve ``create_app(engine, args)`` from a daemon thread (tests, notebooks).

    ``url`` is ready when the constructor returns; ``stop()`` ends uvicorn, not the engine.
    """

    def __init__(self, engine: Engine, args: ServerArgs, ready_timeout: float = 30.0) -> None:
        self.app = create_app(engine, args)
        config = uvicorn.Config(self.app, host=args.host, port=args.port,
                                log_level="warning", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self.url = f"http://{args.host}:{args.port}"
        self._thread = threading.Thread(target=self._server.run, name="dspark-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server failed to start on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def launch_server(args: ServerArgs) -> None:
    """Build the Engine from ``args`` and serve on ``args.host:args.port`` until stopped."""
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(server_args=args)
    try:
        app = create_app(engine, args)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
