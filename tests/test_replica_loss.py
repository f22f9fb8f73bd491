"""End-to-end: a replica killed under load (`kill -9`: the OOM killer, a node lost), behind Debian's
haproxy configured by deploy/haproxy.cfg.

Three replicas, closed-loop clients, some streaming and some not. The replica dies without
draining. A non-streamed request it had not answered is replayed by haproxy on another replica
(generation has no side effects), so it ends 200. A stream that had begun cannot be replayed: its
client must see it cut (the connection ends inside the chunked body), never a clean end without
its `done` event. Then the replica starts again and gets traffic only once its `/ready` says 200.
Run with `-s` to see the counts (deploy/README.md quotes them).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests import test_replicas
from tests.conftest import KEY
from tests.sse import events
from tests.test_replicas import PROMPT, Cluster, Haproxy, Replica, one_request, running_cluster, wait_for

pytestmark = pytest.mark.e2e
REPLICAS = 3
BATCH, QUEUE = 2, 4  # per replica
PLAIN_CLIENTS, STREAM_CLIENTS = 4, 3  # below the 18 places, so every request is taken at once
STREAM_TOKENS = 200  # a stream lasts ~12 plain requests, so streams are under way on every replica


tiny_model = test_replicas.tiny_model  # the fixture: random-distilgpt2's tokenizer on 2 small layers


@pytest.fixture
def cluster(tiny_model: Path, tmp_path: Path) -> Iterator[Cluster]:
    """Three replicas, one torch thread each (three share two cores); this test's own, as it kills one."""
    with running_cluster(tiny_model, tmp_path, REPLICAS, THREADS="1") as cluster:
        yield cluster


# ---------------------------------------------------------------------------------------------
# What a client sees


@dataclass
class Answer:
    stream: bool
    start: float
    end: float
    ending: str  # "complete", "cut", "error event", or what else went wrong (all counted as "other")
    status: int | None = None
    detail: str = ""


def plain_request(client: httpx.Client) -> Answer:
    outcome = one_request(client)
    ending = "complete" if outcome.complete else "no answer" if outcome.status is None else "not complete"
    return Answer(False, outcome.start, outcome.end, ending, outcome.status, outcome.detail)


