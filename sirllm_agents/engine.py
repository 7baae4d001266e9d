"""The Engine: one loaded model, its tokenizer and chat template, shared by any number of sessions."""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel

from . import loading
from .policies import Policy, make_policy
from .rope import KeyRotator
from .session import Session
from .transcript import ChatTemplate

DEFAULT_CACHE_SIZE = 1024
MIN_FREE_SLOTS = 16  # room a cache keeps beyond sinks and protected recent tokens, so prefill can make progress


class Engine:
    """A local causal LM ready to serve stateful chat sessions.

    ``Engine()`` loads the embedded SmolLM2-135M-Instruct (offline); ``Engine(model=...)`` takes a local folder, a hub
    id, a ``.gguf`` file, or an already loaded ``PreTrainedModel`` together with ``tokenizer=``.
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | None = None,
        *,
        tokenizer=None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
    ):
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if isinstance(model, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("an already loaded model needs its tokenizer: Engine(model, tokenizer=...)")
            self.model, self.tokenizer = model.eval(), tokenizer
            self.model_name = model.config.name_or_path or model.config.model_type
        else:
            self.model, self.tokenizer, self.model_name = loading.load(
                model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
            )
        if getattr(self.tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"{self.model_name}: sirllm-agents needs a fast (tokenizers) tokenizer")
        self.template = ChatTemplate(self.tokenizer, chat_template)
        self.rotator = KeyRotator.from_model(self.model)
        self.device = self.model.device
        config = self.model.config.get_text_config(decoder=True)
        self.max_length: int = config.max_position_embeddings
        self.stop_token_ids: frozenset[int] = self._stop_token_ids()

    def session(
        self,
        cache_size: int | None = None,
        start_size: int = 4,
        recent_size: int = 0,
        decay: float = 1.0,
        policy: str | Policy = "sirllm",
        prefill_chunk: int = 512,
    ) -> Session:
        """A new conversation with a KV cache of at most ``cache_size`` tokens.

        ``policy`` chooses who stays when the cache is full: ``"sirllm"`` (sinks + highest token entropy),
        ``"streaming"`` (sinks + newest) or ``"full"`` (never evict; ``cache_size`` defaults to the model's maximum
        length). ``decay`` multiplies every stored score after each turn so old key tokens can fade.
        """
        if isinstance(policy, str):
            for name, value in (("start_size", start_size), ("recent_size", recent_size)):
                if not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            policy = make_policy(policy, start_size, recent_size)
        if cache_size is None:
            cache_size = self.max_length if policy.name == "full" else min(DEFAULT_CACHE_SIZE, self.max_length)
        reserved = policy.start_size + policy.recent_size
        if not isinstance(cache_size, int) or cache_size < reserved + MIN_FREE_SLOTS:
            raise ValueError(
                f"cache_size must be at least start_size + recent_size + {MIN_FREE_SLOTS} = "
                f"{reserved + MIN_FREE_SLOTS}, got {cache_size!r}"
            )
        if cache_size > self.max_length:
            raise ValueError(
                f"cache_size {cache_size} is larger than the model's maximum length {self.max_length}; cache positions "
                "past it were never trained"
            )
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if not isinstance(prefill_chunk, int) or prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        return Session(self, cache_size=cache_size, policy=policy, decay=decay, prefill_chunk=prefill_chunk)

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered chat text (its special tokens are already written in it)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _stop_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is not None:
                ids.update(source if isinstance(source, list) else [source])
        return frozenset(ids)
