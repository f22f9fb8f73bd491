"""End-to-end: replicas of the server behind Debian's haproxy, configured by deploy/haproxy.cfg.

A rolling restart under steady load loses nothing; overload through haproxy answers only 200 and
503 + Retry-After, and haproxy never takes a busy replica out. Run with `-s` to see the figures.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import KEY, ROOT, free_port

pytestmark = pytest.mark.e2e
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
REPLICAS = 2
BATCH, QUEUE = 2, 4  # per replica: capacity 6, so 4x overload needs only 48 clients
PROMPT = "A rolling restart"
STEADY_CLIENTS = 3  # steady load, light enough that a restarting replica is not starved on 2 cores
TOKENS = 16  # short generations; restart() still waits until one is in flight before its SIGTERM
ROUNDING = 0.005  # log times are cut to milliseconds


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The replicas and haproxy


@dataclass
class Replica:
    """One `python server.py` on a fixed port; each start writes its own log file."""

    name: str
    port: int
    env: dict[str, str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        self.logs.append(self.log_dir / f"{self.name}-run{len(self.logs)}.log")
        env = {**os.environ, **self.env, "PORT": str(self.port)}
        with open(self.logs[-1], "wb") as log:
            self.process = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT, env=env, stdout=log, stderr=log)

    def ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.logs[-1].read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def active(self) -> int:
        health = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).json()
        return int(health["active_sequences"])

    def log(self, run: int) -> list[dict[str, Any]]:
        """One run's JSON log lines, each with its time as epoch seconds ("at")."""
        entries = []
        for line in self.logs[run].read_text(errors="replace").splitlines():
            entry = _json_or_none(line)
            if entry and "time" in entry:
                entry["at"] = datetime.strptime(entry["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                entries.append(entry)
        return entries

    def generate_log(self, run: int) -> list[dict[str, Any]]:
        """The /generate lines of one run's request log, each with its arrival ("start")."""
        entries = [e for e in self.log(run) if e.get("path") == "/generate"]
        for entry in entries:
            entry["start"] = entry["at"] - entry["latency_ms"] / 1000
        return entries


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Haproxy:
    process: subprocess.Popen[bytes]
    url: str
    stats_socket: Path
    log_path: Path

    def stat(self) -> dict[str, dict[str, str]]:
        """`show stat` on the admin socket: one row per server of the backend, by server name."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            raw = b"".join(iter(lambda: s.recv(65536), b""))
        rows = csv.DictReader(raw.decode().lstrip("# ").splitlines())
        return {row["svname"]: row for row in rows if row["pxname"] == "replicas" and row["svname"] != "BACKEND"}

    def wait_up(self, names: list[str], timeout: float = 30) -> None:
        wait_for(lambda: all(self.stat()[n]["status"] == "UP" for n in names), timeout, f"haproxy sees {names} UP")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def retried(self, since: int) -> int:
        """Requests haproxy sent more than once since a log offset (httplog's retries field)."""
        with open(self.log_path, errors="replace") as log:
            log.seek(since)
            counts = re.findall(r" \d+/\d+/\d+/\d+/\+?(\d+) \d+/\d+ ", log.read())
        return sum(1 for n in counts if int(n) > 0)


@dataclass
class Cluster:
    replicas: list[Replica]
    haproxy: Haproxy


def start_haproxy(replicas: list[Replica], tmp: Path) -> Haproxy:
    assert shutil.which("haproxy"), "haproxy is not installed: `make debs` (or apt-get install haproxy)"
    port, sock, log_path = free_port(), tmp / "haproxy.sock", tmp / "haproxy.log"
    env = {**os.environ, "LB_BIND": f"127.0.0.1:{port}", "LB_STATS_SOCKET": str(sock)}
    env.update({f"LLM_SERVER_{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log, stderr=log)
    haproxy = Haproxy(process, f"http://127.0.0.1:{port}", sock, log_path)
    wait_for(lambda: sock.exists() or process.poll() is not None, 10, "haproxy's stats socket")
    assert process.poll() is None, log_path.read_text()
    return haproxy


@pytest.fixture(scope="module")
def tiny_model(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model's tokenizer on a GPT-2 2 layers deep and 64 wide: it loads and generates in
    a blink, so a restart costs little more than the imports, and a drain has little to wait for."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gpt2_dir / name, out / name)
    torch.manual_seed(0)
    config = GPT2Config.from_pretrained(gpt2_dir, n_layer=2, n_embd=64, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@contextmanager
def running_cluster(model: Path, tmp: Path, count: int, **settings: str) -> Iterator[Cluster]:
    """`count` replicas of `model` (small batches) behind haproxy, each ready and up; stopped after."""
    env = {"API_KEY": KEY, "HOST": "127.0.0.1", "MODEL_NAME": str(model), "LOAD_ON_START": "1"}
    env |= {"MAX_BATCH_SIZE": str(BATCH), "MAX_QUEUE": str(QUEUE), "DTYPE": "float32", **settings}
    replicas = [Replica(f"r{i + 1}", free_port(), env, tmp) for i in range(count)]
    for replica in replicas:
        replica.start()
    haproxy = None
    try:
        for replica in replicas:
            wait_for(replica.ready, 120, f"{replica.name} ready")
        haproxy = start_haproxy(replicas, tmp)
        haproxy.wait_up([r.name for r in replicas])
        yield Cluster(replicas, haproxy)
    finally:
        for process in [r.process for r in replicas] + [haproxy.process if haproxy else None]:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=60)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tiny_model, tmp_path_factory.mktemp("replicas"), REPLICAS, OMP_NUM_THREADS="1") as cluster:
        yield cluster


# ---------------------------------------------------------------------------------------------
# Closed-loop load: each client sends its next request when the last one is answered


@dataclass
class Outcome:
    start: float
    end: float
    status: int | None  # None: no HTTP answer (a refused, reset or dropped connection)
    complete: bool = False  # a 200 whose body is whole and says what was asked
    retry_after: str | None = None
    detail: str = ""


def one_request(client: httpx.Client) -> Outcome:
    start = time.time()
    try:
        response = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": TOKENS, "ignore_eos": True})
    except httpx.HTTPError as exc:
        return Outcome(start, time.time(), None, detail=repr(exc))
    outcome = Outcome(start, time.time(), response.status_code, retry_after=response.headers.get("retry-after"))
    body = _json_or_none(response.text) or {}
    if response.status_code == 200:
        text = str(body.get("generated_text", ""))
        outcome.complete = body.get("generated_tokens") == TOKENS and text.startswith(PROMPT)
    outcome.detail = str(body.get("detail", ""))
    return outcome


class Load:
    """Clients that each wait `think` seconds between an answer and their next request: enough
    load to keep every replica busy, not so much that a restarting replica starves on 2 cores."""

    def __init__(self, url: str, clients: int, think: float):
        self.url, self.think = url, think
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, headers={"x-api-key": KEY}, timeout=30) as client:
            while not self.stop.is_set():
                self.outcomes.append(one_request(client))
                time.sleep(self.think)


def longest_gap(outcomes: list[Outcome], since: float, until: float) -> float:
    """The longest time in [since, until] in which no request completed successfully."""
    ends = sorted(o.end for o in outcomes if o.status == 200 and since <= o.end <= until)
    points = [since, *ends, until]
    return max(b - a for a, b in itertools.pairwise(points))


# ---------------------------------------------------------------------------------------------
# The tests


@dataclass
class Drain:
    replica: str
    exit_code: int
    drain_seconds: float
    in_flight: int  # requests it was generating at SIGTERM; like every other, they must end 200
    refused: int  # requests that reached it while draining: 503, and haproxy retried them elsewhere
    served_after: int  # answers other than 503 to requests that arrived once it was closing: must be 0
    back_after: float  # seconds from SIGTERM until haproxy sent it traffic again


def restart(cluster: Cluster, replica: Replica) -> Drain:
    """SIGTERM, wait for the exit, start again on the same port, wait until haproxy uses it."""
    assert replica.process is not None
    # Usually leaves a request in flight for the drain to finish (test_hardening.py has the
    # deterministic case, on one server); the figures report how many there were.
    wait_for(lambda: replica.active() > 0, 10, f"a request in flight on {replica.name}")
    run, sigterm = len(replica.logs) - 1, time.time()
    replica.process.send_signal(signal.SIGTERM)
    exit_code = replica.process.wait(timeout=60)
    drained = time.time() - sigterm
    replica.start()
    wait_for(replica.ready, 90, f"{replica.name} ready again")
    cluster.haproxy.wait_up([replica.name])
    wait_for(lambda: any(e["status"] == 200 for e in replica.generate_log(run + 1)), 10, f"traffic to {replica.name}")
    # The server's own clock: it turns to draining on SIGTERM, a moment before uvicorn logs this.
    closing = next(e["at"] for e in replica.log(run) if e["message"] == "Shutting down")
    entries = replica.generate_log(run)
    after = [e for e in entries if e["start"] > closing + ROUNDING]
    return Drain(
        replica.name,
        exit_code,
        round(drained, 2),
        in_flight=sum(1 for e in entries if e["status"] == 200 and e["start"] < sigterm < e["at"]),
        refused=sum(1 for e in entries if e["status"] == 503),  # the load stays below capacity
        served_after=sum(1 for e in after if e["status"] != 503),
        back_after=round(time.time() - sigterm, 2),
    )


def test_a_rolling_restart_under_load_loses_nothing(cluster: Cluster) -> None:
    log_start = cluster.haproxy.log_size()
    with Load(cluster.haproxy.url, STEADY_CLIENTS, think=0.2) as load:
        time.sleep(2)
        began = time.time()
        drains = [restart(cluster, replica) for replica in cluster.replicas]
        ended = time.time()
        time.sleep(1)
    outcomes = load.outcomes
    statuses = Counter(o.status for o in outcomes)
    during = [o for o in outcomes if began <= o.end <= ended]
    print(
        f"\nrolling restart of {REPLICAS} replicas through haproxy, {STEADY_CLIENTS} closed-loop clients: "
        f"{len(outcomes)} requests ({len(during)} during the restarts), statuses {dict(statuses)}, retried by haproxy "
        f"{cluster.haproxy.retried(log_start)}, longest gap in service {longest_gap(outcomes, began, ended):.2f} s, "
        f"slowest request {max(o.end - o.start for o in outcomes):.2f} s"
    )
    for drain in drains:
        print(f"  {drain}")
    assert [o for o in outcomes if o.status != 200 or not o.complete] == []
    assert len(during) >= 20  # the load really ran through the restarts
    for drain in drains:
        assert drain.exit_code == 0
        assert drain.served_after == 0, "a draining replica took new work"


def test_overload_through_haproxy_gives_200_or_503_and_no_replica_is_taken_out(cluster: Cluster) -> None:
    names = [r.name for r in cluster.replicas]
    cluster.haproxy.wait_up(names)
    before = cluster.haproxy.stat()
    seen: list[str] = []
    capacity = REPLICAS * (BATCH + QUEUE)
    clients = 4 * capacity
    with Load(cluster.haproxy.url, clients, think=0.05) as load:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            seen += [row["status"] for row in cluster.haproxy.stat().values()]
            time.sleep(0.2)
    after = cluster.haproxy.stat()
    outcomes = load.outcomes
    statuses = Counter(o.status for o in outcomes)
    details = Counter(o.detail.split(":")[0] for o in outcomes if o.status == 503)
    print(f"\noverload, {clients} clients on capacity {capacity}: {dict(statuses)}, 503s: {dict(details)}")
    assert set(statuses) <= {200, 503}
    assert statuses[200] > 0 and statuses[503] > 0
    assert all(o.retry_after for o in outcomes if o.status == 503)
    assert all(o.complete for o in outcomes if o.status == 200)
    assert set(seen) == {"UP"}
    assert [after[n]["chkdown"] for n in names] == [before[n]["chkdown"] for n in names]


def test_haproxys_own_503_has_the_servers_error_shape_and_a_retry_after(tmp_path: Path) -> None:
    nobody = [Replica(f"r{i + 1}", free_port(), {}, tmp_path) for i in range(REPLICAS)]  # never started
    haproxy = start_haproxy(nobody, tmp_path)
    try:
        response = httpx.post(haproxy.url + "/generate", json={"prompt": PROMPT}, headers={"x-api-key": KEY})
    finally:
        haproxy.process.terminate()
        haproxy.process.wait(timeout=10)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json() == {"detail": "no replica available; retry shortly"}
