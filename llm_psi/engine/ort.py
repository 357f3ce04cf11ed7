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
- decode_shared (``kv`` "shared"; ``_shared_decode_graph``, written with onnx.helper
  from the same weights) ``(input_ids [B, 1], position_ids [B, 1], seqlens_k [B], total_sequence_length [1],
  past_key0 ... [B, heads, C, dim]) -> (logits, present_* [B, heads, C, dim])``: one token per row, each at
  its own position, attention by ONNX Runtime's ``GroupQueryAttention`` kernel, the present bound to the past's
  buffer so that a step writes one column in place (``OrtSharedDecodeBatch``);
- decode (``kv`` "concat", the default) ``(input_ids [B, 1], position_ids [B, 1], bias [B, 1, 1,
  W+1], past_key0 ... [B, heads, W, dim]) -> (logits, present_* [B, heads, W+1, dim])``: the additive
  ``bias`` (0 or -inf) masks each row's left padding, as ``net.DecodeBatch`` does, and each step
  concatenates the new column, copying the whole cache (``OrtDecodeBatch``).

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

Why the shared graph: with the concatenating one a step's time grew with the cache's width (the copy of
every layer's keys and values, as the ONNX Runtime peer does too), so long sequences and big batches paid
most. With ``kv`` "shared" the cache is a numpy buffer per layer, with free columns, bound through IO
binding as both the past and the present; with "concat" it lives in ONNX Runtime's tensors and a step's
``present`` outputs are the next step's ``past`` inputs (``run_with_ort_values``). Either way only the logits
are read out, and the cache is re-laid in numpy only when sequences join or leave.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings

from llm_psi.engine import net

EXPORT_VERSION = 2          # bump when the graphs below change: a new cache key
QUANTIZE = ("none", "int8")
GRAPHS = ("prefill", "decode", "decode_shared")
KV = ("concat", "shared")   # the decode graph: the cache concatenated per step (default), or updated in place


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
    """The directory holding prefill.onnx, decode.onnx, decode_shared.onnx and meta.json for ``model`` (a
    float32 Hugging Face GPT-2) in ``quantize``; exported on the first call, reused after."""
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


def _shared_decode_graph(model):
    """The decode step over a KV cache that ONNX Runtime updates in place (written by hand with onnx.helper,
    from the model's own weights): ``(input_ids [B, 1], position_ids [B, 1], seqlens_k [B] int32 (each row's
    tokens before this one), total_sequence_length [1] int32, past_key0 ... [B, heads, C, dim]) -> (logits
    [B, vocab], present_key0 ...)``. Each layer's attention is ONNX Runtime's ``GroupQueryAttention``
    (com.microsoft, its CPU kernel; as many key/value heads as query heads, GPT-2's packed q|k|v as its query):
    bound to the same buffer as its past (IO binding), the present is the past, and a step writes one column
    per row instead of copying the cache. Rows are right-padded: row i's tokens are its first ``seqlens_k[i]``
    columns, and the kernel attends to those and the new one only."""
    import numpy as np
    require("onnx")
    from onnx import TensorProto, helper, numpy_helper
    t, cfg = model.transformer, model.config
    heads, embed = cfg.n_head, cfg.n_embd
    act = getattr(cfg, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu"):
        raise ValueError(f"the ort engine's shared KV graph knows gelu_new and gelu, not {act!r}")
    eps = float(cfg.layer_norm_epsilon)
    inits, nodes = [], []

    def const(name, tensor):
        arr = tensor.detach().cpu().float().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, ins, outs, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, domain=domain or None, **attrs))
        return outs[0]

    def layer_norm(x, ln, name):
        return node("LayerNormalization", [x, const(f"{name}.w", ln.weight), const(f"{name}.b", ln.bias)],
                    [f"{name}.out"], axis=-1, epsilon=eps)

    def linear(x, conv, name):
        y = node("MatMul", [x, const(f"{name}.w", conv.weight)], [f"{name}.mm"])
        return node("Add", [y, const(f"{name}.b", conv.bias)], [f"{name}.out"])

    past, present = kv_names(cfg.n_layer, "past"), kv_names(cfg.n_layer, "present")
    h = node("Add", [node("Gather", [const("wte", t.wte.weight), "input_ids"], ["tok"]),
                     node("Gather", [const("wpe", t.wpe.weight), "position_ids"], ["pos"])], ["h0"])
    for i, block in enumerate(t.h):
        p = f"h{i}"
        qkv = linear(layer_norm(h, block.ln_1, f"{p}.ln_1"), block.attn.c_attn, f"{p}.c_attn")
        att = node("GroupQueryAttention", [qkv, "", "", past[2 * i], past[2 * i + 1], "seqlens_k",
                                           "total_sequence_length"],
                   [f"{p}.att", present[2 * i], present[2 * i + 1]], domain="com.microsoft", num_heads=heads,
                   kv_num_heads=heads, scale=float(block.attn.scaling))
        h = node("Add", [h, linear(att, block.attn.c_proj, f"{p}.c_proj")], [f"{p}.mid"])
        x = layer_norm(h, block.ln_2, f"{p}.ln_2")
        x = node("MatMul", [x, const(f"{p}.c_fc.w", block.mlp.c_fc.weight)], [f"{p}.c_fc.mm"])
        gelu = "FastGelu" if act == "gelu_new" else "BiasGelu"
        x = node(gelu, [x, const(f"{p}.c_fc.b", block.mlp.c_fc.bias)], [f"{p}.act"], domain="com.microsoft")
        h = node("Add", [h, linear(x, block.mlp.c_proj, f"{p}.mlp.c_proj")], [f"{p}.out"])
    last = node("Squeeze", [h, const("axis1", np.array([1], dtype=np.int64))], ["last"])
    node("MatMul", [layer_norm(last, t.ln_f, "ln_f"), const("head.w", t.wte.weight.t())], ["logits"])
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    kv_shape = ["batch", heads, "capacity", embed // heads]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", 1]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", 1]),
              helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", i32, [1]),
              *(helper.make_tensor_value_info(n, f32, kv_shape) for n in past)]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", cfg.vocab_size]),
               *(helper.make_tensor_value_info(n, f32, kv_shape) for n in present)]
    # the types of the com.microsoft ops' outputs, which ONNX's shape inference does not know (the quantizer
    # needs the type of every MatMul input)
    inner = t.h[0].mlp.c_fc.weight.shape[1]
    typed = [helper.make_tensor_value_info(f"h{i}.{name}", f32, ["batch", 1, width]) for i in range(cfg.n_layer)
             for name, width in (("att", embed), ("act", inner))]
    graph = helper.make_graph(nodes, "gpt2_decode_shared_kv", inputs, outputs, inits, value_info=typed)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def kv_names(n_layer: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}{i}" for i in range(n_layer) for kind in ("key", "value")]


