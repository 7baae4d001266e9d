"""The llama.cpp backend: a GGUF file run by llama.cpp (through ``llama-cpp-python``'s low-level API), one llama.cpp
context per conversation.

Eviction removes the evicted ranges of the sequence (``llama_memory_seq_rm``) and shifts each kept range down to its
new cache indices (``llama_memory_seq_add``); llama.cpp re-rotates the shifted keys itself before the next decode.
Token entropies need the logits of every ingested token, so every token of a batch asks for its output; batches are
cut to ``batch_size`` tokens so the output buffer stays at ``batch_size`` x vocabulary floats.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as llama
import numpy as np
import torch

if logging.getLogger("llama-cpp-python").level == logging.NOTSET:
    # llama-cpp-python prints every llama.cpp log line unless its logger says otherwise; keep errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

BATCH_SIZE = 64  # tokens per llama_decode call: their logits are kept, so this bounds the output buffer
SEQUENCE = 0  # each context holds one conversation


class LlamaCppError(RuntimeError):
    """llama.cpp refused an operation (the message says which, and what to do)."""


class LlamaCppBackend:
    """A GGUF model loaded once by llama.cpp, serving any number of :class:`LlamaCppRunner`."""

    name = "llamacpp"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, batch_size: int = BATCH_SIZE):
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.batch_size = batch_size
        llama.llama_backend_init()
        params = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {self.path}: is it a GGUF file of a supported model?")
        weakref.finalize(self, llama.llama_model_free, self.model)
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.vocab_size: int = llama.llama_vocab_n_tokens(self.vocab)
        self.max_length: int = llama.llama_model_n_ctx_train(self.model)
        self._identity: dict[str, Any] | None = None

    def new_runner(self, capacity: int) -> LlamaCppRunner:
        return LlamaCppRunner(self, capacity)

    def eos_token_ids(self) -> set[int]:
        """The end-of-generation tokens the GGUF names (end of sequence, end of turn)."""
        ids = {llama.llama_vocab_eos(self.vocab), llama.llama_vocab_eot(self.vocab)}
        return {i for i in ids if i >= 0}

    def identity(self) -> dict[str, Any]:
        """The file's architecture, size and a fingerprint of its bytes (its first and last MiB), computed once."""
        if self._identity is None:
            digest = hashlib.sha256()
            size = self.path.stat().st_size
            with open(self.path, "rb") as file:
                digest.update(file.read(2**20))
                file.seek(max(0, size - 2**20))
                digest.update(file.read())
            description = ctypes.create_string_buffer(256)
            llama.llama_model_desc(self.model, description, len(description))
            self._identity = {
                "backend": self.name,
                "model_type": description.value.decode(errors="replace"),
                "layers": llama.llama_model_n_layer(self.model),
                "dtype": "gguf",
                "weights": f"{size}:{digest.hexdigest()}",
            }
        return self._identity


