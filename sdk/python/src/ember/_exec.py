"""One command's NDJSON event stream, folded into a result.

Each line is ``{"type": "started"|"stdout"|"stderr"|"exit"|"error", "seq", …}``;
output is ``text`` or ``data_b64``. Events are numbered, so a stream resumed
with ``?after=SEQ`` after a break drops what was already seen. Callbacks get
text decoded incrementally, so a character split across chunks arrives whole.
"""

from __future__ import annotations

import base64
import codecs
import json
from dataclasses import dataclass

from .errors import TimeoutError as EmberTimeoutError
from .models import CommandResult

#: Tries to resume a broken stream before giving up.
MAX_RECONNECTS = 3


class StreamBroken(Exception):
    """The stream ended or failed before the command exited."""


@dataclass(frozen=True, slots=True)
class Output:
    stream: str  # "stdout" or "stderr"
    text: str


class EventLog:
    """Folds events into stdout, stderr and an exit status."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.last_seq = 0
        self._out = bytearray()
        self._err = bytearray()
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")("replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self.exit: dict[str, object] | None = None

    @property
    def done(self) -> bool:
        return self.exit is not None

    def feed(self, line: str | bytes) -> Output | None:
        """Take one line; returns output to hand to a callback, if any.

        Raises :class:`StreamBroken` for an ``error`` event.
        """
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        line = line.strip()
        if not line:
            return None
        try:
            ev = json.loads(line)
        except ValueError as e:
            raise StreamBroken(f"an unreadable event line: {line[:200]!r}") from e
        kind = ev.get("type")
        if kind == "error":
            raise StreamBroken(f"{ev.get('message')} ({ev.get('code')})")
        seq = ev.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return None  # replayed after a reconnect
            self.last_seq = seq
        if kind == "started":
            self.pid = int(ev["pid"])
        elif kind in ("stdout", "stderr"):
            if "text" in ev and ev["text"] is not None:
                data = str(ev["text"]).encode()
            else:
                data = base64.b64decode(ev.get("data_b64") or "")
            (self._out if kind == "stdout" else self._err).extend(data)
            text = self._decoders[kind].decode(data)
            return Output(kind, text) if text else None
        elif kind == "exit":
            self.exit = ev
        return None

    def result(self) -> CommandResult:
        ex = self.exit or {}
        code = ex.get("exit_code")
        signal = ex.get("signal")
        return CommandResult(
            pid=self.pid or 0,
            stdout=self._out.decode("utf-8", "replace"),
            stderr=self._err.decode("utf-8", "replace"),
            exit_code=int(code) if isinstance(code, int) else None,
            signal=int(signal) if isinstance(signal, int) else None,
            timed_out=bool(ex.get("timed_out", False)),
            stdout_bytes=bytes(self._out),
            stderr_bytes=bytes(self._err),
        )

    def finish(self) -> CommandResult:
        """The result; a command killed by its timeout raises ``ember.TimeoutError``."""
        result = self.result()
        if result.timed_out:
            raise EmberTimeoutError(f"the command timed out and was killed (pid {result.pid})", result=result)
        return result
