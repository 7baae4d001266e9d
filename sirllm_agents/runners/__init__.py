"""Model runners: the forward pass and the KV cache of one conversation, behind one interface per backend."""

from .base import Backend, ModelRunner

__all__ = ["Backend", "ModelRunner"]
