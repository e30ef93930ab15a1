"""The coalescing transport under mae-serve's HTTP protocol: one socket write per response, nothing lost."""

from __future__ import annotations

import asyncio

from service.http_protocol import CoalescingTransport


class Socket:
    """The socket's transport, as far as the coalescing one uses it: writes recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 7


def test_writes_of_one_turn_go_out_as_one_and_in_order() -> None:
    async def scenario() -> Socket:
        sock = Socket()
        transport = CoalescingTransport(sock, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(memoryview(b"ok"))
        assert sock.writes == []  # not before the turn ends
        await asyncio.sleep(0)
        assert sock.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
        transport.write(b"next")
        await asyncio.sleep(0)
        assert transport.get_write_buffer_size() == 7  # the rest is the socket's
        return sock

    assert asyncio.run(scenario()).writes[-1] == b"next"


def test_close_sends_what_was_written_first_and_abort_drops_it() -> None:
    async def scenario() -> tuple[Socket, Socket]:
        loop = asyncio.get_running_loop()
        closed, aborted = Socket(), Socket()
        for sock, end in ((closed, "close"), (aborted, "abort")):
            transport = CoalescingTransport(sock, loop)  # type: ignore[arg-type]
            transport.write(b"last answer")
            getattr(transport, end)()
        await asyncio.sleep(0)  # the flush scheduled by the write finds nothing left, and writes nothing
        return closed, aborted

    closed, aborted = asyncio.run(scenario())
    assert closed.writes == [b"last answer"] and closed.closed
    assert aborted.writes == [] and aborted.aborted


def test_mae_serve_runs_uvicorn_with_the_coalescing_protocol(monkeypatch) -> None:
    import uvicorn

    from service import __main__ as main
    from service.http_protocol import CoalescingHttpToolsProtocol

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    main.cli(["--log-level", "warning"])  # the bundled model, opened for real; uvicorn.run does not serve
    assert calls and calls[0]["http"] is CoalescingHttpToolsProtocol