def _export(model, out: str) -> None:
    import torch
    onnx = require("onnx")
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
    onnx.save(_shared_decode_graph(model), os.path.join(out, "decode_shared.onnx"))


def _quantize(out: str) -> int:
    """Both graphs in place with int8 MatMul weights; returns the quantized MatMuls of the decode graph."""
    import logging
    quantization = require("onnxruntime.quantization")
    onnx = require("onnx")
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)   # its advice to pre-process goes to the root logger
    try:
        for name in GRAPHS:
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
    """The ONNX Runtime sessions of one export, on ``threads`` intra-op threads, spinning off (a spinning
    worker burns the CPU quota between steps): the prefill, and the decode graph of ``kv`` (one of ``KV``)."""

    def __init__(self, path: str, threads: int = 1, kv: str = "concat"):
        if kv not in KV:
            raise ValueError(f"the ort engine's kv must be one of {', '.join(KV)}, got {kv!r}")
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
        graph = "decode_shared.onnx" if kv == "shared" else "decode.onnx"
        self.kv = kv
        self.decode = ort.InferenceSession(os.path.join(path, graph), opts, providers=["CPUExecutionProvider"])
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

    def _lay(self, rows, columns: int, left: bool) -> list:
        """Per layer, a numpy buffer [B, heads, columns, dim] holding each row's last n keys or values in its
        last n columns (``left`` padding) or its first n."""
        np = self._np
        out = []
        for i in range(len(rows[0][0])):
            first = rows[0][0][i]
            buf = np.zeros((len(rows), first.shape[0], columns, first.shape[2]), dtype=first.dtype)
            for r, (kv, n) in enumerate(rows):
                (buf[r, :, columns - n:] if left else buf[r, :, :n])[...] = kv[i][:, kv[i].shape[1] - n:]
            out.append(buf)
        return out

    def _rebuild(self, rows, width: int) -> None:
        self._hold = self._lay(rows, width, left=True)
        self.cache = [self.s.ort.OrtValue.ortvalue_from_numpy(b) for b in self._hold]
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


class OrtSharedDecodeBatch(OrtDecodeBatch):
    """``OrtDecodeBatch`` over the shared-KV decode graph (``kv`` "shared"): per layer, keys and values live in
    numpy buffers [B, heads, capacity, dim] that ONNX Runtime reads and writes in place (bound as both past and
    present), right-padded: row i's ``lengths[i]`` tokens in its first columns. A step writes one column per
    row; the buffers are rebuilt only when sequences join or leave, with ``reserve`` free columns (doubled when
    they run out), as ``net.DecodeBatch`` does in torch."""

    def __init__(self, sessions: Sessions, reserve: int = 64):
        super().__init__(sessions)
        if sessions.kv != "shared":
            raise ValueError("OrtSharedDecodeBatch needs Sessions(kv='shared')")
        self.reserve, self.capacity = max(1, reserve), 0

    def _clear(self) -> None:
        super()._clear()
        self.capacity = 0

    def _rows(self):
        return [([a[r, :, :n] for a in self._hold], n) for r, n in enumerate(self.lengths)]

    def _rebuild(self, rows, width: int, capacity: int | None = None) -> None:
        capacity = max(capacity or 0, width + self.reserve)
        self._hold = self._lay(rows, capacity, left=False)   # the OrtValues share this memory: kept alive here
        self.cache = [self.s.ort.OrtValue.ortvalue_from_numpy(b) for b in self._hold]
        self.width, self.lengths, self.capacity = width, [n for _, n in rows], capacity

    def step(self, input_ids):
        """One token per row (``input_ids`` [B, 1]); the next-token logits [B, vocab], float32 torch."""
        np = self._np
        if self.width + 1 > self.capacity:
            self._rebuild(self._rows(), self.width, capacity=2 * self.capacity)
        b = len(self.lengths)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        feeds = {"input_ids": np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64).reshape(b, 1)),
                 "position_ids": lengths.reshape(b, 1), "seqlens_k": lengths.astype(np.int32),
                 "total_sequence_length": np.asarray([self.width + 1], dtype=np.int32)}
        io = self.s.decode.io_binding()
        io.bind_output("logits", "cpu")         # first: get_outputs() keeps the binding order
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for past, present, value in zip(self.s.past, self.s.present, self.cache):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)     # the same buffer: the kernel appends in place
        self.s.decode.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        self.width, self.lengths = self.width + 1, [n + 1 for n in self.lengths]
        return self._torch.from_numpy(logits)
