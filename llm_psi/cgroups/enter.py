"""Exec wrapper that puts a process into cgroups, safe to start from a threaded parent (no preexec_fn):

  python llm_psi/cgroups/enter.py --parent PID [--ready FD] DIR [DIR...] -- CMD...

It asks for SIGKILL when its parent dies (PR_SET_PDEATHSIG, which survives the exec), exits at once if its
parent PID is no longer PID (the parent died before the request took hold), writes its own PID to each
DIR/cgroup.procs, then execs CMD, which so runs in the cgroups from its first instruction, with the same PID.
With --ready FD (a pipe's write end), FD is closed by the exec of CMD, so that the parent, reading the pipe
to its end, knows that CMD runs in the cgroups; a failure is written to FD as "ERRNO MESSAGE" (and, without
--ready, to stderr as one line), and exits with status 127, CMD not started. cell.place(dirs, cmd) builds
this argv and cell.spawn() runs it. Standard library only: it runs by its path, without the package on
sys.path.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


READY = None                              # the --ready pipe, if any


def _fail(msg, err=0):
    if READY is not None:
        os.write(READY, f"{err} {msg}".encode())
    else:
        print(f"enter: error: {msg}", file=sys.stderr, flush=True)
    os._exit(127)


def main(argv=None):
    global READY
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[0] != "--parent" or "--" not in argv[2:]:
        _fail("usage: enter.py --parent PID [--ready FD] DIR... -- CMD...")
    parent, argv = argv[1], argv[2:]
    if argv[0] == "--ready":
        READY, argv = int(argv[1]), argv[2:]
        os.set_inheritable(READY, False)      # closed by the exec of CMD: the parent then reads its end
    split = argv.index("--")
    dirs, cmd = argv[:split], argv[split + 1:]
    if not cmd:
        _fail("no command given after --")
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL)) != 0:
        err = ctypes.get_errno()
        _fail(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}", err)
    if str(os.getppid()) != parent:
        os._exit(1)                       # the parent is gone: nothing to run for
    for d in dirs:
        try:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            _fail(f"cannot join cgroup {d}: {e.strerror or e}", e.errno or 0)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        _fail(f"{e.strerror or e}: {cmd[0]!r}", e.errno or 0)


if __name__ == "__main__":
    main()
