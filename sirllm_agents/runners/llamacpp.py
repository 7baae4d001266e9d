"""The llama.cpp backend: a GGUF file run by llama.cpp (through ``llama-cpp-python``'s low-level API).

A conversation is one sequence id in a llama.cpp context shared by up to ``sequences`` conversations (the backend
places each new runner on a free sequence, making a context when none has one), whose tokens
:func:`decode_together` evaluates in the same ``llama_decode`` calls. A shared context gives each sequence a KV cache
stream of its own (llama.cpp's non-unified cache), so its cells lie as in a context of its own, its attention spans
its own cells only, and it decodes the same logits, bit for bit, as when alone. Every call into a context holds its
lock, so runners of one context may be used from several threads.

Eviction removes the evicted ranges of the sequence (``llama_memory_seq_rm``) and shifts each kept range down to its
new cache indices (``llama_memory_seq_add``); llama.cpp re-rotates the shifted keys itself before the next decode.
Both act on that sequence alone. Token entropies need the logits of every ingested token, so every token of a batch
asks for its output; batches are cut to ``batch_size`` tokens so the output buffer stays at ``batch_size`` x
vocabulary floats.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as llama
import numpy as np
import torch

from .base import batch_inputs

if logging.getLogger("llama-cpp-python").level == logging.NOTSET:
    # llama-cpp-python prints every llama.cpp log line unless its logger says otherwise; keep errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

BATCH_SIZE = 64  # tokens per llama_decode call: their logits are kept, so this bounds the output buffer

# What llama_decode's non-zero statuses mean (llama.h).
_DECODE_STATUS = {
    1: "no free KV cache cells for the batch",
    2: "aborted",
    -1: "invalid batch",
}


class LlamaCppError(RuntimeError):
    """llama.cpp refused an operation (the message says which, and what to do)."""


class LlamaCppBackend:
    """A GGUF model loaded once by llama.cpp, serving any number of :class:`LlamaCppRunner`, up to ``sequences`` of
    them in one context (so they can be decoded together; 1: a context per conversation)."""

    name = "llamacpp"

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, batch_size: int = BATCH_SIZE, sequences: int = 1
    ):
        if not isinstance(sequences, int) or sequences < 1:
            raise ValueError(f"sequences must be a positive integer, got {sequences!r}")
        self.path = Path(path)
        self.threads = threads or torch.get_num_threads()
        self.batch_size = batch_size
        self.step_tokens = batch_size  # a scheduler's step takes one llama_decode's worth of a long input
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
        self.sequences = sequences if sequences == 1 or _can_share(self) else 1
        self._contexts: list[weakref.ref[LlamaCppContext]] = []  # freed once their last runner is
        self._placing = threading.Lock()

    def new_runner(self, capacity: int) -> LlamaCppRunner:
        """A runner on a free sequence of a context with room for ``capacity`` tokens per sequence (a new context of
        ``sequences`` sequences when none has one)."""
        with self._placing:
            for ref in self._contexts:
                context = ref()
                if context is not None and context.capacity >= capacity and context.free_sequences:
                    return context.new_runner(capacity)
            context = LlamaCppContext(self, self.sequences, capacity)
            self._contexts = [ref for ref in self._contexts if ref() is not None] + [weakref.ref(context)]
            return context.new_runner(capacity)

    @property
    def can_batch(self) -> bool:
        """Runners share contexts, so a call can decode several."""
        return self.sequences > 1

    def batch_key(self, runner: LlamaCppRunner, tokens: int) -> LlamaCppContext:
        """Runners of one context decode together."""
        return runner.context

    def decode_together(self, runners: Sequence[LlamaCppRunner], tokens: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """:func:`decode_together`: the runners must share one context."""
        return decode_together(runners, tokens)

    def shared_context(self, sequences: int, capacity: int) -> LlamaCppContext:
        """One llama.cpp context for up to ``sequences`` conversations of at most ``capacity`` tokens each; its
        runners (``context.new_runner()``) can be decoded together with :func:`decode_together`."""
        return LlamaCppContext(self, sequences, capacity)

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


class LlamaCppContext:
    """A llama.cpp context holding up to ``sequences`` conversations, each a sequence id of at most ``capacity``
    tokens in a KV cache stream of its own. Like a llama.cpp context, not for two threads at once: whoever steps
    its runners (a scheduler) must be the only one calling into it."""

    def __init__(self, backend: LlamaCppBackend, sequences: int, capacity: int):
        if sequences < 1:
            raise ValueError(f"a llama.cpp context holds at least one sequence, not {sequences}")
        params = llama.llama_context_default_params()
        if sequences > 1 and not hasattr(params, "kv_unified"):
            raise LlamaCppError(
                "this llama-cpp-python has no per-sequence KV cache streams (kv_unified); shared contexts need 0.3.17 "
                "or later"
            )
        if sequences > 1 and not _can_share(backend):
            raise LlamaCppError(
                f"{backend.path.name}: shared contexts take models with one KV cache, and this one has sliding-window "
                "or recurrent layers; give each conversation a context of its own (new_runner with sequences=1)"
            )
        self.backend = backend
        self.sequences = sequences
        self.capacity = capacity
        params.n_ctx = sequences * capacity  # llama.cpp gives each stream a share, rounded up to 256 cells
        params.n_batch = params.n_ubatch = backend.batch_size
        params.n_seq_max = sequences
        if hasattr(params, "kv_unified"):
            params.kv_unified = False
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
            raise LlamaCppError(
                f"llama.cpp could not make a context of {sequences} x {capacity} tokens (out of memory?)"
            )
        self.memory = llama.llama_get_memory(self.context)
        if not llama.llama_memory_can_shift(self.memory):
            llama.llama_free(self.context)
            raise LlamaCppError(
                f"{backend.path.name}: llama.cpp cannot shift this model's cache positions, so it cannot evict; "
                "use backend='torch'"
            )
        self.batch = llama.llama_batch_init(backend.batch_size, 0, 1)
        weakref.finalize(self, _free, self.context, self.batch)
        self.free_sequences = list(range(sequences))
        self.state_header = self._state_header() if sequences > 1 else 0
        self.lock = threading.RLock()  # held by every call into the context

    def new_runner(self, capacity: int | None = None) -> LlamaCppRunner:
        """A runner on the lowest free sequence id, for at most ``capacity`` tokens (default: the context's)."""
        capacity = self.capacity if capacity is None else capacity
        if capacity > self.capacity:
            raise ValueError(f"a sequence of this context holds at most {self.capacity} tokens, not {capacity}")
        with self.lock:
            if not self.free_sequences:
                raise LlamaCppError(
                    f"all {self.sequences} sequences of this llama.cpp context are in use; drop a runner or make the "
                    "shared context with more sequences"
                )
            return LlamaCppRunner(self, capacity, self.free_sequences.pop(0))

    def release(self, sequence: int) -> None:
        """Empty ``sequence`` and make it free for a new runner (a runner's finalizer calls this)."""
        with self.lock:
            llama.llama_memory_seq_rm(self.memory, sequence, -1, -1)
            self.free_sequences.append(sequence)
            self.free_sequences.sort()

    def export_sequence(self, sequence: int) -> bytes:
        """``sequence``'s state as llama.cpp exports it from sequence 0 of a context of one KV stream, whatever this
        context and sequence are (so a session file does not depend on where it was saved from).

        After a header ending in the sequence id, llama.cpp writes the stream count, then per stream its cell count
        and, when not zero, its cells. A sequence's cells all lie in its own stream (stream ``sequence``), so every
        other stream is a bare zero count, which is dropped; each cell names its sequence, which becomes 0 (an import
        takes the sequence it is loaded into instead)."""
        with self.lock:
            size = llama.llama_state_seq_get_size(self.context, sequence)
            data = (ctypes.c_uint8 * size)()
            # string_at copies the bytes at C speed; slicing the ctypes array would build a list of ints first.
            blob = ctypes.string_at(data, llama.llama_state_seq_get_data(self.context, data, size, sequence))
        if self.sequences == 1:
            return blob
        start, end = self.state_header + 4 * (1 + sequence), len(blob) - 4 * (self.sequences - 1 - sequence)
        others = np.frombuffer(blob[self.state_header + 4 : start] + blob[end:], dtype=np.uint32)
        if _u32(blob, self.state_header) != self.sequences or others.any():
            raise LlamaCppError(
                f"llama.cpp exported sequence {sequence}'s state in a layout this version of sirllm-agents does not "
                "know; give the conversation a context of its own (new_runner)"
            )
        return _as_sequence_zero(
            blob[: self.state_header] + np.uint32(1).tobytes() + blob[start:end], self.state_header
        )

    def import_sequence(self, sequence: int, blob: bytes) -> None:
        """Load a state :meth:`export_sequence` gave (from this context or any other) into ``sequence``."""
        if self.sequences > 1:
            if _u32(blob, self.state_header) != 1:
                raise LlamaCppError("this sequence state holds several KV streams; it was not saved by sirllm-agents")
            zeros = bytes(4)
            blob = (
                blob[: self.state_header]
                + np.uint32(self.sequences).tobytes()
                + zeros * sequence
                + blob[self.state_header + 4 :]
                + zeros * (self.sequences - 1 - sequence)
            )
        data = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        with self.lock:
            loaded = llama.llama_state_seq_set_data(self.context, data, len(blob), sequence)
        if loaded == 0:
            raise LlamaCppError("llama.cpp refused the saved sequence state (another model, or too large a cache)")

    def _state_header(self) -> int:
        """Bytes llama.cpp writes before the stream count of a sequence's state (a magic number and the sequence id,
        in the llama.cpp of llama-cpp-python 0.3.36), read off the export of a sequence still empty: the stream count
        and one zero cell count per stream follow the header."""
        size = llama.llama_state_seq_get_size(self.context, 0)
        data = (ctypes.c_uint8 * size)()
        blob = ctypes.string_at(data, llama.llama_state_seq_get_data(self.context, data, size, 0))
        header = len(blob) - 4 * (1 + self.sequences)
        if header < 0 or _u32(blob, header) != self.sequences:
            raise LlamaCppError(
                "llama.cpp exports sequence states in a layout this version of sirllm-agents does not know, so a "
                "shared context could not save them; give each conversation a context of its own (new_runner)"
            )
        return header

    def remove(self, sequence: int, start: int, stop: int) -> None:
        """Drop cache indices ``start`` up to ``stop`` (-1: the end) of ``sequence``."""
        with self.lock:
            removed = llama.llama_memory_seq_rm(self.memory, sequence, start, stop)
        if not removed:
            raise LlamaCppError(f"llama.cpp could not remove cache indices {start}-{stop} of sequence {sequence}")

    def decode(self, tokens: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """Evaluate ``(sequence, cache index, token id)`` triples (at most ``batch_size``) in one ``llama_decode``;
        returns a view of their logits rows, in the same order (valid until the next decode)."""
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, (sequence, index, token) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = index
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = sequence
            batch.logits[i] = True
        status = llama.llama_decode(self.context, batch)
        if status != 0:
            sequences = sorted({sequence for sequence, _, _ in tokens})
            raise LlamaCppError(
                f"llama_decode failed with status {status} ({_DECODE_STATUS.get(status, 'fatal error')}) on a batch of "
                f"{len(tokens)} tokens of sequences {sequences}"
            )
        rows = llama.llama_get_logits(self.context)
        return np.ctypeslib.as_array(rows, shape=(len(tokens), self.backend.vocab_size))


class LlamaCppRunner:
    """One conversation: a sequence id of a :class:`LlamaCppContext`, holding at most ``capacity`` tokens (see
    :class:`~sirllm_agents.runners.ModelRunner`)."""

    def __init__(self, context: LlamaCppContext, capacity: int, sequence: int):
        self.backend = context.backend
        self.context = context  # the LlamaCppContext holding this runner's sequence
        self.capacity = capacity
        self.sequence = sequence
        self.memory = context.memory
        weakref.finalize(self, context.release, sequence)
        self.length = 0  # tokens cached; an interrupted rollback can leave more in the sequence, until `truncate`
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def ingest(self, ids: Sequence[int]) -> torch.Tensor:
        return decode_together([self], [ids])[0]

    def retain(self, keep: torch.Tensor) -> None:
        with self.context.lock:
            self._retain(keep.tolist())

    def _retain(self, keep: list[int]) -> None:
        # Remove the gaps between kept indices, then shift each run of consecutive kept indices down to its new
        # indices, oldest first (a run never lands on cells another run still holds). The calls take microseconds;
        # unlike the PyTorch runner's swap, an interrupt between two of them would leave the sequence half moved.
        start = 0
        for index in keep + [self.length]:
            if index > start:
                self.context.remove(self.sequence, start, index)
            start = index + 1
        begin = 0
        while begin < len(keep):
            end = begin
            while end + 1 < len(keep) and keep[end + 1] == keep[end] + 1:
                end += 1
            if keep[begin] != begin:
                llama.llama_memory_seq_add(self.memory, self.sequence, keep[begin], keep[end] + 1, begin - keep[begin])
            begin = end + 1
        self.length = len(keep)

    def truncate(self, length: int) -> None:
        self.context.remove(self.sequence, length, -1)
        self.length = length
        self.logits = None

    def copy(self) -> LlamaCppRunner:
        """An independent copy, on a free sequence of any context of the backend (see ``new_runner``)."""
        twin = self.backend.new_runner(self.capacity)
        twin.load_state({name: tensor.clone() for name, tensor in self.state().items()})
        return twin

    def state(self) -> dict[str, torch.Tensor]:
        blob = self.context.export_sequence(self.sequence)
        tensors = {
            "llamacpp.sequence": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
            "llamacpp.length": torch.tensor([self.length]),
        }
        if self.logits is not None:
            tensors["logits"] = self.logits
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "llamacpp.sequence" not in tensors:
            raise LlamaCppError("this state was not saved by the llama.cpp backend; load it with backend='torch'")
        length = int(tensors["llamacpp.length"][0])
        if length > self.capacity:
            raise LlamaCppError(f"the saved state holds {length} tokens, more than this runner's {self.capacity}")
        self.context.remove(self.sequence, -1, -1)
        self.length, self.logits = 0, None
        blob = tensors["llamacpp.sequence"].contiguous().numpy().tobytes()
        if blob:
            self.context.import_sequence(self.sequence, blob)
        self.length = length
        self.logits = tensors["logits"].float().clone() if "logits" in tensors else None


def decode_together(runners: Sequence[LlamaCppRunner], tokens: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Append ``tokens[i]`` to ``runners[i]``'s sequence for every ``i``, the runners (all of one context) evaluated
    together, and return each runner's surprisals, equal bit for bit to what :meth:`LlamaCppRunner.ingest` alone
    returns (and leaving the same logits). Decode steps of many conversations (one token each) take one
    ``llama_decode`` call; a runner's longer input is cut into ``batch_size`` chunks as ``ingest`` cuts it, and
    chunks of one length share calls.

    Every input is checked before anything is decoded: an error names the runner and leaves every sequence as it
    was. A failure during decoding (or an interrupt) removes what this call had added to every sequence, so no
    runner counts a token it did not finish."""
    ids = _checked_inputs(runners, tokens)
    if not runners:
        return []
    with runners[0].context.lock:
        return _decode_together(runners, ids)


def _decode_together(runners: Sequence[LlamaCppRunner], ids: list[list[int]]) -> list[torch.Tensor]:
    context = runners[0].context
    scores = [np.empty(len(chunk), dtype=np.float32) for chunk in ids]
    last = [None if runner.logits is None else runner.logits.numpy() for runner in runners]
    try:
        for call in _calls(runners, ids, context.backend.batch_size):
            triples = [
                (runners[r].sequence, runners[r].length + i, ids[r][i])
                for r, start, stop in call
                for i in range(start, stop)
            ]
            rows = context.decode(triples)
            offset = 0
            for r, start, stop in call:
                chunk = np.array(ids[r][start:stop])
                chunk_rows = rows[offset : offset + len(chunk)]
                before = last[r]
                scores[r][start] = np.inf if before is None else _surprisal(before[None], chunk[:1])[0]
                scores[r][start + 1 : stop] = _surprisal(chunk_rows[:-1], chunk[1:])
                last[r] = chunk_rows[-1].copy()
                offset += len(chunk)
    except BaseException:
        for runner in runners:
            runner.context.remove(runner.sequence, runner.length, -1)
        raise
    for runner, chunk, logits in zip(runners, ids, last):
        if chunk:
            runner.length += len(chunk)
            runner.logits = torch.from_numpy(logits)
    return [torch.from_numpy(chunk_scores) for chunk_scores in scores]


def _calls(
    runners: Sequence[LlamaCppRunner], ids: list[list[int]], batch_size: int
) -> list[list[tuple[int, int, int]]]:
    """The ``llama_decode`` calls that evaluate ``ids``, each a list of ``(runner index, start, stop)`` chunks.

    Round ``j`` holds every runner's ``j``-th chunk of ``batch_size`` tokens; a call holds chunks of one length only,
    in ascending sequence ids. llama.cpp splits a batch of several streams into parts of equal length per sequence,
    taking only consecutive sequence ids into one part, and a sequence's logits depend on the length of the part it
    was decoded in (measured on the embedded model: decoding a prompt token by token instead of in one chunk moves
    its logits by up to 0.6). Equal chunks make each part exactly the chunk ``ingest`` would decode."""
    order = sorted(range(len(runners)), key=lambda r: runners[r].sequence)
    rounds = max(-(-len(chunk) // batch_size) for chunk in ids)
    calls = []
    for j in range(rounds):
        by_length: dict[int, list[tuple[int, int, int]]] = {}
        for r in order:
            start, stop = j * batch_size, min(len(ids[r]), (j + 1) * batch_size)
            if start < stop:
                by_length.setdefault(stop - start, []).append((r, start, stop))
        for length, chunks in sorted(by_length.items()):
            per_call = batch_size // length
            calls.extend(chunks[k : k + per_call] for k in range(0, len(chunks), per_call))
    return calls


def _checked_inputs(runners: Sequence[LlamaCppRunner], tokens: Sequence[Sequence[int]]) -> list[list[int]]:
    names = [f"runner {n} (sequence {runner.sequence})" for n, runner in enumerate(runners)]
    if not runners:
        return batch_inputs(runners, tokens, 0, names)
    context = runners[0].context
    for runner, name in zip(runners, names):
        if runner.context is not context:
            raise ValueError(f"{name} is in another llama.cpp context than runner 0: only one context decodes at once")
    ids = batch_inputs(runners, tokens, context.backend.vocab_size, names)
    for runner, chunk, name in zip(runners, ids, names):
        if runner.length + len(chunk) > runner.capacity:
            raise LlamaCppError(
                f"{name}: cannot cache {len(chunk)} more tokens: {runner.length} of {runner.capacity} held"
            )
    return ids


def _can_share(backend: LlamaCppBackend) -> bool:
    """Whether contexts can hold several conversations: llama.cpp must have per-sequence KV streams, and the
    model's memory be one KV cache (sliding-window or recurrent layers add a second one, whose per-sequence states
    :meth:`LlamaCppContext.export_sequence` cannot take apart)."""
    streams = hasattr(llama.llama_context_default_params(), "kv_unified")
    return streams and not (llama.llama_model_n_swa(backend.model) > 0 or llama.llama_model_is_hybrid(backend.model))


def _as_sequence_zero(blob: bytes, header: int) -> bytes:
    """A one-stream sequence state (see :meth:`LlamaCppContext.export_sequence`) with its sequence ids set to 0: the
    header's last four bytes, and each cell's one id (a cell is its position, its id count, 1, and its id)."""
    data = bytearray(blob)
    data[header - 4 : header] = bytes(4)
    offset = header + 8  # past the stream count and the cell count
    for _ in range(_u32(data, header + 4) or 0):
        if _u32(data, offset + 4) != 1:
            raise LlamaCppError(
                "llama.cpp exported a sequence state in a layout this version of sirllm-agents does not know; give "
                "each conversation a context of its own (sequences=1)"
            )
        data[offset + 8 : offset + 12] = bytes(4)
        offset += 12
    return bytes(data)


def _u32(blob: bytes, offset: int) -> int | None:
    """The little-endian uint32 at ``offset`` (None past the end)."""
    return int.from_bytes(blob[offset : offset + 4], "little") if 0 <= offset <= len(blob) - 4 else None


def _free(context, batch) -> None:
    llama.llama_batch_free(batch)
    llama.llama_free(context)


def _surprisal(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``-log softmax(logits)[target]`` per row, in NumPy: torch's multithreaded kernels on one row of logits wait on
    threads that llama.cpp's own are holding (measured: 30 ms against 0.08 ms for one 49k-token row)."""
    peak = logits.max(axis=1)
    log_total = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
    return log_total - logits[np.arange(len(targets)), targets]
