"""The engine: one lazily loaded model, one thread that runs every request in one batch.

A request's path through this file: the server's worker thread (`anyio.to_thread.run_sync` under
the capacity limiter) calls `ENGINE.get()` (loads the model once) and then `Engine.stream`, which
tokenizes the prompt, hands a `Sequence` to the `Scheduler` and reads the sequence's `Output`:
pieces of text as they are made, then the `Result`, or an error. The engine thread runs
`Engine.step` in a loop: the scheduler admits waiting sequences while the KV pool has blocks
for them (their prompts prefilled after the blocks the prefix cache already holds, several to a
pass), hands each sequence pool blocks as it grows, the model (model.py) advances every running
sequence by one token in one batched forward pass (with a prompt chunk's, when the step has one),
and `Scheduler.postprocess` appends each new token, detokenizes it once, sends the new text,
decides who finished and takes their blocks back.

Reading order: requests, results and errors; settings; sampling; text work (incremental
detokenizing, stop strings); the sequence and its output; the prefix cache; the scheduler; the
engine loop; the one module-level engine (`ENGINE`).

Three words kept apart: the *model* is the network (model.py's `Model`), a *step* is one batched
forward pass (`Model.run`), and *detokenizing* turns token ids back into text (`TextStream`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import enum
import hashlib
import heapq
import logging
import math
import os
import queue
import secrets
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model import KV_BLOCK, PREFILL_BUCKET, PREFIX_BLOCK, LoadedModel, LoadError, Work, blocks_for, load_model

log = logging.getLogger("llm.engine")

# The most prompt tokens one pass prefills: fewer, larger passes make more tokens a second (AMX
# Xeon, SmolLM2, `bench/step_profile.py --chunk-sizes`: 1,595 tok/s in passes of 64, 2,391 of 128,
# 2,874 of 256), and a long prompt joins over several steps.
PREFILL_CHUNK = 256
PREFILL_UNTIMED = 64  # what a step prefills beside decoding sequences before any chunk's cost is known
PREFILL_CHUNK_LEAST = PREFILL_BUCKET  # the fewest while sequences decode: smaller chunks only add padding
PREFILL_QUEUED = 4 * PREFILL_CHUNK  # prompt tokens a step, in chunks, while prompts queue for free places
# Leading prompt tokens that another prompt in a prefill pass computes, from which on a prompt
# waits for the next pass (and the prefix cache) rather than compute them too: a pass costs ~35 ms
# besides ~0.37 ms a token, about 96 tokens' worth (AMX Xeon, SmolLM2, 1-16 prompts a pass).
PREFIX_WAIT = 96
# Keys a prefill pass's attention spans (every chunk's earlier positions, restored prefixes too,
# and the row) past which no other prompt joins it: each token of the row is scored against all
# of them, masked, so many long restored prefixes in one pass would cost their square.
PASS_KEYS = 2048
DETOKENIZE_CONTEXT = 4  # prompt tokens detokenized ahead of the continuation (see `TextStream`)


# ---------------------------------------------------------------------------------------------
# Requests, results and errors


class FinishReason(enum.StrEnum):
    """Why a generation ended; the values are the API's `finish_reason`."""

    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop string (cut from the text)
    EOS = "eos"  # the model's end of sequence
    TIMEOUT = "timeout"  # REQUEST_TIMEOUT, or the drain's deadline: the text so far
    CANCELLED = "cancelled"  # the client left


@dataclass(frozen=True)
class SamplingParams:
    """One request's options. These defaults are the API's defaults: the server's validation and
    OpenAPI document read them from here."""

    max_new_tokens: int = 50
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # ... times how often it was generated
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log-probability under the model (before penalties and
    temperature), and the most likely alternatives at its place."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Result:
    text: str  # the continuation only (the pieces sent, added up); the server prepends the prompt
    tokens: int
    finish_reason: FinishReason
    # Accounting, not content: two results with the same text, tokens and reason are equal.
    prompt_tokens: int = field(default=0, compare=False)
    cached_tokens: int = field(default=0, compare=False)  # prompt tokens whose keys came from the prefix cache
    admitted_at: float = field(default=0.0, compare=False)  # time.monotonic() when its prefill began
    first_token_at: float = field(default=0.0, compare=False)  # ... when its first token was sampled
    finished_at: float = field(default=0.0, compare=False)  # ... when it finished


@dataclass(frozen=True)
class Delta:
    """A piece of a generation: new token ids, and the new text that is safe to show (see
    `TextStream`). A request's deltas add up to its result's text."""

    token_ids: list[int]
    text: str
    tokens: int  # generated so far
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for them


class EngineUnavailable(RuntimeError):
    """The model could not be loaded; the message says what failed and what to set."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after  # seconds until the next load attempt (LazyEngine.retry_in)


class PromptTooLong(ValueError):
    """The prompt and max_new_tokens do not fit in the model's context."""


class GenerationFailed(RuntimeError):
    """The engine failed while running this request."""


class EngineStopped(GenerationFailed):
    """The engine is shutting down, or its thread stopped; another request may load it again."""


