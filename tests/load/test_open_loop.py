"""Open-loop arrivals, SLO goodput and the co-tenant, through the generator's command line."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, read_cell, run_script
from llm_psi.config import RunConfig
from llm_psi.load.trial import send_times


@pytest.mark.slow
def test_poisson_schedule_rows(generate):
    args = ("--config", "baseline", "--arrival", "poisson", "--rate", 4, "--num-requests", 12, "--seed", 3,
            "--max-new-tokens", 4)
    _, out = generate(*args, name="a.csv")
    df, meta = read_cell(out)
    assert len(df) == 12 and (df.status == "ok").all() and df.t_intended_s.notna().all()
    gaps = np.diff(np.sort(df.t_intended_s.to_numpy()))
    assert 0.1 <= gaps.mean() <= 0.6 and gaps.std() / gaps.mean() > 0.5
    assert (df.t_submit_s >= df.t_intended_s - 1e-6).all()     # never sent early
    assert df.lateness_ms.notna().all()
    # the schedule is the seed's: the same draw that send_times gives for trial 1, without a second run
    again = send_times(RunConfig(arrival="poisson", rate=4, num_requests=12, seed=3), 1)
    assert np.allclose(np.sort(df.t_intended_s), np.sort(again), atol=1e-6)
    assert meta["config"]["arrival"] == "poisson" and meta["trials"][0]["requests"] == 12


@pytest.mark.slow
def test_open_loop_does_not_wait_for_a_worker(generate):
    """A burst of 6 at a very high rate overlaps though --concurrency is 1 (it labels the cell only)."""
    _, out = generate("--arrival", "constant", "--rate", 1000, "--num-requests", 6, "--max-new-tokens", 30)
    df, meta = read_cell(out)
    assert meta["peak_in_flight"] >= 2


@pytest.mark.slow
def test_max_concurrency_caps_in_flight(generate):
    _, out = generate("--arrival", "constant", "--rate", 1000, "--num-requests", 5, "--max-new-tokens", 20,
                      "--max-concurrency", 1)
    df, meta = read_cell(out)
    assert meta["peak_in_flight"] == 1 and (df.queue_ms > 0).any()


@pytest.mark.slow
def test_duration_and_slo_goodput(generate):
    proc, out = generate("--arrival", "gamma", "--burstiness", 0.5, "--rate", 5, "--duration", 1.0,
                         "--max-new-tokens", 3, "--slo", "e2e:60000,ttft:60000")
    df, _ = read_cell(out)
    assert len(df) >= 1 and (df.t_intended_s < 1.0).all()
    assert "goodput" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--arrival", "poisson"], "needs --rate"),
    (["--rate", "2"], "--rate applies to an open loop"),
    (["--arrival", "poisson", "--rate", "1", "--burstiness", "2"], "--burstiness applies to --arrival gamma"),
    (["--arrival", "poisson", "--rate", "1", "--slo", "e2e:-5"], "--slo"),
    (["--arrival", "poisson", "--rate", "1", "--slo", "speed:5"], "--slo"),
    (["--target", "localhost:80"], "--target must be http://HOST:PORT"),
    (["--antagonist", "cpu:0"], "--antagonist"),
    (["--antagonist-quota", "50"], "--antagonist-quota needs --antagonist"),
    (["--max-concurrency", "2"], "--max-concurrency applies to an open loop"),
])
def test_bad_load_options(tmp_path, args, message):
    proc = run_script("request_generator.py", "--tiny", *args, "--output", tmp_path / "c.csv")
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.csv").exists()


def _alive(pids):
    return [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]


@pytest.mark.slow
@pytest.mark.host_cgroups
def test_cotenant_throughput_recorded_and_stopped(generate):
    _, out = generate("--antagonist", "cpu:1", "--num-requests", 4, "--max-new-tokens", 40, "--spacing-ms", 400,
                      "--timeline-interval-ms", 100)
    df, meta = read_cell(out)
    tenant = meta["cotenant"]
    assert tenant["kind"] == "cpu" and tenant["pids"]
    rec = meta["trials"][0]["cotenant"]
    assert rec["per_second"] and rec["mean_units_per_s"] > 0
    timeline = pd.read_csv(str(out).replace(".csv", "_timeline.csv"))
    units = timeline.cotenant_units.dropna()
    assert len(units) >= 2 and units.iloc[-1] > units.iloc[0]
    assert _alive(tenant["pids"]) == []


@pytest.mark.slow
@pytest.mark.host_cgroups
def test_cotenant_stopped_after_ctrl_c(tmp_path):
    out = tmp_path / "c.csv"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "request_generator.py"), "--tiny", "--quiet",
                             "--antagonist", "cpu:2", "--num-requests", "400", "--max-new-tokens", "40",
                             "--output", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    meta_path = tmp_path / "c.json"
    deadline, pids = time.monotonic() + 120, []
    while time.monotonic() < deadline and not pids:
        if meta_path.exists():
            try:
                pids = json.loads(meta_path.read_text()).get("cotenant", {}).get("pids", [])
            except ValueError:
                pass
        time.sleep(0.1)
    assert pids and len(_alive(pids)) == 2
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert _alive(pids) == []