class LlamaCppRunner:
    """One conversation in its own llama.cpp context of ``capacity`` cells (see
    :class:`~sirllm_agents.runners.ModelRunner`)."""

    def __init__(self, backend: LlamaCppBackend, capacity: int):
        self.backend = backend
        self.capacity = capacity
        params = llama.llama_context_default_params()
        params.n_ctx = capacity
        params.n_batch = params.n_ubatch = backend.batch_size
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = backend.threads
        params.no_perf = True
        # As llama-cpp-python's Llama class runs by default, so replies match the llama.cpp a user knows, bit for bit
        # (the field's name depends on the version).
        if hasattr(params, "flash_attn_type"):
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        else:
            params.flash_attn = False
        self.context = llama.llama_init_from_model(backend.model, params)
        if not self.context:
            raise LlamaCppError(f"llama.cpp could not make a context of {capacity} tokens (out of memory?)")
        self.memory = llama.llama_get_memory(self.context)
        if not llama.llama_memory_can_shift(self.memory):
            llama.llama_free(self.context)
            raise LlamaCppError(
                f"{backend.path.name}: llama.cpp cannot shift this model's cache positions, so it cannot evict; "
                "use backend='torch'"
            )
        self.batch = llama.llama_batch_init(backend.batch_size, 0, 1)
        weakref.finalize(self, _free, self.context, self.batch)
        self.length = 0  # tokens cached; a decode broken midway can leave more in the context, until `truncate`
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def ingest(self, ids: Sequence[int]) -> torch.Tensor:
        ids = [int(i) for i in ids]
        if self.length + len(ids) > self.capacity:
            raise LlamaCppError(f"cannot cache {len(ids)} more tokens: {self.length} of {self.capacity} held")
        scores = np.empty(len(ids), dtype=np.float32)
        last = None if self.logits is None else self.logits.numpy()
        done = 0
        while done < len(ids):
            chunk = np.array(ids[done : done + self.backend.batch_size])
            rows = self._decode(chunk.tolist(), self.length + done)
            scores[done] = np.inf if last is None else _surprisal(last[None], chunk[:1])[0]
            scores[done + 1 : done + len(chunk)] = _surprisal(rows[:-1], chunk[1:])
            last = rows[-1].copy()
            done += len(chunk)
        self.length += len(ids)
        self.logits = torch.from_numpy(last)
        return torch.from_numpy(scores)

    def _decode(self, chunk: list[int], start: int) -> np.ndarray:
        """Evaluate ``chunk`` at cache indices ``start``...; returns a view of its logits rows (valid until the next
        decode)."""
        batch = self.batch
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = SEQUENCE
            batch.logits[i] = True
        status = llama.llama_decode(self.context, batch)
        if status != 0:
            raise LlamaCppError(f"llama_decode failed with status {status} at cache index {start}")
        return np.ctypeslib.as_array(llama.llama_get_logits(self.context), shape=(len(chunk), self.backend.vocab_size))

    def retain(self, keep: torch.Tensor) -> None:
        keep = keep.tolist()
        # Remove the gaps between kept indices, then shift each run of consecutive kept indices down to its new
        # indices, oldest first (a run never lands on cells another run still holds). The calls take microseconds;
        # unlike the PyTorch runner's swap, an interrupt between two of them would leave the sequence half moved.
        start = 0
        for index in keep + [self.length]:
            if index > start:
                self._remove(start, index)
            start = index + 1
        begin = 0
        while begin < len(keep):
            end = begin
            while end + 1 < len(keep) and keep[end + 1] == keep[end] + 1:
                end += 1
            if keep[begin] != begin:
                llama.llama_memory_seq_add(self.memory, SEQUENCE, keep[begin], keep[end] + 1, begin - keep[begin])
            begin = end + 1
        self.length = len(keep)

    def _remove(self, start: int, stop: int) -> None:
        if not llama.llama_memory_seq_rm(self.memory, SEQUENCE, start, stop):
            raise LlamaCppError(f"llama.cpp could not remove cache indices {start}-{stop}")

    def truncate(self, length: int) -> None:
        self._remove(length, -1)
        self.length = length
        self.logits = None

    def copy(self) -> LlamaCppRunner:
        twin = LlamaCppRunner(self.backend, self.capacity)
        twin.load_state({name: tensor.clone() for name, tensor in self.state().items()})
        return twin

    def state(self) -> dict[str, torch.Tensor]:
        size = llama.llama_state_seq_get_size(self.context, SEQUENCE)
        data = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data(self.context, data, size, SEQUENCE)
        tensors = {
            "llamacpp.sequence": torch.frombuffer(bytearray(data[:written]), dtype=torch.uint8),
            "llamacpp.length": torch.tensor([self.length]),
        }
        if self.logits is not None:
            tensors["logits"] = self.logits
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "llamacpp.sequence" not in tensors:
            raise LlamaCppError("this state was not saved by the llama.cpp backend; load it with backend='torch'")
        llama.llama_memory_clear(self.memory, True)
        blob = tensors["llamacpp.sequence"].contiguous().numpy()
        data = (ctypes.c_uint8 * blob.size).from_buffer_copy(blob.tobytes())
        if blob.size and llama.llama_state_seq_set_data(self.context, data, blob.size, SEQUENCE) == 0:
            raise LlamaCppError("llama.cpp refused the saved sequence state (another model, or too large a cache)")
        self.length = int(tensors["llamacpp.length"][0])
        self.logits = tensors["logits"].float().clone() if "logits" in tensors else None


def _free(context, batch) -> None:
    llama.llama_batch_free(batch)
    llama.llama_free(context)


def _surprisal(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``-log softmax(logits)[target]`` per row, in NumPy: torch's multithreaded kernels on one row of logits wait on
    threads that llama.cpp's own are holding (measured: 30 ms against 0.08 ms for one 49k-token row)."""
    peak = logits.max(axis=1)
    log_total = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
    return log_total - logits[np.arange(len(targets)), targets]