# ---------------------------------------------------------------------------------------------
# Settings
@dataclass(frozen=True)
class ModelConfig:
    """The engine's settings; each default is written here once (the server reads it from here)."""

    name: str = field(default="distilgpt2", metadata={"env": "MODEL_NAME"})  # a hub id or a local directory
    device: str = field(default="auto", metadata={"env": "DEVICE"})  # auto | cpu | cuda | cuda:N
    dtype: str = field(default="auto", metadata={"env": "DTYPE", "choices": ("auto", "float32", "bfloat16", "float16")})
    max_batch: int = field(default=32, metadata={"env": "MAX_BATCH_SIZE"})  # the capacity limiter's size
    retry_seconds: int = field(default=30, metadata={"env": "MODEL_RETRY_SECONDS"})  # after a failed load
    max_context: int = field(default=1024, metadata={"env": "MAX_CONTEXT_TOKENS"})  # bounds each sequence
    cache_dir: str | None = field(default=None, metadata={"env": "TRANSFORMERS_CACHE"})  # None: HF_HOME
    threads: int = field(default=0, metadata={"env": "THREADS", "minimum": 0})  # 0: the CPUs we may use
    quantize: str = field(default="auto", metadata={"env": "QUANTIZE", "choices": ("auto", "none", "int8")})
    memory_limit_mb: int = field(default=0, metadata={"env": "MEMORY_LIMIT_MB", "minimum": 0})  # 0: memory.max
    # Prompt tokens whose keys and values are kept for later prompts that start the same way; 0: off.
    prefix_cache_tokens: int = field(default=4096, metadata={"env": "PREFIX_CACHE_TOKENS", "minimum": 0})
    # The KV pool every running sequence takes its blocks from; 0: MAX_BATCH_SIZE sequences of the whole context.
    kv_cache_mb: int = field(default=0, metadata={"env": "KV_CACHE_MB", "minimum": 0})
    compile: bool = field(default=False, metadata={"env": "COMPILE"})  # torch.compile a lone sequence's decode pass


def use_threads(setting: int) -> int:
    """Size torch's thread pool: THREADS when set, else the CPUs this process may use. torch's
    own default counts the host's cores, ignoring a container's CPU quota: 64 threads on 2 CPUs'
    worth of quota spend most of their time throttled."""
    threads = setting or cpu_budget()
    torch.set_num_threads(threads)
    return threads


