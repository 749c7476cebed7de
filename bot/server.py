"""The daemon's HTTP side: /healthz and /metrics (and, with the LINE adapter, its webhook)."""

from __future__ import annotations

from aiohttp import web


def build_app(metrics, health) -> web.Application:
    """`health()` returns (ok, details); /healthz answers 200 or 503 with the details as JSON."""

    async def healthz(request: web.Request) -> web.Response:
        ok, details = health()
        return web.json_response({"ok": ok, **details}, status=200 if ok else 503)

    async def metrics_endpoint(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Starts serving; returns the runner (for cleanup) and the port actually bound (port 0 picks one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
    return runner, bound