def stream_request(client: httpx.Client) -> Answer:
    """One stream, read to its end. A transport error once the 200 is in is a cut stream; an end
    without `done` or `error` would look complete to a careless client: "silent end"."""
    start, status = time.time(), None
    body = {"prompt": PROMPT, "max_new_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True}
    try:
        with client.stream("POST", "/generate", json=body) as response:
            status = response.status_code
            if status != 200:
                return Answer(True, start, time.time(), "not 200", status, response.read().decode(errors="replace"))
            seen = [e for e in events(response) if e.kind != "comment"]
    except httpx.HTTPError as exc:
        return Answer(True, start, time.time(), "cut" if status == 200 else "no answer", status, repr(exc))
    last = seen[-1] if seen else None
    if last is None or last.kind not in ("done", "error"):
        return Answer(True, start, time.time(), "silent end", status, repr(last))
    if last.kind == "error":
        return Answer(True, start, time.time(), "error event", status, str(last.data))
    tokens = sum(len(e.data["token_ids"]) for e in seen if e.kind == "token")
    complete = tokens == last.data["generated_tokens"] == STREAM_TOKENS
    return Answer(True, start, time.time(), "complete" if complete else "not complete", status, str(last.data))


class MixedLoad:
    """Closed-loop clients, each sending its next request as soon as the last one ended."""

    def __init__(self, url: str):
        self.url = url
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        kinds = [plain_request] * PLAIN_CLIENTS + [stream_request] * STREAM_CLIENTS
        self.threads = [threading.Thread(target=self._client, args=(kind,), daemon=True) for kind in kinds]

    def __enter__(self) -> MixedLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _client(self, kind: Callable[[httpx.Client], Answer]) -> None:
        with httpx.Client(base_url=self.url, headers={"x-api-key": KEY}, timeout=30) as client:
            while not self.stop.is_set():
                self.answers.append(kind(client))


# ---------------------------------------------------------------------------------------------
# What haproxy saw


@dataclass(frozen=True)
class Logged:
    """One httplog line: when haproxy accepted the request, the replica that answered last, how
    often it was sent again, and the termination state ("SD--": the server side ended mid-data)."""

    accepted: float
    server: str
    status: int
    state: str
    retries: int


HTTPLOG = re.compile(
    r" \[(?P<accepted>[^]]+)\] \S+ replicas/(?P<server>\S+) \S+ (?P<status>-?\d+) \d+ \S+ \S+ (?P<state>\S{4}) "
    r"\d+/\d+/\d+/\d+/\+?(?P<retries>\d+) \d+/\d+ "
)


def logged_since(haproxy: Haproxy, offset: int) -> list[Logged]:
    with open(haproxy.log_path, errors="replace") as log:
        log.seek(offset)
        text = log.read()
    return [
        Logged(datetime.strptime(m["accepted"], "%d/%b/%Y:%H:%M:%S.%f").timestamp(), m["server"], int(m["status"]),
               m["state"], int(m["retries"]))
        for m in HTTPLOG.finditer(text)
    ]  # fmt: skip


@dataclass(frozen=True)
class OnServer:
    """haproxy's sessions on one replica, from `show sess all` (a txn's status is -1 until the
    replica's status line arrives)."""

    unanswered: int  # nothing received yet: haproxy still holds what it needs to replay them
    answering: int  # an answer under way: with the tiny model's short JSON answers, a stream


def on_server(haproxy: Haproxy, name: str) -> OnServer:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(haproxy.stats_socket))
        s.sendall(b"show sess all\n")
        raw = b"".join(iter(lambda: s.recv(65536), b"")).decode(errors="replace")
    sessions = [block for block in re.split(r"\n(?=0x[0-9a-f]+: \[)", raw) if f"server={name} " in block]
    statuses = [m[1] for block in sessions if (m := re.search(r" status=(-?\d+) ", block))]
    return OnServer(statuses.count("-1"), len(statuses) - statuses.count("-1"))


def until_both_on(haproxy: Haproxy, name: str, timeout: float = 15) -> OnServer:
    """Wait until the replica has a request it has not answered and a stream under way."""
    deadline = time.monotonic() + timeout
    while (seen := on_server(haproxy, name)).unanswered < 1 or seen.answering < 1:
        assert time.monotonic() < deadline, f"no unanswered request and stream together on {name}: {seen}"
        time.sleep(0.02)
    return seen


# ---------------------------------------------------------------------------------------------
# The test


@dataclass
class Rejoin:
    loading_polls: int  # polls that found the process answering /health while /ready said 503
    up_while_not_ready: int  # polls in which haproxy had it UP while /ready said 503: must be 0
    ready_after: float  # seconds from its start to its first /ready 200 (its own log)
    first_ready: float  # the replica's first /ready 200 (its own log)
    first_generate: float  # the arrival of its first /generate (its own log)


