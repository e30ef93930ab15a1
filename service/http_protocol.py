"""uvicorn's HTTP protocol, with a response written to the socket in one piece.

uvicorn writes a response's status line and headers (`http.response.start`) and its body
(`http.response.body`) as two `transport.write` calls: two send syscalls and two TCP segments for
every answer, which py-spy put at about a third of the CPU of a refused request here, and which the
client pays again on its side. `CoalescingTransport` gathers the writes made within one turn of the
event loop (a response's head and body are sent back to back by one task) and hands them to the
socket as one write at the end of that turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop go out as one; the rest is the socket's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def flush(self) -> None:
        if self._pending and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    def close(self) -> None:
        """What was written, then the connection closed (as the socket's transport does with its buffer)."""
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a CoalescingTransport (its flow control still watches the socket's)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
