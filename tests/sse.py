"""Reading a streaming /generate answer as a client does: server-sent events with arrival times."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Event:
    kind: str  # "token", "done", "error", or "comment" for a `: ...` line (the keep-alive)
    data: Any  # the decoded JSON of its data line; a comment's text
    at: float  # time.monotonic() when its last line arrived


def events(response: httpx.Response) -> Iterator[Event]:
    """The events of a streaming response, each yielded as soon as its blank line arrives."""
    kind, data = "message", []
    for line in response.iter_lines():
        if line.startswith(":"):
            yield Event("comment", line[1:].strip(), time.monotonic())
        elif line.startswith("event:"):
            kind = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())
        elif line == "" and data:
            yield Event(kind, json.loads("\n".join(data)), time.monotonic())
            kind, data = "message", []


def read_all(stream: Iterator[Event], timeout: float) -> list[Event]:
    """The remaining events until the stream ends; fails if it has not ended within `timeout` s."""
    deadline, seen = time.monotonic() + timeout, []
    for event in stream:
        seen.append(event)
        assert time.monotonic() < deadline, f"the stream did not end within {timeout} s: {seen[-3:]}"
    return seen


def until(stream: Iterator[Event], kind: str, timeout: float) -> list[Event]:
    """Events up to and including the first of `kind`; fails past `timeout` seconds or at the end."""
    deadline, seen = time.monotonic() + timeout, []
    for event in stream:
        seen.append(event)
        if event.kind == kind:
            return seen
        assert time.monotonic() < deadline, f"no {kind!r} event within {timeout} s: {seen[-3:]}"
    raise AssertionError(f"the stream ended without a {kind!r} event: {seen[-3:]}")
