"""GPT-2's forward pass written out over the model's own modules, and the engine's precisions.

``Forward`` runs the model's computation (same modules, same weights) on rows of tokens, so that a decode
step can attend over a preallocated KV cache (``batch.DecodeBatch``) instead of Hugging Face's concatenating
cache, and so that each linear layer runs on the fastest kernel for its row count and precision.

Precisions (``set_precision``, applied to the Hugging Face model in place, so that ``generate()`` and this
forward see the same weights):

- ``dtype='float32'``, ``quantize='none'``: the model as loaded. GPT-2's ``Conv1D`` layers (``x @ W + b``,
  W [in, out]) run on MKL's ``addmm`` at one row and on oneDNN's linear at more (``onednn_linear``).
- ``dtype='bfloat16'``: every parameter in bfloat16, activations and KV cache too; the Conv1D layers become
  ``nn.Linear`` (weight transposed to [out, in]), on oneDNN's bf16 kernels (AVX512-BF16 here). The logits
  leave the forward as float32, and sampling is float32 (``Engine.sample``).
- ``quantize='int8'``: every Conv1D converted to ``nn.Linear`` first (``quantize_dynamic`` only knows
  ``nn.Linear``: on HF's GPT-2 it would quantize nothing but the output head), then dynamic int8
  (``torch.ao.quantization.quantize_dynamic``, qint8 weights per tensor, activations quantized per call),
  the output head included. Embeddings, layer norms, attention and the cache stay float32.
"""
from __future__ import annotations

import warnings

from llm_psi.config import DTYPES, QUANTIZE


def check_precision(dtype: str, quantize: str) -> None:
    """ValueError unless ``dtype`` and ``quantize`` are known and combine."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if quantize != "none" and dtype != "float32":
        raise ValueError(f"quantize {quantize} needs dtype float32 (dynamic int8 takes float32 activations)")


def convert_conv1d(model) -> int:
    """Replace every Hugging Face ``Conv1D`` of ``model`` by the equal ``nn.Linear`` (weight transposed);
    returns how many were replaced."""
    import torch
    from transformers.pytorch_utils import Conv1D
    found = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Conv1D)]
    for name, conv in found:
        n_in, n_out = conv.weight.shape
        lin = torch.nn.Linear(n_in, n_out, dtype=conv.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.t())
            lin.bias.copy_(conv.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, lin)
    return len(found)


def quantized_linears(model) -> int:
    """How many of ``model``'s modules are dynamically quantized linear layers."""
    import torch
    return sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def set_precision(model, dtype: str = "float32", quantize: str = "none") -> None:
    """Put ``model`` (in place) in ``dtype`` and ``quantize`` (see the module doc)."""
    import torch
    check_precision(dtype, quantize)
    if dtype == "bfloat16":
        convert_conv1d(model)
        model.to(torch.bfloat16)
    if quantize == "int8":
        convert_conv1d(model)
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        if quantized_linears(model) == 0:
            raise RuntimeError("quantize_dynamic quantized no layer")


