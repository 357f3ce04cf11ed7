"""Continuous batching in front of the in-process engine (``--batching dynamic``).

One scheduler thread owns the model. ``generate`` (called from the load generator's workers) encodes the
prompt, queues the request and waits; ``generate_many`` queues several at once (a static batch: how the
benchmarks measure B requests of one prompt length). At every step boundary the scheduler

1. drops requests whose ``stop`` event is set (their callers get ``Interrupted``),
2. admits queued requests while fewer than ``max_batch`` run: the joining prompts are prefilled (those of
   one length together, in one forward), which samples their first tokens, and the sequences join the batch
   in one rebuild of the cache,
3. decodes every running sequence by one token in ONE batched forward pass over a left-padded KV cache,
   sampling each row with its request's own ``torch.Generator`` (``Engine.draw``: one uniform per row from
   the row's generator, then one vectorized inverse-CDF draw for all rows),

and a request leaves the batch after exactly ``max_new_tokens`` tokens. Admission at step boundaries
(continuous batching) rather than batch boundaries: with closed-loop arrivals ~100 ms apart, waiting for
a whole batch to finish would delay a newcomer by up to a full generation (tens of seconds under the quota).
A request's timestamps are the unbatched engine's: t_start when its prefill begins (it joins), every token,
t_end at its last token.

The forward is ``net.DecodeBatch`` over ``net.Forward`` (GPT-2's computation written out over the model's own
modules, in the engine's ``dtype``/``quantize``), shared with the unbatched loop engine: in-place KV writes
instead of a whole-cache copy per step, attention as batched products over views of the cache, and the
faster kernel for each layer's row count and precision.

What holds for reproducibility: every token is sampled with the request's own generator, seeded from its
seed, from its own row of logits. Those logits equal the unbatched engine's within float tolerance (pads are
masked out, each row has its own positions; the tests check 1e-4, observed ~3e-7 on the tiny config), not bit
for bit: other kernels and batched matmuls round differently. Tokens are therefore identical to the
unbatched engine's, and independent of batch mates, unless a last-bit difference flips a sample (the tests
see identical tokens).

Failures: a request is checked before it is queued (``max_new_tokens >= 1``, a non-empty prompt that fits
with its new tokens in the model's positions). A failing prefill fails the requests prefilled with it (one
prompt length, one step), not the running batch. A request whose sampling raises fails alone. A decode step
that raises cannot be pinned on one row: every request of that step fails with a ``RuntimeError`` naming the
cause, and the scheduler carries on with the queue.

``close()`` drains: no new requests are accepted, every request already queued or running finishes (or
leaves at the next step if its ``stop`` is set), then the scheduler thread ends.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from llm_psi.engine.loop import Engine, Generation, Interrupted
from llm_psi.engine.net import DecodeBatch, onednn_linear  # noqa: F401 (re-exported)


def wrap(engine, cfg):
    """The engine for ``cfg.batching``: a ``BatchEngine`` around ``engine`` for 'dynamic'."""
    if cfg.batching != "dynamic":
        raise ValueError(f"unknown batching mode {cfg.batching!r}")
    return BatchEngine(engine, max_batch=cfg.max_batch)


class _Request:
    def __init__(self, ids, max_new_tokens: int, seed: int, stop, on_token=None):
        self.ids, self.max_new_tokens, self.seed, self.stop = ids, max_new_tokens, seed, stop
        self.on_token = on_token
        self.gen = None
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.t_start = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def add(self, token: int) -> bool:
        """Record a sampled token; True when the request has all its tokens."""
        self.tokens.append(token)
        self.times.append(time.monotonic())
        if self.on_token is not None:
            self.on_token(token, self.times[-1])
        return len(self.tokens) == self.max_new_tokens

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()


class BatchEngine:
    """The engine's interface (``generate``, ``encode``, ``identity``, ...) served by one batching scheduler.

    ``BatchEngine(engine, max_batch=8)`` serves an existing loop ``Engine``; without one,
    ``BatchEngine(max_batch=8, **kwargs)`` builds ``Engine(**kwargs)`` (``tiny``, ``seed``, ``dtype``,
    ``quantize``, ...). ``generate_many`` submits several requests at once (a static batch, for benchmarks)."""

    def __init__(self, engine=None, max_batch: int = 8, **engine_kwargs):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if engine is None:
            engine = Engine(**engine_kwargs)
        elif engine_kwargs:
            raise TypeError(f"engine options {sorted(engine_kwargs)} given with an engine already built")
        self.engine = engine
        self.max_batch = max_batch
        self._cv = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._closing = False
        self._batch = engine.decode_batch()
        self._running: list[_Request] = []   # aligned with the batch's rows; scheduler thread only
        self._thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
        self._thread.start()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def identity(self) -> dict:
        return {**self.engine.identity(), "batching": "dynamic", "max_batch": self.max_batch}

    def state(self) -> dict:
        """For the timeline: sequences in the running batch."""
        return {"batch": len(self._running)}

    def generate(self, prompt: str, max_new_tokens: int, seed: int = 0, stop=None, on_token=None) -> Generation:
        """Queue the request, wait for its batch to produce exactly ``max_new_tokens`` tokens
        (``on_token(id, t)`` runs on the scheduler thread: it must be quick)."""
        return self._wait(self._submit([self._request(prompt, max_new_tokens, seed, stop, on_token)])[0])

    def generate_many(self, prompts, max_new_tokens: int, seeds=None) -> list[Generation]:
        """Queue one request per prompt at once (seeds: one per prompt, default 0, 1, ...) and wait for all:
        up to ``max_batch`` of them join the batch at the same step, prompts of one length prefill together.
        The call to measure a static batch of B requests (B = ``max_batch``) on the serving path."""
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        reqs = self._submit([self._request(p, max_new_tokens, s, None, None) for p, s in zip(prompts, seeds)])
        return [self._wait(r) for r in reqs]

    def _request(self, prompt, max_new_tokens, seed, stop, on_token) -> _Request:
        """A checked request (ValueError for a bad one)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.engine.encode(prompt)
        n = ids.shape[1]
        limit = getattr(self.engine.model.config, "n_positions", None)
        if n == 0:
            raise ValueError("empty prompt")
        if limit is not None and n + max_new_tokens - 1 > limit:
            raise ValueError(f"prompt of {n} tokens + {max_new_tokens} new tokens exceeds the model's "
                             f"{limit} positions")
        return _Request(ids, max_new_tokens, seed, stop, on_token)

    def _submit(self, reqs: list) -> list:
        with self._cv:
            if self._closing:
                raise RuntimeError("batch engine is closed")
            self._queue.extend(reqs)
            self._cv.notify()
        return reqs

    def _wait(self, req: _Request) -> Generation:
        req.done.wait()
        if req.error is not None:
            raise req.error
        return Generation(prompt_tokens=req.ids.shape[1], output_tokens=len(req.tokens), t_start=req.t_start,
                          t_first_token=req.times[0], t_end=req.times[-1], token_times=list(req.times),
                          text=self.engine.decode(req.tokens))

    def close(self) -> None:
        """Stop accepting requests, let the queued and running ones finish, end the scheduler thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()

    # --- scheduler thread -------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a scheduler bug must not leave callers waiting forever
            with self._cv:
                self._closing = True
                pending = list(self._queue) + self._running
                self._queue.clear()
            for r in pending:
                r.finish(_shared_error("batch scheduler failed", e))
            raise

    def _serve(self) -> None:
        with self.engine.torch.inference_mode():
            while True:
                with self._cv:
                    while not self._queue and not self._running and not self._closing:
                        self._cv.wait()
                    if self._closing and not self._queue and not self._running:
                        return
                    stopped = [r for r in self._queue if _stopped(r)]
                    for r in stopped:
                        self._queue.remove(r)
                    joining = [self._queue.popleft()
                               for _ in range(min(len(self._queue), self.max_batch - len(self._running)))]
                for r in stopped:
                    r.finish(Interrupted("generation stopped"))
                gone = [i for i, r in enumerate(self._running) if _stopped(r)]
                for i in gone:
                    self._running[i].finish(Interrupted("generation stopped"))
                self._drop(gone)
                self._prefill(joining)
                if self._running:
                    self._step()

    def _prefill(self, joining: list) -> None:
        """Prefill the joining requests (those of one prompt length together, in arrival order) and sample
        their first tokens; they join the batch (unless done). A failing prefill fails its group only."""
        groups: dict[int, list] = {}
        for r in joining:
            groups.setdefault(r.ids.shape[1], []).append(r)
        rows = []
        for group in groups.values():
            rows += self._prefill_group(group)
        self._batch.add(*rows)

    def _prefill_group(self, group: list) -> list:
        torch, sample = self.engine.torch, self.engine.sample
        t_start = time.monotonic()
        try:
            logits, rows = self._batch.prefill_many(torch.cat([r.ids for r in group]))
        except Exception as e:
            for r in group:
                r.t_start = t_start
                r.finish(e)
            return []
        joined = []
        for i, r in enumerate(group):
            r.t_start = t_start
            try:
                r.gen = torch.Generator().manual_seed(r.seed)
                if r.add(sample(logits[i:i + 1], r.gen)):
                    r.finish()
                    continue
            except Exception as e:
                r.finish(e)
                continue
            self._running.append(r)
            joined.append(rows[i])
        return joined

    def _step(self) -> None:
        """One batched decode step; each row samples its own token; finished rows leave."""
        torch, engine = self.engine.torch, self.engine
        try:
            logits = self._batch.step(torch.tensor([[r.tokens[-1]] for r in self._running]))
        except Exception as e:
            for r in self._running:
                r.finish(_shared_error("batched decode step failed", e))
            self._running = []
            self._batch = self.engine.decode_batch()
            return
        try:
            tokens = engine.draw(logits, [r.gen for r in self._running])
        except Exception:       # pin the failure on its rows: sample each alone
            tokens = None
        done, failed = [], {}
        for i, r in enumerate(self._running):
            try:
                token = tokens[i] if tokens is not None else engine.sample(logits[i:i + 1], r.gen)
                if r.add(token):
                    done.append(i)
            except Exception as e:
                failed[i] = e
        for i in done:
            self._running[i].finish()
        for i, e in failed.items():
            self._running[i].finish(e)
        self._drop(done + list(failed))

    def _drop(self, rows) -> None:
        if rows:
            self._batch.remove(rows)
            drop = set(rows)
            self._running = [r for i, r in enumerate(self._running) if i not in drop]


def _stopped(r: _Request) -> bool:
    return r.stop is not None and r.stop.is_set()


def _shared_error(what: str, e: BaseException) -> RuntimeError:
    """One exception per caller for an error that hit several requests (each caller raises its own)."""
    err = RuntimeError(f"{what}: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err
