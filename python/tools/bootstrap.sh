#!/usr/bin/env bash
# Create (or refresh) the virtual environment .venv and install mbf-kernels into it, editable,
# with its test extras, compiled against torch 2.13.0 (CPU build) under constraints.txt.
# Idempotent: a second run reuses the environment and rebuilds only what changed.
#
#   MBF_VENV=path   where the environment lives (default: .venv in the repository root)
#   PYTHON=python3  the interpreter that creates it
# Build switches for the extension (MBF_NO_EXTENSION, MBF_CUDA, ...) are documented in setup.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

venv="${MBF_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# Build tools and torch first: the extension compiles against the torch installed here, so the
# package itself is installed without build isolation (an isolated build would fetch its own,
# multi-GB CUDA torch).
"${pip[@]}" install -c constraints.txt setuptools wheel ninja torch
command -v cmake >/dev/null 2>&1 || "${pip[@]}" install "cmake>=3.25"
start=$(date +%s)
"${pip[@]}" install -c constraints.txt --no-build-isolation -e ".[test,bench]"
echo "bootstrap: mbf-kernels installed in $venv (build and install took $(( $(date +%s) - start )) s)"
