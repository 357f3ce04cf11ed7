"""run_experiments.sh / run_psi_experiments.sh: options, root check, cells, teardown on signals.

Most tests use a stand-in generator (SWEEP_GENERATOR) that records where it ran; one runs the real
request_generator.py with the tiny model.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest

from llm_psi import cgroups
from conftest import real_cgroups

from conftest import ROOT  # noqa: E402
SCRIPTS = ["run_experiments.sh", "run_psi_experiments.sh"]
NAME = f"sweep_test_{os.getpid()}"

FAKE_GENERATOR = r'''
import json, os, sys, time
if "--list-configs" in sys.argv:
    print("baseline unlimited\ncgroups limited\npsi limited\nlimit1 limited")
    sys.exit(0)
flags = [x for x in sys.argv[1:] if x in ("--force", "--resume", "--tiny", "--quiet")]
rest = [x for x in sys.argv[1:] if x not in flags]
a = dict(zip(rest[::2], rest[1::2]))
stem = a["--output"][:-4]
call = {"argv": sys.argv[1:], "flags": flags, "config": a["--config"], "c": int(a["--concurrency"]),
        "trial": int(a["--trial"]), "run_index": int(a["--run-index"]),
        "proc_self_cgroup": open("/proc/self/cgroup").read().splitlines()}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(call) + "\n")
if not os.path.exists(stem + ".json"):
    with open(stem + ".json", "w") as f:
        json.dump({"argv": sys.argv[1:]}, f)
open(a["--output"], "a").close()
t = time.time()
while time.time() - t < float(os.environ.get("FAKE_BURN_S", "0.2")):
    pass
if os.environ.get("FAKE_FAIL"):
    sys.exit(3)
print(f"[{a['--config']} c={a['--concurrency']} trial {a['--trial']}] p95 e2e 1.00 s", file=sys.stderr)
'''


def _sh(script, *args, env=None, **kw):
    full_env = {k: v for k, v in os.environ.items() if k not in ("CGROUP_ROOT", "PYTHON")}
    full_env.update(env or {})
    return subprocess.run(["bash", os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=120, env=full_env, **kw)


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake_generator.py"
    path.write_text(FAKE_GENERATOR)
    return {"SWEEP_GENERATOR": str(path), "FAKE_LOG": str(tmp_path / "calls.jsonl")}


def calls(fake):
    with open(fake["FAKE_LOG"]) as f:
        return [json.loads(line) for line in f]


def _dirs():
    mode = cgroups.detect_mode("/sys/fs/cgroup")
    return cgroups.cgroup_dirs(cgroups.cgroup_info(mode, "/sys/fs/cgroup", NAME, NAME, NAME))


real = real_cgroups


@pytest.fixture
def nothing_left():
    yield
    left = [d for d in _dirs() if os.path.isdir(d)]
    if left:
        subprocess.run([sys.executable, os.path.join(ROOT, "cgroup_lib.py"), "cleanup", "--name", NAME])
    assert not left, f"cgroups left behind: {left}"


def test_shellcheck_clean():
    shellcheck = os.path.join(ROOT, ".venv", "bin", "shellcheck")
    if not os.path.exists(shellcheck):
        shellcheck = shutil.which("shellcheck") or pytest.skip("shellcheck not installed")
    p = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
    p = subprocess.run([shellcheck, *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_bad_options(script, fake):
    p = _sh(script, "--help")
    assert p.returncode == 0 and "--quick" in p.stdout and "--concurrency" in p.stdout
    for args, message in [(["--bogus"], "unknown option '--bogus'"),
                          (["--num-requests", "0"], "--num-requests must be a positive integer"),
                          (["--trials"], "--trials needs a value"),
                          (["--concurrency", ""], "--concurrency is empty"),
                          (["--concurrency", "1 x"], "--concurrency must be a positive integer, got 'x'"),
                          (["--configs", "cgroups nope"], "unknown config 'nope'")]:
        p = _sh(script, *args, env=fake)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.strip().endswith(message) or message in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1


def test_interpreter_choice(fake, tmp_path):
    p = _sh("run_experiments.sh", "--configs", "bogus", env=fake)
    assert f"python: {ROOT}/.venv/bin/python (the .venv beside run_experiments.sh)" in p.stdout
    p = _sh("run_experiments.sh", "--configs", "bogus", env={**fake, "PYTHON": sys.executable})
    assert f"python: {sys.executable} ($PYTHON)" in p.stdout


@pytest.mark.root
@pytest.mark.parametrize("script", SCRIPTS)
def test_non_root_is_refused_and_nothing_is_created(script, fake):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the script as nobody")
    tmp = tempfile.mkdtemp()
    try:
        os.chmod(tmp, 0o777)
        shutil.copy(fake["SWEEP_GENERATOR"], tmp)
        results = os.path.join(tmp, "results")
        p = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "bash",
                            os.path.join(ROOT, script), "--quick", "--results-dir", results,
                            "--cgroup-name", NAME],
                           capture_output=True, text=True, timeout=60, cwd="/",
                           env={"PATH": os.environ["PATH"],
                                "SWEEP_GENERATOR": os.path.join(tmp, "fake_generator.py")})
        assert p.returncode == 2, p.stderr
        assert "must run as root" in p.stderr and "sudo bash" in p.stderr
        assert not os.path.exists(results)
        assert not any(os.path.exists(d) for d in _dirs())
    finally:
        shutil.rmtree(tmp)


@pytest.mark.slow
@real
def test_quick_sweep_runs_every_cell_in_a_cgroup_of_its_own(fake, tmp_path, nothing_left):
    p = _sh("run_experiments.sh", "--quick", "--results-dir", str(tmp_path / "r"), "--cgroup-name", NAME,
            "--tiny", "--model", "m", env=fake)
    assert p.returncode == 0, p.stderr
    progress = [line.split(" -> ")[0] for line in p.stdout.splitlines() if line.startswith("[")]
    assert [line.split("] ")[0] for line in progress] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert sorted(line.split("] ")[1] for line in progress) == sorted(
        [f"trial 1/1 baseline c={c} (in unlimited cgroup {NAME})" for c in (1, 2)]
        + [f"trial 1/1 cgroups c={c} (in cgroup {NAME})" for c in (1, 2)])
    for call in calls(fake):
        argv = call["argv"]
        assert argv[argv.index("--num-requests") + 1] == "4" and argv[argv.index("--max-new-tokens") + 1] == "8"
        assert "--tiny" in argv and argv[argv.index("--model") + 1] == "m" and "--quiet" in argv
        assert any(line.endswith(f"/{NAME}") for line in call["proc_self_cgroup"])
    for cfg, c in [("baseline", 1), ("baseline", 2), ("cgroups", 1), ("cgroups", 2)]:
        run = json.loads((tmp_path / "r" / f"{cfg}_c{c}.json").read_text())["cgroup_runs"][0]
        limited = {"cpu_quota_us": 50000, "cpu_period_us": 100000, "memory_max_bytes": 4294967296}
        assert run["limits"] == limited if cfg == "cgroups" else run["limits"]["cpu_quota_us"] is None
        assert run["counters"]["nr_periods"] is not None
    assert p.stderr.count("p95 e2e") == 4


@pytest.mark.slow
def test_trials_interleave_in_a_seeded_order_and_cells_are_never_overwritten(fake, tmp_path):
    args = ["--configs", "baseline", "--concurrency", "1 2 4", "--cells", "baseline:8", "--trials", "3",
            "--results-dir", str(tmp_path / "r"), "--cgroup-name", NAME]
    env = {**fake, "FAKE_BURN_S": "0"}
    p = _sh("run_experiments.sh", *args, env=env)
    assert p.returncode == 0, p.stderr
    first = calls(fake)
    assert [x["run_index"] for x in first] == list(range(1, 13))
    assert [x["trial"] for x in first] == [1] * 4 + [2] * 4 + [3] * 4      # round k: trial k of every cell
    rounds = [[x["c"] for x in first[i:i + 4]] for i in (0, 4, 8)]
    assert all(sorted(r) == [1, 2, 4, 8] for r in rounds) and len({tuple(r) for r in rounds}) > 1
    assert all(("--resume" in x["flags"]) == (x["trial"] > 1) for x in first)
    before = {f.name: f.read_bytes() for f in (tmp_path / "r").iterdir()}
    p = _sh("run_experiments.sh", *args, env=env)   # the cells exist: refused before anything runs
    assert p.returncode == 2 and "4 cell(s) exist already" in p.stderr and "--force replaces" in p.stderr
    assert len(calls(fake)) == 12 and {f.name: f.read_bytes() for f in (tmp_path / "r").iterdir()} == before
    p = _sh("run_experiments.sh", *args, "--force", env=env)  # the same seed gives the same order
    again = calls(fake)[12:]
    assert [(x["trial"], x["c"]) for x in again] == [(x["trial"], x["c"]) for x in first]
    assert all(("--force" in x["flags"]) == (x["trial"] == 1) for x in again)
    p = _sh("run_experiments.sh", *args, "--resume", env=env)
    assert p.returncode == 0 and len(calls(fake)) == 36 and all("--resume" in x["flags"] for x in calls(fake)[24:])


@real
def test_a_failed_cell_stops_the_sweep_and_leaves_no_cgroup(fake, tmp_path, nothing_left):
    p = _sh("run_experiments.sh", "--configs", "cgroups", "--concurrency", "1 2", "--results-dir", str(tmp_path),
            "--cgroup-name", NAME, env={**fake, "FAKE_FAIL": "1", "FAKE_BURN_S": "0"})
    assert p.returncode == 3 and "failed (exit status 3); finished trials are kept" in p.stderr
    assert len(calls(fake)) == 1


@real
def test_psi_script_runs_the_psi_config(fake, tmp_path, nothing_left):
    p = _sh("run_psi_experiments.sh", "--concurrency", "1", "--results-dir", str(tmp_path),
            "--cgroup-name", NAME, "--cpu-quota", "25", "--memory-max", "1G", env=fake)
    assert p.returncode == 0, p.stderr
    call, = calls(fake)
    assert call["config"] == "psi" and call["argv"][call["argv"].index("--num-requests") + 1] == "20"
    assert json.loads((tmp_path / "psi_c1.json").read_text())["cgroup_runs"][0]["limits"] == {
        "cpu_quota_us": 25000, "cpu_period_us": 100000, "memory_max_bytes": 1 << 30}


@real
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_cgroups_cell_leaves_nothing(sig, fake, tmp_path, nothing_left):
    """SIGINT to the whole process group (as Ctrl-C does); SIGTERM to the script alone (kill PID)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CGROUP_ROOT", "PYTHON")}
    env.update(fake, FAKE_BURN_S="60")
    p = subprocess.Popen(["bash", os.path.join(ROOT, "run_experiments.sh"), "--configs", "cgroups",
                          "--concurrency", "1", "--results-dir", str(tmp_path), "--cgroup-name", NAME],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    deadline = time.monotonic() + 20
    while not any(cgroups.procs(d) for d in _dirs() if os.path.isdir(d)):
        assert time.monotonic() < deadline and p.poll() is None, "the cell never started"
        time.sleep(0.05)
    victims = {pid for d in _dirs() for pid in cgroups.procs(d)}
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 128 + sig, err
    assert f"{sig.name} received; stopping the running cell" in err
    assert not any(os.path.exists(d) for d in _dirs())
    assert not any(os.path.exists(f"/proc/{pid}") for pid in victims)


@pytest.mark.slow
@real
def test_real_generator_cell(tmp_path, nothing_left):
    p = _sh("run_experiments.sh", "--configs", "cgroups", "--concurrency", "1", "--num-requests", "2",
            "--max-new-tokens", "2", "--tiny", "--results-dir", str(tmp_path), "--cgroup-name", NAME)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "p95 e2e" in p.stderr
    meta = json.loads((tmp_path / "cgroups_c1.json").read_text())
    limits = {"cpu_quota_us": 50000, "cpu_period_us": 100000, "memory_max_bytes": 4294967296}
    assert meta["cgroup"]["limits"] == limits and meta["cgroup_runs"][0]["limits"] == limits
    assert meta["cgroup"]["info"]["cpu"].endswith(f"/{NAME}") and meta["cgroup"]["own"] is True
    assert meta["trials"][0]["cgroup_delta"]["nr_periods"] is not None and meta["complete"] is True
    assert meta["cgroup_runs"][0]["counters"]["usage_usec"] > 0
    with open(tmp_path / "cgroups_c1_timeline.csv") as f:
        periods = [row["nr_periods"] for row in csv.DictReader(f)]
    assert periods and all(periods)  # the cell's own cgroup: its throttling counters in every sample


@pytest.mark.slow
@real
def test_service_mode_puts_only_the_service_in_the_cgroup(tmp_path, nothing_left):
    """--mode service: llm_server.py serve runs in the cell's cgroup, the generator outside it sends HTTP."""
    p = _sh("run_experiments.sh", "--configs", "cgroups", "--concurrency", "2", "--num-requests", "3",
            "--max-new-tokens", "3", "--tiny", "--results-dir", str(tmp_path), "--cgroup-name", NAME,
            "--mode", "service", "--port", "18977")
    assert p.returncode == 0, p.stderr[-3000:]
    df = pd.read_csv(tmp_path / "cgroups_c2.csv")
    assert (df.status == "ok").sum() == 3 and df.srv_start_s.notna().all()
    meta = json.loads((tmp_path / "cgroups_c2.json").read_text())
    assert meta["mode"] == "service" and meta["service"]["config"]["config"] == "cgroups"
    assert not any(NAME in line for line in meta["environment"]["proc_self_cgroup"])  # the client: outside
    assert meta["service"]["cgroup"]["own"] is True                                     # the service: inside
    assert meta["cgroup_runs"][0]["limits"]["cpu_quota_us"] == 50000
    assert meta["trials"][0]["cgroup_delta"]["nr_periods"] > 0  # the service's counters, read over HTTP
    with open(tmp_path / "cgroups_c2_timeline.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["nr_periods"] for r in rows)
