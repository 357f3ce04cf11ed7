"""The request generator: schema, exact counts, real concurrency, metadata, bad input, interruption."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, read_cell, run_script
from llm_psi.analysis import metrics
from llm_psi.load import generator as rg


def intervals_overlap(df):
    """Number of request pairs whose generation intervals [t_start, t_end] overlap."""
    iv = sorted(zip(df.t_start_s, df.t_end_s))
    return sum(1 for i in range(len(iv)) for j in range(i + 1, len(iv)) if iv[j][0] < iv[i][1])


@pytest.fixture(scope="module")
def cell_c4(tmp_path_factory):
    out = tmp_path_factory.mktemp("c4") / "baseline_c4.csv"
    proc = run_script("request_generator.py", "--tiny", "--quiet", "--config", "baseline", "--concurrency", 4,
                      "--num-requests", 8, "--max-new-tokens", 6, "--spacing-ms", 0, "--trials", 2,
                      "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df, meta = read_cell(out)
    return df, meta, proc


@pytest.mark.slow
def test_schema_and_counts(cell_c4):
    df, meta, _ = cell_c4
    assert list(df.columns) == rg.COLUMNS
    assert len(df) == 16
    assert sorted(df.trial.unique()) == [1, 2]
    for _, g in df.groupby("trial"):
        assert sorted(g.request_id) == list(range(8))  # the warm-up request is not among them
    assert (df.status == "ok").all()
    assert (df.output_tokens == 6).all()
    assert (df.prompt_chars.between(27, 41)).all()
    assert (df.gate_decision == "none").all()


def test_derived_columns_match_timestamps(cell_c4):
    df, _, _ = cell_c4
    again = metrics.derive(df)
    for col in ["queue_ms", "defer_ms", "sched_ms", "service_ms", "ttft_ms", "tpot_ms", "e2e_ms"]:
        np.testing.assert_allclose(df[col], again[col], rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(df.e2e_ms, (df.t_end_s - df.t_submit_s) * 1000, atol=1e-6)
    assert (df.e2e_ms >= df.service_ms).all()
    parts = df.queue_ms + df.defer_ms + df.sched_ms + df.service_ms
    np.testing.assert_allclose(parts, df.e2e_ms, atol=1e-6)
    assert (df.t_submit_s <= df.t_dequeue_s).all() and (df.t_start_s <= df.t_first_token_s).all()
    assert (df.t_first_token_s <= df.t_end_s).all()


def test_papers_labels_serve_one_request_at_a_time(cell_c4):
    """The paper's server generates in one thread, one prompt after another (engine.one_thread): at
    concurrency 4 requests are in flight together, their generations never overlap."""
    df, meta, _ = cell_c4
    for _, g in df.groupby("trial"):
        assert intervals_overlap(g) == 0
    assert meta["peak_in_flight"] >= 2
    model = meta["environment"]["model"]
    assert model["engine"] == "generate" and model["engine_thread"] == "one" and model["omp_wait_policy"] is None


def test_requests_overlap_at_concurrency_4_on_their_callers_threads(tmp_path):
    out = tmp_path / "c4.csv"
    proc = run_script("request_generator.py", "--tiny", "--quiet", "--config", "baseline", "--engine-thread", "caller",
                      "--concurrency", 4, "--num-requests", 4, "--max-new-tokens", 6, "--spacing-ms", 0,
                      "--output", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df, meta = read_cell(out)
    assert intervals_overlap(df) >= 1 and meta["peak_in_flight"] >= 2


def test_metadata(cell_c4):
    df, meta, proc = cell_c4
    assert meta["config"]["concurrency"] == 4 and meta["config"]["tiny"] is True
    env = meta["environment"]
    for key in ["git_commit", "git_dirty", "python", "versions", "torch_threads", "torch_interop_threads",
                "thread_env", "cpu_model", "cpu_simd", "cpu_count", "mem_total_bytes", "kernel", "proc_self_cgroup",
                "model"]:
        assert key in env, key
    assert set(env["versions"]) == {"torch", "transformers", "numpy"}
    assert set(env["cpu_simd"]) <= {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}
    assert env["model"]["init_seed"] == 0 and env["model"]["pretrained"] is False
    assert meta["counts"] == {"ok": 16, "rejected": 0, "failed": 0, "cut": 0}
    assert [t["deadline_hit"] for t in meta["trials"]] == [False, False]
    assert [t["trial"] for t in meta["trials"]] == [1, 2]
    assert meta["warmup_s"] > 0 and meta["start_wall"] <= meta["end_wall"]
    assert meta["interrupted"] is False
    assert "p95 e2e" in proc.stderr  # the per-trial summary line


@pytest.mark.slow
def test_no_overlap_at_concurrency_1(generate):
    _, out = generate("--concurrency", 1, "--num-requests", 4, "--max-new-tokens", 6, "--spacing-ms", 0)
    df, meta = read_cell(out)
    assert len(df) == 4 and intervals_overlap(df) == 0
    assert meta["peak_in_flight"] == 1


@pytest.mark.model
@pytest.mark.slow
def test_124m_architecture_overlaps_at_default_spacing(generate):
    """The issue's acceptance command: 8 ok rows, at least two of them overlapping in time, with requests on
    their callers' threads (the paper's labels serve one at a time, as its server: --engine-thread one)."""
    _, out = generate("--config", "baseline", "--engine-thread", "caller", "--concurrency", 4, "--num-requests", 8,
                      "--max-new-tokens", 8, tiny=False)
    df, meta = read_cell(out)
    assert (df.status == "ok").sum() == 8 and (df.output_tokens == 8).all()
    assert intervals_overlap(df) >= 1
    assert meta["environment"]["model"]["n_params"] == 124_439_808


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "0"], "argument --concurrency: must be an integer >= 1, got '0'"),
    (["--num-requests", "0"], "argument --num-requests: must be an integer >= 1"),
    (["--config", "nonsense"], "unknown config 'nonsense'"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--output", "OUT/cell.json"], "--output must name a .csv file"),
    (["--output", "OUT/cell_timeline.csv"], "not ending in _timeline.csv"),
    (["--trial", "3", "--trials", "2"], "--trial 3 is beyond --trials 2"),
    (["--force", "--resume"], "--force and --resume exclude each other"),
    (["--config", "cgroups"], "config 'cgroups' is limited, but no CPU quota is in force"),
    (["--torch-threads", "two"], "--torch-threads must be"),
    (["--prompts", "/nonexistent/prompts.txt"], "cannot read prompts file"),
    (["--prompts", "EMPTY"], "has no prompts"),
    (["--output", "/proc/forbidden/x.csv"], "cannot create output directory"),
    (["--concurrency", "x"], "must be an integer >= 1, got 'x'"),
])
def test_bad_input_is_one_line_exit_2_and_no_files(tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [str(empty) if a == "EMPTY" else a.replace("OUT/", str(tmp_path / "out") + "/") for a in args]
    out = tmp_path / "out" / "cell.csv"
    if "--output" not in args:
        args += ["--output", str(out)]
    proc = run_script("request_generator.py", "--tiny", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_sigint_keeps_finished_rows(tmp_path):
    out = tmp_path / "cell.csv"
    cmd = [sys.executable, os.path.join(ROOT, "request_generator.py"), "--tiny", "--quiet", "--concurrency", "2",
           "--num-requests", "400", "--max-new-tokens", "40", "--spacing-ms", "0", "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 4:  # header + 3 finished rows
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    df, meta = read_cell(out)
    assert 3 <= len(df) < 400
    assert list(df.columns) == rg.COLUMNS
    assert (df.status == "ok").all() and (df.output_tokens == 40).all()  # only whole requests are rows
    assert meta["interrupted"] is True and meta["counts"]["ok"] == len(df)
    assert meta["complete"] is False and meta["trials"][0]["complete"] is False


@pytest.mark.slow
def test_llm_server_runs_one_cell_into_runs_and_never_overwrites(tmp_path):
    args = ["--config", "baseline", "--concurrency", 2, "--num-requests", 2, "--max-new-tokens", 2, "--tiny",
            "--quiet"]
    proc = run_script("llm_server.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cell = tmp_path / "runs" / "baseline_c2.csv"
    df, meta = read_cell(cell)
    assert len(df) == 2 and meta["config"]["output"] == "runs/baseline_c2.csv" and meta["complete"] is True
    assert not (tmp_path / "results").exists()
    before = {p.name: p.read_bytes() for p in cell.parent.iterdir()}
    again = run_script("llm_server.py", *args, cwd=tmp_path)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "runs/baseline_c2.csv exists; --force replaces the cell, --resume completes it" in again.stderr
    assert {p.name: p.read_bytes() for p in cell.parent.iterdir()} == before
    skipped = run_script("llm_server.py", *args, "--resume", cwd=tmp_path)
    assert skipped.returncode == 0 and "already finished; skipped" in skipped.stderr
    assert {p.name: p.read_bytes() for p in cell.parent.iterdir()} == before
    replaced = run_script("llm_server.py", *args, "--force", "--seed", 1, cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert read_cell(cell)[1]["config"]["seed"] == 1 and len(read_cell(cell)[0]) == 2


@pytest.mark.slow
def test_trials_added_one_at_a_time_form_one_cell(generate):
    common = ["--concurrency", 1, "--num-requests", 2, "--max-new-tokens", 2, "--spacing-ms", 0, "--trials", 2,
              "--no-warmup"]
    _, out = generate(*common, "--trial", 1, "--run-index", 7)
    df, meta = read_cell(out)
    assert meta["complete"] is False and meta["trials_planned"] == 2 and len(df) == 2
    assert [t["run_index"] for t in meta["trials"]] == [7]
    proc, _ = generate(*common, "--trial", 2, check=False)  # an existing cell: only --resume adds to it
    assert proc.returncode == 2 and "--resume completes it" in proc.stderr
    proc, _ = generate(*common, "--trial", 2, "--resume", "--max-new-tokens", 3, check=False)
    assert proc.returncode == 2 and "it was run with max_new_tokens=2, this run has 3" in proc.stderr
    generate(*common, "--trial", 2, "--run-index", 9, "--resume")
    df, meta = read_cell(out)
    assert meta["complete"] is True and sorted(df.trial) == [1, 1, 2, 2]
    assert [(t["trial"], t["run_index"], t["complete"]) for t in meta["trials"]] == [(1, 7, True), (2, 9, True)]
    started = [t["started_at"] for t in meta["trials"]]
    assert started == sorted(started) and all(s.endswith("+00:00") for s in started)
    assert len(meta["resumed"]) == 1


@pytest.mark.slow
def test_resume_drops_the_rows_of_an_unfinished_trial(generate):
    _, out = generate("--num-requests", 2, "--max-new-tokens", 2, "--trials", 2, "--no-warmup")
    df, meta = read_cell(out)
    # as a run killed during trial 2 leaves it: trial 2's rows half written, not marked finished
    meta["trials"] = meta["trials"][:1]
    meta["complete"] = False
    with open(str(out)[:-4] + ".json", "w") as f:
        json.dump(meta, f)
    df[df.trial == 1].to_csv(out, index=False)
    with open(out, "a") as f:
        f.write(df[df.trial == 2].head(1).to_csv(index=False, header=False))
    generate("--num-requests", 2, "--max-new-tokens", 2, "--trials", 2, "--no-warmup", "--resume")
    df, meta = read_cell(out)
    assert sorted(df.trial) == [1, 1, 2, 2] and sorted(df[df.trial == 2].request_id) == [0, 1]
    assert meta["complete"] is True


@pytest.mark.slow
def test_limited_config_runs_under_a_quota(generate, fake_quota):
    _, out = generate("--config", "cgroups", "--num-requests", 1, "--max-new-tokens", 2, "--no-warmup")
    _, meta = read_cell(out)
    assert meta["cgroup"]["limits"]["cpu_quota_us"] == 50000 and meta["limited"] is True
    assert meta["cgroup"]["own"] is False and "no counters" in meta["cgroup"]["note"]
    assert meta["trials"][0]["cgroup_delta"] is None
    import pandas as pd
    timeline = pd.read_csv(str(out)[:-4] + "_timeline.csv")
    assert len(timeline) >= 2 and timeline["nr_periods"].isna().all()  # another cgroup's counters: none


@pytest.mark.slow
def test_generate_engine_writes_exact_tokens(generate):
    _, out = generate("--engine", "generate", "--concurrency", 2, "--num-requests", 2, "--max-new-tokens", 5)
    df, meta = read_cell(out)
    assert len(df) == 2 and (df.status == "ok").all() and (df.output_tokens == 5).all()
    assert df[["t_first_token_s", "t_end_s", "ttft_ms", "tpot_ms"]].notna().all(axis=None)
    assert meta["config"]["engine"] == "generate" and meta["environment"]["model"]["engine"] == "generate"


def test_presets_and_explicit_flags():
    cfg = rg.parse_config(["--config", "psi"])
    assert cfg.admission == "gate" and cfg.psi_threshold == 95.0 and cfg.psi_interval_ms == 500
    assert cfg.psi_max_checks == 10 and cfg.on_timeout == "admit" and cfg.output == "runs/psi_c1.csv"
    assert rg.parse_config(["--config", "psi", "--admission", "none"]).admission == "none"
    assert rg.parse_config([]).admission == "none"
    assert rg.parse_config(["--config", "limit1"]).concurrency_limit == 1
    with pytest.raises(dataclasses_frozen_error()):
        cfg.concurrency = 3


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_list_configs():
    proc = run_script("request_generator.py", "--list-configs")
    assert proc.returncode == 0
    rows = dict(line.split() for line in proc.stdout.splitlines())
    assert rows["baseline"] == "unlimited" and rows["cgroups"] == "limited" and rows["psi"] == "limited"


def test_csv_sink_writes_derived_columns_without_pandas(tmp_path):
    """CsvSink appends with the csv module: missing values (None, NaN) are empty fields, floats as Python
    writes them, the derived columns from the row's timestamps; the header only once."""
    from llm_psi.load.cell_files import COLUMNS, CsvSink
    row = dict(trial=0, request_id=3, config="psi", concurrency=2, status="ok", output_tokens=3,
               prompt_tokens=None, gate_pressure=float("nan"), t_submit_s=0.5, t_dequeue_s=0.75, t_admit_s=1.0,
               t_start_s=1.5, t_first_token_s=2.0, t_end_s=3.0)
    for _ in range(2):
        sink = CsvSink(str(tmp_path / "c.csv"))
        sink.write(row)
        sink.close()
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 3 and lines[1] == lines[2]
    f = dict(zip(COLUMNS, lines[1].split(",")))
    assert f["prompt_tokens"] == f["gate_pressure"] == f["t_intended_s"] == f["lateness_ms"] == ""
    assert (f["t_submit_s"], f["queue_ms"], f["service_ms"], f["tpot_ms"], f["e2e_ms"]) == ("0.5", "250.0", "1500.0",
                                                                                          "500.0", "2500.0")
    code = "import sys, llm_psi.load.cell_files; print('pandas' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "False"

@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--dtype", "bfloat16"], ["--quantize", "int8"]], ids=["bf16", "int8"])
def test_dtype_and_quantize_write_exact_tokens(generate, flags):
    """The issue's acceptance: each precision writes 2 ok rows of 5 tokens, recorded in the cell's JSON."""
    _, out = generate(*flags, "--num-requests", 2, "--max-new-tokens", 5)
    df, meta = read_cell(out)
    assert len(df) == 2 and (df.status == "ok").all() and (df.output_tokens == 5).all()
    model = meta["environment"]["model"]
    assert meta["config"][flags[0][2:]] == flags[1] == model[flags[0][2:]]
    assert (model["quantized_linears"] > 0) == (flags[1] == "int8")


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
    (["--dtype", "bfloat16", "--quantize", "int8"], "--quantize int8 needs --dtype float32"),
])
def test_bad_dtype_or_quantize_exits_2(tmp_path, args, message):
    out = tmp_path / "out" / "cell.csv"
    proc = run_script("request_generator.py", "--tiny", *args, "--output", out)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
