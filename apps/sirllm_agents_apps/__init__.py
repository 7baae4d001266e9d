"""sirllm-agents-apps: the applications built on the sirllm-agents library: the ``sirllm-agents`` command (``demo``,
``chat``, ``inspect``, ``bench``), the memory views and the benchmarks."""
