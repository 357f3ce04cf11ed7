"""PSI parsing, the gate with an injected pressure source, the limit, triggers, the timeline sampler, the CLI,
and a whole run reading a fake cgroup tree ($CGROUP_ROOT)."""
import csv
import json
import errno
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from conftest import read_cell, real_cgroups, run_script
from llm_psi import cgroups
from llm_psi import control as pa
from llm_psi.control import pressure, psi as psi_cli
from llm_psi.service import telemetry
from llm_psi.service import lifecycle as service
from bench import psi as psi_bench

CPU_SAMPLE = ("some avg10=1.26 avg60=0.43 avg300=0.52 total=3345418\n"
              "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
OLD_CPU_SAMPLE = "some avg10=12.50 avg60=3.10 avg300=0.75 total=987654321\n"   # kernels < 5.13: no full line
SYSTEM_CPU = "/proc/pressure/cpu"


def test_parse_real_format():
    p = pa.parse_pressure(CPU_SAMPLE)
    assert p["some"] == {"avg10": 1.26, "avg60": 0.43, "avg300": 0.52, "total": 3345418}
    assert p["full"] == {"avg10": 0.0, "avg60": 0.0, "avg300": 0.0, "total": 0}
    for res in ("cpu", "memory", "io"):              # and this host's files, where it has PSI
        if os.path.exists(f"/proc/pressure/{res}"):
            f = pa.PressureFile(f"/proc/pressure/{res}")
            first, second = f.read()["some"], f.read()["some"]
            assert isinstance(first["total"], int) and second["total"] >= first["total"]   # a counter: never back
            assert all(0.0 <= first[k] <= 100.0 for k in ("avg10", "avg60", "avg300"))


def test_parse_missing_full_line():
    p = pa.parse_pressure(OLD_CPU_SAMPLE)
    assert p["full"] is None and p["some"]["avg10"] == 12.5 and p["some"]["total"] == 987654321


@pytest.mark.parametrize("text", ["", "hello world\n", "some avg10=1.0 avg60=2.0 total=5\n",
                                  "some avg10=x avg60=0 avg300=0 total=1\n", "some avg10 avg60 avg300 total\n",
                                  "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
                                  CPU_SAMPLE + "some avg10=0 avg60=0 avg300=0 total=0\n"])
def test_parse_garbage_raises(text):
    with pytest.raises(ValueError):
        pa.parse_pressure(text)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(pa.PsiUnavailable, match="psi=1"):
        pa.PressureFile(str(tmp_path / "cpu")).read()


def test_psi_disabled_at_boot_names_the_fix(monkeypatch):
    def no_psi(*_a, **_k):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(pressure, "open", no_psi, raising=False)
    with pytest.raises(pa.PsiUnavailable, match="disabled at boot.*psi=1"):
        pa.PressureFile(SYSTEM_CPU).read()


class FakeClock:
    """A clock that only moves when the code sleeps: no real waiting in unit tests."""

    def __init__(self):
        self.t, self.sleeps = 100.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def scripted(*values):
    it = iter(values)
    return lambda: next(it)


def make_gate(values, max_checks=10, on_timeout="admit", threshold=95.0):
    clock = FakeClock()
    det = pa.Detector(scripted(*values), threshold, "fake")
    return pa.Gate(det, 0.5, max_checks, on_timeout, sleep=clock.sleep, clock=clock), clock


def test_gate_admits_at_once_at_or_below_threshold():
    gate, clock = make_gate([95.0])
    assert gate.admit() == pa.Decision("admitted", 1, 95.0)
    assert clock.sleeps == []


def test_gate_defers_until_pressure_drops():
    gate, clock = make_gate([99.0, 97.5, 96.0, 40.0])
    assert gate.admit() == pa.Decision("admitted", 4, 40.0)
    assert clock.sleeps == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("on_timeout,decision", [("admit", "admitted_after_timeout"), ("reject", "rejected")])
def test_gate_timeout(on_timeout, decision):
    gate, clock = make_gate([99.0] * 10, on_timeout=on_timeout)
    assert gate.admit() == pa.Decision(decision, 10, 99.0)
    assert clock.sleeps == [0.5] * 9          # the paper: 10 checks 500 ms apart, no sleep after the last


def test_gate_counts_waiting_workers():
    release = threading.Event()
    det = pa.Detector(lambda: 99.0, 95.0, "fake")
    gate = pa.Gate(det, 0.0, 3, sleep=lambda _s: release.wait(5))
    workers = [threading.Thread(target=gate.admit) for _ in range(3)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 5
    while gate.state()["waiting"] < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert gate.state() == {"waiting": 3}
    release.set()
    for w in workers:
        w.join()
    assert gate.state() == {"waiting": 0}


def test_stall_share_first_check_takes_a_short_fresh_delta():
    clock, totals = FakeClock(), iter([1_000_000, 1_080_000, 1_130_000, 1_200_000])
    share = pa.StallShare(lambda: (clock(), next(totals)), 0.5, sleep=clock.sleep)
    assert share() == pytest.approx(80.0)     # 80 ms of stall in the fresh 100 ms
    assert clock.sleeps == [pytest.approx(0.1)]
    clock.t += 0.4
    assert share() == pytest.approx(26.0)     # 130 ms over the 500 ms since the first sample
    clock.t += 0.5
    assert share() == pytest.approx(14.0)     # baseline moved up: 70 ms over the last 500 ms
    assert len(clock.sleeps) == 1


def test_stall_share_helper_reports_as_measured():
    assert pa.stall_share((10.0, 1_000_000), (10.5, 1_250_000)) == pytest.approx(50.0)
    assert pa.stall_share((10.0, 0), (10.1, 100_004)) == pytest.approx(100.004)   # not clipped
    assert math.isnan(pa.stall_share((10.0, 0), (10.0, 5)))


class SlowPsiFile:
    """open() replacement: a cpu.pressure whose read first blocks for the next of `delays` seconds (as on
    the kernel's PSI lock), then snapshots a stall that accrues at exactly 50% of the clock's time."""

    def __init__(self, clock, delays):
        self.clock, self.delays = clock, iter(delays)

    def __call__(self, _path, *_a, **_k):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        return False

    def read(self):
        self.clock.t += next(self.delays)
        return f"some avg10=50.00 avg60=50.00 avg300=50.00 total={round((self.clock.t - 100.0) * 0.5e6)}\n"


def test_stall_share_pairs_each_total_with_its_own_read_time(monkeypatch):
    """A slow read does not inflate the share: stamped before the read, these would give 200% and 90%."""
    clock, sampler = FakeClock(), telemetry.TimelineSampler(os.devnull, 100, 1, dict, 0.0)
    monkeypatch.setattr(pressure, "open", SlowPsiFile(clock, [0.0, 0.3, 0.0, 0.0, 0.4]), raising=False)
    pf = pa.PressureFile("/fake/cpu.pressure", clock=clock)
    share = pa.StallShare(pf.timed_total, 0.5, sleep=clock.sleep)
    assert share() == pytest.approx(50.0)      # 0.1 s fresh delta whose second read takes 0.3 s
    clock.t += 0.5
    assert share() == pytest.approx(50.0)
    sampler.probe.files = {"sys": pf}
    sampler.row()
    clock.t += 0.5
    assert sampler.row()["sys_cpu_some_pct"] == pytest.approx(50.0)   # the second read takes 0.4 s


def test_limit_is_fifo_and_bounded():
    lim, order = pa.Limit(2), []
    first = lim.admit()
    assert first.decision == "admitted" and first.checks == 1 and math.isnan(first.pressure)
    lim.admit()
    threads = []
    for i in range(3):                         # queue up three waiters, in order
        threads.append(threading.Thread(target=lambda i=i: (lim.admit(), order.append(i))))
        threads[-1].start()
        while lim.state()["waiting"] < i + 1:
            time.sleep(0.002)
    assert order == [] and lim.state() == {"limit": 2, "waiting": 3}
    for i in range(3):
        lim.release()
        while len(order) < i + 1:
            time.sleep(0.002)
    for t in threads:
        t.join()
    assert order == [0, 1, 2] and lim.state()["waiting"] == 0


def cfg(**kw):
    base = dict(admission="gate", psi_threshold=95.0, psi_interval_ms=1.0, psi_max_checks=3, on_timeout="admit",
                psi_source="system", psi_signal="avg10", psi_mode="poll", concurrency_limit=2,
                adaptive_max=4, batching="off", max_batch=8, adaptive_low_pct=20.0, adaptive_high_pct=90.0,
                adaptive_tolerance=1.5)
    return types.SimpleNamespace(**{**base, **kw})


def test_build_admission_kinds():
    assert service.build_admission(cfg(admission="none")) is None
    assert isinstance(service.build_admission(cfg(admission="limit")), pa.Limit)
    adaptive = service.build_admission(cfg(admission="adaptive"))
    try:
        assert isinstance(adaptive, pa.Limit) and adaptive.limit == 1 and adaptive.max_limit == 4
    finally:
        adaptive.close()
    gate = service.build_admission(cfg(on_timeout="reject"), read=lambda: 100.0)
    assert gate.admit() == pa.Decision("rejected", 3, 100.0)


def test_gate_reads_the_fake_tree(fake_cgroupfs):
    """Under $CGROUP_ROOT the system pressure is the fake root's cpu.pressure, the cgroup's its own."""
    fake_cgroupfs.set_pressure("system", 99.0)
    assert service.build_admission(cfg()).admit() == pa.Decision("admitted_after_timeout", 3, 99.0)
    fake_cgroupfs.set_pressure("cgroup", 42.0)
    assert service.build_admission(cfg(psi_source="cgroup")).admit() == pa.Decision("admitted", 1, 42.0)


def test_timeline_reads_the_fake_tree(fake_cgroupfs, monkeypatch):
    fake_cgroupfs.set_pressure("system", 12.5, total=1000)
    fake_cgroupfs.set_pressure("cgroup", 7.0, total=500)
    monkeypatch.setenv(cgroups.CELL_ENV, fake_cgroupfs.own.name)        # the fake cgroup is the cell's own
    row = telemetry.TimelineSampler(os.devnull, 100, 1, dict, 0.0).row()
    assert row["sys_cpu_some_avg10"] == (7.0 if fake_cgroupfs.own == fake_cgroupfs.root else 12.5)
    assert row["cg_cpu_some_avg10"] == 7.0 and row["cg_cpu_some_total_us"] == 500
    assert (row["nr_periods"], row["nr_throttled"], row["throttled_usec"]) == (5, 1, 10)


def test_show_reads_the_fake_tree_and_fails_without_pressure(fake_cgroupfs):
    fake_cgroupfs.set_pressure("cgroup", 3.0)
    proc = run_script("psi_admission.py", "--show")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["cgroup"]["dir"] == str(fake_cgroupfs.own) and shown["cgroup"]["cpu"]["some"]["avg10"] == 3.0
    assert shown["cgroup"]["io"] is None and shown["throttling"] is None
    os.remove(fake_cgroupfs.pressure_file("system"))
    proc = run_script("psi_admission.py", "--show")
    assert proc.returncode == 1 and proc.stderr.startswith("psi_admission.py: ") and proc.stderr.count("\n") == 1


def test_trigger_refused_falls_back_to_polling_once(monkeypatch, caplog, tmp_path):
    path = tmp_path / "cpu.pressure"
    path.write_text(CPU_SAMPLE)

    def busy(*_a):
        raise OSError(errno.EBUSY, "Device or resource busy")
    monkeypatch.setattr(pressure.os, "write", busy)
    with caplog.at_level(logging.WARNING, logger="psi_admission"):
        det = pa.make_detector("system", "avg10", "trigger", 95.0, 0.5, path=str(path))
    assert det.monitor is None and det.check() == (False, 1.26)
    assert len(caplog.records) == 1 and "already exists" in caplog.text and "falling back" in caplog.text


@pytest.mark.parametrize("threshold,payload", [(10.0, b"some 200000 2000000\0"), (95.0, b"some 1900000 2000000\0")])
def test_trigger_write_carries_its_trailing_nul(monkeypatch, tmp_path, threshold, payload):
    path = tmp_path / "cpu.pressure"
    path.write_text(CPU_SAMPLE)
    written = []
    monkeypatch.setattr(pressure.os, "write", lambda fd, data: written.append(data) or len(data))
    monitor = pa.TriggerMonitor(str(path), threshold)
    monitor.close()
    assert written == [payload] and written[0].endswith(b"\0")


def test_trigger_decides_without_reading_the_file():
    monitor = types.SimpleNamespace(path="/p/cpu.pressure", error=None, high=lambda: True, stall_us=1_900_000,
                                    window_s=2.0, close=lambda: None)
    over, value = pa.Detector(pytest.fail, 95.0, "poll", monitor).check()
    assert over is True and math.isnan(value)


def test_trigger_pollerr_falls_back_once(caplog):
    monitor = types.SimpleNamespace(path="/gone/cpu.pressure", error="POLLERR on /gone/cpu.pressure",
                                    close=lambda: None)
    det = pa.Detector(lambda: 97.0, 95.0, "poll", monitor)
    with caplog.at_level(logging.WARNING, logger="psi_admission"):
        assert det.check() == (True, 97.0) and det.check() == (True, 97.0)
    assert len(caplog.records) == 1 and "POLLERR" in caplog.text


def test_timeline_sampler_rows(tmp_path):
    path = tmp_path / "cell_timeline.csv"
    for trial in (1, 2):
        s = telemetry.TimelineSampler(str(path), 20, trial, lambda: {"in_flight": 1, "waiting": 2}, time.monotonic())
        s.start()
        time.sleep(0.1)
        s.stop()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    with open(path) as f:
        assert f.readline().strip().split(",") == telemetry.TIMELINE_COLUMNS    # one header, even when appending
    assert {r["trial"] for r in rows} == {"1", "2"} and len(rows) >= 4
    assert all(r["in_flight"] == "1" and r["waiting"] == "2" and r["limit"] == "" for r in rows)
    if os.path.exists(SYSTEM_CPU):
        assert all(r["sys_cpu_some_avg10"] != "" for r in rows)
        assert any(r["sys_cpu_some_pct"] != "" for r in rows)


@pytest.mark.slow
def test_real_trigger_and_stall_share_under_cpu_load():
    if not os.path.exists(SYSTEM_CPU):
        pytest.skip(f"{SYSTEM_CPU} missing: kernel without PSI (boot with psi=1)")
    try:
        monitor = pa.TriggerMonitor(SYSTEM_CPU, 10.0, poll_s=0.05)   # 200 ms of stall in a 2 s window
    except pa.TriggerUnavailable as e:
        pytest.skip(f"PSI trigger unavailable here: {e}")
    share = pa.StallShare(pa.PressureFile(SYSTEM_CPU).timed_total, 0.5)
    burn = "import time\nend = time.monotonic() + 10\nwhile time.monotonic() < end: pass"
    n = (os.cpu_count() or 1) + 1              # one more burner than CPUs: someone always waits
    procs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(n)]
    try:
        assert monitor.fired.wait(8), f"no POLLPRI within 8 s of {n} CPU burners"
        assert monitor.high() and monitor.error is None
        assert share() > 10.0
    finally:
        for p in procs:
            p.kill()
            p.wait()
        monitor.close()


@pytest.mark.parametrize("flag", ["--threshold", "--seconds"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "x"])
def test_bench_cli_rejects_bad_numbers_in_one_line(monkeypatch, capsys, flag, value):
    monkeypatch.setattr(psi_bench, "bench", pytest.fail)
    with pytest.raises(SystemExit) as exit_info:
        psi_bench.main([flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"psi_bench.py: error: argument {flag}: ") and err.count("\n") == 1


@pytest.mark.parametrize("error,status", [(cgroups.CgroupError("no cgroups"), 1), (pa.PsiUnavailable("no psi"), 1),
                                          (KeyboardInterrupt("SIGTERM"), 130)])
def test_bench_cli_exit_status(monkeypatch, capsys, error, status):
    def fail(threshold, seconds):
        assert (threshold, seconds) == (80.0, 5.0)
        raise error
    monkeypatch.setattr(psi_bench, "bench", fail)
    assert psi_bench.main(["--threshold", "80", "--seconds", "5"]) == status
    err = capsys.readouterr().err
    assert err.startswith("psi_bench.py: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [[], ["--bench"], ["--bench", "--bench-threshold", "50"], ["--show", "-x"]])
def test_psi_admission_cli_is_show_only(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        psi_cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("psi_admission.py: error: ") and err.count("\n") == 1
    assert ("psi_bench.py" in err) == ("--bench" in argv)


@real_cgroups
@pytest.mark.parametrize("how", ["exception", "SIGTERM"])
def test_bench_removes_its_cgroup_and_burners_on_every_exit(monkeypatch, how):
    if not os.path.exists(SYSTEM_CPU):
        pytest.skip(f"{SYSTEM_CPU} missing: kernel without PSI (boot with psi=1)")
    from llm_psi import cgroups
    from bench import psi as psi_bench
    name, started, missed, burn = f"psi_bench_{os.getpid()}", [], [], psi_bench._burn
    dirs = cgroups.cgroup_dirs(cgroups.cgroup_info(cgroups.detect_mode("/sys/fs/cgroup"), "/sys/fs/cgroup",
                                             name, name, name))

    def burn_then_fail(procs, *args):           # mid-bench: the load runs inside the bench cgroup
        burn(procs, *args)
        started.extend(procs)
        deadline = time.monotonic() + 10
        while not any(cgroups.procs(d) for d in dirs) and time.monotonic() < deadline:
            time.sleep(0.02)
        if how == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("boom")

    def on_sigterm(*_a):                        # the bench should catch it: pytest survives one it misses
        missed.append(1)

    monkeypatch.setattr(psi_bench, "_burn", burn_then_fail)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with pytest.raises(KeyboardInterrupt if how == "SIGTERM" else RuntimeError):
            psi_bench.bench(load_s=0.5, burners=1, calls=10)
        assert signal.getsignal(signal.SIGTERM) is on_sigterm and not missed
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert started and all(p.poll() is not None for p in started)
    assert not [d for d in dirs if os.path.exists(d)]


@pytest.mark.slow
def test_generator_records_rejected_rows(tmp_path, fake_cgroupfs):
    fake_cgroupfs.set_pressure("system", 99.0)            # $CGROUP_ROOT: the run reads the fake tree
    for on_timeout, decision, status in (("reject", "rejected", "rejected"),
                                         ("admit", "admitted_after_timeout", "ok")):
        out = tmp_path / f"psi_{on_timeout}.csv"
        proc = run_script("request_generator.py", "--tiny", "--quiet", "--no-warmup", "--config", "psi",
                          "--concurrency", 2, "--num-requests", 3, "--spacing-ms", 0, "--max-new-tokens", 2,
                          "--psi-interval-ms", 1, "--psi-max-checks", 2, "--on-timeout", on_timeout,
                          "--timeline-interval-ms", 20, "--output", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        df, _meta = read_cell(out)
        assert len(df) == 3 and set(df["status"]) == {status} and set(df["gate_decision"]) == {decision}
        assert set(df["gate_checks"]) == {2} and set(df["gate_pressure"]) == {99.0}
        assert (df["defer_ms"] >= 1.0).all()
        with open(str(out).replace(".csv", "_timeline.csv")) as f:
            timeline = list(csv.DictReader(f))
        assert len(timeline) >= 1 and {r["sys_cpu_some_avg10"] for r in timeline} == {"99.0"}


def test_bench_output_file_keeps_the_result_with_its_provenance(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(psi_bench, "bench", lambda threshold, seconds: {"reaction_s": {"system": threshold}})
    out = tmp_path / "psi" / "psi_bench.json"
    assert psi_bench.main(["--threshold", "80", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["reaction_s"] == {"system": 80.0} and record["command"].endswith(f"--output {out}")
    assert {"git_commit", "git_dirty", "finished_at"} <= set(record)
    assert json.loads(capsys.readouterr().out) == {"reaction_s": {"system": 80.0}}
    with pytest.raises(SystemExit) as exit_info:           # an existing file is not overwritten without --force
        psi_bench.main(["--output", str(out)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err
    assert psi_bench.main(["--threshold", "70", "--output", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["reaction_s"] == {"system": 70.0}
