#!/usr/bin/env bash
# The main job: set up the environment, report what runs here, train MBF against SGD, AdamW
# and SOAP on the bundled digits data (a small CNN and a deep autoencoder; every optimizer's
# lr from the same 5-point sweep, then the same 10 s of training each), and benchmark the
# block solves of every backend against torch.linalg. Outputs land in out/.
# Extra arguments go to `mbf train` (e.g. --budget-seconds 30).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash python/tools/bootstrap.sh
venv="${MBF_VENV:-.venv}"
"$venv/bin/mbf" info
"$venv/bin/mbf" train --tune --tune-epochs 5 --epochs 1000 --budget-seconds 10 --out out/train "$@"
"$venv/bin/mbf" bench --quick --out out/bench
