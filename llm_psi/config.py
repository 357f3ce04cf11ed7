"""The configuration labels of the experiment grid and the settings each one presets.

One small module that the service, the load generator and the analysis all import. A label's preset names
service options (``service.ServiceConfig`` fields); ``limited`` says whether its cells must run under the CPU
quota of the service cgroup (the sweeps put them there, and the generator refuses them elsewhere).
"""
from __future__ import annotations

PAPER = ("baseline", "cgroups", "psi")  # the paper's three configurations, in its order

CONFIGS = {
    "baseline": dict(limited=False),
    "cgroups": dict(limited=True),
    "psi": dict(limited=True, admission="gate"),
    "cgroups_threads": dict(limited=True, torch_threads="auto"),
    "psi_threads": dict(limited=True, admission="gate", torch_threads="auto"),
    "limit1": dict(limited=True, admission="limit", concurrency_limit=1, torch_threads="auto"),
    "adaptive": dict(limited=True, admission="adaptive", torch_threads="auto"),
    "batch": dict(limited=True, batching="dynamic", torch_threads="auto"),
    # The batch limit is the adaptive limit: a one-thread service at a 50% quota stalls ~50% of the time on
    # throttling alone, so "low" pressure sits above that floor; batching raises service time by design,
    # so the latency tolerance is wider than for one-at-a-time service.
    "batch_psi": dict(limited=True, batching="dynamic", admission="adaptive", torch_threads="auto",
                      adaptive_low_pct=60.0, adaptive_tolerance=2.0),
    # The paper's gate reading the service cgroup's own pressure instead of the whole system's.
    "psi_cgroup": dict(limited=True, admission="gate", psi_source="cgroup"),
    # The paper's gate with no quota: what pressure-aware admission alone does next to a co-tenant.
    "psi_unlimited": dict(limited=False, admission="gate"),
}

# Varied prompts of 27-41 characters, as in the paper.
PROMPTS = [
    "Explain the theory of relativity.",
    "Write a short poem about the sea.",
    "What causes the seasons on Earth?",
    "Describe a busy market at dawn.",
    "Summarize the history of Rome.",
    "How do vaccines train the immune system?",
    "Give three tips for learning to cook.",
    "Why is the sky blue during the day?",
    "Tell a story about a lost robot.",
    "What is the future of renewable energy?",
]


def is_limited(label: str) -> bool:
    """True if cells of ``label`` run under the quota; unknown labels count as unlimited."""
    return bool(CONFIGS.get(label, {}).get("limited", False))


def preset(label: str) -> dict:
    """The service options ``label`` sets (without ``limited``); KeyError for an unknown label."""
    return {k: v for k, v in CONFIGS[label].items() if k != "limited"}
