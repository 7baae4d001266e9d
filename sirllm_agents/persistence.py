"""Session files: one safetensors file holding the KV cache and per-token tensors, with the transcript, settings,
stats and model identity as a JSON document in its header.

Nothing is ever unpickled: safetensors holds raw tensor bytes and the rest is JSON, so a session file from someone
else cannot run code. A checksum over the JSON and every tensor byte catches truncation and corruption; the model
identity and dtype catch a file written by another model. A file is written to a temporary file in the same folder
and renamed over the target, so a crash midway leaves an earlier save intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .memory import Memory, token_pieces

if TYPE_CHECKING:
    from .model import Model

FORMAT = "sirllm-agents-session"
# 2: runner state under "runner.", per-token template marks, the backend in the model identity; 3: a bounded history
# (from "history.start" on) with the cached tokens' own text, no rendered transcript text; 4: the cache state's
# position and turn under "cache" (the turn was the stats' count of replies)
VERSION = 4
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header


class SessionFileError(ValueError):
    """A session file that cannot be loaded: missing, truncated, corrupted, or written by another model or dtype."""


def write_session(
    path: str | os.PathLike, model: Model, document: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Write a session's state (``Session.state()``) to ``path`` atomically (see the module docstring)."""
    _write_atomically(Path(path), session_bytes(model, document, tensors))


def session_bytes(model: Model, document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """A session's state (``Session.state()``) as the bytes of a session file, for stores that keep them elsewhere
    than in a file (see :mod:`sirllm_agents.redis_store`)."""
    pieces = token_pieces(model.tokenizer, tensors["history.ids"].tolist())
    cached = token_pieces(model.tokenizer, tensors["cache.token_ids"].tolist())
    tensors = tensors | {"history.piece_ends": _ends(pieces), "cache.piece_ends": _ends(cached)}
    document = {"format": FORMAT, "version": VERSION, "model": model.identity, **document}
    document |= {"decoded": "".join(pieces), "decoded_cache": "".join(cached)}
    try:
        text = json.dumps(document, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the session's messages or tools are not JSON data and cannot be saved: {error}") from error
    return save_tensors(tensors, metadata={"sirllm_agents": text, "sha256": _digest(text, tensors)})


def read_session(path: str | os.PathLike, model: Model) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The state saved in ``path`` (for ``Session.from_state``), checked to belong to ``model``; raises
    :class:`SessionFileError` when the file cannot be used."""
    document, tensors = _read(path)
    _check_model(document, model, path)
    return document, tensors


def read_session_bytes(data: bytes, model: Model, source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """:func:`read_session` for the bytes of a session file; ``source`` names where they came from in errors."""
    document, tensors = _decode(data, source)
    _check_model(document, model, source)
    return document, tensors


def read_memory(path: str | os.PathLike) -> tuple[Memory, dict[str, Any]]:
    """The memory of a saved session and its JSON document, without loading any model."""
    document, tensors = _read(path)
    settings = document["settings"]
    memory = Memory.build(
        history_start=int(tensors["history.start"][0]),
        history_ids=tensors["history.ids"].tolist(),
        history_turns=tensors["history.turns"].tolist(),
        pieces=_pieces(document["decoded"], tensors["history.piece_ends"]),
        cache_positions=tensors["cache.positions"].tolist(),
        cache_scores=tensors["cache.scores"].tolist(),
        cache_ids=tensors["cache.token_ids"].tolist(),
        cache_turns=tensors["cache.turns"].tolist(),
        cache_pieces=_pieces(document["decoded_cache"], tensors["cache.piece_ends"]),
        cache_lengths=[turn["cache_len"] for turn in document["turn_log"]],
        cache_size=settings["cache_size"],
        policy=settings["policy"],
    )
    return memory, document


def _ends(pieces: list[str]) -> torch.Tensor:
    return torch.tensor([len(p) for p in pieces], dtype=torch.int64).cumsum(0)


def _pieces(decoded: str, ends: torch.Tensor) -> list[str]:
    ends = ends.tolist()
    return [decoded[begin:end] for begin, end in zip([0] + ends[:-1], ends)]


# -- identity -------------------------------------------------------------------------------------------------------


def _check_model(document: dict[str, Any], model: Model, path) -> None:
    saved, here = document["model"], model.identity
    if saved.get("backend") != here["backend"]:
        raise SessionFileError(
            f"{path}: the session was saved from the {saved.get('backend')} backend; this engine runs "
            f"{here['backend']} (their cached states differ)"
        )
    if saved["dtype"] != here["dtype"]:
        raise SessionFileError(
            f"{path}: the session was saved from a {saved['dtype']} model; this engine runs {here['dtype']} "
            "(its keys and values would not match)"
        )
    if saved["fingerprint"] != here["fingerprint"]:
        raise SessionFileError(
            f"{path}: the session was saved from another model ({saved['name']!r}, {saved['model_type']}, "
            f"{saved['layers']} layers) than this engine's ({here['name']!r}, {here['model_type']}, "
            f"{here['layers']} layers, or other weights/tokenizer)"
        )


# -- bytes ----------------------------------------------------------------------------------------------------------


def _digest(text: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise SessionFileError(f"{path}: cannot read the session file ({error.strerror or error})") from error
    return _decode(data, path)


def _decode(data: bytes, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if len(data) < 8:
        raise SessionFileError(f"{path}: not a session file (truncated: {len(data)} bytes)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(_HEADER_LIMIT, len(data) - 8):
        raise SessionFileError(f"{path}: truncated or not a session file (its header runs past the end)")
    try:
        header = json.loads(data[8 : 8 + header_size])
        metadata = header.get("__metadata__") or {}
    except (UnicodeDecodeError, ValueError, AttributeError) as error:
        raise SessionFileError(f"{path}: corrupted session file (unreadable header: {error})") from error
    if "sirllm_agents" not in metadata:
        raise SessionFileError(f"{path}: not a sirllm-agents session file")
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise SessionFileError(f"{path}: truncated or corrupted session file ({error})") from error
    text = metadata["sirllm_agents"]
    if _digest(text, tensors) != metadata.get("sha256"):
        raise SessionFileError(f"{path}: corrupted session file (checksum mismatch)")
    document = json.loads(text)
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise SessionFileError(
            f"{path}: unsupported session file format {document.get('format')!r} version {document.get('version')!r} "
            f"(this sirllm-agents reads {FORMAT!r} version {VERSION})"
        )
    return document, tensors
