"""The operator's console: the DLQ in a browser, at `/ui` of `eventhandler api`, with the API's roles.

Server-rendered pages (Jinja2) that read and work without JavaScript; htmx, shipped in `static/`, only
makes them smoother. A browser signs in once with a token (`sessions`); every change is a POST with the
session's CSRF token, and goes through the same `DLQService` operations as the API, audited the same.
"""

from __future__ import annotations

from eventhandler.console.common import Gate
from eventhandler.console.views import install

__all__ = ["Gate", "install"]
