"""Exec wrapper that puts a process into cgroups, safe to start from a threaded parent (no preexec_fn):

  python llm_psi/cgroups/enter.py --parent PID DIR [DIR...] -- CMD...

It asks for SIGKILL when its parent dies (PR_SET_PDEATHSIG, which survives the exec), exits at once if its
parent PID is no longer PID (the parent died before the request took hold), writes its own PID to each
DIR/cgroup.procs, then execs CMD, which so runs in the cgroups from its first instruction, with the same PID.
cell.place(dirs, cmd) builds this argv. Standard library only: it runs by its path, without the package on
sys.path. A failure is one line on stderr and exit status 127 (CMD not started).
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _fail(msg):
    print(f"enter: error: {msg}", file=sys.stderr, flush=True)
    os._exit(127)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[0] != "--parent" or "--" not in argv[2:]:
        _fail("usage: enter.py --parent PID DIR... -- CMD...")
    split = argv.index("--", 2)
    parent, dirs, cmd = argv[1], argv[2:split], argv[split + 1:]
    if not cmd:
        _fail("no command given after --")
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL)) != 0:
        _fail(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if str(os.getppid()) != parent:
        os._exit(1)                       # the parent is gone: nothing to run for
    for d in dirs:
        try:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            _fail(f"cannot join cgroup {d}: {e.strerror or e}")
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        _fail(f"cannot start {cmd[0]}: {e.strerror or e}")


if __name__ == "__main__":
    main()
