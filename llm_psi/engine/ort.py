"""ONNX Runtime as the serving forward (``--engine ort``): GPT-2 exported once, per-row positions, past KV.

Why: on this CPU, ONNX Runtime's dynamic int8 GPT-2 made more tokens per CPU-second than our torch forward at
every batch size measured (results/engines/: issue 31). ``loop.OrtEngine`` keeps everything else of the engine
(tokenizer, request checks, per-request seeded sampling, the continuous-batching scheduler) and swaps only the
forward: ``OrtDecodeBatch`` has ``net.DecodeBatch``'s interface (``prefill_many``, ``add``, ``remove``,
``step``), so the scheduler (``batch.BatchEngine``) and the unbatched loop run it unchanged.

The export (``export_dir``): the engine's own torch model (the seeded GPT-2, or ``--model`` weights), written
out as two graphs with ``torch.onnx.export``:

- prefill ``(input_ids [B, L]) -> (logits [B, vocab], present_key0, present_value0, ...)``: prompts of one
  length side by side, causal, logits of the last position only;
- decode ``(input_ids [B, 1], position_ids [B, 1], bias [B, 1, 1, W+1], past_key0 ... [B, heads, W, dim])
  -> (logits, present_* [B, heads, W+1, dim])``: one token per row, each at its own position; the additive
  ``bias`` (0 or -inf) masks each row's left padding, as ``net.DecodeBatch`` does.

Linear layers are MatMul + Add so that ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, per
tensor; activations quantized per call, per tensor over the whole batch, as torch's dynamic int8) finds them,
the output head included. Reproducibility as in ``batch``: each request samples from its own seeded
generator; in float32 its logits equal the unbatched engine's within float tolerance, in int8 within the
rounding of an activation scale shared with its batch mates: in float32 its tokens equal the unbatched
engine's (tested); in int8 a sampled token can change with the batch mates (seen in the tests with the tiny
config), though the same seeds beside the same mates give the same tokens.

Both graphs go into ``<cache root>/ort/<key>/`` (cache root: ``$LLM_PSI_PEER_CACHE``, default
``<tmp>/llm-psi-peers``), where ``key`` is a SHA-256 over the model's config, every weight's bytes, the
quantization, the export's own version and the versions of torch, onnx and onnxruntime: changed weights or
software get a new directory, never a stale graph. A directory appears only complete (written aside, then
renamed), so concurrent processes may race to build it. A service exports on its first start (minutes for
the 124M model under the paper's quota); ``python -m llm_psi.engine.accuracy --full`` exports ahead (it runs
the ort engine in float32 and int8 from seed 0, as ``serve`` and the batching presets do).

The KV cache lives in ONNX Runtime's own tensors (``OrtValue``): a step's ``present`` outputs are the next
step's ``past`` inputs, run through ``run_with_ort_values`` (IO binding without copies to numpy; only the
logits are read out). The decode graph concatenates the new column (a copy of the cache per step, as the ONNX
Runtime peer did); the cache is re-padded in numpy only when sequences join or leave.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings

from llm_psi.engine import net

EXPORT_VERSION = 1          # bump when the graphs below change: a new cache key
QUANTIZE = ("none", "int8")


class OrtUnavailable(ImportError):
    """onnxruntime (or onnx, for the export) is missing."""


def require(module: str, error=OrtUnavailable, what: str = "the ort engine needs {module} (a dependency of "
            "llm-psi: pip install -e .)"):
    """The imported ``module``, or ``error`` saying ``what`` (formatted with the module) and why."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise error(f"{what.format(module=module)}: {e}") from None


def cache_root() -> str:
    return os.environ.get("LLM_PSI_PEER_CACHE") or os.path.join(tempfile.gettempdir(), "llm-psi-peers")


