"""Unit: the connection protocol sends a plain answer in one write. uvicorn writes a head and its
body apart; a replica killed between the two leaves its proxy a head it can neither use nor
replay (tests/test_replica_loss.py saw it once as a cut non-streamed answer)."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

import engine
from server import Settings, create_app, guarded_protocol
from tests.conftest import KEY


class RecordingTransport(asyncio.Transport):
    """A socket's end as the protocol sees it: every write kept apart, as the network would send it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def connect(app: ASGIApp) -> tuple[H11Protocol, RecordingTransport]:
    """The server's own connection protocol, opened on a recording transport, serving `app`."""
    config = uvicorn.Config(app, http=guarded_protocol(5, 10), lifespan="off", access_log=False, log_config=None)
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def writes_for(request: bytes, keep_alive: bool) -> list[bytes]:
    """The writes one request's answer makes through the server's app, as they reach the socket
    within a few turns of the loop, before anything closes a connection that stays open."""
    settings = Settings(api_keys=(KEY,), model=engine.ModelConfig(name="/nonexistent/model"))
    protocol, transport = connect(create_app(settings, lazy=engine.LazyEngine()))
    protocol.data_received(request)
    for _ in range(200):  # the app answers in a task of its own
        await asyncio.sleep(0.01)
        if transport.writes and transport.writes[-1].endswith(b"}"):
            break
    for _ in range(3):  # anything written after the body would show here
        await asyncio.sleep(0)
    writes = list(transport.writes)
    assert transport.closed is not keep_alive
    protocol.connection_lost(None)
    return writes


@pytest.mark.parametrize(
    "request_bytes, status, keep_alive",
    [
        (b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", b"200", True),
        (b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}", b"401", False),  # closes
        (b"GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n", b"404", True),
        (b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n", b"200", True),
    ],
)
def test_a_plain_answer_reaches_the_socket_in_one_write(request_bytes: bytes, status: bytes, keep_alive: bool) -> None:
    writes = asyncio.run(writes_for(request_bytes, keep_alive))
    assert len(writes) == 1, [w[:60] for w in writes]
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status)
    assert body.startswith(b"{") and body.endswith(b"}")
    length = next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    assert int(length.split(b":")[1]) == len(body)


STREAM_HEAD = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def test_a_streams_pieces_go_out_as_they_come_each_in_its_own_write() -> None:
    async def run() -> list[bytes]:
        later = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send(STREAM_HEAD)
            await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
            await later.wait()
            await send({"type": "http.response.body", "body": b"data: two\n\n"})

        protocol, transport = connect(app)
        protocol.data_received(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        first = list(transport.writes)
        assert len(first) == 1 and first[0].startswith(b"HTTP/1.1 200") and b"data: one" in first[0]
        later.set()
        for _ in range(5):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport.writes

    writes = asyncio.run(run())
    assert len(writes) == 2 and b"data: two" in writes[1] and writes[1].endswith(b"0\r\n\r\n")


def test_a_large_answer_is_written_through_so_flow_control_sees_it() -> None:
    """Past WholeWrites.WRITE_THROUGH bytes in one turn, the bytes reach the transport at once:
    its buffer limits (pause_writing) then hold the app back as uvicorn means them to."""

    async def run() -> tuple[int, int]:
        seen_in_turn = 0

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal seen_in_turn
            await send(STREAM_HEAD)
            for _ in range(4):
                await send({"type": "http.response.body", "body": b"x" * 100_000, "more_body": True})
            seen_in_turn = len(transport.writes)  # before the loop turns again
            await send({"type": "http.response.body", "body": b""})

        protocol, transport = connect(app)
        protocol.data_received(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return seen_in_turn, sum(map(len, transport.writes))

    seen_in_turn, total = asyncio.run(run())
    assert seen_in_turn >= 4 and total > 400_000