def onednn_linear(dtype: str = "float32"):
    """oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, a private op of x86 torch builds) for tensors of
    ``dtype``, or None where this torch build or CPU lacks it (bfloat16 needs AVX-512 BF16 or AMX: on an AVX2-only
    CPU oneDNN has no bfloat16 inner product). MKL's sgemm, which serves ``addmm``/``F.linear``, is slow for 2-8 rows
    here: measured on this host's AMD EPYC with 1 thread, all GPT-2 block weights take 52 ms at 8 rows (addmm)
    against 39 ms (oneDNN), and the 50257-row output projection 30 ms against 18 ms; at 1 row addmm is the
    faster for the blocks."""
    import torch
    try:
        op, t = torch.ops.mkldnn._linear_pointwise, getattr(torch, dtype)
        op(torch.ones(2, 4, dtype=t), torch.ones(3, 4, dtype=t), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None
    return lambda x, weight, bias: op(x, weight, bias, "none", [], "")


class Forward:
    """The computation of a GPT-2 model over rows of hidden states [N, embed], in the model's precision.

    ``onednn``: use oneDNN's float32 linear for more than one row (None: where available)."""

    def __init__(self, model, onednn: bool | None = None):
        import torch
        from transformers.pytorch_utils import Conv1D
        cfg = model.config
        if cfg.model_type != "gpt2" or cfg.add_cross_attention:
            raise ValueError(f"batched decoding supports GPT-2 decoder models only, not {cfg.model_type!r}")
        self._torch, self.model, self._conv1d = torch, model, Conv1D
        self._dnn = onednn_linear() if onednn in (None, True) else None
        if onednn and self._dnn is None:
            raise RuntimeError("oneDNN linear is not available in this torch build")
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.embed_dim = cfg.n_embd
        self.dtype = model.transformer.wte.weight.dtype   # of activations and the KV cache
        # the model's own nn.Linear layers (bfloat16) on oneDNN only where it has a kernel for their dtype
        self._dnn_model = self._dnn if self._dnn is None or self.dtype == torch.float32 else \
            onednn_linear(str(self.dtype).removeprefix("torch."))
        # GPT-2's gelu_new is five elementwise ops in Python; outside exact float32, the fused kernel of
        # the same formula (differences at the last bit, far below bfloat16's or int8's own)
        exact = self.dtype == torch.float32 and quantized_linears(model) == 0
        act = model.transformer.h[0].mlp.act
        self.act = act if exact or type(act).__name__ != "NewGELUActivation" else \
            (lambda x: torch.nn.functional.gelu(x, approximate="tanh"))

    def linear(self, x, layer):
        """One linear layer on rows ``x``: a float32 Conv1D on the faster kernel for x's rows, a bfloat16
        ``nn.Linear`` on oneDNN's (where available), a dynamic int8 one through its own call."""
        if isinstance(layer, self._conv1d):
            if self._dnn is None or x.shape[0] == 1:
                return self._torch.addmm(layer.bias, x, layer.weight)
            return self._dnn(x, layer.weight.t(), layer.bias)
        if self._dnn_model is not None and type(layer) is self._torch.nn.Linear:
            return self._dnn_model(x, layer.weight, layer.bias)
        return layer(x)

    def embed(self, ids, positions):
        t = self.model.transformer
        return t.wte(ids) + t.wpe(positions)

    def blocks(self, h, attend):
        """The transformer blocks over rows ``h`` [N, embed]; ``attend(i, block, q, k, v)`` -> [N, embed]."""
        t, lin = self.model.transformer, self.linear
        for i, block in enumerate(t.h):
            q, k, v = lin(block.ln_1(h), block.attn.c_attn).split(self.embed_dim, dim=1)
            h = h + lin(attend(i, block, q, k, v), block.attn.c_proj)
            h = h + lin(self.act(lin(block.ln_2(h), block.mlp.c_fc)), block.mlp.c_proj)
        return h

    def logits(self, h):
        """Float32 next-token logits of rows ``h`` [N, embed]."""
        h = self.model.transformer.ln_f(h)
        head = self.model.get_output_embeddings()
        fp32_row = h.shape[0] == 1 and h.dtype == self._torch.float32   # the module's call: MKL, hooks fire
        if self._dnn_model is None or fp32_row or type(head) is not self._torch.nn.Linear:
            return head(h).float()
        return self._dnn_model(h, head.weight, head.bias).float()


class RunningRows:
    """``prefill``, ``add`` and ``remove`` of a batch of running sequences over the subclass's
    ``prefill_many``, ``_rows()`` (one tuple per row, its length last), ``_rebuild(rows, width)`` and
    ``_clear()``; ``width`` is the columns in use, ``lengths`` each row's tokens."""

    width = 0
    lengths: list = []

    def __len__(self) -> int:
        return len(self.lengths)

    def prefill(self, input_ids):
        """One prompt (``input_ids`` [1, L]) alone, causally: (its last logits [1, vocab], its row for ``add``)."""
        logits, rows = self.prefill_many(input_ids)
        return logits, rows[0]

    def add(self, *rows) -> None:
        """Append prefilled sequences (``prefill``'s rows) as the last rows, in one rebuild."""
        if rows:
            self._rebuild(self._rows() + list(rows), max([self.width] + [row[-1] for row in rows]))

    def remove(self, rows) -> None:
        """Drop the given row indices; trim the columns that only held padding."""
        drop = set(rows)
        if not drop:
            return
        keep = [row for r, row in enumerate(self._rows()) if r not in drop]
        if keep:
            self._rebuild(keep, max(row[-1] for row in keep))
        else:
            self._clear()


class DecodeBatch(RunningRows):
    """The running sequences of a GPT-2 model: their KV cache, a prefill, and one batched decode step.

    The forward pass is the model's own computation written out (``net.Forward``: same modules and weights,
    in the model's precision), so that each row can sit at its own position, pads are masked out, and the
    linear layers run on the faster kernel for their row count. ``model`` is a GPT-2 model or a ``Forward``
    over one; ``onednn`` (for a model) as in ``Forward``.

    Per layer, keys and values live in [B, heads, capacity, head_dim] buffers, left-padded: row i holds its
    ``lengths[i]`` tokens in the last ``lengths[i]`` of the ``width`` used columns. A decode step writes its
    new column in place; ``DynamicCache`` would concatenate, copying the whole cache at every step (~16 ms per
    step at 8 rows and length ~40 for the 124M architecture). The buffers are rebuilt, re-padded, only when
    sequences join or leave, with ``reserve`` free columns (doubled when they run out)."""

    def __init__(self, model, reserve: int = 64, onednn: bool | None = None):
        import torch
        self.fwd = model if isinstance(model, Forward) else Forward(model, onednn=onednn)
        self._torch, self.reserve = torch, reserve
        self.n_head, self.head_dim = self.fwd.n_head, self.fwd.head_dim
        self.keys: list = []      # per layer [B, heads, capacity, head_dim]
        self.values: list = []
        self.width = 0
        self.lengths: list[int] = []

    def prefill_many(self, input_ids):
        """Prompts of one length (``input_ids`` [B, L]) side by side, each causally on its own: (their last
        logits [B, vocab], their rows for ``add``)."""
        torch, fwd = self._torch, self.fwd
        b, n = input_ids.shape
        heads, dim = self.n_head, self.head_dim
        keys, values = [], []

        def attend(i, block, q, k, v):
            q, k, v = (x.view(b, n, heads, dim).transpose(1, 2) for x in (q, k, v))   # [B, heads, L, dim]
            keys.append(k)
            values.append(v)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                   scale=block.attn.scaling)
            return att.transpose(1, 2).reshape(b * n, fwd.embed_dim)

        h = fwd.blocks(fwd.embed(input_ids.reshape(-1), torch.arange(n).repeat(b)), attend)
        logits = fwd.logits(h.view(b, n, -1)[:, -1].contiguous())
        return logits, [([k[r] for k in keys], [v[r] for v in values], n) for r in range(b)]

    def _clear(self) -> None:
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
                buf = rows[0][part][i].new_empty(len(rows), self.n_head, width + self.reserve, self.head_dim)
                for r, row in enumerate(rows):
                    t, length = row[part][i], row[2]
                    buf[r, :, :width - length] = 0
                    buf[r, :, width - length:width] = t[:, t.shape[1] - length:]
                store.append(buf)
        self.width = width
        self.lengths = [row[2] for row in rows]

    def step(self, input_ids):
        """Feed one token per row (``input_ids`` [B, 1]); return the next-token logits [B, vocab], float32."""
        torch, fwd = self._torch, self.fwd
        b, width = len(self.lengths), self.width + 1
        if width > self.keys[0].shape[2]:
            grow = lambda buf: torch.cat([buf, torch.zeros_like(buf)], dim=2)  # noqa: E731
            self.keys, self.values = [grow(k) for k in self.keys], [grow(v) for v in self.values]
        pos = torch.tensor(self.lengths)                       # each row's own next position, pads ignored
        bias = None                                            # no pads: every row attends to every column
        if min(self.lengths) != self.width:
            pads = torch.arange(width).unsqueeze(0) < (width - 1 - pos).unsqueeze(1)
            bias = torch.zeros(b, 1, width).masked_fill_(pads.unsqueeze(1), float("-inf"))
        heads, dim = self.n_head, self.head_dim

        def attend(i, block, q, k, v):
            """q over the row's cached keys and values, as batched matrix products over [B * heads] whose
            operands are views of the cache (scaled_dot_product_attention copies the strided cache: ~5x
            slower at 32 rows)."""
            keys, values = self.keys[i], self.values[i]
            keys[:, :, width - 1] = k.view(b, heads, dim)
            values[:, :, width - 1] = v.view(b, heads, dim)
            keys, values = (x[:, :, :width].reshape(b * heads, width, dim) for x in (keys, values))  # views
            scores = torch.bmm(q.reshape(b * heads, 1, dim), keys.transpose(1, 2)).float() * block.attn.scaling
            if bias is not None:
                scores = scores.view(b, heads, width) + bias
            probs = scores.softmax(dim=-1).to(values.dtype).view(b * heads, 1, width)
            return torch.bmm(probs, values).view(b, fwd.embed_dim)

        logits = fwd.logits(fwd.blocks(fwd.embed(input_ids[:, 0], pos), attend))
        self.width = width
        self.lengths = [n + 1 for n in self.lengths]
        return logits
