#!/usr/bin/env bash
# The main job: set up the environment, report what runs here, train MBF (its shipped defaults,
# the paper's update, and MBF-True) against SGD, AdamW, SOAP and Shampoo, every optimizer at its
# defaults for the same epochs, on two tasks that separate optimizers: the paper's ReLU
# autoencoder on the bundled digits, and a BatchNorm CNN with weight decay on the generated 32x32
# shapes (judged on test accuracy); then benchmark the block solves of every backend against
# torch.linalg. Outputs land in out/.
# Extra arguments go to both `mbf train` calls (e.g. --seeds 0,1,2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash python/tools/bootstrap.sh
venv="${MBF_VENV:-.venv}"
"$venv/bin/mbf" info
"$venv/bin/mbf" train --dataset digits --models relu_autoencoder --epochs 20 \
    --seeds 0,1 --out out/train/relu_autoencoder "$@"
"$venv/bin/mbf" train --dataset shapes --models small_cnn --epochs 6 --weight-decay 0.01 \
    --seeds 0,1 --out out/train/shapes "$@"
"$venv/bin/mbf" bench --quick --out out/bench
