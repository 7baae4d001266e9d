"""Benchmarks: the SirLLM paper's three memory tasks under each cache policy, and the agent loop against the tools
local-agent users pick today. Run them with ``sirllm-agents bench TASK``;
see ``apps/sirllm_agents_apps/bench/README.md``."""
