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
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .memory import Memory, token_pieces
from .policies import POLICIES, make_policy
from .session import Session, SessionStats, TurnStats
from .transcript import Transcript

if TYPE_CHECKING:
    from .engine import Engine

FORMAT = "sirllm-agents-session"
VERSION = 1
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header


class SessionFileError(ValueError):
    """A session file that cannot be loaded: missing, truncated, corrupted, or written by another model or dtype."""


def save_session(session: Session, path: str | os.PathLike) -> None:
    """Write ``session`` to ``path`` atomically (see the module docstring). Call with the session's lock held."""
    if session.policy.name not in POLICIES:
        raise ValueError(f"policy {session.policy.name!r} is not a built-in policy and cannot be saved")
    cache = session.cache
    tensors: dict[str, torch.Tensor] = {
        "cache.token_ids": cache.token_ids,
        "cache.scores": cache.scores,
        "cache.positions": cache.positions,
        "cache.turns": cache.turns,
        "cache.template": cache.template,
        "history.ids": cache.history_ids,
        "history.turns": cache.history_turns,
    }
    pieces = token_pieces(session.engine.tokenizer, cache.history_ids.tolist())
    tensors["history.piece_ends"] = torch.tensor([len(p) for p in pieces], dtype=torch.int64).cumsum(0)
    layers = [layer for layer in cache.kv.layers if layer.keys is not None and layer.keys.numel()] if len(cache) else []
    for i, layer in enumerate(layers):
        tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"] = layer.keys, layer.values
    if session._logits is not None:
        tensors["logits"] = session._logits
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    transcript = session.transcript
    document = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_identity(session.engine),
        "session_id": session.session_id,
        "settings": {
            "cache_size": session.cache_size,
            "policy": session.policy.name,
            "start_size": session.policy.start_size,
            "recent_size": session.policy.recent_size,
            "decay": session.decay,
            "prefill_chunk": session.prefill_chunk,
        },
        "transcript": {
            "messages": transcript.messages,
            "tools": transcript.tools,
            "text": transcript.text,
            "length": transcript.length,
            "spans": transcript.spans,
        },
        "position": session._position,
        "kv_layers": len(layers),
        "stats": asdict(session.stats),
        "turn_log": [asdict(turn) for turn in session.turn_log],
        "decoded": "".join(pieces),
    }
    try:
        text = json.dumps(document, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the session's messages or tools are not JSON data and cannot be saved: {error}") from error
    data = save_tensors(tensors, metadata={"sirllm_agents": text, "sha256": _digest(text, tensors)})
    _write_atomically(Path(path), data)


def load_session(engine: Engine, path: str | os.PathLike, session_id: str | None = None) -> Session:
    """A new session on ``engine`` holding what ``path`` holds; raises :class:`SessionFileError` (nothing changed)
    when the file cannot be used."""
    document, tensors = _read(path)
    _check_model(document, engine, path)
    settings = document["settings"]
    session = Session(
        engine,
        cache_size=settings["cache_size"],
        policy=make_policy(settings["policy"], settings["start_size"], settings["recent_size"]),
        decay=settings["decay"],
        prefill_chunk=settings["prefill_chunk"],
        session_id=session_id or document["session_id"],
    )
    cache = session.cache
    device = engine.device
    for i in range(document["kv_layers"]):
        cache.kv.update(tensors[f"kv.{i}.keys"].to(device), tensors[f"kv.{i}.values"].to(device), i)
    cache.token_ids, cache.scores = tensors["cache.token_ids"], tensors["cache.scores"]
    cache.positions, cache.turns = tensors["cache.positions"], tensors["cache.turns"]
    # Files written before template marks were recorded mark no token.
    cache.template = tensors.get("cache.template", torch.zeros(len(cache.token_ids), dtype=torch.bool))
    cache.history_ids, cache.history_turns = tensors["history.ids"], tensors["history.turns"]
    if "logits" in tensors:
        session._logits = tensors["logits"].to(device)
    session._position = document["position"]
    t = document["transcript"]
    session.transcript = Transcript(t["messages"], t["tools"], t["text"], t["length"], [tuple(s) for s in t["spans"]])
    session.stats = SessionStats(**document["stats"])
    session.turn_log = [TurnStats(**turn) for turn in document["turn_log"]]
    return session


def read_memory(path: str | os.PathLike) -> tuple[Memory, dict[str, Any]]:
    """The memory of a saved session and its JSON document, without loading any model."""
    document, tensors = _read(path)
    decoded, ends = document["decoded"], tensors["history.piece_ends"].tolist()
    pieces = [decoded[begin:end] for begin, end in zip([0] + ends[:-1], ends)]
    settings = document["settings"]
    memory = Memory.build(
        history_ids=tensors["history.ids"].tolist(),
        history_turns=tensors["history.turns"].tolist(),
        pieces=pieces,
        cache_positions=tensors["cache.positions"].tolist(),
        cache_scores=tensors["cache.scores"].tolist(),
        cache_lengths=[turn["cache_len"] for turn in document["turn_log"]],
        cache_size=settings["cache_size"],
        policy=settings["policy"],
    )
    return memory, document


# -- identity -------------------------------------------------------------------------------------------------------

_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_identity(engine: Engine) -> dict[str, Any]:
    """What a KV cache is only valid for: the architecture, dtype, weights and tokenizer (fingerprinted once per
    engine from a sample of every parameter and the tokenizer's vocabulary and chat template)."""
    if engine not in _identities:
        config = engine.model.config.get_text_config(decoder=True)
        digest = hashlib.sha256()
        with torch.no_grad():
            for name, parameter in engine.model.named_parameters():
                flat = parameter.detach().reshape(-1)
                sample = torch.cat((flat[:64], flat[-64:])).float().cpu()
                digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
                digest.update(sample.numpy().tobytes())
        tokenizer = engine.tokenizer
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(str(engine.template.template or tokenizer.chat_template).encode())
        _identities[engine] = {
            "name": engine.model_name,
            "model_type": config.model_type,
            "layers": config.num_hidden_layers,
            "dtype": str(engine.model.dtype).removeprefix("torch."),
            "fingerprint": digest.hexdigest(),
        }
    return _identities[engine]


def _check_model(document: dict[str, Any], engine: Engine, path) -> None:
    saved, here = document["model"], model_identity(engine)
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
