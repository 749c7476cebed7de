"""The daemon's HTTP side: /healthz and /metrics (and, with the LINE adapter, its webhook; with [api], /v1).

Bytes that are not valid HTTP (a Content-Length that lies or comes twice, a header line the parser refuses) are
answered 400 by aiohttp itself and the connection closed, before any route or middleware sees a request: there is
no path or method to answer for. `ParserLog` keeps the request's bytes out of the log and counts these answers.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http import HttpProcessingError

# aiohttp's own logger for its server; ParserLog wraps it.
server_log = logging.getLogger("aiohttp.server")


def build_app(metrics, health, middlewares=()) -> web.Application:
    """`health()` returns (ok, details); /healthz answers 200 or 503 with the details as JSON."""

    async def healthz(request: web.Request) -> web.Response:
        ok, details = health()
        return web.json_response({"ok": ok, **details}, status=200 if ok else 503)

    async def metrics_endpoint(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    app = web.Application(client_max_size=1024 * 1024, middlewares=list(middlewares))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


class ParserLog(logging.LoggerAdapter):
    """aiohttp's server logger, minus the request's bytes.

    aiohttp logs a request its parser refuses with a traceback whose text quotes the bytes around the fault: part of
    a body (someone's message) or of a header (an API key). Here that is one line naming the error's class, at most
    WARNING, and bunshin_http_rejected counts the 400 aiohttp answers. A body that fails while aiohttp drains what a
    handler left unread (a Content-Encoding that does not decode) is one line too, and a client gone before its
    answer one DEBUG line. Everything else (a bug in a handler) passes as is, traceback included."""

    def __init__(self, metrics) -> None:
        super().__init__(server_log, {})
        self.metrics = metrics

    def log(self, level, msg, *args, exc_info=None, **kwargs) -> None:
        if isinstance(exc_info, ConnectionError):
            # The client left (e.g. while aiohttp wrote "100 Continue" for it): nothing to answer, nothing broken.
            super().log(logging.DEBUG, msg + ": the client left (%s)", *args, type(exc_info).__name__, **kwargs)
            return
        if isinstance(exc_info, HttpProcessingError | web.RequestPayloadError):
            if isinstance(exc_info, HttpProcessingError):
                self.metrics.http_rejected.inc()
                msg += ": not valid HTTP (%s), answered 400"
            else:
                msg += ": the body could not be read (%s)"
            # Parsing what a client sent is no server error: WARNING at most (aiohttp logs a port scan at DEBUG).
            super().log(min(level, logging.WARNING), msg, *args, type(exc_info).__name__, **kwargs)
            return
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)


async def start_server(app: web.Application, host: str, port: int, metrics) -> tuple[web.AppRunner, int]:
    """Starts serving; returns the runner (for cleanup) and the port actually bound (port 0 picks one)."""
    runner = web.AppRunner(app, access_log=None, logger=ParserLog(metrics))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
    return runner, bound
