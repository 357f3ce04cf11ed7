"""run_experiments.sh / run_psi_experiments.sh: options, root check, cells, teardown on signals.

Most tests use a stand-in generator (SWEEP_GENERATOR) that records where it ran; one runs the real
request_generator.py with the tiny model.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import cgroup_lib
from conftest import real_cgroups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["run_experiments.sh", "run_psi_experiments.sh"]
NAME = f"sweep_test_{os.getpid()}"

FAKE_GENERATOR = r'''
import json, os, sys, time
if "--list-configs" in sys.argv:
    print("baseline unlimited\ncgroups limited\npsi limited")
    sys.exit(0)
a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
stem = a["--output"][:-4]
with open(stem + ".json", "w") as f:
    json.dump({"argv": sys.argv[1:], "proc_self_cgroup": open("/proc/self/cgroup").read().splitlines()}, f)
open(a["--output"], "w").close()
t = time.time()
while time.time() - t < float(os.environ.get("FAKE_BURN_S", "0.2")):
    pass
print(f"[{a['--config']} c={a['--concurrency']} trial 1/1] p95 e2e 1.00 s", file=sys.stderr)
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
    return {"SWEEP_GENERATOR": str(path)}


def _dirs():
    mode = cgroup_lib.detect_mode("/sys/fs/cgroup")
    return cgroup_lib._dirs(cgroup_lib._info(mode, "/sys/fs/cgroup", NAME, NAME, NAME))


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
    p = subprocess.run([shellcheck, "-x", *SCRIPTS, "sweep_lib.sh"], cwd=ROOT, capture_output=True, text=True)
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


@real
def test_quick_sweep_places_limited_cells_only(fake, tmp_path, nothing_left):
    p = _sh("run_experiments.sh", "--quick", "--results-dir", str(tmp_path / "r"), "--cgroup-name", NAME,
            "--tiny", "--model", "m", env=fake)
    assert p.returncode == 0, p.stderr
    progress = [line for line in p.stdout.splitlines() if line.startswith("[")]
    assert [line.split(" -> ")[0] for line in progress] == [
        "[1/4] baseline c=1 (unlimited)", "[2/4] baseline c=2 (unlimited)",
        f"[3/4] cgroups c=1 (in cgroup {NAME})", f"[4/4] cgroups c=2 (in cgroup {NAME})"]
    for cfg, c in [("baseline", 1), ("baseline", 2), ("cgroups", 1), ("cgroups", 2)]:
        meta = json.loads((tmp_path / "r" / f"{cfg}_c{c}.json").read_text())
        argv = meta["argv"]
        assert argv[argv.index("--num-requests") + 1] == "4" and argv[argv.index("--max-new-tokens") + 1] == "8"
        assert "--tiny" in argv and argv[argv.index("--model") + 1] == "m" and "--quiet" in argv
        inside = any(line.endswith(f"/{NAME}") for line in meta["proc_self_cgroup"])
        assert inside == (cfg == "cgroups")
        if cfg == "cgroups":
            cell = meta["cgroup_cell"]
            assert cell["limits"] == {"cpu_quota_us": 50000, "cpu_period_us": 100000,
                                      "memory_max_bytes": 4294967296}
            assert cell["counters"]["nr_periods"] is not None
    assert p.stderr.count("p95 e2e") == 4


@real
def test_psi_script_runs_the_psi_config(fake, tmp_path, nothing_left):
    p = _sh("run_psi_experiments.sh", "--concurrency", "1", "--results-dir", str(tmp_path),
            "--cgroup-name", NAME, "--cpu-quota", "25", "--memory-max", "1G", env=fake)
    assert p.returncode == 0, p.stderr
    meta = json.loads((tmp_path / "psi_c1.json").read_text())
    assert meta["argv"][meta["argv"].index("--config") + 1] == "psi"
    assert meta["argv"][meta["argv"].index("--num-requests") + 1] == "20"
    assert meta["cgroup_cell"]["limits"] == {"cpu_quota_us": 25000, "cpu_period_us": 100000,
                                             "memory_max_bytes": 1 << 30}


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
    while not any(cgroup_lib._procs(d) for d in _dirs() if os.path.isdir(d)):
        assert time.monotonic() < deadline and p.poll() is None, "the cell never started"
        time.sleep(0.05)
    victims = {pid for d in _dirs() for pid in cgroup_lib._procs(d)}
    if sig == signal.SIGINT:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 128 + sig, err
    assert f"{sig.name} received; stopping the running cell" in err
    assert not any(os.path.exists(d) for d in _dirs())
    assert not any(os.path.exists(f"/proc/{pid}") for pid in victims)


@real
def test_real_generator_cell(tmp_path, nothing_left):
    if not os.path.exists(os.path.join(ROOT, "request_generator.py")):
        pytest.skip("request_generator.py not present")
    p = _sh("run_experiments.sh", "--configs", "cgroups", "--concurrency", "1", "--num-requests", "2",
            "--max-new-tokens", "2", "--tiny", "--results-dir", str(tmp_path), "--cgroup-name", NAME)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "p95 e2e" in p.stderr
    meta = json.loads((tmp_path / "cgroups_c1.json").read_text())
    limits = {"cpu_quota_us": 50000, "cpu_period_us": 100000, "memory_max_bytes": 4294967296}
    assert meta["cgroup"]["limits"] == limits and meta["cgroup_cell"]["limits"] == limits
    assert meta["cgroup"]["info"]["cpu"].endswith(f"/{NAME}")
    assert meta["trials"][0]["cgroup_delta"]["nr_periods"] is not None
    assert meta["cgroup_cell"]["counters"]["usage_usec"] > 0