def cpu_budget(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs in this process's affinity, capped by a cgroup v2 quota ("200000 100000" is 2 CPUs)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cpus


# ---------------------------------------------------------------------------------------------
# Sampling


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from float32 logits [V] with this request's own generator. The most likely
    token always stays a candidate, so no accepted top_p, top_k or temperature leaves none."""
    raw, logits = logits, (logits - logits.max()) / params.temperature  # <= 0 everywhere: no overflow to inf
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the token that crosses top_p
        drop[0] = False  # a top_p below float32's smallest number would otherwise drop every token
        logits = logits.masked_fill(drop.scatter(0, order, drop), -math.inf)
    probs = logits.softmax(-1)
    if not bool(torch.isfinite(probs).all()):  # NaN logits from the model itself: fall back to greedy
        return int(raw.nan_to_num(-math.inf).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# Text work: token ids back to text, once each, and stop strings over the held-back tail


class TextStream:
    """One sequence's text, built a token at a time on the engine thread. Each token is
    detokenized once, inside a short window: the tokens since the last piece plus those before it
    (a few prompt tokens at first), since some tokenizers (SentencePiece) drop a leading space
    when a fragment is detokenized alone. A character still split across tokens (U+FFFD) waits
    until it is whole, and an ending that could still grow into a stop string is held back until
    it cannot; a complete stop string and what follows are never sent. So no piece is ever taken
    back, stop strings are searched only in the held-back tail and the new text, and the pieces
    add up to the final text exactly. No clean-up of spaces before punctuation: with it, a text
    could stop being the start of the same text one token longer."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids = prompt_ids[-DETOKENIZE_CONTEXT:]  # the window's tokens, and those since
        self.window = 0  # where the window starts in `ids`
        self.shown = len(self.ids)  # tokens whose text is already in `held` or `sent`
        self.held = ""  # detokenized, but not sent yet: it could still be the start of a stop string
        self.sent = ""
        self.stopped = False  # a stop string was found; nothing more is sent

    def add(self, token: int) -> str:
        """Take the next token; return the new text that is safe to send (often "")."""
        self.ids.append(token)
        return self._release(self._new_text(final=False))

    def finish(self) -> str:
        """The rest of the text, once the sequence has ended (a trailing split character too)."""
        rest = self._release(self._new_text(final=True))
        if not self.stopped:
            rest, self.sent, self.held = rest + self.held, self.sent + self.held, ""
        return rest

    def _new_text(self, final: bool) -> str:
        if self.stopped or len(self.ids) == self.shown:
            return ""
        head, full = self._decode(self.ids[self.window : self.shown]), self._decode(self.ids[self.window :])
        if not full.startswith(head):  # the window's start ended inside a character
            head, full = "", self._decode(self.ids[self.shown :])
        if not final and full.endswith("\ufffd"):
            return ""  # a character split across tokens: wait for the rest of it
        self.window, self.shown = self.shown, len(self.ids)
        return full[len(head) :]

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _release(self, new: str) -> str:
        if self.stopped:
            return ""
        candidate = self.held + new  # a stop string can only start here: anything earlier was sent
        hits = [i for i in (candidate.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return self._send(candidate[: min(hits)])
        could_stop = max((n for stop in self.stops for n in range(1, len(stop)) if candidate.endswith(stop[:n])),
                         default=0)  # fmt: skip
        self.held = candidate[len(candidate) - could_stop :]
        return self._send(candidate[: len(candidate) - could_stop])

    def _send(self, piece: str) -> str:
        self.sent += piece
        return piece


# ---------------------------------------------------------------------------------------------
# A sequence: one request's tokens, its place in the batch, and its output channel


class Output:
    """One request's events, fed by the engine thread and read by the request's worker thread:
    `Delta`s as text is made, then the `Result`, or a `GenerationFailed` instead. Given `relay`,
    the Deltas go to it instead, on the engine thread (see `Engine.stream`)."""

    def __init__(self, relay: Callable[[Delta], None] | None = None) -> None:
        self._events: queue.SimpleQueue[Delta | Result | GenerationFailed] = queue.SimpleQueue()
        self._relay = relay

    def put(self, event: Delta | Result | GenerationFailed) -> None:
        if self._relay is not None and isinstance(event, Delta):
            self._relay(event)
        else:
            self._events.put(event)

    def __iter__(self) -> Iterator[Delta | Result]:
        while True:
            event = self._events.get()
            if isinstance(event, GenerationFailed):
                raise event
            yield event
            if isinstance(event, Result):
                return


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    text: TextStream
    cancel: threading.Event = field(default_factory=threading.Event)  # set: end at the next step
    deadline: float = math.inf  # time.monotonic() past which the sequence ends with "timeout"
    output: Output = field(default_factory=Output)
    generated: list[int] = field(default_factory=list)
    pieces: bool = True  # False: one Delta at the end, for a reader of the whole answer only
    unsent: int = 0  # generated tokens not yet in a Delta (their text is held back)
    unsent_text: str = ""  # text safe to show, not yet in a Delta (pieces=False)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache (a long prompt joins in chunks)
    blocks: list[bytes] = field(default_factory=list)  # `block_digests` of the prompt
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    table: list[int] = field(default_factory=list)  # its KV pool blocks while it runs, in order (the scheduler's)
    admitted_at: float = 0.0  # time.monotonic() stamps, for the timing headers and metrics
    first_token_at: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt_ids)

    @property
    def blocks_needed(self) -> int:
        """Pool blocks for the prompt and every token it may generate: reserved when it joins."""
        return blocks_for(len(self.prompt_ids) + self.params.max_new_tokens)

    @property
    def cached(self) -> int:
        """Tokens whose keys and values are in the cache: all but the newest sampled one."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def append(self, token: int, is_text: bool, logprob: TokenLogprob | None = None) -> None:
        """Take the next token and send the text it makes safe to show (an EOS has none)."""
        self.generated.append(token)
        self.unsent += 1
        if logprob is not None:
            self.unsent_logprobs.append(logprob)
        if len(self.generated) == 1:
            self.first_token_at = time.monotonic()
        self._send(self.text.add(token) if is_text else "")

    def finish(self, reason: FinishReason) -> None:
        """Send the rest of the text, then the result."""
        self._send(self.text.finish(), last=True)
        self.output.put(Result(self.text.sent, len(self.generated), reason, len(self.prompt_ids), self.cached_tokens,
                               self.admitted_at, self.first_token_at, time.monotonic()))  # fmt: skip

    def _send(self, piece: str, last: bool = False) -> None:
        """Put a Delta of the new text, with the token ids and log-probabilities since the last
        one (ids whose text is held back go with the next piece). Without `pieces` it all waits
        for the end: each Delta wakes the request's worker thread and the event loop, on the
        cores the steps run on (32 clients' whole answers a token at a time: 499-511 against
        565-575 tok/s, AMX Xeon, bench/README.md)."""
        self.unsent_text += piece
        if not (self.unsent_text or (last and self.unsent)) or not (self.pieces or last):
            return
        ids = self.generated[len(self.generated) - self.unsent :]
        self.output.put(Delta(ids, self.unsent_text, len(self.generated), tuple(self.unsent_logprobs)))
        self.unsent, self.unsent_text, self.unsent_logprobs = 0, "", []


# ---------------------------------------------------------------------------------------------
# The prefix cache: which prompt blocks the model's store holds


def block_digests(ids: list[int]) -> list[bytes]:
    """One digest per whole PREFIX_BLOCK of the prompt, of the block's tokens and every token before
    it (chained), so a block matches only after the same whole prefix. A digest of 16 bytes, not
    Python's hash(): a collision would hand one prompt another prompt's keys."""
    digests, parent = [], b""
    for start in range(0, len(ids) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
        block = array("q", ids[start : start + PREFIX_BLOCK]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        digests.append(parent)
    return digests


class PrefixCache:
    """Which store block holds which prompt block (by `block_digests`), least recently used first.
    Blocks are copied in and out of the KV pool (model.py's `PrefixStore`), so no running sequence holds
    one and any may be evicted. Engine thread only."""

    BLOCK = PREFIX_BLOCK  # tokens a block

    def __init__(self, blocks: int):
        self.capacity = blocks
        self.where: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.free = list(range(blocks))

    def match(self, digests: list[bytes], usable: int) -> tuple[int, ...]:
        """The store blocks of the longest run of leading blocks held (at most `usable`), now
        the most recently used."""
        slots = []
        for digest in digests[:usable]:
            if (slot := self.where.get(digest)) is None:
                break
            self.where.move_to_end(digest)
            slots.append(slot)
        return tuple(slots)

    def claim(self, digests: list[bytes]) -> tuple[tuple[int, int], ...]:
        """Store blocks for the prompt blocks not held yet, the least recently used evicted for
        them: (block of the prompt, store block) pairs for the model to fill."""
        pairs = []
        for block, digest in enumerate(digests[: self.capacity]):
            if digest in self.where:
                self.where.move_to_end(digest)
                continue
            slot = self.free.pop() if self.free else self.where.popitem(last=False)[1]
            self.where[digest] = slot
            pairs.append((block, slot))
        return tuple(pairs)

    def forget(self, digests: list[bytes], pairs: tuple[tuple[int, int], ...]) -> None:
        """Give back claimed blocks that were never filled (the pass failed)."""
        for block, slot in pairs:
            if self.where.get(digests[block]) == slot:
                del self.where[digests[block]]
                self.free.append(slot)

    @property
    def used(self) -> int:
        return len(self.where)


# ---------------------------------------------------------------------------------------------
# The scheduler: the waiting queue, the KV pool's blocks, and who finished


class Scheduler:
    """Owns which sequence waits, which runs, and which KV pool blocks each holds. A sequence
    joins only when the blocks not yet promised to others cover its prompt and all it may
    generate; it then takes them one at a time as it grows (the lowest free first) and gives them
    back when it ends. So a running sequence never runs out, nothing is ever preempted, and when
    the pool is short the queue waits, first come first served (the head is not overtaken, so a
    long request is not starved by short ones). Request threads add sequences; the engine thread
    does everything else."""

    BLOCK = KV_BLOCK  # tokens a block

    def __init__(self, max_batch: int, blocks: int, eos_ids: frozenset[int] = frozenset()):
        self.max_batch, self.blocks, self.eos_ids = max_batch, blocks, eos_ids
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in the order they joined
        self.free_blocks = list(range(blocks))  # a heap: the lowest free block first
        self.drain_deadline = math.inf  # time.monotonic() past which every sequence ends ("timeout")
        self.drained = False  # the drain's deadline has ended a sequence (logged once)
        self._live: set[Sequence] = set()  # added and not yet ended: failed together if the engine stops
        self._wake = threading.Condition()
        self.stopping = False

    def add(self, seq: Sequence) -> None:
        with self._wake:
            if self.stopping:
                raise EngineStopped("the engine is shutting down")
            self.waiting.append(seq)
            self._live.add(seq)
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self.stopping = True
            self._wake.notify()

    def wait_for_work(self) -> bool:
        """Block until something waits or runs; False once the engine is stopping."""
        with self._wake:
            while not (self.waiting or self.running or self.stopping):
                self._wake.wait()
            return not self.stopping

    def prefilling(self) -> Sequence | None:
        return next((seq for seq in self.running if seq.prefilling), None)

    def decoding(self) -> list[Sequence]:
        return [seq for seq in self.running if not seq.prefilling]

    @property
    def promised(self) -> int:
        """Blocks the running sequences hold or may still take: never more than `blocks`."""
        return sum(seq.blocks_needed for seq in self.running)

    @property
    def blocks_used(self) -> int:
        return self.blocks - len(self.free_blocks)

    def next_to_join(self, hold: Callable[[Sequence], bool] = lambda seq: False) -> Sequence | None:
        """The next waiting sequence, if the batch has a place, the pool has its blocks and `hold`
        does not keep it waiting. One whose client left (or whose drain time is up) while it
        waited ends here, without running."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if seq.cancel.is_set() or time.monotonic() > self.drain_deadline:
                with self._wake:
                    self.waiting.popleft()
                self._free(seq)
                seq.finish(FinishReason.CANCELLED if seq.cancel.is_set() else FinishReason.TIMEOUT)
                continue
            if seq.blocks_needed > self.blocks - self.promised:
                return None  # it waits for running sequences to end and give their blocks back
            if hold(seq):
                return None
            with self._wake:
                self.waiting.popleft()
            self.running.append(seq)
            return seq
        return None

    def grow(self, seq: Sequence, length: int) -> list[int]:
        """Blocks for a running sequence's first `length` positions: those it lacks, from its
        promise. Returns the new ones (for the model to zero)."""
        fresh = [heapq.heappop(self.free_blocks) for _ in range(blocks_for(length) - len(seq.table))]
        seq.table.extend(fresh)
        return fresh

    def postprocess(
        self, batch: list[Sequence], tokens: list[int], logprobs: list[TokenLogprob | None] | None = None
    ) -> list[tuple[Sequence, FinishReason]]:
        """Append each sequence's new token, take out those that are finished and free their blocks;
        return them with their reasons, for the engine to end. A sequence whose text work fails
        fails alone."""
        ended = []
        now = time.monotonic()
        for seq, token, logprob in zip(batch, tokens, logprobs or [None] * len(batch), strict=True):
            try:
                eos = token in self.eos_ids and not seq.params.ignore_eos
                seq.append(token, not eos, logprob)
                reason = FinishReason.EOS if eos else self._finish_reason(seq, now)
            except Exception as exc:
                log.exception("postprocessing a sequence failed")
                self.fail(seq, GenerationFailed(f"generation failed: {exc}"))
                continue
            if reason is not None:
                self._free(seq)
                ended.append((seq, reason))
        return ended

    def _finish_reason(self, seq: Sequence, now: float) -> FinishReason | None:
        if seq.text.stopped:
            return FinishReason.STOP
        if len(seq.generated) >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        if now > seq.deadline:
            return FinishReason.TIMEOUT
        if now > self.drain_deadline:
            if not self.drained:
                log.warning("drain timeout reached: ending generations in flight with what they have")
                self.drained = True
            return FinishReason.TIMEOUT
        if seq.cancel.is_set():
            return FinishReason.CANCELLED
        return None

    def fail(self, seq: Sequence, error: GenerationFailed) -> None:
        self._free(seq)
        seq.output.put(error)

    def fail_all(self, error: GenerationFailed) -> None:
        """Every sequence not yet ended, running, waiting or mid-step (the engine stopped)."""
        with self._wake:
            live, self.running, self.waiting = list(self._live), [], collections.deque()
            self.free_blocks, self._live = list(range(self.blocks)), set()
        for seq in live:
            seq.output.put(type(error)(str(error)))  # one exception each: they are raised in different threads

    def _free(self, seq: Sequence) -> None:
        """Take an ending sequence out and take its blocks back. Done before its last event is
        sent: a request that reads its result may send the next one at once, and must find them free."""
        if seq in self.running:
            self.running.remove(seq)
            for block in seq.table:
                heapq.heappush(self.free_blocks, block)
            seq.table = []
        with self._wake:
            self._live.discard(seq)


# ---------------------------------------------------------------------------------------------
# The engine: the API for request threads, and the loop of the engine thread


# (kind, seconds, sequences): "prefill" (prompt chunks), "decode" (rows), "mixed" (chunks and rows; the rows)
StepObserver = Callable[[str, float, int], None]


@dataclass(frozen=True)
class Chunk:
    """A sequence's part of a prefill pass: its prompt's tokens start..end, after the prompt
    blocks the prefix cache holds (`restore`, its first chunk's)."""

    seq: Sequence
    start: int
    end: int
    restore: tuple[int, ...] = ()

    @staticmethod
    def next(seq: Sequence, room: int, restore: tuple[int, ...] = ()) -> Chunk:
        """The sequence's next chunk: its prompt from where its prefill stands, at most `room` tokens."""
        return Chunk(seq, seq.prefilled, min(seq.prefilled + room, len(seq.prompt_ids)), restore)

    @property
    def tokens(self) -> int:
        return self.end - self.start

    @property
    def last(self) -> bool:
        return self.end == len(self.seq.prompt_ids)


class Engine:
    def __init__(self, loaded: LoadedModel, max_batch: int, observe: StepObserver | None = None):
        self.loaded, self.model = loaded, loaded.model
        self.scheduler = Scheduler(max_batch, self.model.pool.blocks, loaded.eos_ids)
        self.prefix = PrefixCache(self.model.store.blocks)
        self.observe = observe or (lambda kind, seconds, size: None)
        self._decode_seconds = 0.0  # the last decode step's time (one without a chunk)
        self._token_seconds = 0.0  # the last prefill chunk's time per token (it grows with the prompt's position)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- called from request threads

    def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        deadline: float = math.inf,
        pieces: bool = True,
        relay: Callable[[Delta], None] | None = None,
    ) -> Iterator[Delta | Result]:
        """Queue the prompt; yield a `Delta` whenever new text is safe to show (with `pieces`;
        else one at the end), then the `Result` (whose text the deltas add up to). Raises on bad
        input or failure. Setting `cancel` ends the sequence at the next step; so does `deadline`
        (a `time.monotonic()` value), with what it has so far. The prompt is text, or token ids
        (see `chat_prompt`). Given `relay`, the engine thread calls it with each Delta instead
        of yielding it: it must neither block nor raise."""
        ids = self.loaded.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        self._check_fits(len(ids), params.max_new_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        text = TextStream(self.loaded.tokenizer, ids, params.stop)
        blocks = block_digests(ids) if self.prefix.capacity else []  # hashed here, off the engine thread
        seq = Sequence(ids, params, torch.Generator().manual_seed(seed), text, cancel or threading.Event(), deadline,
                       Output(relay), blocks=blocks, pieces=pieces)  # fmt: skip
        self.scheduler.add(seq)
        return iter(seq.output)

    def generate(self, prompt: str, params: SamplingParams, cancel: threading.Event | None = None,
                 deadline: float = math.inf) -> Result:  # fmt: skip
        """The stream read to its end."""
        *_, result = self.stream(prompt, params, cancel, deadline, pieces=False)
        assert isinstance(result, Result)
        return result

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation as prompt token ids, by the tokenizer's own chat template (the turn for
        the assistant's answer opened); a tokenizer without one (distilgpt2) gets a plain
        "Role: text" line per message and "Assistant:". Token ids, not text: a template that
        writes the BOS token itself would get a second one from encoding its text."""
        tokenizer = self.loaded.tokenizer
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            return list(
                rendered["input_ids"] if isinstance(rendered, Mapping) else rendered
            )  # transformers 5: a BatchEncoding
        lines = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
        return list(tokenizer.encode("\n".join([*lines, "Assistant:"])))

    def drain(self, deadline: float) -> None:
        """End every sequence at its first step after `deadline` (time.monotonic()) with what it has."""
        self.scheduler.drain_deadline = deadline

    def close(self) -> None:
        self.scheduler.stop()
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        return len(self.scheduler.running)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.scheduler.stopping

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        context = self.loaded.max_context
        if prompt_tokens == 0:
            raise PromptTooLong("prompt encodes to no tokens")
        if prompt_tokens + max_new_tokens > context:
            raise PromptTooLong(
                f"prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} at most "
                f"{context - max_new_tokens} prompt tokens fit in the model's context of {context}"
            )
        if blocks_for(prompt_tokens + max_new_tokens) > self.scheduler.blocks:
            raise PromptTooLong(
                f"prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it needs more than the "
                f"KV cache holds ({self.scheduler.blocks * KV_BLOCK} tokens, KV_CACHE_MB)"
            )

    # -- the engine thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self.step():
                    pass
            self.scheduler.fail_all(EngineStopped("the engine shut down"))
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            log.exception("the engine thread stopped")
            self.scheduler.stop()
            self.scheduler.fail_all(EngineStopped(f"the engine stopped: {exc}"))

    def step(self) -> bool:
        """One round: advance the decoding sequences by one token, and prefill the step's prompt
        tokens (`_chunk_budget`) in passes of at most PREFILL_CHUNK (`_next_pass`), the first of
        them carrying the decode rows: one reading of the weights for both (a step of 32 rows
        and a 256-token chunk 140 against 168 ms apart, AMX Xeon). A long prompt thus never
        stalls the batch for more than about a step; a prompt that is in by the step's end
        decodes from the next. Returns False once the engine is stopping."""
        if not self.scheduler.wait_for_work():
            return False
        budget, batch = self._chunk_budget(), self.scheduler.decoding()
        while budget > 0 and (chunks := self._next_pass(min(budget, PREFILL_CHUNK))):
            budget -= self._run_pass(chunks, batch)
            batch = []
        if batch:
            self._run_pass([], batch)
        self._clear_if_idle()  # also after a failed pass
        return True

    def _chunk_budget(self) -> int:
        """The prompt tokens this step prefills. Every decoding sequence waits for them before its
        next token, so while sequences decode they are sized to cost about one decode step (the
        last step's time over the last chunk's time a token; PREFILL_UNTIMED until both were
        timed, as when every step so far carried a chunk): the gap between tokens stays near
        twice a step however slow this CPU's prefill is, or however far into a long prompt, and
        where the batch's steps are long (long histories) the chunks grow with them, up to
        PREFILL_CHUNK, each pass dearer in time but cheaper a token. A prompt no one waits for
        goes in chunks of PREFILL_CHUNK. But while more than one prompt queues for a free place,
        the batch is starved, not stalled: each request needs all its prompt tokens for its
        generated ones (~650 for 200 in the long-prompt benchmark), so prefill takes
        PREFILL_QUEUED tokens a step, else the batch settles well below its places; four chunks a
        step rather than two spend fewer steps of the few decoding sequences on the way
        (bench/README.md, the chunk budget)."""
        scheduler = self.scheduler
        if not scheduler.decoding():
            return PREFILL_CHUNK
        if min(len(scheduler.waiting), scheduler.max_batch - len(scheduler.running)) > 1:
            return PREFILL_QUEUED
        if not (self._token_seconds and self._decode_seconds):
            return PREFILL_UNTIMED
        fits = int(self._decode_seconds / self._token_seconds) // PREFILL_BUCKET * PREFILL_BUCKET
        return min(PREFILL_CHUNK, max(PREFILL_CHUNK_LEAST, fits))

    def _next_pass(self, room: int) -> list[Chunk]:
        """The next prefill pass, up to `room` prompt tokens: the prompt still part way in first,
        then waiting sequences as they join, each prompt whole but the last; so between steps at
        most one prompt is part way in. Several short prompts share a pass (and its reading of
        the weights), where each alone cost a pass of ~16 tokens, up to PASS_KEYS keys."""
        chunks: list[Chunk] = []
        if (seq := self.scheduler.prefilling()) is not None:
            chunks.append(Chunk.next(seq, room))
        while (
            (left := room - sum(c.tokens for c in chunks)) > 0
            and sum(c.end for c in chunks) < PASS_KEYS
            and (seq := self._join(chunks)) is not None
        ):
            restore = self._cached_prefix(seq)  # its prefill starts after them
            chunks.append(Chunk.next(seq, left, restore))
        return chunks

    def _join(self, chunks: list[Chunk]) -> Sequence | None:
        """The next waiting sequence to join the pass, unless the pass computes PREFIX_WAIT or
        more of its prompt's leading tokens: it then waits for the next pass, to restore them
        from the prefix cache rather than compute them twice (a shared system prompt). Blocks
        restored from the cache are not computed: prompts that share those join together."""
        cached = self.prefix.capacity  # a prompt's blocks past it are never cached
        computing = {d for c in chunks for d in c.seq.blocks[c.seq.cached_tokens // PREFIX_BLOCK : cached]}

        def shares_much(seq: Sequence) -> bool:
            return sum(digest in computing for digest in seq.blocks) * PREFIX_BLOCK >= PREFIX_WAIT

        return self.scheduler.next_to_join(shares_much)

    def _run_pass(self, chunks: list[Chunk], batch: list[Sequence]) -> int:
        """One forward pass: each chunk's prompt tokens into its sequence's blocks, and each decoding
        sequence's newest token; return the prompt tokens it took. A sequence's first chunk
        starts after its prompt's blocks that the prefix cache holds (copied into its pool
        blocks); its last saves the prompt's whole blocks for the prompts after it, and gives its
        first token. Should the pass fail, its chunks' sequences fail, and with decode rows in it
        every running one (as a failed decode step always did)."""
        start, seqs = time.monotonic(), [c.seq for c in chunks]
        for seq in seqs:
            seq.admitted_at = seq.admitted_at or start
        saves = tuple(self.prefix.claim(c.seq.blocks) if c.last else () for c in chunks)
        work = self._work(chunks, batch, saves)
        try:
            logits = self.model.run(work)
        except Exception as exc:
            log.exception("a pass failed; failing its sequences" + (" and the whole batch" if batch else ""))
            for seq, pairs in zip(seqs, saves, strict=True):
                self.prefix.forget(seq.blocks, pairs)
            for seq in list(self.scheduler.running) if batch else seqs:
                self.scheduler.fail(seq, GenerationFailed(f"generation failed: {exc}"))
            return sum(c.tokens for c in chunks)
        for c in chunks:
            c.seq.prefilled = c.end
        self._timed(chunks, batch, time.monotonic() - start)
        done = [row for row, c in enumerate(chunks) if c.last]  # their prompts are in: their first tokens
        rows = done + list(range(len(chunks), len(chunks) + len(batch)))  # the decode rows come after the chunks
        in_order = rows == list(range(len(logits)))  # a decode step's: no copy (276 us of logits at 32 rows)
        self._postprocess([seqs[row] for row in done] + batch, logits if in_order else logits[rows])
        return sum(c.tokens for c in chunks)

    def _work(self, chunks: list[Chunk], batch: list[Sequence], saves: tuple[tuple[tuple[int, int], ...], ...]) -> Work:
        """The pass as the model takes it: the chunks' sequences, then the decode rows (which
        restore and save nothing), each with the pool blocks it lacks for its new tokens."""
        seqs, nothing = [c.seq for c in chunks] + batch, ((),) * len(batch)
        ends = [c.end for c in chunks] + [seq.cached + 1 for seq in batch]
        fresh = tuple(block for seq, end in zip(seqs, ends, strict=True) for block in self.scheduler.grow(seq, end))
        ids = [c.seq.prompt_ids[c.start : c.end] for c in chunks] + [[seq.generated[-1]] for seq in batch]
        starts = [c.start for c in chunks] + [seq.cached for seq in batch]
        restore = tuple(c.restore for c in chunks) + nothing
        return Work([seq.table for seq in seqs], ids, starts, fresh, restore, saves + nothing)

    def _timed(self, chunks: list[Chunk], batch: list[Sequence], seconds: float) -> None:
        """Note a pass's time: a decode step's, or a prompt token's (`_chunk_budget`; in a mixed
        pass, the part beyond what its decode rows cost alone), and tell the observer."""
        tokens = sum(c.tokens for c in chunks)
        if not chunks:
            self._decode_seconds = seconds
        # A short prompt's time is mostly the pass's fixed cost; beside decode rows, the tokens'
        # share is known only once a decode step was timed.
        elif tokens >= PREFILL_CHUNK_LEAST and (self._decode_seconds or not batch):
            beyond = seconds - (self._decode_seconds if batch else 0.0)
            self._token_seconds = beyond / tokens if beyond > 0 else self._token_seconds
        kind = "mixed" if chunks and batch else "prefill" if chunks else "decode"
        self.observe(kind, seconds, len(batch) or len(chunks))

    def _cached_prefix(self, seq: Sequence) -> tuple[int, ...]:
        """The store blocks that hold the prompt's leading blocks; the prompt's last token is always
        computed, since its logits give the first new token."""
        slots = self.prefix.match(seq.blocks, (len(seq.prompt_ids) - 1) // PREFIX_BLOCK)
        seq.prefilled = seq.cached_tokens = len(slots) * PREFIX_BLOCK
        return slots

    def _postprocess(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        """Pick each sequence's next token; the scheduler takes it from there."""
        # max's indices, not argmax: the same first highest token, from a vectorized kernel (AMX
        # Xeon, bfloat16 logits of 49,152 tokens: 45 against 168 us a row, 0.57 against 2.71 ms at 32)
        tokens: list[int] = logits.max(-1).indices.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(batch)
        special = [row for row, seq in enumerate(batch) if seq.params.temperature or seq.params.penalized
                   or seq.params.logprobs is not None]  # fmt: skip
        rows = logits.float().cpu() if special else logits  # a copy only when someone needs more than argmax
        for row in special:
            tokens[row], logprobs[row] = self._pick(batch[row], rows[row])
        ended = self.scheduler.postprocess(batch, tokens, logprobs)
        self._clear_if_idle()  # before the results go out: whoever reads one may look at the cache
        for seq, reason in ended:
            seq.finish(reason)

    def _pick(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """One sequence's next token from its float32 logits [V], and its log-probability if asked."""
        params, adjusted = seq.params, logits
        if params.penalized and seq.generated:
            counts = torch.bincount(torch.tensor(seq.generated), minlength=logits.shape[-1])[: logits.shape[-1]]
            adjusted = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
        token = sample(adjusted, params, seq.generator) if params.temperature else int(adjusted.max(-1).indices)
        if params.logprobs is None:
            return token, None
        return token, self._logprob(logits, token, params.logprobs)

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits, dim=-1)
        text = self.loaded.tokenizer.decode
        values, ids = torch.topk(logprobs, top) if top else (torch.empty(0), torch.empty(0, dtype=torch.long))
        alternatives = tuple((text([i]), v) for v, i in zip(values.tolist(), ids.tolist(), strict=True))
        return TokenLogprob(text([token]), float(logprobs[token]), alternatives)

    def _clear_if_idle(self) -> None:
        if not self.scheduler.running:
            self.model.clear()  # the pool's pages go back, so memory stays flat once the batch empties


