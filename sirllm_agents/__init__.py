"""sirllm-agents: a local-LLM chat session whose KV cache lives across agent steps, bounded by SirLLM eviction."""

from .engine import SESSION_SETTINGS, Engine
from .generation import GenerationConfig
from .loading import ModelLoadError
from .memory import Memory, MemoryToken, TurnMemory
from .persistence import SessionFileError
from .policies import ContextOverflowError, FullPolicy, Policy, SirLLMPolicy, StreamingPolicy
from .rope import UnsupportedModelError
from .session import Reply, ReplyStream, Session, SessionStats, TurnStats

__all__ = [
    "SESSION_SETTINGS",
    "ContextOverflowError",
    "Engine",
    "FullPolicy",
    "GenerationConfig",
    "Memory",
    "MemoryToken",
    "ModelLoadError",
    "Policy",
    "Reply",
    "ReplyStream",
    "Session",
    "SessionFileError",
    "SessionStats",
    "SirLLMPolicy",
    "StreamingPolicy",
    "TurnMemory",
    "TurnStats",
    "UnsupportedModelError",
]