def cache_key(model, quantize: str) -> str:
    """SHA-256 (hex, first 24 characters) of everything the exported graphs depend on."""
    import torch
    ort, onnx = require("onnxruntime"), require("onnx")
    h = hashlib.sha256()
    h.update(json.dumps({"export": EXPORT_VERSION, "quantize": quantize, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                         "config": model.config.to_dict()}, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy())   # the bytes, without a copy
    return h.hexdigest()[:24]


def export_dir(model, quantize: str = "none", root: str | None = None) -> str:
    """The directory holding prefill.onnx, decode.onnx and meta.json for ``model`` (a float32 Hugging Face
    GPT-2) in ``quantize``; exported on the first call, reused after."""
    if quantize not in QUANTIZE:
        raise ValueError(f"the ort engine's quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    path = os.path.join(root or cache_root(), "ort", cache_key(model, quantize))
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="export-", dir=os.path.dirname(path))
    try:
        _export(model, tmp)
        quantized = _quantize(tmp) if quantize == "int8" else 0
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"quantize": quantize, "quantized_matmuls": quantized, "export_version": EXPORT_VERSION,
                       "config": model.config.to_dict()}, f, default=str)
        os.chmod(tmp, 0o755)      # mkdtemp's 0700 would hide the export from other users
        try:
            os.replace(tmp, path)
        except OSError:   # another process published it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _graphs(model):
    """(prefill, decode) torch modules: GPT-2's forward written out over the model's own modules."""
    import torch
    t, cfg = model.transformer, model.config
    heads, dim, embed = cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd

    def linear(x, conv):
        return torch.matmul(x, conv.weight) + conv.bias

    def blocks(h, attend):
        b, s = h.shape[:2]
        present = []
        for i, block in enumerate(t.h):
            q, k, v = linear(block.ln_1(h), block.attn.c_attn).split(embed, dim=2)
            q, k, v = (x.view(b, s, heads, dim).transpose(1, 2) for x in (q, k, v))
            att, k, v = attend(i, block, q, k, v)
            present += [k, v]
            h = h + linear(att.transpose(1, 2).reshape(b, s, embed), block.attn.c_proj)
            h = h + linear(block.mlp.act(linear(block.ln_2(h), block.mlp.c_fc)), block.mlp.c_proj)
        return torch.matmul(t.ln_f(h[:, -1]), t.wte.weight.t()), present

    class Prefill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            def attend(i, block, q, k, v):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                        scale=block.attn.scaling), k, v
            logits, present = blocks(t.wte(input_ids) + t.wpe(torch.arange(input_ids.shape[1])), attend)
            return (logits, *present)

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, bias, *past):
            def attend(i, block, q, k, v):
                k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
                scores = torch.matmul(q, k.transpose(2, 3)) * block.attn.scaling + bias
                return torch.matmul(scores.softmax(dim=-1), v), k, v
            logits, present = blocks(t.wte(input_ids) + t.wpe(position_ids), attend)
            return (logits, *present)

    return Prefill().eval(), Decode().eval()


def kv_names(n_layer: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}{i}" for i in range(n_layer) for kind in ("key", "value")]


def _export(model, out: str) -> None:
    import torch
    require("onnx")
    cfg = model.config
    heads, dim = cfg.n_head, cfg.n_embd // cfg.n_head
    past, present = kv_names(cfg.n_layer, "past"), kv_names(cfg.n_layer, "present")
    prefill, decode = _graphs(model)
    ids = torch.ones(2, 3, dtype=torch.long)
    kv = tuple(torch.zeros(2, heads, 3, dim) for _ in past)
    runs = (("prefill", prefill, (ids,), ["input_ids"],
             {"input_ids": {0: "batch", 1: "sequence"}, **{n: {0: "batch", 2: "sequence"} for n in present}}),
            ("decode", decode, (ids[:, :1], ids[:, :1] + 2, torch.zeros(2, 1, 1, 4), *kv),
             ["input_ids", "position_ids", "bias", *past],
             {"input_ids": {0: "batch"}, "position_ids": {0: "batch"}, "bias": {0: "batch", 3: "total"},
              **{n: {0: "batch", 2: "past"} for n in past}, **{n: {0: "batch", 2: "total"} for n in present}}))
    for name, module, args, inputs, axes in runs:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notices
            torch.onnx.export(module, args, os.path.join(out, f"{name}.onnx"), input_names=inputs,
                              output_names=["logits", *present], dynamic_axes={"logits": {0: "batch"}, **axes},
                              opset_version=17, dynamo=False)


