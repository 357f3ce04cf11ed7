"""Peer engines on our weights: Hugging Face ``generate()``, ONNX Runtime with past KV, and CTranslate2.

Optional: onnxruntime, onnx, onnxscript and ctranslate2 come from ``bench/requirements-peers.txt`` and are
imported only when a peer is built (``PeerUnavailable`` says which is missing). The paper's suite never needs them.

Every peer runs the same weights as our engines: the seeded GPT-2 initialisation of ``loop.Engine`` (the 124M
architecture, or the tiny config), saved once with ``save_pretrained`` into a cache directory
(``$LLM_PSI_PEER_CACHE``, default ``<tmp>/llm-psi-peers``) and converted from there:

- ``hf-generate``: ``model.generate`` on a static batch, float32, bfloat16 or int8 weights;
- ``onnxruntime``: GPT-2's forward written out as two graphs, a prefill (no past) and a decode step that
  takes and returns every layer's keys and values (past KV, concatenated per step), exported with
  ``torch.onnx.export``; int8 through ``onnxruntime.quantization.quantize_dynamic`` (its MatMul weights);
- ``ctranslate2``: ``TransformersConverter`` on the saved directory; compute type float32 or int8.

A peer's ``generate_batch(ids, batch, tokens, seed)`` runs ``batch`` copies of the prompt ``ids`` (a static
batch) for exactly ``tokens`` new tokens each, sampling with temperature 0.7 among the 50 likeliest tokens
(Hugging Face's default top-k), one thread, and returns the number of new tokens.
"""
from __future__ import annotations

import os
import tempfile

from llm_psi.config import TOP_K  # Hugging Face generate()'s default, as our engines'

PEERS = ("hf-generate", "onnxruntime", "ctranslate2")
# (dtype, quantize) settings each peer supports here
SETTINGS = {"hf-generate": [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")],
            "onnxruntime": [("float32", "none"), ("float32", "int8")],
            "ctranslate2": [("float32", "none"), ("float32", "int8")]}
TEMPERATURE = 0.7


class PeerUnavailable(Exception):
    """The peer cannot run here (a missing optional package, or a setting it does not support)."""


def cache_root() -> str:
    return os.environ.get("LLM_PSI_PEER_CACHE") or os.path.join(tempfile.gettempdir(), "llm-psi-peers")


def hf_dir(tiny: bool, seed: int = 0, root: str | None = None) -> str:
    """Our seeded initialisation (``loop.Engine``) saved with ``save_pretrained``, with its tokenizer; made once."""
    import torch
    from llm_psi.engine.loop import Engine
    name = f"gpt2-{'tiny' if tiny else '124m'}-seed{seed}-torch{torch.__version__.split('+')[0]}"
    path = os.path.join(root or cache_root(), name, "hf")
    if not os.path.exists(os.path.join(path, "config.json")):
        engine = Engine(tiny=tiny, seed=seed)
        _quiet_transformers()
        tmp = tempfile.mkdtemp(prefix="hf-", dir=_parent(path))
        engine.model.save_pretrained(tmp)
        engine.tokenizer.save_pretrained(tmp)
        _publish(tmp, path)
    return path


def _parent(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.path.dirname(path)


def _publish(tmp: str, path: str) -> None:
    """Move a finished directory into place; another process may have won the race."""
    import shutil
    try:
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _require(module: str):
    from llm_psi.engine.ort import require
    return require(module, PeerUnavailable, "{module} is not installed (pip install -r bench/requirements-peers.txt)")


def sample_top_k(logits, rng, temperature: float = TEMPERATURE, k: int = TOP_K):
    """One token per row of numpy ``logits`` [B, vocab]: softmax at ``temperature`` over the ``k`` largest."""
    import numpy as np
    k = min(k, logits.shape[1])
    top = np.argpartition(logits, -k, axis=1)[:, -k:]
    z = np.take_along_axis(logits, top, axis=1).astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    pick = (p.cumsum(axis=1) < rng.random((len(p), 1))).sum(axis=1).clip(max=k - 1)
    return top[np.arange(len(top)), pick]


# --- Hugging Face generate -------------------------------------------------------------------------------
class HFGeneratePeer:
    """``model.generate`` on the saved model, put in ``dtype``/``quantize`` by the engine's own precisions
    (``llm_psi.engine.net.set_precision``) where that module exists; without it, bfloat16 is a plain cast and
    int8 is unavailable."""
    name = "hf-generate"

    def __init__(self, hf: str, dtype: str = "float32", quantize: str = "none", threads: int = 1):
        import torch
        from transformers import AutoModelForCausalLM
        if (dtype, quantize) not in SETTINGS[self.name]:
            raise PeerUnavailable(f"hf-generate: no {dtype}/{quantize} setting here")
        torch.set_num_threads(threads)
        _quiet_transformers()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        try:
            from llm_psi.engine import net
        except ImportError:
            net = None
        if net is not None:
            net.set_precision(self.model, dtype, quantize)
        elif quantize != "none":
            raise PeerUnavailable("hf-generate: int8 needs the engine's precisions (llm_psi.engine.net)")
        else:
            self.model.to(getattr(torch, dtype))
        self.setting = (dtype, quantize)

    def generate_batch(self, ids, batch: int, tokens: int, seed: int = 0) -> int:
        torch = self.torch
        x = torch.tensor([list(ids)] * batch)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=True,
                                      temperature=TEMPERATURE, top_k=TOP_K, max_new_tokens=tokens,
                                      min_new_tokens=tokens, pad_token_id=self.model.config.eos_token_id)
        return int((out.shape[1] - x.shape[1]) * batch)


# --- ONNX Runtime ----------------------------------------------------------------------------------------
def _decoder_module(model, with_past: bool):
    """GPT-2's forward written out over explicit per-layer keys and values, for ``torch.onnx.export``:
    prefill ``(input_ids) -> (logits, k0, v0, k1, ...)``; decode ``(input_ids [B,1], k0, v0, ...) -> same``,
    keys and values [B, heads, length, head_dim], logits of the last position only. Linear layers are written
    as MatMul + Add so that the dynamic int8 quantizer finds them."""
    import torch
    t = model.transformer
    heads, dim = model.config.n_head, model.config.n_embd // model.config.n_head

    def linear(x, conv):
        return torch.matmul(x, conv.weight) + conv.bias

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *past):
            b, s = input_ids.shape
            start = past[0].shape[2] if with_past else 0
            h = t.wte(input_ids) + t.wpe(torch.arange(s) + start)
            present = []
            for i, block in enumerate(t.h):
                q, k, v = linear(block.ln_1(h), block.attn.c_attn).split(t.embed_dim, dim=2)
                q, k, v = (x.view(b, s, heads, dim).transpose(1, 2) for x in (q, k, v))
                if with_past:
                    k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
                present += [k, v]
                att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=not with_past)
                h = h + linear(att.transpose(1, 2).reshape(b, s, t.embed_dim), block.attn.c_proj)
                h = h + linear(block.mlp.act(linear(block.ln_2(h), block.mlp.c_fc)), block.mlp.c_proj)
            logits = torch.matmul(t.ln_f(h[:, -1]), t.wte.weight.t())
            return (logits, *present)

    return Decoder().eval()


