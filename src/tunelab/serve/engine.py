"""The engine: one thread owns the model, the adapter slots and the KV cache, and runs continuous batching.

The HTTP side (serve/app.py) validates, applies the chat template, tokenizes and then `submit`s a
`Request`; from then on it only reads the `Event`s the engine hands to the request's callback.
Every step of the engine thread:

    1. cancelled requests leave (a client that disconnected frees its row and its adapter slot)
    2. one decode step for every running row, all adapters in one forward (serve/multi_lora.py);
       each row's token is chosen with its own settings, rows that end leave the batch
    3. admission: waiting requests join, oldest first, while the batch has rows (`max_batch_rows`),
       the prompts fit the step's token budget (`token_budget`; one prompt always may) and the
       adapters in the batch stay within `max_adapters_per_step`; their prompts are computed
       together (`evaluation.prefill.prefill`, the evaluation's prompt pass) and their first
       tokens sent

The decode arithmetic is evaluation's (`sample_next`, `prefill`, the reserved KV layers); what is
new here is only that rows join and leave between steps (serve/batch_cache.py).
A request's answer does not depend on its batch neighbours: greedy rows take the argmax of their own
logits, and a sampled row draws from its own generator, seeded by the request's `seed`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal, Protocol

import torch
from transformers import PreTrainedModel

from tunelab.evaluation.generate import sample_next
from tunelab.evaluation.prefill import prefill
from tunelab.model.kernels.attention import generation_kernels
from tunelab.model.load import body_and_head
from tunelab.model.precision import Precision
from tunelab.serve.adapters import AdapterRef, SlotsBusy, SlotTable
from tunelab.serve.batch_cache import BatchCache
from tunelab.serve.multi_lora import LoraKernel, RowSlots, rows_use

log = logging.getLogger("tunelab.serve")


@dataclass(frozen=True)
class Tokens:
    ids: list[int]  # the next token(s) of the answer


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500  # 503 when the server is shutting down


Event = Tokens | Finished | Failed


class Constraint(Protocol):
    """What an answer may say next (serve/structured.py: JSON answers); the engine masks the other tokens."""

    def allowed(self) -> torch.Tensor: ...  # (vocab,) bool; the end of turn is in it only when the answer may end

    def advance(self, token: int) -> None: ...  # the token chosen (never an end of turn)


@dataclass
class Request:
    prompt: list[int]
    adapter: AdapterRef | None  # None: the base model
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    on_event: Callable[[Event], None]  # called from the engine thread; must not block
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    constraint: Constraint | None = None  # response_format json_object / json_schema
    cancelled: bool = False  # set by the HTTP side (a disconnect, a stop string); read between steps
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Row:
    request: Request
    slot: int
    next_token: int  # fed to the next decode step
    position: int  # its position id
    generated: int
    generator: torch.Generator | None


class QueueFull(Exception):
    """The waiting line is full: the server answers 429."""


@dataclass
class EngineStats:
    """What /metrics reads; written by the engine thread only."""

    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    batch_rows: collections.Counter = field(default_factory=collections.Counter)  # rows per decode step -> steps
    finished: collections.Counter = field(default_factory=collections.Counter)  # reason -> requests


class Engine:
    def __init__(self, model: PreTrainedModel, slots: SlotTable, precision: Precision, *, pad_token_id: int,
                 max_batch_rows: int, token_budget: int, max_adapters_per_step: int, queue_size: int,
                 lora_kernel: LoraKernel = "auto", native_lora: ModuleType | None = None,
                 prefill_threads: int | None = None, prefill_parallel_tokens: int = 256) -> None:
        self.model = model
        self.body, self.head = body_and_head(model)
        self.slots = slots
        self.precision = precision
        self.pad_token_id = pad_token_id
        self.max_batch_rows = max_batch_rows
        self.token_budget = token_budget
        self.max_adapters_per_step = max_adapters_per_step
        self.queue_size = queue_size
        self.lora_kernel = lora_kernel
        self.native_lora = native_lora  # serve/native_lora.py's module where it built: the fused LoRA update
        # A step with this many prompt tokens runs on prefill_threads (None: the thread count it finds), see _admit.
        self.prefill_threads = prefill_threads
        self.prefill_parallel_tokens = prefill_parallel_tokens
        self.cache = self._new_cache()
        self.rows: list[_Row] = []  # row i of the batch cache
        self.stats = EngineStats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="tunelab-engine", daemon=True)

    # ------------------------------------------------------------------ the HTTP side's calls
    def start(self) -> None:
        self._thread.start()

    def queue_full(self) -> bool:
        return len(self._waiting) >= self.queue_size

    def waiting(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self.rows)

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (queue_size {self.queue_size})")
            self._waiting.append(request)
            self._lock.notify()

    def stop(self, grace_seconds: float) -> None:
        """Stop admitting; let running and waiting requests finish for up to `grace_seconds`, then fail the rest."""
        with self._lock:
            self._stopping = True
            self._deadline = time.monotonic() + grace_seconds
            self._lock.notify()
        self._thread.join()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self.rows and not self._stopping:
                    self._lock.wait()
                if self._stopping and ((not self._waiting and not self.rows) or time.monotonic() > self._deadline):
                    break
            try:
                self._step()
            except Exception as exc:  # a bug, not a client's doing: fail what was in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(exc).__name__}: {exc}", 500)
        self._fail_all("the server is shutting down", 503)

    def _step(self) -> None:
        self._drop_cancelled()
        if self.rows:
            self._decode()
        self._admit()

    def _drop_cancelled(self) -> None:
        with self._lock:
            kept = [r for r in self._waiting if not r.cancelled]
            self._waiting = collections.deque(kept)
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request.cancelled:
                self._remove(i)

    @torch.no_grad()
    @generation_kernels()
    def _decode(self) -> None:
        rows = self.rows
        ids = torch.tensor([[r.next_token] for r in rows])  # (B, 1)
        positions = torch.tensor([[r.position] for r in rows])  # (B, 1)
        cache, mask = self.cache.step_view()
        with self.precision.autocast(), rows_use(RowSlots.of([r.slot for r in rows], self.lora_kernel,
                                                                           self.native_lora)):
            hidden = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                               use_cache=True).last_hidden_state  # (B, 1, H)
            logits = self.head(hidden[:, -1].contiguous())  # (B, vocab)
        self.cache.stepped()
        for r in rows:
            r.position += 1
        self.stats.steps += 1
        self.stats.batch_rows[len(rows)] += 1
        self._take(logits, list(range(len(rows))))

    @torch.no_grad()
    @generation_kernels()
    def _admit(self) -> None:
        admitted: list[tuple[Request, int]] = []
        budget = self.token_budget
        adapters = {r.slot for r in self.rows} - {0}
        with self._lock:
            candidates = list(self._waiting)
        for request in candidates:
            if len(self.rows) + len(admitted) >= self.max_batch_rows:
                break
            if admitted and len(request.prompt) > budget:
                break  # oldest first: a long prompt is not overtaken; it goes first in a later step
            if request.adapter is not None and request.adapter.key not in self._keys(adapters) \
                    and len(adapters) >= self.max_adapters_per_step:
                continue  # one adapter too many for this step; it waits for the batch to change
            try:
                slot = self.slots.acquire(request.adapter)
            except SlotsBusy:
                continue
            except Exception as exc:  # the adapter's files went missing or changed since it was checked
                self._forget(request)
                request.on_event(Failed(f"cannot load the adapter: {exc}", 500))
                continue
            self._forget(request)
            adapters.add(slot)
            adapters.discard(0)
            admitted.append((request, slot))
            budget -= len(request.prompt)
        if not admitted:
            return
        admitted.sort(key=lambda a: len(a[0].prompt))  # prefill groups neighbours of similar length
        prompts = [req.prompt for req, _ in admitted]
        slots = [slot for _, slot in admitted]
        # A prompt pass of many tokens is compute-bound and the HTTP side has little to do while it runs (it waits
        # for these first tokens), so it may take every core. Decode steps stay on fewer: torch's idle workers
        # spin for a while after each parallel region, which on a small machine stalls the HTTP thread that
        # streams every step's tokens (docs/benchmarks.md, serving).
        many = sum(len(p) for p in prompts) >= self.prefill_parallel_tokens
        try:
            with torch_threads(self.prefill_threads if many else None):
                cache, logits, mask = prefill(
                    self.body, self.head, self.model.config, prompts, 0, 0, None, self.pad_token_id,
                    self.precision, reserve=0,
                    each_chunk=lambda rows: rows_use(RowSlots.of(slots[rows.start : rows.stop], self.lora_kernel,
                                                                 self.native_lora)),
                )
        except Exception as exc:
            for request, slot in admitted:
                self.slots.release(slot)
                request.on_event(Failed(f"the engine failed: {type(exc).__name__}: {exc}", 500))
            raise
        placed = self.cache.add(cache, mask, list(range(len(admitted))))
        for (request, slot), row in zip(admitted, placed):
            assert row == len(self.rows)
            generator = None
            if request.temperature > 0:
                seed = request.seed if request.seed is not None else secrets.randbits(63)
                generator = torch.Generator().manual_seed(seed)
            self.rows.append(_Row(request, slot, -1, len(request.prompt), 0, generator))
            self.stats.prompt_tokens += len(request.prompt)
        self._take(logits, placed)

    def _take(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Choose each row's next token from its logits (row j of `logits` is batch row rows[j]), send it,
        and drop the rows that ended."""
        for j, row in enumerate(rows):
            constraint = self.rows[row].request.constraint
            if constraint is not None:
                logits[j].masked_fill_(~constraint.allowed(), float("-inf"))
        chosen = torch.empty(len(rows), dtype=torch.long)
        by_setting: dict[tuple[float, float], list[int]] = {}
        for j, row in enumerate(rows):
            r = self.rows[row].request
            by_setting.setdefault((r.temperature, r.top_p) if r.temperature > 0 else (0.0, 1.0), []).append(j)
        for (temperature, top_p), js in by_setting.items():
            gens = None if temperature == 0 else [self.rows[rows[j]].generator for j in js]
            chosen[js] = sample_next(logits[js], temperature, top_p, gens)
        ended = []
        for j, row in enumerate(rows):
            r = self.rows[row]
            token = int(chosen[j])
            if token in r.request.stop_token_ids:
                ended.append((row, "stop"))
                continue
            if r.request.constraint is not None:
                r.request.constraint.advance(token)
            r.generated += 1
            r.next_token = token
            r.request.on_event(Tokens([token]))
            self.stats.generated_tokens += 1
            if r.generated >= r.request.max_new_tokens:
                ended.append((row, "length"))
        for row, reason in sorted(ended, reverse=True):  # highest first: a removal moves only rows already handled
            r = self.rows[row]
            self._remove(row)  # first: whoever hears of the end sees the row and its slot free
            self.stats.finished[reason] += 1
            r.request.on_event(Finished(reason, len(r.request.prompt), r.generated))

    def _remove(self, row: int) -> None:
        self.slots.release(self.rows[row].slot)
        moved = self.cache.remove(row)
        if moved is not None:
            self.rows[row] = self.rows[moved]
        self.rows.pop()

    def _forget(self, request: Request) -> None:
        with self._lock:
            self._waiting.remove(request)

    def _keys(self, slots: set[int]) -> set[str | None]:
        return {self.slots.keys[s] for s in slots}

    def _fail_all(self, message: str, status: int) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            request.on_event(Failed(message, status))
        for i in reversed(range(len(self.rows))):
            request = self.rows[i].request
            self._remove(i)
            request.on_event(Failed(message, status))
        self.cache = self._new_cache()

    def _new_cache(self) -> BatchCache:
        # The running rows' keys and values in fp32 even when the weights are bf16: one decode step's attention
        # reads every row's whole history, and torch's CPU flash attention ran it several times slower in bf16
        # than in fp32 on an AVX512-BF16 CPU (docs/benchmarks.md, "Serving"); the cache is small beside the weights.
        return BatchCache(self.model.config, self.max_batch_rows, dtype=torch.float32)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block, then back (None: unchanged).

    Called on the engine thread: OpenMP keeps the thread count per calling thread, and torch applies its own
    setting to a thread before its first parallel region, so the switch is this thread's alone.
    """
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
