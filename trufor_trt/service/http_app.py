"""The HTTP API of `trufor-trt serve`: a Starlette app over one warm runner.

POST /v1/analyze   the image as the body, or as multipart field "image"; JSON with the score,
                   size, backend, precision, stage times and whether the checkpoint is the
                   official one; `?outputs=map` adds "npz": the .npz
                   analyze would write (map, conf, score, imgsize, provenance), base64.
GET  /healthz      the process is up (never needs the token); 503 once the runner has failed
GET  /readyz       the runner is loaded and has answered (a warm-up inference at start)
GET  /metrics      Prometheus text

Every answer on /v1/analyze is decided without trusting the request: the body is size- and
time-limited before it is read whole, and the bodies arriving at once share a memory budget (what
has arrived of them, so a slow client holds what it sent, not a place); a place in the queue is
taken only once the body is complete (slow bodies never keep other clients out of the line); the
image's header is checked before it is decoded, and it is decoded on threads of its own, within
its time allowance, so a slow decode never holds the runner; no route reads a path. A request
whose framing or credentials are ambiguous (Content-Length with Transfer-Encoding, either header
twice, Authorization twice) is refused and its connection closed: nothing smuggled in its body
is ever read as a request. Every error is JSON and counted. The connections themselves are
guarded in connections.py.
"""

import asyncio
import base64
import hashlib
import hmac
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trufor_trt.batch.analyze import AnalyzeOptions, decode_job, infer_and_finish, open_job
from trufor_trt.batch.results_log import ResultsLog
from trufor_trt.batch.inputs import ImageJob
from trufor_trt.batch.outputs import npz_bytes
from trufor_trt.engine.preprocess import prepare_input
from trufor_trt.errors import ImageError, OutputsUnwritable, RunnerFailure
from trufor_trt.service.metrics import ServiceMetrics
from trufor_trt.service.inference_queue import InferenceQueue

DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_MAX_QUEUE = 8
DEFAULT_BODY_TIMEOUT = 60.0
WARM_UP_SIDE = 256
UNPROTECTED_PATHS = ("/healthz",)
DECODE_THREADS = 2
# Headers a request may carry once at most, and pairs it may not carry together (RFC 9112, 6.3:
# such a message's framing is ambiguous, a way to smuggle a second request past a proxy).
SINGLE_HEADERS = (b"content-length", b"transfer-encoding", b"authorization", b"content-type")


@dataclass(frozen=True)
class ServeSettings:
    analyze: AnalyzeOptions  # out_dir None: nothing is written
    token: Optional[str] = None
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body: int = DEFAULT_MAX_BODY
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # seconds a request's whole body may take to arrive


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class BodiesOverBudget(Exception):
    pass


class BodyBudget:
    """The bytes of the request bodies arriving at once: at most `limit` in all (the event loop
    is one thread: no lock)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise BodiesOverBudget
        self.held += size

    def give_back(self, size: int) -> None:
        self.held -= size


class BadRequest(Exception):
    pass


def _error(status: int, reason: str, **headers) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


def _closing_error(status: int, reason: str, **headers) -> JSONResponse:
    """An error answered before the body was read: the connection closes after it, so the rest
    of the body is never taken."""
    return _error(status, reason, Connection="close", **headers)


def ambiguity(scope) -> Optional[str]:
    """Why the request's headers are ambiguous (None when they are not)."""
    names = [name.lower() for name, _ in scope.get("headers") or []]
    repeated = next((name for name in SINGLE_HEADERS if names.count(name) > 1), None)
    if repeated is not None:
        return f"the {repeated.decode()} header given {names.count(repeated)} times"
    if b"content-length" in names and b"transfer-encoding" in names:
        return "both Content-Length and Transfer-Encoding (ambiguous framing)"
    return None


class StrictHeaders:
    """ASGI middleware, outermost: a request with ambiguous headers gets 400 and its connection
    is closed after the answer, its body unread."""

    def __init__(self, app, on_reject):
        self.app, self._on_reject = app, on_reject

    async def __call__(self, scope, receive, send):
        why = ambiguity(scope) if scope["type"] == "http" else None
        if why is not None:
            self._on_reject("ambiguous_request")
            await _closing_error(400, f"refused: {why}")(scope, receive, send)
            return
        await self.app(scope, receive, send)


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