def onnx_files(hf: str, quantize: str = "none") -> tuple[str, str]:
    """(prefill, decode) ONNX files exported from the saved model (int8: dynamically quantized); made once."""
    base = os.path.join(os.path.dirname(hf), "onnx")
    paths = tuple(os.path.join(base, f"{part}{'' if quantize == 'none' else '-' + quantize}.onnx")
                  for part in ("prefill", "decode"))
    if all(os.path.exists(p) for p in paths):
        return paths
    _require("onnx")
    tmp = tempfile.mkdtemp(prefix="onnx-", dir=_parent(os.path.join(base, "x")))
    fp32 = [os.path.join(base, f"{part}.onnx") for part in ("prefill", "decode")]
    if not all(os.path.exists(p) for p in fp32):
        _export(hf, tmp)
        for part, path in zip(("prefill", "decode"), fp32):
            os.replace(os.path.join(tmp, f"{part}.onnx"), path)
    if quantize == "int8":
        import logging
        quantization = _require("onnxruntime.quantization")
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)   # its advice to pre-process goes to the root logger
        try:
            for src, dst in zip(fp32, paths):
                quantization.quantize_dynamic(src, os.path.join(tmp, "q.onnx"),
                                              weight_type=quantization.QuantType.QInt8)
                os.replace(os.path.join(tmp, "q.onnx"), dst)
        finally:
            logging.getLogger().setLevel(level)
    elif quantize != "none":
        raise PeerUnavailable(f"onnxruntime: no quantize={quantize} setting")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _export(hf: str, out: str) -> None:
    import torch
    from transformers import GPT2LMHeadModel
    _quiet_transformers()
    model = GPT2LMHeadModel.from_pretrained(hf, dtype=torch.float32).eval()
    n_layer, heads = model.config.n_layer, model.config.n_head
    dim = model.config.n_embd // heads
    kv = [f"{kind}{i}" for i in range(n_layer) for kind in ("key", "value")]
    ids = torch.ones(2, 3, dtype=torch.long)
    past = tuple(torch.zeros(2, heads, 3, dim) for _ in kv)
    seq = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    for with_past, name, args in ((False, "prefill", (ids,)), (True, "decode", (ids[:, :1], *past))):
        axes = dict(seq, **{f"present_{n}": {0: "batch", 2: "length"} for n in kv})
        if with_past:
            axes.update({f"past_{n}": {0: "batch", 2: "past"} for n in kv})
        with torch.no_grad():
            torch.onnx.export(_decoder_module(model, with_past), args, os.path.join(out, f"{name}.onnx"),
                              input_names=["input_ids"] + ([f"past_{n}" for n in kv] if with_past else []),
                              output_names=["logits"] + [f"present_{n}" for n in kv],
                              dynamic_axes=axes, opset_version=17, dynamo=False)