def rejoin(cluster: Cluster, replica: Replica) -> Rejoin:
    """Start a killed replica again; watch haproxy's view of it until it serves again."""
    started = time.time()
    replica.start()
    run, loading, up_early = len(replica.logs) - 1, 0, 0
    while True:
        status = cluster.haproxy.stat()[replica.name]["status"]  # read first: UP needs two good checks
        if replica.ready():
            break
        try:
            answering = httpx.get(f"http://127.0.0.1:{replica.port}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            answering = False
        loading += answering
        up_early += status == "UP"
        time.sleep(0.1)
    cluster.haproxy.wait_up([replica.name])
    wait_for(lambda: any(e["status"] == 200 for e in replica.generate_log(run)), 20, f"traffic to {replica.name}")
    first_ready = min(e["at"] for e in replica.log(run) if e.get("path") == "/ready" and e["status"] == 200)
    first_generate = min(e["start"] for e in replica.generate_log(run))
    return Rejoin(loading, up_early, round(first_ready - started, 1), first_ready, first_generate)


@dataclass
class Tally:
    """What the clients saw, and what haproxy did from the kill on (deploy/README.md quotes it)."""

    sent: int
    complete: int  # 200 and the whole answer; a stream: every token, then its `done` event
    replayed: int  # requests haproxy sent again, to another replica
    replayed_200: int  # of those, the ones that replica answered 200
    replayed_unanswered: int  # of those, the ones it had sent to the victim before the kill
    cut_streams: int  # the connection ended inside the stream's body: a client error, never an end
    aborted: int  # haproxy's log lines for the victim whose answer its server cut (state S...)
    other: dict[str, int]  # anything else a client saw (an error status, a lost request, a silent end)

    def __str__(self) -> str:
        return (
            f"sent {self.sent}, 200 and complete {self.complete}, replayed by haproxy {self.replayed} "
            f"({self.replayed_200} answered 200; {self.replayed_unanswered} sent to the victim before it died), "
            f"cut streams {self.cut_streams} (haproxy: {self.aborted} cut by the server), "
            f"other {sum(self.other.values())} {self.other}"
        )


def tally(answers: list[Answer], lines: list[Logged], victim: str, killed: float) -> Tally:
    endings = Counter(a.ending for a in answers)
    replayed = [line for line in lines if line.retries > 0]
    return Tally(
        len(answers), endings["complete"], len(replayed), sum(1 for line in replayed if line.status == 200),
        replayed_unanswered=sum(1 for line in replayed if line.accepted < killed),  # the rest found it closed
        cut_streams=endings["cut"],
        aborted=sum(1 for line in lines if line.server == victim and line.state.startswith("S")),
        other={ending: n for ending, n in endings.items() if ending not in ("complete", "cut")},
    )  # fmt: skip


def test_a_replica_killed_under_load_replays_what_it_had_not_answered_and_cuts_its_streams(
    cluster: Cluster,
) -> None:
    victim = cluster.replicas[0]
    assert victim.process is not None
    with MixedLoad(cluster.haproxy.url) as load:
        time.sleep(2)
        on_it = until_both_on(cluster.haproxy, victim.name)
        since, killed = cluster.haproxy.log_size(), time.time()
        victim.process.kill()  # SIGKILL: no drain, no goodbye
        victim.process.wait(timeout=10)
        wait_for(lambda: cluster.haproxy.stat()[victim.name]["status"].startswith("DOWN"), 10, "the victim DOWN")
        down_after = time.time() - killed
        time.sleep(2)
        back = rejoin(cluster, victim)
        time.sleep(1)
    seen = tally(load.answers, logged_since(cluster.haproxy, since), victim.name, killed)
    print(
        f"\nkill -9 of 1 of {REPLICAS} replicas under {PLAIN_CLIENTS} plain and {STREAM_CLIENTS} streaming "
        f"closed-loop clients, while haproxy had on it {on_it}: {seen}; DOWN {down_after:.1f} s after the kill; "
        f"started again: {back}"
    )
    for answer in load.answers:
        if answer.ending != "complete":
            print(f"  {answer}")
    assert seen.other == {}
    assert seen.replayed_unanswered >= 1  # what it had not answered was answered elsewhere
    assert seen.replayed_200 == seen.replayed
    assert seen.cut_streams >= 1, "no stream was cut: the kill found none under way"
    assert seen.cut_streams == seen.aborted  # each cut a client saw is a stream its replica died in
    assert back.up_while_not_ready == 0
    assert back.loading_polls >= 1  # it answered /health while loading, and haproxy waited for /ready
    assert back.first_generate >= back.first_ready - 0.005  # log times are cut to milliseconds
