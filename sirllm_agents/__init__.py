"""sirllm-agents: a local-LLM chat session whose KV cache lives across agent steps, bounded by SirLLM eviction."""

from .async_stream import AsyncReplyStream
from .config import SessionConfig
from .engine import Engine
from .generation import GenerationConfig
from .loading import ModelLoadError
from .memory import Memory, MemoryToken, TurnMemory
from .model import Model
from .persistence import SessionFileError
from .policies import ContextOverflowError, FullPolicy, Policy, SirLLMPolicy, StreamingPolicy
from .replies import Reply, ReplyStream, TextDelta, ToolCallDelta
from .runners.rope import UnsupportedModelError
from .scheduler import EngineBusyError
from .session import Session
from .stats import SessionStats, TurnStats
from .store import (
    DirectoryStore,
    SessionBusyError,
    SessionStore,
    SessionStoreUnavailable,
    SharedDirectoryStore,
    open_store,
)
from .tools import ToolCall

__all__ = [
    "AsyncReplyStream",
    "ContextOverflowError",
    "DirectoryStore",
    "Engine",
    "EngineBusyError",
    "FullPolicy",
    "GenerationConfig",
    "Memory",
    "MemoryToken",
    "Model",
    "ModelLoadError",
    "Policy",
    "Reply",
    "ReplyStream",
    "Session",
    "SessionBusyError",
    "SessionConfig",
    "SessionFileError",
    "SessionStats",
    "SessionStore",
    "SessionStoreUnavailable",
    "SharedDirectoryStore",
    "SirLLMPolicy",
    "StreamingPolicy",
    "TextDelta",
    "ToolCall",
    "ToolCallDelta",
    "TurnMemory",
    "TurnStats",
    "UnsupportedModelError",
    "open_store",
]
