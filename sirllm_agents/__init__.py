"""sirllm-agents: a local-LLM chat session whose KV cache lives across agent steps, bounded by SirLLM eviction."""

from .engine import Engine
from .generation import GenerationConfig
from .loading import ModelLoadError
from .policies import ContextOverflowError, FullPolicy, Policy, SirLLMPolicy, StreamingPolicy
from .rope import UnsupportedModelError
from .session import Reply, ReplyStream, Session, SessionStats, TurnStats

__all__ = [
    "ContextOverflowError",
    "Engine",
    "FullPolicy",
    "GenerationConfig",
    "ModelLoadError",
    "Policy",
    "Reply",
    "ReplyStream",
    "Session",
    "SessionStats",
    "SirLLMPolicy",
    "StreamingPolicy",
    "TurnStats",
    "UnsupportedModelError",
]