# ---------------------------------------------------------------------------------------------
# The one module-level engine, created on first use


def memory_budget(setting_mb: int, memory_max: Path = Path("/sys/fs/cgroup/memory.max")) -> int:
    """Bytes this process may use: MEMORY_LIMIT_MB when set, else a cgroup v2 limit (a container's
    `mem_limit`/`memory:`), else 0 for none known."""
    if setting_mb:
        return setting_mb * 2**20
    try:
        raw = memory_max.read_text().strip()
        return 0 if raw == "max" else int(raw)
    except (OSError, ValueError):
        return 0  # no cgroup v2 limit here


def check_memory(loaded: LoadedModel, config: ModelConfig, limit: int) -> None:
    """Refuse settings whose worst case cannot fit: a full KV pool on top of what the process holds
    once the weights are in, the prefix cache, and a margin for the step's activations. Pool and
    store are made empty and fill as tokens come, so a clear refusal at load beats the OOM killer
    later, under load."""
    if not limit:
        return
    held, store = resident_bytes(), loaded.model.store.bytes
    pool = loaded.model.pool
    worst = held + pool.bytes + store + max(256 * 2**20, pool.bytes // 8)
    if worst > limit:
        mib = 2**20
        raise LoadError(
            f"the worst case of these settings needs ~{worst // mib} MiB (weights and runtime {held // mib} MiB, "
            f"KV cache {pool.bytes // mib} MiB for {pool.blocks * KV_BLOCK} tokens (KV_CACHE_MB, or MAX_BATCH_SIZE="
            f"{config.max_batch} sequences of {loaded.max_context} tokens), prefix cache {store // mib} MiB), over "
            f"the memory limit of {limit // mib} MiB; lower KV_CACHE_MB, MAX_BATCH_SIZE, MAX_CONTEXT_TOKENS or "
            "PREFIX_CACHE_TOKENS, or raise the limit (MEMORY_LIMIT_MB, or the container's memory limit)"
        )


def resident_bytes() -> int:
    with contextlib.suppress(OSError):  # Linux; elsewhere 0
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def create_engine(config: ModelConfig, observe: StepObserver | None = None) -> Engine:
    """Load the model and start the engine thread. The load runs in a thread of its own
    (`_in_own_thread`), so a caller that goes on using torch (a benchmark, a test) leaves the
    engine its speed: loaded in the calling thread, the engine's steps ran ~1.5-2x slower."""
    return _in_own_thread(lambda: _load_and_start(config, observe))


def _load_and_start(config: ModelConfig, observe: StepObserver | None) -> Engine:
    start = time.perf_counter()
    loaded = load_model(config, PREFILL_CHUNK)
    check_memory(loaded, config, memory_budget(config.memory_limit_mb))
    pool = loaded.model.pool
    log.info(
        "model %s (%s, context %d) loaded in %.1f s (activations %s, weights %s); KV cache %d MiB: %d blocks of %d "
        "tokens%s", config.name, loaded.family, loaded.max_context, time.perf_counter() - start, loaded.dtype,
        loaded.weights, pool.bytes // 2**20, pool.blocks, KV_BLOCK, f"; {loaded.lone_pass}" if loaded.lone_pass else "",
    )  # fmt: skip
    return Engine(loaded, config.max_batch, observe)


def load_failure(config: ModelConfig, exc: Exception) -> str:
    """Why a load failed, in words a user can act on."""
    if isinstance(exc, LoadError | EngineUnavailable):
        return str(exc)  # it says what to set already
    return (
        f"could not load model {config.name!r}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
        "Set MODEL_NAME to a readable local model directory (tools/fetch_model.py makes one) "
        "or make the model hub reachable."
    )


class LazyEngine:
    """The engine, created by the first `get()` (in a worker thread; concurrent callers wait for
    the same load). After a failed load, callers get the same error at once until
    `retry_seconds` have passed (a hub that is down can take ~50 s to fail each time)."""

    def __init__(self, factory: Callable[[ModelConfig, StepObserver | None], Engine] = create_engine):
        self._factory = factory
        self._lock = threading.Lock()
        self._config: ModelConfig | None = None
        self._observe: StepObserver | None = None
        self._engine: Engine | None = None
        self._error: str | None = None  # why the last load failed
        self._failed_at = -math.inf
        self.loading = False
        self.load_seconds = 0.0  # how long the last successful load took
        self._drain_deadline = math.inf  # an engine loaded during a drain drains too

    def configure(self, config: ModelConfig, observe: StepObserver | None = None) -> None:
        """Set the model to load, once; a different second configuration is a bug, not a reload.
        `observe` is told the kind, duration and size of every engine step (metrics)."""
        with self._lock:
            if self._config is not None and self._config != config:
                raise RuntimeError(f"the engine is already configured with {self._config}; close() it first")
            self._config, self._observe = config, observe

    @property
    def loaded(self) -> Engine | None:
        return self._engine

    def retry_in(self) -> int:
        """Seconds until a failed load may be tried again (0: now). The one place this is computed."""
        if self._error is None or self._config is None:
            return 0
        return max(0, math.ceil(self._failed_at + self._config.retry_seconds - time.monotonic()))

    def failure(self) -> tuple[str, int] | None:
        """While no engine runs after a failed load: why it failed, and seconds until the next try."""
        if self._error is None or self._config is None or self._engine is not None:
            return None
        return self._error, self.retry_in()

    def get(self) -> Engine:
        with self._lock:
            if self._engine is not None and self._engine.running:
                return self._engine
            self._engine = None  # never loaded, or its thread stopped: load (again)
            if self._config is None:
                raise RuntimeError("the engine is not configured; call configure() first")
            if self._error is not None and self.retry_in() > 0:
                raise EngineUnavailable(self._error, self.retry_in())
            return self._load(self._config)

    def _load(self, config: ModelConfig) -> Engine:
        start, self.loading = time.monotonic(), True
        try:
            self._engine = _in_own_thread(lambda: self._factory(config, self._observe))
        except Exception as exc:
            log.exception("loading the model failed")
            self._error, self._failed_at = load_failure(config, exc), time.monotonic()
            raise EngineUnavailable(self._error, self.retry_in()) from exc
        finally:
            self.loading = False
        self._error, self.load_seconds = None, time.monotonic() - start
        self._engine.drain(self._drain_deadline)
        return self._engine

    def drain(self, deadline: float) -> None:
        """End every generation at its first step after `deadline` (time.monotonic()) with what it has."""
        self._drain_deadline = deadline
        if self._engine is not None:
            self._engine.drain(deadline)

    def close(self) -> None:
        """Stop the engine and forget the configuration (server shutdown; tests)."""
        with self._lock:
            engine, self._engine, self._config, self._error = self._engine, None, None, None
        if engine is not None:
            engine.close()


def _in_own_thread(work: Callable[[], Engine]) -> Engine:
    """Run the load in a thread that ends with it. The load runs kernels, so the thread running
    it gets an OpenMP team of its own, kept while that thread lives, and a server's worker thread
    outlives the load. Once libgomp manages more threads than there are CPUs, every team (the
    engine thread's too) spins 100 rounds instead of ~3 ms between two parallel regions and then
    sleeps, so each kernel of a step waits for its helper thread to wake: half the decode speed
    on 2 CPUs (bench/README.md, "A second OpenMP team halves the step")."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
        return pool.submit(work).result()


ENGINE = LazyEngine()  # the module's single engine: the server configures it at start
