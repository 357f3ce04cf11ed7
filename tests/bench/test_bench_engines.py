"""bench/engines.py: a quick tiny run writes the summary with its exact columns, the raw runs, the table with the
roofline formula, the accuracy guard and the figure; the quota rows as root; refusals; the roofline formula;
the capacity study over HTTP (its search, its service options, a quick run)."""
import importlib.util
from types import SimpleNamespace

import pandas as pd
import pytest

from bench import engines_capacity, engines_pairs, engines_report, roofline
from conftest import real_cgroups_reason, run_script

SUMMARY = ["engine", "dtype", "quantize", "batch", "constrained", "tokens_per_cpu_s", "roofline_tokens_per_cpu_s",
           "roofline_fraction"]
PEERS = [m for m in ("onnxruntime", "ctranslate2") if importlib.util.find_spec(m) is not None]
OURS_ORT = ["ours-ort"] if importlib.util.find_spec("onnxruntime") is not None else []
CAPACITY = ["engine", "slo", "capacity_rps", "ci_lo", "ci_hi", "n_trials"]


@pytest.fixture
def env(tmp_path_factory):
    return {"LLM_PSI_PEER_CACHE": str(tmp_path_factory.getbasetemp() / "peer-cache")}


@pytest.mark.slow
def test_quick_tiny_run_without_quota(tmp_path, env):
    engines = " ".join(["ours", *OURS_ORT, "hf-generate", *PEERS])
    proc = run_script("bench.engines", "--quick", "--tiny", "--no-quota", "--no-capacity", "--engines", engines,
                      "--output-dir", tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rows under the quota skipped: --no-quota given" in proc.stderr
    df = pd.read_csv(tmp_path / "summary.csv")
    assert list(df.columns) == SUMMARY
    assert set(df["engine"]) == set(engines.split()) and set(df["batch"]) == {1, 8} and not df["constrained"].any()
    ours = df[(df.engine == "ours") & (df.dtype == "float32") & (df.quantize == "none")]
    assert list(ours["batch"]) == [1, 8]
    assert (df["tokens_per_cpu_s"] > 0).all()
    assert ((df["roofline_fraction"] - df["tokens_per_cpu_s"] / df["roofline_tokens_per_cpu_s"]).abs() < 1e-3).all()
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert (runs["tokens"] == 5 * runs["batch"]).all() and (runs["cpu_s"] > 0).all() and (runs["wall_s"] > 0).all()
    table = (tmp_path / "table.md").read_text()
    assert "min(b * BW / W, P[d] / F)" in table and "## Accuracy guard" in table
    for dtype, quantize in (("bfloat16", "none"), ("float32", "int8")):   # measured, or skipped with the reason
        measured = ((df.engine == "ours") & (df.dtype == dtype) & (df.quantize == quantize)).any()
        assert measured or f"ours {dtype}/{quantize}: the engine rejects" in table
    guard = pd.read_csv(tmp_path / "accuracy.csv")
    assert list(guard[["engine", "dtype", "quantize"]].itertuples(index=False, name=None)) == \
        [("ours", *g) for g in engines_report.GUARDED] + [("ours-ort", d, q) for d, q, _ in engines_report.ORT_GUARDED
                                                         if OURS_ORT]
    assert not (tmp_path / "capacity.csv").exists()
    assert (tmp_path / "engines.png").stat().st_size > 0 and (tmp_path / "roofline.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(real_cgroups_reason() is not None, reason=str(real_cgroups_reason()))
def test_quota_rows_as_root(tmp_path, env):
    proc = run_script("bench.engines", "--quick", "--tiny", "--engines", "ours", "--batches", "1", "--no-capacity",
                      "--output-dir", tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "summary.csv")
    base = df[(df.dtype == "float32") & (df.quantize == "none")]
    assert sorted(base["constrained"]) == [False, True]


@pytest.mark.parametrize("args", [["--batches", "0"], ["--batches", "1 x"], ["--engines", "vllm"],
                                  ["--tokens", "0"], ["--repeats", "nan"], ["--slo", "ttft:0"],
                                  ["--capacity-config", "cgroups"], ["--capacity-engines", "vllm"],
                                  ["--no-capacity", "--capacity-only"], ["--capacity-start-rps", "9",
                                                                         "--capacity-max-rps", "4"],
                                  ["--pairs", "1"], ["--pairs", "2", "--pair", "ours:int8"],
                                  ["--pairs", "2", "--pair", "vllm:int8,ours:none"],
                                  ["--pairs", "2", "--pair", "ours:int8,ours:int8"]])
def test_bad_input_exits_2_with_one_line(tmp_path, args):
    proc = run_script("bench.engines", *args, "--output-dir", tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "summary.csv").exists()


@pytest.mark.slow
def test_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "table.md").write_text("keep me")
    proc = run_script("bench.engines", "--quick", "--tiny", "--output-dir", tmp_path)
    assert proc.returncode == 2 and "exists; use --force" in proc.stderr
    assert (tmp_path / "table.md").read_text() == "keep me"


def test_roofline_is_the_lower_of_bandwidth_and_peak():
    roof = {"bandwidth_bytes_per_cpu_s": 20e9, "peak_float32_flop_per_cpu_s": 60e9,
            "peak_bfloat16_flop_per_cpu_s": 240e9, "peak_int8_flop_per_cpu_s": None}
    costs = {"matmul_params": 100e6, "flop_per_token": 200e6}
    assert roofline.roofline_tokens(1, "float32", "none", roof, costs) == pytest.approx(50)     # 20 GB/s / 400 MB
    assert roofline.roofline_tokens(16, "float32", "none", roof, costs) == pytest.approx(300)   # 60 GFLOP/s / 200 MFLOP
    assert roofline.roofline_tokens(1, "bfloat16", "none", roof, costs) == pytest.approx(100)
    assert roofline.roofline_tokens(8, "float32", "int8", roof, costs) is None
    assert roofline.bound(8, "float32", "int8", roof, costs) is None
    assert roofline.bound(1, "float32", "none", roof, costs) == "memory"
    assert roofline.bound(32, "float32", "none", roof, costs) == "compute"
    costs = roofline.model_costs({"n_layer": 12, "n_embd": 768, "vocab_size": 50257}, context=0)
    assert costs["matmul_params"] == 12 * 12 * 768 ** 2 + 50257 * 768
    assert costs["flop_per_token"] == 2 * costs["matmul_params"]


def test_a_peak_is_the_fastest_kernel_for_the_precision(monkeypatch):
    """A ceiling is the best available: an AVX2 CPU runs torch._int_mm and a bfloat16 matmul in a reference
    loop (~1 GFLOP per CPU-second), below fbgemm's int8 Linear and a float32 matmul of the same weights."""
    names = {how for _, how in roofline._kernels("int8", 4, 8, 16)}
    assert "torch.ao dynamic quantized Linear" in names
    assert {how for _, how in roofline._kernels("bfloat16", 4, 8, 16)} == {"torch.matmul",
                                                                            "torch.matmul in float32"}
    slow, fast = (lambda: None), (lambda: None)
    monkeypatch.setattr(roofline, "_kernels", lambda dtype, m, k, n: [(slow, "reference"), (fast, "fbgemm")])
    monkeypatch.setattr(roofline, "_rate", lambda fn, work, seconds: 1e9 if fn is slow else 300e9)
    assert roofline.matmul_peak("int8") == (300e9, "fbgemm")
    monkeypatch.setattr(roofline, "_kernels", lambda dtype, m, k, n: [])
    assert roofline.matmul_peak("int8") == (None, "none")


def search_args(**kw):
    return SimpleNamespace(**{"capacity_start_rps": 1.0, "capacity_max_rps": 32.0, "capacity_bisections": 3, **kw})


@pytest.mark.parametrize("true_capacity, expected, probes", [(5.0, 4.5, [1, 2, 4, 8, 6, 5, 4.5]),
                                                             (100.0, 32.0, [1, 2, 4, 8, 16, 32]),
                                                             (0.5, 0.46875, [1, 0.5, 0.25, 0.375, 0.4375, 0.46875]),
                                                             (0.01, 0.0, [1, 0.5, 0.25, 0.125, 0.0625])])
def test_capacity_search_doubles_then_bisects(true_capacity, expected, probes):
    """A probe passes below the true capacity; the search reports its highest passing rate."""
    tried = []

    def probe(rate):
        tried.append(rate)
        return {"passed": rate < true_capacity}
    cap, rows = engines_capacity.search(search_args(), probe)
    assert cap == expected and tried == probes and len(rows) == len(probes)


def test_capacity_ratio_pairs_trial_k_of_each_engine():
    """The paired ratio is the mean of trial-by-trial ratios (not the ratio of means), a zero trial left out."""
    mean, lo, hi, n = engines_capacity.paired_ratio([2.0, 6.0, 3.0], [1.0, 4.0, 0.0])
    assert n == 2 and mean == pytest.approx(1.75) and lo < 1.75 < hi
    args = SimpleNamespace(capacity_config="batch", capacity_requests=40, capacity_tokens=20, slo="ttft:1,e2e:2",
                           capacity_start_rps=1.0, capacity_bisections=3, capacity_max_rps=64.0)
    caps = [dict(engine=e, slo="s", capacity_rps=sum(v) / 3, ci_lo=0.0, ci_hi=9.0, n_trials=3, capped=0,
                 constrained=True, trials=v) for e, v in (("ours", [2.0, 4.0, 3.0]), ("ours-ort", [3.0, 6.0, 4.5]))]
    text = "\n".join(engines_capacity.table(args, caps))
    assert "trial by trial (trial k of each, run in turn): mean ratio 1.50x, 95% t-interval 1.50–1.50 over 3 pairs" \
        in text


def test_capacity_service_options_are_the_preset_with_the_engine():
    """Under the quota, the label; without it (a limited label refuses to run there), the preset's options."""
    from llm_psi.service.server import parse_serve
    for engine, kind in engines_capacity.ENGINE_KINDS.items():
        args = SimpleNamespace(capacity_config="batch", tiny=True)
        assert engines_capacity.service_args(args, engine, True) == ["--config", "batch", "--engine", kind, "--tiny"]
        cfg, _ = parse_serve(engines_capacity.service_args(args, engine, False))
        assert (cfg.config, cfg.engine, cfg.batching, cfg.dtype, cfg.quantize, cfg.torch_threads) == \
            ("baseline", kind, "dynamic", "float32", "int8", "auto")


@pytest.mark.slow
@pytest.mark.skipif(not OURS_ORT, reason="onnxruntime is not installed")
def test_quick_capacity_only_run(tmp_path, env):
    """Both engines served over HTTP, probed at Poisson rates; capacity.csv has its exact columns."""
    proc = run_script("bench.engines", "--quick", "--tiny", "--no-quota", "--capacity-only", "--output-dir", tmp_path,
                      timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cap = pd.read_csv(tmp_path / "capacity.csv")
    assert list(cap.columns) == CAPACITY and list(cap["engine"]) == ["ours", "ours-ort"]
    assert (cap["n_trials"] == 2).all() and (cap["slo"] == "ttft:1000,e2e:6000").all()
    probes = pd.read_csv(tmp_path / "capacity_probes.csv")
    assert set(probes["engine"]) == {"ours", "ours-ort"} and (probes["n"] == 6).all() and not probes.constrained.any()
    for (engine, trial), g in probes.groupby(["engine", "trial"]):    # each trial's capacity: its best pass
        best = g[g.passed]["rate_rps"].max() if g.passed.any() else 0.0
        assert best <= cap.set_index("engine").loc[engine, "ci_hi"] + 1e-9 or cap.ci_hi.isna().any()
    assert "## Capacity over HTTP" in (tmp_path / "capacity.md").read_text()
    assert not (tmp_path / "summary.csv").exists()


@pytest.mark.slow
def test_pairs_time_two_settings_in_turn_and_state_the_ratio(tmp_path, env):
    proc = run_script("bench.engines", "--tiny", "--no-quota", "--pairs", "3", "--pair", "ours:none,ours:int8",
                      "--batches", "1 4", "--tokens", "3", "--output-dir", tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = pd.read_csv(tmp_path / "pairs.csv")
    assert list(runs.columns) == engines_pairs.RUNS and len(runs) == 2 * 3 * 2
    assert (runs["tokens"] == 3 * runs["batch"]).all() and (runs["cpu_s"] > 0).all()
    first = runs[runs.order == 0].sort_values(["batch", "pair"])
    assert list(first["quantize"]) == ["none", "int8", "none"] * 2          # A first, then B, then A ...
    summary = pd.read_csv(tmp_path / "pairs_summary.csv")
    assert list(summary.columns) == engines_pairs.SUMMARY and list(summary["batch"]) == [1, 4]
    assert (summary["n_pairs"] == 3).all() and (summary["ci_lo"] <= summary["ratio_mean"]).all()
    assert "| 1 | no |" in (tmp_path / "pairs.md").read_text()
    assert not (tmp_path / "summary.csv").exists()


def test_pair_ratios_and_their_interval():
    rows = [dict(engine=e, dtype="float32", quantize="int8", batch=8, constrained=True, pair=k, order=0,
                 tokens=80, cpu_s=1.0, tokens_per_cpu_s=v)
            for k, (a, b) in enumerate([(110, 100), (90, 100), (120, 100), (80, 100)])
            for e, v in (("ours-ort", a), ("onnxruntime", b))]
    pair = engines_pairs.parse(engines_pairs.DEFAULT, ["ours-ort", "onnxruntime"])
    [s] = engines_pairs.summarize(rows, pair)
    assert s["ratio_mean"] == pytest.approx(1.0) and s["n_pairs"] == 4 and s["ci_lo"] < 1 < s["ci_hi"]
    assert (s["a"], s["b"], s["batch"], s["constrained"]) == ("ours-ort float32/int8", "onnxruntime float32/int8",
                                                              8, True)
