"""HTML pages from Jinja2 templates in `relay/templates/`, escaped by default.

Every value a page shows (display names, user names, namespaces) is escaped by Jinja2's
autoescape, in text and in attributes alike; nothing is marked safe. The viewer's configuration
is JSON in a `data-config` attribute, escaped the same way (no inline script: the CSP allows
scripts from 'self' only).
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp_jinja2
import jinja2
from aiohttp import web

PAGE_HEADERS = {"Cache-Control": "no-store"}


def setup_templates(app: web.Application) -> None:
    aiohttp_jinja2.setup(
        app, loader=jinja2.PackageLoader("vncgate.relay", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",),
                                            default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined)


def render_page(request: web.Request, template: str, context: Mapping[str, object],
                status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    response = aiohttp_jinja2.render_template(template, request, dict(context), status=status)
    response.headers.update(PAGE_HEADERS)
    if headers:
        response.headers.update(headers)
    return response
