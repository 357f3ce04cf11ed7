#!/usr/bin/env bash
# cgroups + PSI admission gate sweep (the paper's configuration 3): same limits, --config psi.
#   sudo bash run_psi_experiments.sh            # paper defaults: c = 1 2 4 8, 20 requests, 50 tokens
#   sudo bash run_psi_experiments.sh --quick    # smoke run; --help for all options
set -euo pipefail
# shellcheck source=llm_psi/load/sweep_lib.sh disable=SC1091  # sweep_lib.sh is checked on its own too
source "$(dirname "${BASH_SOURCE[0]}")/llm_psi/load/sweep_lib.sh"
sweep_main "$(basename "$0")" "psi" "$@"
