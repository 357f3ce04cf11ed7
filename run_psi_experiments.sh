#!/usr/bin/env bash
# cgroups + PSI admission gate sweep (the paper's configuration 3): same limits, --config psi.
#   sudo bash run_psi_experiments.sh            # paper defaults: c = 1 2 4 8, 20 requests, 50 tokens
#   sudo bash run_psi_experiments.sh --quick    # smoke run; --help for all options
# The same door as run_experiments.sh, with the psi configuration as its default.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SWEEP_SCRIPT=$(basename "$0") SWEEP_DEFAULT_CONFIGS=psi exec bash "$here/run_experiments.sh" "$@"
