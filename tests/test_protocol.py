"""Unit: the connection protocol sends a plain answer in one write. uvicorn writes a head and its
body apart; a replica killed between the two leaves its proxy a head it can neither use nor
replay (tests/test_replica_loss.py saw it once as a cut non-streamed answer)."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
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


async def writes_for(request: bytes) -> list[bytes]:
    """The writes one request's answer makes, through the server's own protocol and app."""
    settings = Settings(api_keys=(KEY,), model=engine.ModelConfig(name="/nonexistent/model"))
    config = uvicorn.Config(create_app(settings, lazy=engine.LazyEngine()), http=guarded_protocol(5, 10),
                            lifespan="off", access_log=False, log_config=None)  # fmt: skip
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(200):  # the app answers in a task of its own
        await asyncio.sleep(0.01)
        if transport.writes and transport.writes[-1].endswith(b"}"):
            break
    await asyncio.sleep(0.05)  # anything written after the body would show here
    protocol.connection_lost(None)
    return transport.writes


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n", b"200"),
        (b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}", b"401"),
        (b"GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n", b"404"),
        (b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n", b"200"),
    ],
)
def test_a_plain_answer_reaches_the_socket_in_one_write(request_bytes: bytes, status: bytes) -> None:
    writes = asyncio.run(writes_for(request_bytes))
    assert len(writes) == 1, [w[:60] for w in writes]
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status)
    assert body.startswith(b"{") and body.endswith(b"}")
    length = next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    assert int(length.split(b":")[1]) == len(body)
