"""Continuous batching in front of the in-process engine (``--batching dynamic``).

One scheduler thread owns the model. ``generate`` (called from the load generator's workers) encodes the
prompt, queues the request and waits. At every step boundary the scheduler

1. drops requests whose ``stop`` event is set (their callers get ``Interrupted``),
2. admits queued requests while fewer than ``max_batch`` run: each one's prompt is prefilled alone, which
   samples its first token, and the sequence joins the batch,
3. decodes every running sequence by one token in ONE batched forward pass over a left-padded KV cache,
   sampling each row with its request's own ``torch.Generator`` (``Engine.sample``, as the unbatched engine),

and a request leaves the batch after exactly ``max_new_tokens`` tokens. Admission at step boundaries
(continuous batching) rather than batch boundaries: with closed-loop arrivals ~100 ms apart, waiting for
a whole batch to finish would delay a newcomer by up to a full generation (tens of seconds under the quota).
A request's timestamps are the unbatched engine's: t_start when its prefill begins (it joins), every token,
t_end at its last token.

``DecodeBatch`` writes GPT-2's forward out (the model's own modules and weights) rather than calling the
Hugging Face forward, for speed on this CPU: in-place KV writes instead of a whole-cache copy per step, and
oneDNN instead of MKL for the multi-row matmuls. Measured with 1 thread, 124M architecture, one decode step
at 8 rows: 67 ms against 100 ms through the Hugging Face forward (37 ms against 42 ms at 1 row).

What holds for reproducibility: every token is sampled with the request's own generator, seeded from its
seed, from its own row of logits. Those logits equal the unbatched engine's within float tolerance (pads are
masked out, each row has its own positions; the tests check 1e-4, observed ~3e-7 on the tiny config), not bit
for bit: other kernels and batched matmuls round differently. Tokens are therefore identical to the
unbatched engine's, and independent of batch mates, unless a last-bit difference flips a sample (the tests
see identical tokens).

Failures: a request is checked before it is queued (``max_new_tokens >= 1``, a non-empty prompt that fits
with its new tokens in the model's positions) and its prefill runs alone, so a failing prefill fails only
its own request.
A request whose sampling raises fails alone. A decode step that raises cannot be pinned on one row: every
request of that step fails with a ``RuntimeError`` naming the cause, and the scheduler carries on with the queue.

``close()`` drains: no new requests are accepted, every request already queued or running finishes (or
leaves at the next step if its ``stop`` is set), then the scheduler thread ends.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from llm_psi.engine.loop import Generation, Interrupted


def wrap(engine, cfg):
    """The engine for ``cfg.batching``: a ``BatchEngine`` around ``engine`` for 'dynamic'."""
    if cfg.batching != "dynamic":
        raise ValueError(f"unknown batching mode {cfg.batching!r}")
    return BatchEngine(engine, max_batch=cfg.max_batch)


def onednn_linear():
    """oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, a private op of x86 torch builds), or None
    where this torch build lacks it. MKL's sgemm, which serves ``addmm``/``F.linear``, is slow for 2-8 rows here: measured on this host's
    AMD EPYC with 1 thread, all GPT-2 block weights take 52 ms at 8 rows (addmm) against 39 ms (oneDNN), and
    the 50257-row output projection 30 ms against 18 ms; at 1 row addmm is the faster for the blocks."""
    import torch
    try:
        op = torch.ops.mkldnn._linear_pointwise
        op(torch.ones(2, 4), torch.ones(3, 4), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    return lambda x, weight, bias: op(x, weight, bias, "none", [], "")


class DecodeBatch:
    """The running sequences of a GPT-2 model: their KV cache, a prefill, and one batched decode step.

    The forward pass is the model's own computation written out (same modules and weights), so that each
    row can sit at its own position, pads are masked out, and the linear layers run on the faster kernel for
    their row count (``onednn_linear`` where available; ``onednn=None`` means: when available).

    Per layer, keys and values live in [B, heads, capacity, head_dim] buffers, left-padded: row i holds its
    ``lengths[i]`` tokens in the last ``lengths[i]`` of the ``width`` used columns. A decode step writes its
    new column in place; ``DynamicCache`` would concatenate, copying the whole cache at every step (~16 ms per
    step at 8 rows and length ~40 for the 124M architecture). The buffers are rebuilt, re-padded, only when a
    sequence joins or leaves, with ``reserve`` free columns."""

    def __init__(self, model, reserve: int = 64, onednn: bool | None = None):
        import torch
        cfg = model.config
        if cfg.model_type != "gpt2" or cfg.add_cross_attention:
            raise ValueError(f"batched decoding supports GPT-2 decoder models only, not {cfg.model_type!r}")
        self._torch, self.model, self.reserve = torch, model, reserve
        self._dnn = onednn_linear() if onednn in (None, True) else None
        if onednn and self._dnn is None:
            raise RuntimeError("oneDNN linear is not available in this torch build")
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.keys: list = []      # per layer [B, heads, capacity, head_dim]
        self.values: list = []
        self.width = 0
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def _linear(self, x, conv):
        """GPT-2's Conv1D (``x @ weight + bias``, weight [in, out]) on the faster kernel for x's rows."""
        if self._dnn is None or x.shape[0] == 1:
            return self._torch.addmm(conv.bias, x, conv.weight)
        return self._dnn(x, conv.weight.t(), conv.bias)

    def _blocks(self, h, attend):
        """The transformer blocks over rows ``h`` [N, embed]; ``attend(i, block, q, k, v)`` -> [N, embed]."""
        t = self.model.transformer
        for i, block in enumerate(t.h):
            q, k, v = self._linear(block.ln_1(h), block.attn.c_attn).split(t.embed_dim, dim=1)
            h = h + self._linear(attend(i, block, q, k, v), block.attn.c_proj)
            h = h + self._linear(block.mlp.act(self._linear(block.ln_2(h), block.mlp.c_fc)), block.mlp.c_proj)
        return h

    def _logits(self, h):
        h = self.model.transformer.ln_f(h)
        head = self.model.get_output_embeddings()
        return head(h) if self._dnn is None else self._dnn(h, head.weight, head.bias)

    def prefill(self, input_ids):
        """One prompt (``input_ids`` [1, L]) alone, causally: (its last logits [1, vocab], its row for ``add``)."""
        torch, t = self._torch, self.model.transformer
        n, heads, dim = input_ids.shape[1], self.n_head, self.head_dim
        keys, values = [], []

        def attend(i, block, q, k, v):
            q, k, v = (x.view(n, heads, dim).transpose(0, 1) for x in (q, k, v))   # [heads, L, dim]
            keys.append(k)
            values.append(v)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                   scale=block.attn.scaling)
            return att.transpose(0, 1).reshape(n, t.embed_dim)

        h = self._blocks(t.wte(input_ids[0]) + t.wpe(torch.arange(n)), attend)
        return self._logits(h[-1:]), (keys, values, n)

    def add(self, row) -> None:
        """Append a prefilled sequence (``prefill``'s row) as the last row."""
        self._rebuild(self._rows() + [row], max(self.width, row[2]))

    def remove(self, rows) -> None:
        """Drop the given row indices; trim the columns that only held padding."""
        drop = set(rows)
        if not drop:
            return
        keep = [row for r, row in enumerate(self._rows()) if r not in drop]
        if keep:
            self._rebuild(keep, max(row[2] for row in keep))
        else:
            self.keys, self.values, self.width, self.lengths = [], [], 0, []

    def _rows(self):
        return [([k[r, :, :self.width] for k in self.keys], [v[r, :, :self.width] for v in self.values], n)
                for r, n in enumerate(self.lengths)]

    def _rebuild(self, rows, width: int) -> None:
        """New buffers of ``width`` used columns holding ``rows``: (per-layer keys, per-layer values, length),
        each per-layer tensor [heads, len, head_dim] with the row's tokens last."""
        self.keys, self.values = [], []
        for i in range(len(rows[0][0])):
            for store, part in ((self.keys, 0), (self.values, 1)):
                buf = rows[0][part][i].new_zeros(len(rows), self.n_head, width + self.reserve, self.head_dim)
                for r, row in enumerate(rows):
                    t, length = row[part][i], row[2]
                    buf[r, :, width - length:width] = t[:, t.shape[1] - length:]
                store.append(buf)
        self.width = width
        self.lengths = [row[2] for row in rows]

    def step(self, input_ids):
        """Feed one token per row (``input_ids`` [B, 1]); return the next-token logits [B, vocab]."""
        torch, t = self._torch, self.model.transformer
        b, width = len(self.lengths), self.width + 1
        if width > self.keys[0].shape[2]:
            grow = lambda buf: torch.cat([buf, torch.zeros_like(buf)], dim=2)  # noqa: E731
            self.keys, self.values = [grow(k) for k in self.keys], [grow(v) for v in self.values]
        pos = torch.tensor(self.lengths)                       # each row's own next position, pads ignored
        mask = (torch.arange(width).unsqueeze(0) >= (width - 1 - pos).unsqueeze(1)).view(b, 1, 1, width)

        def attend(i, block, q, k, v):
            self.keys[i][:, :, width - 1] = k.view(b, self.n_head, self.head_dim)
            self.values[i][:, :, width - 1] = v.view(b, self.n_head, self.head_dim)
            att = torch.nn.functional.scaled_dot_product_attention(
                q.view(b, self.n_head, 1, self.head_dim), self.keys[i][:, :, :width],
                self.values[i][:, :, :width], attn_mask=mask, scale=block.attn.scaling)
            return att.reshape(b, t.embed_dim)

        logits = self._logits(self._blocks(t.wte(input_ids[:, 0]) + t.wpe(pos), attend))
        self.width = width
        self.lengths = [n + 1 for n in self.lengths]
        return logits


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
    """The engine's interface (``generate``, ``encode``, ``identity``, ...) served by one batching scheduler."""

    def __init__(self, engine, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self._cv = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._closing = False
        self._batch = DecodeBatch(engine.model)
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
        req = _Request(ids, max_new_tokens, seed, stop, on_token)
        with self._cv:
            if self._closing:
                raise RuntimeError("batch engine is closed")
            self._queue.append(req)
            self._cv.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return Generation(prompt_tokens=n, output_tokens=len(req.tokens), t_start=req.t_start,
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
                for r in joining:
                    self._prefill(r)
                if self._running:
                    self._step()

    def _prefill(self, r: _Request) -> None:
        """The request's own batch-1 forward and first token; then it joins the batch (unless done)."""
        torch = self.engine.torch
        r.t_start = time.monotonic()
        try:
            r.gen = torch.Generator().manual_seed(r.seed)
            logits, row = self._batch.prefill(r.ids)
            if r.add(int(self.engine.sample(logits, r.gen))):
                r.finish()
                return
            self._batch.add(row)
        except Exception as e:
            r.finish(e)
            return
        self._running.append(r)

    def _step(self) -> None:
        """One batched decode step; each row samples its own token; finished rows leave."""
        torch = self.engine.torch
        try:
            logits = self._batch.step(torch.tensor([[r.tokens[-1]] for r in self._running]))
        except Exception as e:
            for r in self._running:
                r.finish(_shared_error("batched decode step failed", e))
            self._running = []
            self._batch = DecodeBatch(self.engine.model)
            return
        done, failed = [], {}
        for i, r in enumerate(self._running):
            try:
                if r.add(int(self.engine.sample(logits[i:i + 1], r.gen))):
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
