"""The roofline of GPT-2 decoding on one thread of this CPU, measured, in tokens per CPU-second.

Two ceilings, each measured per CPU-second of this process (``time.process_time``), best of a few tries:

- memory bandwidth ``BW`` (bytes/s): a stream copy ``dst.copy_(src)`` of a large float32 array, counting the
  bytes read and written (2 x its size);
- matmul peak ``P[d]`` (FLOP/s) for d in float32, bfloat16 and int8: ``x @ w`` with x [64, 768] and w
  [768, 3072], 2*64*768*3072 FLOP a call, on the fastest kernel that this torch has for weights of that
  precision: int8 through ``torch._int_mm`` and torch's dynamic quantized Linear (fbgemm), bfloat16 through
  a bfloat16 ``torch.matmul`` and the same weights computed in float32. A ceiling is the best available: on a
  CPU without int8 or bfloat16 instructions for ``torch._int_mm`` or a bfloat16 matmul (AVX2 only), those
  run a reference loop at about 1 GFLOP per CPU-second, below what any engine reaches, and a peak taken from
  them alone would put every engine far "above" its roofline (an AVX2 run of 2026-12-07 did).

A decode step of a batch of b sequences reads every weight once, ``W`` bytes (matmul parameters x bytes per
weight: 4 float32, 2 bfloat16, 1 int8), and costs ``F`` FLOP per token (2 x matmul parameters, plus the
attention's 4 x layers x width x context). The roofline is then

    roofline_tokens_per_cpu_s(b) = min(b * BW / W, P[d] / F)

The first term binds at batch 1 (weight bytes per step over bandwidth), the second at 16 and above (FLOPs over
peak). ``roofline_fraction`` = measured tokens per CPU-second / roofline.
"""
from __future__ import annotations

import time

MATMUL = (64, 768, 3072)   # m, k, n of the peak probe
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def _rate(fn, work: float, seconds: float) -> float:
    """work / CPU-second of fn(), best of 3 tries of about ``seconds`` each."""
    fn()
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.process_time()
        while True:
            fn()
            n += 1
            spent = time.process_time() - t0
            if spent >= seconds:
                break
        best = max(best, n * work / spent)
    return best


def bandwidth(n_bytes: int, seconds: float = 0.5) -> float:
    """Stream-copy bandwidth, bytes read + written per CPU-second."""
    import torch
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    return _rate(lambda: dst.copy_(src), 2 * src.nbytes, seconds)


def _int8_kernels(m: int, k: int, n: int) -> list:
    """[(callable int8 matmul [m,k]x[k,n], what it is)] of the kernels this torch has."""
    import warnings
    import torch
    found = []
    a = torch.randint(-64, 64, (m, k), dtype=torch.int8)
    b = torch.randint(-64, 64, (k, n), dtype=torch.int8)
    try:
        torch._int_mm(a, b)
        found.append(((lambda: torch._int_mm(a, b)), "torch._int_mm"))
    except (AttributeError, RuntimeError):
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lin = torch.ao.nn.quantized.dynamic.Linear(k, n)
        x = torch.randn(m, k)
        lin(x)
        found.append(((lambda: lin(x)), "torch.ao dynamic quantized Linear"))
    except (AttributeError, RuntimeError):
        pass
    return found


def _kernels(dtype: str, m: int, k: int, n: int) -> list:
    """[(callable matmul [m,k]x[k,n] for weights stored in ``dtype``, what it is)]."""
    import torch
    if dtype == "int8":
        return _int8_kernels(m, k, n)
    x, w = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
    found = [((lambda: torch.matmul(x, w)), "torch.matmul")]
    if dtype == "bfloat16":
        x32, w32 = x.float(), w.float()
        found.append(((lambda: torch.matmul(x32, w32)), "torch.matmul in float32"))
    return found


def matmul_peak(dtype: str, seconds: float = 0.5) -> tuple[float | None, str]:
    """(FLOP per CPU-second of the probe matmul in ``dtype`` on its fastest kernel, that kernel); (None,
    "none") where this torch has none."""
    m, k, n = MATMUL
    rates = [(_rate(fn, 2 * m * k * n, seconds), how) for fn, how in _kernels(dtype, m, k, n)]
    return max(rates) if rates else (None, "none")


def measure(tiny: bool = False) -> dict:
    """Bandwidth and the three peaks, on the calling thread (set torch to one thread first)."""
    seconds = 0.1 if tiny else 0.5
    out = {"stream_bytes": (16 if tiny else 512) * 2 ** 20, "matmul_shape": list(MATMUL)}
    out["bandwidth_bytes_per_cpu_s"] = bandwidth(out["stream_bytes"], seconds)
    for dtype in BYTES:
        out[f"peak_{dtype}_flop_per_cpu_s"], out[f"peak_{dtype}_kernel"] = matmul_peak(dtype, seconds)
    return out


def model_costs(config: dict, context: float) -> dict:
    """Matmul parameters, FLOP per token and weights (parameter count) of a GPT-2 config (n_layer, n_embd,
    vocab_size), at an average attention ``context`` in tokens."""
    layers, d, vocab = config["n_layer"], config["n_embd"], config["vocab_size"]
    params = layers * 12 * d * d + vocab * d   # qkv 3d², proj d², mlp 8d² per layer; the tied output head
    return {"matmul_params": params, "flop_per_token": 2 * params + 4 * layers * d * context}


def weight_bits(dtype: str, quantize: str) -> str:
    return "int8" if quantize == "int8" else dtype


def roofline_tokens(batch: int, dtype: str, quantize: str, roof: dict, costs: dict) -> float | None:
    """min(b * BW / W, P / F), tokens per CPU-second; None where the peak of that dtype is unknown."""
    kind = weight_bits(dtype, quantize)
    peak = roof.get(f"peak_{kind}_flop_per_cpu_s")
    if not peak:
        return None
    memory = batch * roof["bandwidth_bytes_per_cpu_s"] / (costs["matmul_params"] * BYTES[kind])
    return min(memory, peak / costs["flop_per_token"])


def bound(batch: int, dtype: str, quantize: str, roof: dict, costs: dict) -> str | None:
    """Which ceiling binds: 'memory' or 'compute' (None where the peak of that dtype is unknown)."""
    kind = weight_bits(dtype, quantize)
    peak = roof.get(f"peak_{kind}_flop_per_cpu_s")
    if not peak:
        return None
    memory = batch * roof["bandwidth_bytes_per_cpu_s"] / (costs["matmul_params"] * BYTES[kind])
    return "memory" if memory <= peak / costs["flop_per_token"] else "compute"
