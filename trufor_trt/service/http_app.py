"""The HTTP API of `trufor-trt serve`: a Starlette app over one warm runner.

POST /v1/analyze   the image as the body, or as multipart field "image"; JSON with the score,
                   size, backend, precision and stage times; `?outputs=map` adds "npz": the .npz
                   analyze would write (map, conf, score, imgsize, provenance), base64.
GET  /healthz      the process is up (never needs the token); 503 once the runner has failed
GET  /readyz       the runner is loaded and has answered (a warm-up inference at start)
GET  /metrics      Prometheus text

Every answer on /v1/analyze is decided without trusting the request: the body is size-limited
before it is read whole, the image's header before it is decoded; no route reads a path.
"""

import asyncio
import base64
import hashlib
import hmac
import math
import time
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trufor_trt.batch.analyze import AnalyzeOptions, run_job
from trufor_trt.batch.results_log import ResultsLog
from trufor_trt.batch.inputs import ImageJob
from trufor_trt.batch.outputs import npz_bytes
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.errors import ImageError, RunnerFailure
from trufor_trt.service.metrics import ServiceMetrics
from trufor_trt.service.inference_queue import InferenceQueue

DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_MAX_QUEUE = 8
WARM_UP_SIDE = 256
UNPROTECTED_PATHS = ("/healthz",)


@dataclass(frozen=True)
class ServeSettings:
    analyze: AnalyzeOptions  # out_dir None: nothing is written
    token: Optional[str] = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body: int = DEFAULT_MAX_BODY


class BodyTooLarge(Exception):
    pass


class BadRequest(Exception):
    pass


def _error(status: int, reason: str, **headers) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


class BearerToken:
    """ASGI middleware: every route but /healthz needs `Authorization: Bearer TOKEN`, compared in
    constant time."""

    def __init__(self, app, token: str):
        self.app = app
        self._token = token.encode()

    def _authorised(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in UNPROTECTED_PATHS and not self._authorised(scope):
            response = _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_bytes(request: Request, body: bytes) -> bytes:
    """The raw body, or the file in multipart field "image" (parsed from the body already read,
    so the size limit has held before any parsing)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    from starlette.formparsers import MultiPartException

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except MultiPartException as exc:
        raise BadRequest(f"unreadable multipart body: {exc.message}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadRequest('multipart body without a file in field "image"')
        return await upload.read()
    finally:
        await form.close()  # the parser's spooled temporary files


class AnalysisService:
    """The routes' shared state: the runner behind its queue, the metrics, the results log."""

    def __init__(self, runner, settings: ServeSettings):
        self.runner, self.settings = runner, settings
        self.queue = InferenceQueue(settings.max_queue)
        self.metrics = ServiceMetrics(runner, lambda: self.queue.waiting)
        self.results = None  # the ResultsLog while the app runs, with an --out
        self.ready = False
        self.failure = None  # why the runner stopped working, once it has
        self.stop_server = lambda: None  # set by the server that runs the app

    def _analyse(self, job: ImageJob):
        """On the worker thread: the per-image job, its record logged when there is an --out."""
        result = run_job(job, self.runner, self.settings.analyze)
        if self.results is not None:
            self.results.add(result.record)
        self.metrics.observe(result.record)
        return result

    def _warm_up(self) -> None:
        if self.runner.refusal(WARM_UP_SIDE, WARM_UP_SIDE) is None:
            self.runner.infer(prepare_input(np.full((WARM_UP_SIDE, WARM_UP_SIDE, 3), 128, np.uint8)))

    @asynccontextmanager
    async def lifespan(self, _app):
        with ExitStack() as stack:
            if self.settings.analyze.out_dir is not None:
                self.results = stack.enter_context(ResultsLog(self.settings.analyze.out_dir))
            try:
                await asyncio.wrap_future(self.queue.submit(self._warm_up))
                self.ready = True
                yield
            finally:  # uvicorn has answered every open request by now
                self.ready = False
                self.queue.close()

    def _busy(self) -> JSONResponse:
        self.metrics.rejected.labels("queue_full").inc()
        retry = max(1, math.ceil(self.metrics.mean_job_seconds() * (self.queue.waiting + 1)))
        return _error(503, f"busy: {self.queue.waiting} requests waiting (--max-queue "
                           f"{self.settings.max_queue})", **{"Retry-After": str(retry)})

    async def analyze(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            data = await _image_bytes(request, await _read_body(request, self.settings.max_body))
        except BodyTooLarge:
            self.metrics.rejected.labels("too_large").inc()
            return _error(413, f"body over the limit of {self.settings.max_body:,} bytes (--max-body)")
        except BadRequest as exc:
            self.metrics.rejected.labels("bad_request").inc()
            return _error(422, str(exc))
        if self.failure is not None:
            return _error(503, self.failure)
        digest = hashlib.sha256(data).hexdigest()
        future = self.queue.submit(self._analyse, ImageJob(Path(f"upload:{digest}"), digest, data))
        if future is None:
            return self._busy()
        try:
            result = await asyncio.wrap_future(future)
        except RunnerFailure as exc:
            self._runner_failed(exc)
            return _error(503, self.failure)
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        if result.error is not None:
            status = 422 if isinstance(result.error, ImageError) else 500
            return _error(status, result.record.reason)
        return JSONResponse(self._answer(result, request.query_params.get("outputs") == "map"))

    def _answer(self, result, with_maps: bool) -> dict:
        record = result.record
        answer = {key: getattr(record, key) for key in ("score", "height", "width", "backend", "precision", "times_ms")}
        if with_maps:
            npz = npz_bytes(result.analysis, self.settings.analyze.save_noiseprint, record.provenance)
            answer["npz"] = base64.b64encode(npz).decode("ascii")
        return answer

    def _runner_failed(self, exc: RunnerFailure) -> None:
        """No request can succeed any more: refuse them, and stop the server as SIGTERM would
        (the CLI then exits 3, and a supervisor starts a fresh process)."""
        if self.failure is None:
            self.failure, self.ready = f"the runner failed: {exc}", False
            self.stop_server()

    async def healthz(self, _request: Request) -> Response:
        if self.failure is not None:
            return _error(503, self.failure)
        return JSONResponse({"status": "up"})

    async def readyz(self, _request: Request) -> Response:
        if not self.ready:
            return _error(503, "the runner is not ready")
        return JSONResponse({"status": "ready", "backend": self.runner.backend,
                             "precision": self.runner.precision})

    async def prometheus(self, _request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def create_app(runner, settings: ServeSettings) -> Starlette:
    """The ASGI app; `runner` is loaded already and is used by one worker thread only."""
    from starlette.middleware import Middleware

    service = AnalysisService(runner, settings)
    routes = [Route("/v1/analyze", service.analyze, methods=["POST"]),
              Route("/healthz", service.healthz), Route("/readyz", service.readyz),
              Route("/metrics", service.prometheus)]
    middleware = [Middleware(BearerToken, token=settings.token)] if settings.token else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=service.lifespan)
    app.state.service = service
    return app
