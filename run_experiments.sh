#!/usr/bin/env bash
# Baseline and cgroups-only sweeps (the paper's configurations 1 and 2).
#   sudo bash run_experiments.sh            # paper defaults: c = 1 2 4 8, 20 requests, 50 tokens
#   sudo bash run_experiments.sh --quick    # smoke run; --help for all options
# The sweep itself is llm_psi/load/runner.py; this door picks the interpreter and hands over (exec: the
# signals reach the runner, which stops the running trial and removes its cgroup). run_psi_experiments.sh
# comes through here with SWEEP_SCRIPT (its name, for messages) and SWEEP_DEFAULT_CONFIGS set.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=${SWEEP_SCRIPT:-$(basename "$0")}
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
exec "$py" -m llm_psi.load.runner --script "$script" --default-configs "${SWEEP_DEFAULT_CONFIGS:-baseline cgroups}" "$@"
