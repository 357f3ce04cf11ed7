"""llm_psi.load.runner (the sweep's planner, options and cgroup wrapper) and the cgroups.enter exec wrapper.
The sweep end to end, through run_experiments.sh, is in test_sweep_scripts.py."""
import os
import subprocess
import sys
import time

import pytest

from llm_psi import REPO, cgroups, config
from llm_psi.load import runner

CELLS = ["baseline:1", "baseline:2", "cgroups:1"]


def test_plan_keeps_the_order_of_the_old_shell_planner():
    """Seed 0: round 1 shuffled, then round 2 shuffled by the same random.Random(0): the literal order that
    sweep_lib.sh's embedded planner printed for these cells, so existing seeds replay the same sweep."""
    assert runner.plan(CELLS, 2, 0) == [(1, "baseline", "1"), (1, "cgroups", "1"), (1, "baseline", "2"),
                                        (2, "cgroups", "1"), (2, "baseline", "2"), (2, "baseline", "1")]
    assert runner.plan(CELLS, 1, 1) == [(1, "baseline", "2"), (1, "cgroups", "1"), (1, "baseline", "1")]


def test_plan_interleaves_trials_and_depends_only_on_the_seed():
    cells = [f"c{i}:{n}" for i in range(3) for n in (1, 2, 4)]
    runs = runner.plan(cells, 4, 11)
    assert runs == runner.plan(cells, 4, 11) and runs != runner.plan(cells, 4, 12)
    for k in range(1, 5):   # round k: trial k of every cell, once each, before any trial k+1
        assert sorted(f"{c}:{n}" for t, c, n in runs[9 * (k - 1):9 * k] if t == k) == sorted(cells)
    assert len({tuple(runs[i:i + 9]) for i in range(0, 36, 9)}) > 1


def test_wrap_builds_the_cgroup_lib_command_with_the_config_defaults():
    lib = os.path.join(REPO, "cgroup_lib.py")
    assert runner.wrap(["gen", "-x"], "cgroups", meta="c.json", root=True) == [
        sys.executable, lib, "run", "--name", config.CGROUP_NAME, "--cpu-quota", "50", "--cpu-period-us",
        str(config.CPU_PERIOD_US), "--memory-max", config.MEMORY_MAX, "--meta", "c.json", "--", "gen", "-x"]
    assert runner.wrap(["gen"], True, name="n", quota=12.5, period_us=5000, memory_max="1G", python="py",
                       root=False) == ["py", lib, "run", "--name", "n", "--cpu-quota", "12.5", "--cpu-period-us",
                                       "5000", "--memory-max", "1G", "--", "gen"]
    assert runner.wrap(["gen"], "baseline", root=True)[3:] == ["--name", config.CGROUP_NAME, "--unlimited", "--",
                                                               "gen"]
    assert runner.wrap(["gen"], False, meta="c.json", root=False) == ["gen"]


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unknown option '--bogus' (see --help)"),
    (["--seed"], "--seed needs a value"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got '-1'"),
    (["--cpu-quota", "0.0"], "--cpu-quota must be a number > 0, got '0.0'"),
    (["--cpu-period-us", "999"], "--cpu-period-us must be within 1000..1000000, got '999'"),
    (["--memory-max", "4X"], "--memory-max must be a size > 0 such as 4G, 512M or max, got '4X'"),
    (["--port", "70000"], "--port must be within 1..65535, got '70000'"),
    (["--mode", "x"], "--mode must be in-process or service, got 'x'"),
    (["--cells", "a:0"], "--cells takes config:level items, got 'a:0'"),
    (["--configs", "", "--cells", ""], "--configs and --cells are both empty"),
    (["--force", "--resume"], "--force and --resume exclude each other")])
def test_bad_options(argv, message):
    with pytest.raises(runner.Die, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        runner.parse(argv, "baseline")


def test_quick_defaults_and_explicit_values():
    o = runner.parse(["--quick", "--concurrency", "3"], "psi")
    assert (o["config_list"], o["levels"], o["num_requests"], o["max_new_tokens"]) == (["psi"], ["3"], "4", "8")
    assert runner.parse(["-h"], "psi") is None


def test_engine_is_each_labels_own_unless_given():
    """Without --engine a cell runs its label's preset engine (generate for the paper's three)."""
    for argv, want in (([], []), (["--engine", "loop"], ["--engine", "loop"])):
        o = runner.parse(argv, "cgroups")
        sweep = runner.Sweep("run_experiments.sh", o, "request_generator.py", {"cgroups": True})
        cmd = sweep.commands(1, "cgroups", "1", 0)[0]
        got = [cmd[i:i + 2] for i in range(len(cmd)) if cmd[i] == "--engine"]
        assert got == ([want] if want else [])


# ---- the exec wrapper ----------------------------------------------------------------------------------

def test_spawn_joins_every_dir_before_the_command_runs(tmp_path):
    """On fake cgroup dirs (plain files): the PID written to each cgroup.procs is the command's own, and the
    file is written before spawn() returns."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
        (d / "cgroup.procs").write_text("")
    proc = cgroups.spawn([str(d) for d in dirs], [sys.executable, "-c", "import os; print(os.getpid())"],
                         stdout=subprocess.PIPE, text=True)
    assert all((d / "cgroup.procs").read_text() == str(proc.pid) for d in dirs)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == str(proc.pid) and proc.returncode == 0


def test_spawn_failures_raise_and_start_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        cgroups.spawn([], ["no-such-program-xyz"])
    with pytest.raises(OSError, match="cannot join cgroup"):
        cgroups.spawn([str(tmp_path / "missing")], ["true"])
    marker = tmp_path / "ran"
    with pytest.raises(OSError):
        cgroups.spawn([str(tmp_path / "missing")], ["touch", str(marker)])
    assert not marker.exists()


def test_enter_exits_when_its_parent_is_not_the_one_named(tmp_path):
    (tmp_path / "cgroup.procs").write_text("")
    argv = cgroups.place([str(tmp_path)], ["touch", str(tmp_path / "ran")])
    argv[argv.index("--parent") + 1] = "1"          # as if the parent had died before the wrapper ran
    assert subprocess.run(argv, timeout=30).returncode == 1
    assert not (tmp_path / "ran").exists() and (tmp_path / "cgroup.procs").read_text() == ""


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_enter_death_signal_follows_its_parent():
    """The wrapped command dies with the process that started it (PR_SET_PDEATHSIG survives the exec)."""
    code = ("import time\nfrom llm_psi import cgroups\n"
            "print(cgroups.spawn([], ['sleep', '60'], process_group=0).pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(200):
        if _gone(child):
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        pytest.fail("the wrapped command outlived its parent")
