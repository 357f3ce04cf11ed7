#!/usr/bin/env bash
# cgroups + PSI admission gate sweep (the paper's configuration 3): same limits, --config psi.
#   sudo bash run_psi_experiments.sh            # paper defaults: c = 1 2 4 8, 20 requests, 50 tokens
#   sudo bash run_psi_experiments.sh --quick    # smoke run; --help for all options
# The sweep itself is llm_psi/load/runner.py; this door picks the interpreter and hands over (exec: the
# signals reach the runner, which stops the running trial and removes its cgroup).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=$(basename "$0")
if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON source="\$PYTHON"
elif [[ -x $here/.venv/bin/python ]]; then
    py=$here/.venv/bin/python source="the .venv beside $script"
else
    py=python3 source="python3 on PATH"
fi
if ! command -v "$py" >/dev/null; then
    echo "$script: error: Python interpreter '$py' not found (set PYTHON=/path/to/python)" >&2
    exit 2
fi
echo "python: $py ($source)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m llm_psi.load.runner --script "$script" --default-configs "psi" "$@"
