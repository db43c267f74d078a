#!/usr/bin/env bash
# The main job: set up the environment, report what runs on this machine, and time the batched
# SPD solve of every available backend against torch.linalg.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash python/tools/bootstrap.sh
venv="${MBF_VENV:-.venv}"
"$venv/bin/mbf" info
"$venv/bin/mbf" demo "$@"
