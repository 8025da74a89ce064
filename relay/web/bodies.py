"""Request bodies read within the HTTP read timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from aiohttp import web

from vncgate.relay.state import STATE


async def read_form(request: web.Request) -> Mapping[str, object]:
    """A form body, read within the HTTP read timeout (a body sent slowly holds an fd)."""
    try:
        async with asyncio.timeout(request.app[STATE].settings.http_read_timeout):
            return await request.post()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="the request body came too slowly\n") from None


async def read_json(request: web.Request) -> object:
    """A JSON body within the HTTP read timeout; bad JSON, bad UTF-8 or too deep -> 400."""
    try:
        async with asyncio.timeout(request.app[STATE].settings.http_read_timeout):
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text="the request body came too slowly\n") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the body is not valid JSON: "
                                                           f"{reason}"}),
                                 content_type="application/json") from None
