"""Exceptions: one class per kind of failure a caller can act on.

The server answers every error with ``{"code", "message", "field"?}``;
:func:`error_from_body` maps the code to a class. Everything raised by this
package derives from :class:`EmberError`.
"""

from __future__ import annotations

import builtins
import json
from typing import Any


class EmberError(Exception):
    """Base class. ``status`` and ``code`` are the server's when it answered."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field

    def __str__(self) -> str:
        return f"{self.message} ({self.code})" if self.code else self.message


class InvalidRequest(EmberError):
    """The request was rejected; ``field`` names the input at fault, if one is."""


class AuthError(EmberError):
    """No API key, a wrong or revoked one, or one not allowed to do this."""


class NotFound(EmberError):
    """No such sandbox, template, file, process, key or team."""


class Conflict(EmberError):
    """The sandbox's state does not allow this now, or the name is taken."""


class CapacityError(EmberError):
    """No host has room for the sandbox (or its host is down)."""


class ServerError(EmberError):
    """The server or one of its hosts failed; the message says which."""


class ConnectError(EmberError, builtins.ConnectionError):
    """The server could not be reached."""


class TimeoutError(EmberError, builtins.TimeoutError):  # noqa: A001 - the SDK's own
    """A request took too long, or a command was killed by its ``timeout``.

    For a command, ``result`` holds what it printed before it was killed.
    """

    def __init__(self, message: str, *, result: Any = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.result = result


class BuildFailed(EmberError):
    """A template build ended ``failed``; ``build`` holds its log and error."""

    def __init__(self, build: Any) -> None:
        super().__init__(f"template build {build.build_id} of {build.name!r} failed: {build.error}")
        self.build = build


class ConfigError(EmberError):
    """The SDK's settings (arguments, environment, config file) are unusable."""


_BY_CODE: dict[str, type[EmberError]] = {
    "invalid_request": InvalidRequest,
    "invalid_json": InvalidRequest,
    "unsupported_media_type": InvalidRequest,
    "payload_too_large": InvalidRequest,
    "template_locked": InvalidRequest,
    "method_not_allowed": InvalidRequest,
    "unauthorized": AuthError,
    "forbidden": AuthError,
    "not_found": NotFound,
    "conflict": Conflict,
    "no_capacity": CapacityError,
    "host_error": ServerError,
    "internal": ServerError,
}

_BY_STATUS: dict[int, type[EmberError]] = {
    400: InvalidRequest,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    415: InvalidRequest,
    422: InvalidRequest,
    503: CapacityError,
}


def error_from_body(status: int, body: bytes) -> EmberError:
    """The exception for a non-2xx answer."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("code"), str):
        code: str = parsed["code"]
        message = str(parsed.get("message") or f"the server answered {status}")
        field = parsed.get("field") if isinstance(parsed.get("field"), str) else None
        cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or _fallback(status)
        return cls(message, status=status, code=code, field=field)
    text = body.decode("utf-8", "replace").strip()
    message = f"the server answered {status}" + (f": {text}" if text else "")
    return (_BY_STATUS.get(status) or _fallback(status))(message, status=status)


def _fallback(status: int) -> type[EmberError]:
    return InvalidRequest if 400 <= status < 500 else ServerError
