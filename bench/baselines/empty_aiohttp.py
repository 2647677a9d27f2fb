"""The framework ceiling: an aiohttp handler that answers ``200`` and does nothing else.

Same server stack as our sidecar (aiohttp, one process, one event loop, access log off), so the
gap between this and the sidecar is the cost of what the sidecar actually does.
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def ok(_request: web.Request) -> web.Response:
    """Answer 200 without reading anything."""
    return web.Response(text="OK")


def make_app() -> web.Application:
    """One catch-all route, GET and POST, like a pingback endpoint."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    return app


def main() -> None:
    """Serve on the given port."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
