"""HTTP to the Ember server, sync and asyncio, with one retry policy.

A request is retried (with jittered exponential backoff) only when that
cannot do something twice:

* the connection could not be made (nothing was sent) — any request;
* the call is *safe* — a read, or a write whose repetition changes nothing
  (``DELETE`` of a sandbox, setting a timeout, replacing a file with the
  same bytes) — and the connection broke, timed out, or the server answered
  502/503/504.

Creating sandboxes, exec, pause, resume, snapshots and stdin are never
retried after they may have reached the server.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx

from . import errors
from ._config import Settings

#: Answers of a safe call that are worth another try.
RETRY_STATUSES = frozenset({502, 503, 504})
DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_RETRIES = 3
USER_AGENT = "ember-python/0.1.0"


def should_retry(
    *, safe: bool, attempt: int, max_retries: int, exc: Exception | None = None, status: int | None = None
) -> bool:
    """Whether attempt number ``attempt`` (0-based) may be followed by another."""
    if attempt >= max_retries:
        return False
    if exc is not None:
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
            return True  # the request never left this process
        return safe and isinstance(
            exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
        )
    return safe and status in RETRY_STATUSES


def backoff(attempt: int, base: float = 0.25, cap: float = 4.0) -> float:
    return float(min(cap, base * 2.0**attempt)) * random.uniform(0.5, 1.0)


def translate(exc: httpx.HTTPError, url: str) -> errors.EmberError:
    """An httpx failure as the SDK's exception."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return errors.ConnectError(f"cannot reach the Ember server at {url}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return errors.TimeoutError(f"the request to {url} timed out: {exc!r}")
    return errors.ServerError(f"the connection to {url} failed: {exc!r}")


class _Base:
    def __init__(self, settings: Settings, timeout: float | None, max_retries: int) -> None:
        self.settings = settings
        self.max_retries = max_retries
        self.headers = {
            "authorization": f"Bearer {settings.api_key}",
            "user-agent": USER_AGENT,
        }
        self.timeout = httpx.Timeout(timeout, connect=min(timeout or 10.0, 10.0))

    def _build(
        self,
        client: httpx.Client | httpx.AsyncClient,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: Any = None,
    ) -> httpx.Request:
        return client.build_request(
            method,
            path,
            json=json,
            params=params,
            content=content,
            headers=headers,
            timeout=self.timeout if timeout is None else timeout,
        )


class Transport(_Base):
    """Synchronous transport (one connection pool)."""

    def __init__(
        self,
        settings: Settings,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        super().__init__(settings, timeout, max_retries)
        self.client = httpx.Client(
            base_url=settings.api_url, headers=self.headers, verify=settings.ssl_context()
        )

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, *, safe: bool = False, **kw: Any) -> httpx.Response:
        """Send and read the whole answer; a non-2xx answer raises."""
        attempt = 0
        while True:
            try:
                resp = self.client.send(self._build(self.client, method, path, **kw))
            except httpx.HTTPError as e:
                if should_retry(safe=safe, attempt=attempt, max_retries=self.max_retries, exc=e):
                    time.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise translate(e, self.settings.api_url) from e
            if resp.is_success:
                return resp
            if should_retry(
                safe=safe, attempt=attempt, max_retries=self.max_retries, status=resp.status_code
            ):
                time.sleep(backoff(attempt))
                attempt += 1
                continue
            raise errors.error_from_body(resp.status_code, resp.content)

    @contextmanager
    def stream(self, method: str, path: str, *, safe: bool = False, **kw: Any) -> Iterator[httpx.Response]:
        """Send and hand back the answer unread (a 2xx one; others raise)."""
        attempt = 0
        while True:
            try:
                resp = self.client.send(self._build(self.client, method, path, **kw), stream=True)
            except httpx.HTTPError as e:
                if should_retry(safe=safe, attempt=attempt, max_retries=self.max_retries, exc=e):
                    time.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise translate(e, self.settings.api_url) from e
            if not resp.is_success:
                body = resp.read()
                resp.close()
                if should_retry(
                    safe=safe, attempt=attempt, max_retries=self.max_retries, status=resp.status_code
                ):
                    time.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise errors.error_from_body(resp.status_code, body)
            try:
                yield resp
            finally:
                resp.close()
            return


class AsyncTransport(_Base):
    """asyncio transport (one connection pool)."""

    def __init__(
        self,
        settings: Settings,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        super().__init__(settings, timeout, max_retries)
        self.client = httpx.AsyncClient(
            base_url=settings.api_url, headers=self.headers, verify=settings.ssl_context()
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def request(self, method: str, path: str, *, safe: bool = False, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self.client.send(self._build(self.client, method, path, **kw))
            except httpx.HTTPError as e:
                if should_retry(safe=safe, attempt=attempt, max_retries=self.max_retries, exc=e):
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise translate(e, self.settings.api_url) from e
            if resp.is_success:
                return resp
            if should_retry(
                safe=safe, attempt=attempt, max_retries=self.max_retries, status=resp.status_code
            ):
                await asyncio.sleep(backoff(attempt))
                attempt += 1
                continue
            raise errors.error_from_body(resp.status_code, resp.content)

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, safe: bool = False, **kw: Any
    ) -> AsyncIterator[httpx.Response]:
        attempt = 0
        while True:
            try:
                resp = await self.client.send(self._build(self.client, method, path, **kw), stream=True)
            except httpx.HTTPError as e:
                if should_retry(safe=safe, attempt=attempt, max_retries=self.max_retries, exc=e):
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise translate(e, self.settings.api_url) from e
            if not resp.is_success:
                body = await resp.aread()
                await resp.aclose()
                if should_retry(
                    safe=safe, attempt=attempt, max_retries=self.max_retries, status=resp.status_code
                ):
                    await asyncio.sleep(backoff(attempt))
                    attempt += 1
                    continue
                raise errors.error_from_body(resp.status_code, body)
            try:
                yield resp
            finally:
                await resp.aclose()
            return
