"""The page's server: Starlette routes over one :class:`Inspector`, served by uvicorn.

The model and datastore are fixed at start; requests carry only a text and the controls'
values (never a path). Model work runs on one worker thread, so answers never mix; at most
``max_pending`` requests are served or queued, and beyond that the answer is 429 with a
Retry-After. Ctrl-C stops uvicorn, and the worker with it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from knnlm.errors import KnnlmError
from knnlm.inspect.requests import MAX_BODY, RequestError, parse_body, parse_request
from knnlm.inspect.static import asset
from knnlm.inspect.steps import continue_text
from knnlm.inspect.view import Inspector, ViewSettings

MIN_PENDING = 8
ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
}


def live_page() -> str:
    head = '<link rel="stylesheet" href="assets/page.css">'
    script = '<script src="assets/page.js"></script>'
    return asset("page.html").replace("<!--HEAD-->", head).replace("<!--SCRIPTS-->", script)


class InspectApp:
    """The routes and the bounded queue in front of the inspector's one worker."""

    def __init__(self, insp: Inspector, defaults: ViewSettings, max_pending: int = 16):
        if max_pending < MIN_PENDING:
            raise KnnlmError(f"--max-pending must be at least {MIN_PENDING}, got {max_pending}")
        insp.check(defaults)
        self.insp, self.defaults, self.max_pending = insp, defaults, max_pending
        self.pending = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knnlm-inspect")
        self.page = live_page()
        self.assets = {name: asset(name) for name in ASSETS}

    def routes(self) -> list[Route]:
        return [
            Route("/", self.index), Route("/assets/{name}", self.asset),
            Route("/api/config", self.config), Route("/api/view", self.view, methods=["POST"]),
            Route("/api/generate", self.generate, methods=["POST"]),
        ]  # fmt: skip

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page, headers=HEADERS)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.assets:  # a fixed set of names, never a path
            return JSONResponse({"error": "no such asset"}, 404)
        return Response(self.assets[name], media_type=ASSETS[name], headers=HEADERS)

    async def config(self, request: Request) -> Response:
        return JSONResponse(self.insp.config() | {"defaults": self.defaults.__dict__})

    async def view(self, request: Request) -> Response:
        return await self.answer(request, self.run_view, ())

    async def generate(self, request: Request) -> Response:
        return await self.answer(request, self.run_generate, ("steps",))

    def run_view(self, text: str, s: ViewSettings, token: int | None, more: dict) -> dict:
        return self.insp.view(self.insp.encode(text), s, token)

    def run_generate(self, text: str, s: ViewSettings, token: int | None, more: dict) -> dict:
        return continue_text(self.insp, self.insp.encode(text), s, more.get("steps", 8))

    async def answer(self, request: Request, work: Any, extra: tuple[str, ...]) -> Response:
        """Read and check the request, then queue its work (429 when the queue is full)."""
        if self.pending >= self.max_pending:
            return JSONResponse({"error": "busy: too many requests queued; retry shortly"},
                                429, headers={"Retry-After": "1"})  # fmt: skip
        self.pending += 1
        try:
            parsed = parse_request(parse_body(await read_body(request)), self.defaults, extra)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self.worker, self.locked, work, parsed)
            return JSONResponse(result, headers=HEADERS)
        except RequestError as e:
            return JSONResponse({"error": e.message}, e.status)
        except KnnlmError as e:
            return JSONResponse({"error": str(e)}, 422)
        finally:
            self.pending -= 1

    def locked(self, work: Any, parsed: tuple) -> dict:
        with self.insp.busy:
            return work(*parsed)


async def read_body(request: Request) -> bytes:
    """The body, stopped as soon as it passes MAX_BODY (413)."""
    length = request.headers.get("content-length", "0")
    if not length.isdigit():
        raise RequestError(400, "bad Content-Length")
    if int(length) > MAX_BODY:
        raise RequestError(413, f"the request is over {MAX_BODY} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestError(413, f"the request is over {MAX_BODY} bytes")
    return bytes(body)


async def internal_error(request: Request, exc: Exception) -> Response:
    print(f"knnlm inspect: {type(exc).__name__}: {exc}", file=sys.stderr)
    return JSONResponse({"error": "internal error"}, 500)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_app(app: InspectApp, host: str = "127.0.0.1") -> Starlette:
    """The ASGI app; on a loopback host only loopback Host headers pass (DNS rebinding)."""
    hosts = ["127.0.0.1", "localhost", "[::1]"] if is_loopback(host) else ["*"]
    return Starlette(
        routes=app.routes(),
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
        exception_handlers={Exception: internal_error},
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: a free port), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KnnlmError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(app: InspectApp, sock: socket.socket, host: str) -> None:
    """Serve until Ctrl-C (uvicorn's graceful shutdown), then stop the worker."""
    config = uvicorn.Config(make_app(app, host), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        app.worker.shutdown(wait=True, cancel_futures=True)
        sock.close()
