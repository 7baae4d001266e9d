"""The model layer: one loaded model (weights behind a backend, tokenizer, chat template) and what is worked out
once for it. Everything above (sessions, the pool) shares one :class:`Model`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedModel

from . import loading
from .runners import Backend, ModelRunner
from .runners.torch import TorchBackend
from .scheduler import DEFAULT_PARALLEL, Scheduler
from .token_shapes import TokenShapes
from .transcript import ChatTemplate


class Model:
    """A loaded model ready to serve sessions.

    ``Model.load()`` loads the embedded SmolLM2-135M-Instruct (offline); ``Model.load(model=...)`` takes a local
    folder, a hub id, a ``.gguf`` file, or an already loaded ``PreTrainedModel`` together with ``tokenizer=``.
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer,
        name: str,
        chat_template: str | None = None,
        parallel: int = DEFAULT_PARALLEL,
        batch: bool | None = None,
    ):
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"{name}: sirllm-agents needs a fast (tokenizers) tokenizer")
        self.backend = backend
        self.tokenizer = tokenizer
        self.name = name
        self.template = ChatTemplate(tokenizer, chat_template)
        self.max_length: int = backend.max_length
        eos = backend.eos_token_ids() | {tokenizer.eos_token_id}
        self.stop_token_ids: frozenset[int] = frozenset(i for i in eos if i is not None)
        self.token_shapes = TokenShapes.from_tokenizer(tokenizer, backend.vocab_size)
        # Every call of every session on this model is admitted by it (up to `parallel` at once), and with `batch`
        # (default: whenever the backend can) their forwards run together.
        batching = backend.can_batch if batch is None else batch
        self.scheduler = Scheduler(backend, max_running=parallel, batching=batching)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | PreTrainedModel | None = None,
        *,
        backend: str = "auto",
        tokenizer=None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        threads: int | None = None,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        parallel: int = DEFAULT_PARALLEL,
        batch: bool | None = None,
    ) -> Model:
        """Load ``model`` (see the class docstring) on ``backend``:

        * ``"torch"``: transformers weights on ``device`` in ``dtype`` (float32 by default);
        * ``"llamacpp"``: a GGUF file run by llama.cpp on the CPU with ``threads`` threads (default: torch's
          intra-op thread count), needing the ``llamacpp`` extra;
        * ``"auto"``: llama.cpp for a GGUF file (the embedded model is one) when ``llama-cpp-python`` is installed
          and neither a device other than the CPU nor a torch dtype is asked for, else torch.

        ``parallel``: how many requests run at once; more wait their turn (see :mod:`sirllm_agents.scheduler`).
        ``batch``: whether the forwards of the requests running at once go through the model together (on llama.cpp,
        ``parallel`` conversations then share one context) or each request runs its own, in its own thread (on
        llama.cpp, in a context of its own). ``None``: batched on torch, not on llama.cpp, where it is measured to
        lose on the embedded model's Q4_1 weights, which ggml's CPU backend multiplies one token at a time (see the
        benchmarks README; files in Q4_0 or Q8_0 gain from it).
        """
        backend = _chosen_backend(backend, model, device, dtype)
        if backend == "llamacpp":
            from .runners.llamacpp import LlamaCppBackend  # optional: imported only when asked for

            gguf = loading.gguf_file(model) if not isinstance(model, PreTrainedModel) else None
            if gguf is None:
                raise loading.ModelLoadError(
                    f"backend='llamacpp' runs GGUF files; {model!r} is not one (use backend='torch')"
                )
            if tokenizer is None:
                tokenizer = loading.gguf_tokenizer(gguf)
            backend = LlamaCppBackend(gguf, threads, sequences=parallel if batch else 1)
            return cls(backend, tokenizer, loading.model_name(model), chat_template, parallel)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
        if isinstance(model, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("an already loaded model needs its tokenizer: Engine(model, tokenizer=...)")
            weights, name = model, model.config.name_or_path or model.config.model_type
        else:
            weights, tokenizer, name = loading.load(
                model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
            )
        return cls(TorchBackend(weights), tokenizer, name, chat_template, parallel, batch)

    def new_runner(self, capacity: int) -> ModelRunner:
        """A runner for one conversation of at most ``capacity`` cached tokens."""
        return self.backend.new_runner(capacity)

    @property
    def device(self) -> torch.device:
        return getattr(self.backend, "device", torch.device("cpu"))

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered chat text (its special tokens are already written in it)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_marked(self, text: str, contents: Sequence[str]) -> tuple[list[int], list[bool]]:
        """Token ids of rendered chat text, and per token whether the chat template wrote it (role markers, ends of
        turn) rather than one of ``contents``, the messages' texts in the order rendered. When a content cannot be
        found verbatim (a template that rewrites it, a message that is only tool calls), no token is marked."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        ranges, cursor = [], 0
        for content in contents:
            start = text.find(content, cursor) if content else -1
            if start < 0:
                return ids, [False] * len(ids)
            ranges.append((start, start + len(content)))
            cursor = start + len(content)
        offsets = encoding["offset_mapping"]
        return ids, [not any(begin < stop and end > start for start, stop in ranges) for begin, end in offsets]

    @cached_property
    def identity(self) -> dict[str, Any]:
        """What a cached state is only valid for: the backend's identity of the weights, and the tokenizer and chat
        template (a session file records it; loading checks it)."""
        digest = hashlib.sha256(json.dumps(self.backend.identity(), sort_keys=True).encode())
        digest.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        digest.update(str(self.template.source).encode())
        return {**self.backend.identity(), "name": self.name, "fingerprint": digest.hexdigest()}

    @cached_property
    def grammar_tokenizer(self) -> llguidance.LLTokenizer:
        """The tokenizer as llguidance sees it, for grammar-constrained decoding (about a second for 49k tokens)."""
        vocab = max(len(self.tokenizer), self.backend.vocab_size)
        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=vocab, eos_token=sorted(self.stop_token_ids))


BACKENDS = ("auto", "torch", "llamacpp")


def _chosen_backend(backend: str, model, device, dtype) -> str:
    """The backend ``backend`` names, with ``"auto"`` resolved (see :meth:`Model.load`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    installed = importlib.util.find_spec("llama_cpp") is not None
    if backend == "llamacpp":
        if not installed:
            raise loading.ModelLoadError(
                "backend='llamacpp' needs llama-cpp-python: pip install 'sirllm-agents[llamacpp]' "
                "(it builds from source, about 8 minutes)"
            )
        if torch.device(device).type != "cpu" or dtype is not None:
            raise ValueError("the llama.cpp backend runs the GGUF's own weights on the CPU: drop device= and dtype=")
        return backend
    if backend == "auto":
        on_cpu = torch.device(device).type == "cpu" and dtype is None
        is_gguf = model is None or (isinstance(model, (str, os.PathLike)) and str(model).endswith(".gguf"))
        return "llamacpp" if installed and on_cpu and is_gguf else "torch"
    return backend