class OnnxRuntimePeer:
    name = "onnxruntime"

    def __init__(self, hf: str, dtype: str = "float32", quantize: str = "none", threads: int = 1):
        if dtype != "float32":
            raise PeerUnavailable(f"onnxruntime: no {dtype} setting here")
        ort = _require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        prefill, decode = onnx_files(hf, quantize)
        self.prefill = ort.InferenceSession(prefill, opts, providers=["CPUExecutionProvider"])
        self.decode = ort.InferenceSession(decode, opts, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.decode.get_inputs()][1:]
        self.setting = (dtype, quantize)

    def generate_batch(self, ids, batch: int, tokens: int, seed: int = 0) -> int:
        import numpy as np
        rng = np.random.default_rng(seed)
        logits, *present = self.prefill.run(None, {"input_ids": np.array([list(ids)] * batch, dtype=np.int64)})
        nxt = sample_top_k(logits, rng)
        for _ in range(tokens - 1):
            feed = dict(zip(self.past_names, present), input_ids=nxt.astype(np.int64).reshape(batch, 1))
            logits, *present = self.decode.run(None, feed)
            nxt = sample_top_k(logits, rng)
        return tokens * batch


# --- CTranslate2 -----------------------------------------------------------------------------------------
def ct2_dir(hf: str) -> str:
    """The saved model converted by CTranslate2's Transformers converter (float32 weights); made once."""
    path = os.path.join(os.path.dirname(hf), "ct2")
    if not os.path.exists(os.path.join(path, "model.bin")):
        converters = _require("ctranslate2.converters")
        tmp = tempfile.mkdtemp(prefix="ct2-", dir=_parent(path))
        converters.TransformersConverter(hf).convert(tmp, force=True)
        _publish(tmp, path)
    return path


class CTranslate2Peer:
    name = "ctranslate2"

    def __init__(self, hf: str, dtype: str = "float32", quantize: str = "none", threads: int = 1):
        ct2 = _require("ctranslate2")
        compute = {("float32", "none"): "float32", ("float32", "int8"): "int8"}.get((dtype, quantize))
        if compute is None or compute not in ct2.get_supported_compute_types("cpu"):
            raise PeerUnavailable(f"ctranslate2: no {dtype}/{quantize} compute type on this CPU")
        import json
        self.ct2, path = ct2, ct2_dir(hf)
        with open(os.path.join(path, "vocabulary.json")) as f:
            self.vocab = json.load(f)   # token strings by id: the generator takes strings
        self.generator = ct2.Generator(path, device="cpu", compute_type=compute, inter_threads=1,
                                       intra_threads=threads)
        self.setting = (dtype, quantize)

    def generate_batch(self, ids, batch: int, tokens: int, seed: int = 0) -> int:
        self.ct2.set_random_seed(seed)
        prompt = [self.vocab[i] for i in ids]
        res = self.generator.generate_batch([prompt] * batch, max_length=tokens, min_length=tokens,
                                            sampling_topk=TOP_K, sampling_temperature=TEMPERATURE,
                                            include_prompt_in_result=False)
        n = sum(len(r.sequences_ids[0]) for r in res)
        if n != tokens * batch:
            raise RuntimeError(f"ctranslate2 generated {n} tokens, expected {tokens * batch}")
        return n


CLASSES = {cls.name: cls for cls in (HFGeneratePeer, OnnxRuntimePeer, CTranslate2Peer)}


def make_peer(name: str, tiny: bool, seed: int = 0, dtype: str = "float32", quantize: str = "none",
              threads: int = 1):
    """The peer ``name`` (one of ``PEERS``) on our seeded weights; ``PeerUnavailable`` where it cannot run."""
    if name not in CLASSES:
        raise ValueError(f"peer must be one of {', '.join(PEERS)}, got {name!r}")
    return CLASSES[name](hf_dir(tiny, seed), dtype=dtype, quantize=quantize, threads=threads)
