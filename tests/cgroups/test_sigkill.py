"""A SIGKILLed `cgroup_lib.py run` loses nothing to orphans: its cell's process dies with it (PDEATHSIG),
and `cleanup` removes the cgroup it left from every hierarchy. Real cgroups only (root)."""
import pytest
import os
import random
import signal
import subprocess
import sys
import time

from conftest import ROOT, real_cgroups

from llm_psi import cgroups

LIB = os.path.join(ROOT, "cgroup_lib.py")
REAL = "/sys/fs/cgroup"
NAME = f"cgl_sigkill_{os.getpid()}"
# Writes its PID, then sleeps forever; in its own process group, it would outlive the driver without PDEATHSIG.
FOREVER = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\nwhile True:\n    time.sleep(0.05)\n"


def _gone(pid):
    """The process has exited (no /proc entry, or a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _left_dirs():
    """Directories named NAME at the top of any hierarchy under /sys/fs/cgroup (or its root on v2)."""
    tops = [REAL] + [os.path.join(REAL, h) for h in os.listdir(REAL)]
    return [os.path.join(t, NAME) for t in tops if os.path.isdir(os.path.join(t, NAME))]


@pytest.mark.slow
@real_cgroups
def test_sigkilled_driver_leaves_no_process_and_cleanup_leaves_no_cgroup(tmp_path):
    rng, had_child = random.Random(20240607), 0
    try:
        for i in range(10):
            pidfile = tmp_path / f"child{i}.pid"
            driver = subprocess.Popen([sys.executable, LIB, "run", "--name", NAME, "--cpu-quota", "50", "--",
                                       sys.executable, "-c", FOREVER, str(pidfile)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.2, 1.5))
            driver.send_signal(signal.SIGKILL)
            assert driver.wait(timeout=10) == -signal.SIGKILL
            child = int(pidfile.read_text()) if pidfile.exists() and pidfile.read_text() else None
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and (
                    (child and not _gone(child)) or any(cgroups.procs(d) for d in _left_dirs())):
                time.sleep(0.05)
            assert child is None or _gone(child), f"iteration {i}: the cell's process {child} outlived its driver"
            assert not [d for d in _left_dirs() if cgroups.procs(d)], f"iteration {i}: processes left"
            had_child += child is not None
            c = subprocess.run([sys.executable, LIB, "cleanup", "--name", NAME], capture_output=True,
                               text=True, timeout=30)
            assert c.returncode == 0, c.stderr
            assert not _left_dirs(), f"iteration {i}: cgroups left after cleanup"
        assert had_child, "the driver never got as far as starting its command"
    finally:
        if _left_dirs():
            cgroups.cleanup(NAME, root=REAL, log=print)
