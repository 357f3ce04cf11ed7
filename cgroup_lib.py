#!/usr/bin/env python3
"""The cgroup CLI that the sweeps call: detect, run a command in a fresh cgroup, cleanup.

A door into `llm_psi.cgroups.command`; `python cgroup_lib.py --help` lists every option."""
import sys

from llm_psi.cgroups.command import main

if __name__ == "__main__":
    sys.exit(main())