async def _read_body(request: Request, limit: int, timeout: float, budget: BodyBudget) -> bytes:
    """The body, within `limit` bytes and `timeout` seconds (BodyTooLarge, BodyTooSlow), its
    bytes taken from `budget` as they arrive (BodiesOverBudget); starlette's ClientDisconnect
    where the client went away."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            budget.take(len(chunk))
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
        return b"".join(chunks)
    except asyncio.TimeoutError:
        raise BodyTooSlow from None
    finally:
        budget.give_back(sum(map(len, chunks)))


async def _image_bytes(request: Request, body: bytes) -> bytes:
    """The raw body, or the file in multipart field "image" (parsed from the body already read,
    so the size limit has held before any parsing)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except MultiPartException as exc:
        raise BadRequest(f"unreadable multipart body: {exc.message}") from None
    except HTTPException as exc:  # starlette's own wrapping of a multipart parse error
        raise BadRequest(f"unreadable multipart body: {exc.detail}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadRequest('multipart body without a file in field "image"')
        return await upload.read()
    finally:
        await form.close()  # the parser's spooled temporary files


class AnalysisService:
    """The routes' shared state: the runner behind its queue, the metrics, the results log."""

    def __init__(self, runner, settings: ServeSettings, guard=None):
        self.runner, self.settings, self.guard = runner, settings, guard
        self.queue = InferenceQueue(settings.max_queue)
        # What the bodies arriving at once may hold: as much as the line holds once they are in.
        self.bodies = BodyBudget(settings.max_body * (settings.max_queue + 1))
        self.decoders = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="trufor-decode")
        self.metrics = ServiceMetrics(runner, lambda: self.queue.waiting)
        self.results = None  # the ResultsLog while the app runs, with an --out
        self.ready = False
        self.failure = None  # why the runner stopped working, once it has
        self.stop_server = lambda: None  # set by the server that runs the app

    def _decoded(self, job: ImageJob):
        """On a decoding thread: the per-image job up to its decoded image."""
        flight = open_job(job, self.runner, self.settings.analyze)
        decode_job(flight, self.runner, self.settings.analyze)
        return flight

    def _analyse(self, flight):
        """On the runner's thread: the rest of the per-image job, its record logged when there
        is an --out."""
        result = infer_and_finish(flight, self.runner, self.settings.analyze, self.guard)
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
            finally:  # uvicorn has answered the open requests, or its shutdown deadline has passed
                self.ready = False
                self.decoders.shutdown(wait=False, cancel_futures=True)  # each within its allowance
                self.queue.close(cancel_waiting=True)  # the one in hand finishes; nobody awaits the rest

    def _busy(self) -> JSONResponse:
        self.metrics.rejected.labels("queue_full").inc()
        retry = max(1, math.ceil(self.metrics.mean_job_seconds() * (self.queue.waiting + 1)))
        return _closing_error(503, f"busy: {self.queue.waiting} requests waiting (--max-queue "
                                   f"{self.settings.max_queue})", **{"Retry-After": str(retry)})

    async def http_error(self, _request: Request, exc) -> Response:
        """starlette's own refusals (no such route, wrong method) in JSON, counted."""
        self.metrics.rejected.labels(f"http_{exc.status_code}").inc()
        return _error(exc.status_code, str(exc.detail), **(exc.headers or {}))

    async def _image(self, request: Request):
        """The request's image bytes, or the error response that refuses it."""
        settings = self.settings
        try:
            body = await _read_body(request, settings.max_body, settings.body_timeout, self.bodies)
            return await _image_bytes(request, body)
        except BodiesOverBudget:
            self.metrics.rejected.labels("bodies_over_budget").inc()
            return _closing_error(503, f"busy: the bodies arriving now fill this server's "
                                       f"{self.bodies.limit:,} bytes for them", **{"Retry-After": "1"})
        except BodyTooLarge:
            self.metrics.rejected.labels("too_large").inc()
            return _closing_error(413, f"body over the limit of {settings.max_body:,} bytes (--max-body)")
        except BodyTooSlow:
            self.metrics.rejected.labels("body_timeout").inc()
            return _closing_error(408, f"the body did not arrive within {settings.body_timeout:g} s (--body-timeout)")
        except BadRequest as exc:
            self.metrics.rejected.labels("bad_request").inc()
            return _error(422, str(exc))
        except ClientDisconnect:
            self.metrics.rejected.labels("client_gone").inc()
            return _error(400, "the client went away before its body arrived")

    async def analyze(self, request: Request) -> Response:
        try:
            return await self._analyze(request)
        except asyncio.CancelledError:  # the shutdown deadline (--shutdown-timeout) has passed
            self.metrics.rejected.labels("shutdown").inc()
            return _closing_error(503, "the server is stopping: its shutdown deadline passed")

    async def _analyze(self, request: Request) -> Response:
        started = time.perf_counter()
        if self.failure is not None:
            return _closing_error(503, self.failure)
        data = await self._image(request)
        if isinstance(data, Response):
            return data
        if not self.queue.reserve():  # only a complete body takes a place: slow ones never hold one
            return self._busy()
        digest = hashlib.sha256(data).hexdigest()
        job = ImageJob(Path(f"upload:{digest}"), digest, data)
        del data
        try:
            flight = await asyncio.get_running_loop().run_in_executor(self.decoders, self._decoded, job)
        except BaseException:  # the shutdown deadline: the place was never handed to the runner
            self.queue.give_back()
            raise
        try:
            result = await asyncio.wrap_future(self.queue.run_reserved(self._analyse, flight))
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
        # Whether these are the published TruFor's outputs, in every answer, not only the .npz's.
        answer["official"] = bool((record.provenance or {}).get("official"))
        if record.verdict_guard:
            answer["verdict_guard"] = record.verdict_guard
        if with_maps:
            npz = npz_bytes(result.analysis, self.settings.analyze.save_noiseprint, record.provenance)
            answer["npz"] = base64.b64encode(npz).decode("ascii")
        return answer

    def _runner_failed(self, exc: RunnerFailure) -> None:
        """No request can succeed any more: refuse them, and stop the server as SIGTERM would
        (the CLI then exits 3, and a supervisor starts a fresh process)."""
        if self.failure is None:
            why = str(exc) if isinstance(exc, OutputsUnwritable) else f"the runner failed: {exc}"
            self.failure, self.ready = why, False
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


def create_app(runner, settings: ServeSettings, guard=None) -> Starlette:
    """The ASGI app; `runner` is loaded already and is used by one worker thread only; `guard`:
    its verdict guard, if any."""
    from starlette.middleware import Middleware

    service = AnalysisService(runner, settings, guard)
    routes = [Route("/v1/analyze", service.analyze, methods=["POST"]),
              Route("/healthz", service.healthz), Route("/readyz", service.readyz),
              Route("/metrics", service.prometheus)]
    from starlette.exceptions import HTTPException

    middleware = [Middleware(StrictHeaders, on_reject=lambda reason: service.metrics.rejected.labels(reason).inc())]
    middleware += [Middleware(BearerToken, token=settings.token)] if settings.token else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=service.lifespan,
                    exception_handlers={HTTPException: service.http_error})
    app.state.service = service
    return app