def _quantize(out: str) -> int:
    """Both graphs in place with int8 MatMul weights; returns the quantized MatMuls of the decode graph."""
    import logging
    quantization = require("onnxruntime.quantization")
    onnx = require("onnx")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)   # its advice to pre-process goes to the root logger
    try:
        for name in ("prefill", "decode"):
            src, dst = os.path.join(out, f"{name}.onnx"), os.path.join(out, f"{name}-int8.onnx")
            quantization.quantize_dynamic(src, dst, weight_type=quantization.QuantType.QInt8)
            os.replace(dst, src)
    finally:
        logging.getLogger().setLevel(level)
    graph = onnx.load(os.path.join(out, "decode.onnx"), load_external_data=False).graph
    n = sum(node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for node in graph.node)
    if n == 0:
        raise RuntimeError("quantize_dynamic quantized no MatMul of the decode graph")
    return n


class Sessions:
    """The two ONNX Runtime sessions of one export, on ``threads`` intra-op threads, spinning off (a spinning
    worker burns the CPU quota between steps)."""

    def __init__(self, path: str, threads: int = 1):
        ort = require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.ort, self.threads, self.path = ort, threads, path
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.prefill = ort.InferenceSession(os.path.join(path, "prefill.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self.decode = ort.InferenceSession(os.path.join(path, "decode.onnx"), opts,
                                           providers=["CPUExecutionProvider"])
        n_layer = int(self.meta["config"]["n_layer"])
        self.past, self.present = kv_names(n_layer, "past"), kv_names(n_layer, "present")
        self.outputs = ["logits", *self.present]


class OrtDecodeBatch(net.RunningRows):
    """``net.DecodeBatch``'s interface over ONNX Runtime: the running sequences, their KV cache (left-padded,
    row i's ``lengths[i]`` tokens in the last columns), a prefill and one batched decode step.
    Logits come back as float32 torch tensors (the engine samples them)."""

    def __init__(self, sessions: Sessions):
        import numpy as np
        import torch
        self.s, self._np, self._torch = sessions, np, torch
        self.cache: list = []        # OrtValues, in sessions.past order: [B, heads, width, dim]
        self._hold: list = []        # numpy buffers the OrtValues of a rebuild point into
        self.width = 0
        self.lengths: list[int] = []

    def prefill_many(self, input_ids):
        """Prompts of one length (``input_ids`` [B, L], torch or numpy) side by side: (last logits [B, vocab],
        rows for ``add``: (per-layer keys and values in past order, each [heads, L, dim]; L))."""
        ids = self._np.ascontiguousarray(self._np.asarray(input_ids, dtype=self._np.int64))
        logits, *kv = self.s.prefill.run(None, {"input_ids": ids})
        n = ids.shape[1]
        return self._torch.from_numpy(logits), [([t[r] for t in kv], n) for r in range(ids.shape[0])]

    def _clear(self) -> None:
        self.cache, self._hold, self.width, self.lengths = [], [], 0, []

    def _rows(self):
        arrays = [v.numpy() for v in self.cache]
        return [([a[r] for a in arrays], n) for r, n in enumerate(self.lengths)]

    def _rebuild(self, rows, width: int) -> None:
        np, ort = self._np, self.s.ort
        self._hold = []
        for i in range(len(rows[0][0])):
            first = rows[0][0][i]
            buf = np.zeros((len(rows), first.shape[0], width, first.shape[2]), dtype=first.dtype)
            for r, (kv, n) in enumerate(rows):
                buf[r, :, width - n:] = kv[i][:, kv[i].shape[1] - n:]
            self._hold.append(buf)
        self.cache = [ort.OrtValue.ortvalue_from_numpy(b) for b in self._hold]
        self.width, self.lengths = width, [n for _, n in rows]

    def step(self, input_ids):
        """One token per row (``input_ids`` [B, 1]); the next-token logits [B, vocab], float32 torch."""
        np, ort = self._np, self.s.ort
        b, width = len(self.lengths), self.width + 1
        lengths = np.asarray(self.lengths, dtype=np.int64)
        bias = np.where(np.arange(width)[None, :] < (width - 1 - lengths)[:, None], -np.inf, 0.0)
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64).reshape(b, 1),
                "position_ids": lengths.reshape(b, 1),
                "bias": np.ascontiguousarray(bias.astype(np.float32).reshape(b, 1, 1, width))}
        feed = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
        feed.update(zip(self.s.past, self.cache))
        logits, *self.cache = self.s.decode.run_with_ort_values(self.s.outputs, feed)
        self._hold = []           # the cache now lives in ONNX Runtime's own tensors
        self.width, self.lengths = width, [n + 1 for n in self.lengths]
        return self._torch.from_numpy(logits.numpy())
