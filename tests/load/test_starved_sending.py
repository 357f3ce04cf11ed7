"""The load generator in service mode sends on its open-loop schedule however little CPU the service gets
(issue 32): with the service stopped (SIGSTOP, the extreme of a starved cgroup) while the requests go out, every
request leaves within a small bound of its scheduled time, and the service answers them only once it runs again."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT
from helpers import Server

LATE_BOUND_MS = 100.0   # a schedule's sending lateness; the stop lasts 3000 ms


@pytest.mark.slow
def test_sending_stays_on_time_while_the_service_is_stopped(tmp_path):
    server = Server("--config", "baseline")
    server.wait_ready()
    out = str(tmp_path / "starved.csv")
    gen = subprocess.Popen([sys.executable, os.path.join(ROOT, "request_generator.py"), "--tiny", "--config",
                            "baseline", "--target", server.url, "--no-warmup", "--arrival", "poisson", "--rate", "10",
                            "--duration", "3", "--deadline-s", "20", "--max-new-tokens", "4", "--output", out,
                            "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.exists(out[:-4] + ".json"):          # the generator is up and has reached the service
            assert gen.poll() is None, gen.stderr.read()
            time.sleep(0.01)
        os.kill(server.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(3.5)                                         # the whole schedule goes out meanwhile
        os.kill(server.proc.pid, signal.SIGCONT)
        resumed_after = time.monotonic() - stopped_at
        assert gen.wait(60) == 0, gen.stderr.read()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        if gen.poll() is None:
            gen.kill()
            gen.wait()
        server.stop()
    df = pd.read_csv(out)
    assert len(df) >= 15                                        # ~30 due at 10/s over 3 s
    late_ms = (df["t_dequeue_s"] - df["t_intended_s"]) * 1000   # the worker's send versus the schedule
    assert late_ms.max() < LATE_BOUND_MS, late_ms.max()
    assert ((df["t_submit_s"] - df["t_intended_s"]) * 1000).max() < LATE_BOUND_MS
    # the service was starved while they went out: most were answered only after it ran again
    waited = df["t_end_s"] - df["t_submit_s"]
    assert (waited > 0.5).mean() > 0.5 and resumed_after >= 3.0
