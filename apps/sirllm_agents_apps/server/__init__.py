"""An OpenAI-compatible HTTP server on an :class:`~sirllm_agents.Engine` (``sirllm-agents serve``; needs the
``serve`` extra: ``pip install "sirllm-agents-apps[serve]"``)."""

from .app import ServerSettings, create_app
from .errors import APIError

__all__ = ["APIError", "ServerSettings", "create_app"]
