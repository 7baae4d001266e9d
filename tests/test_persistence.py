"""Session files: exact resume (same and new process), atomic writes, no pickle, and clear errors that change
nothing for truncated, corrupted and mismatched files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sirllm_fixtures import make_engine, write_gguf

from sirllm_agents import Engine
from sirllm_agents.persistence import SessionFileError

QUESTIONS = ["Hi there!", "What is 2+2?", "Name a colour.", "Tell me a short joke."]
TESTS = Path(__file__).parent


@pytest.fixture
def saved(converse, tiny_engine, tmp_path):
    """A session that evicted (cache 64, decay 0.9) saved after three turns, its messages, and the file."""
    session = tiny_engine.session(cache_size=64, decay=0.9, session_id="conv-1")
    messages, _ = converse(session, QUESTIONS[:3])
    path = tmp_path / "s.safetensors"
    session.save(path)
    return session, messages, path


def test_a_loaded_session_equals_the_original_and_continues_with_the_same_reply(tiny_engine, saved):
    session, messages, path = saved
    loaded = tiny_engine.load_session(path)
    assert loaded.session_id == "conv-1" and tiny_engine.route(messages, "conv-1") is loaded
    assert session.cache.template.any() and not session.cache.template.all()
    for name in ("token_ids", "scores", "positions", "turns", "template", "history_ids", "history_turns"):
        assert torch.equal(getattr(loaded.cache, name), getattr(session.cache, name)), name
    for name, tensor in session.cache.runner.state().items():  # keys and values, or llama.cpp's sequence state
        assert torch.equal(loaded.cache.runner.state()[name], tensor), name
    assert loaded.transcript == session.transcript and loaded.stats == session.stats
    assert (loaded.config, loaded.policy) == (session.config, session.policy)

    messages.append({"role": "user", "content": QUESTIONS[3]})
    original, resumed = session.chat(messages, max_new_tokens=12), loaded.chat(messages, max_new_tokens=12)
    assert resumed.token_ids == original.token_ids
    assert resumed.stats.restarts == 0 and resumed.stats.prefilled_tokens == original.stats.prefilled_tokens
    tiny_engine.drop_session("conv-1")


def test_a_session_resumed_in_a_new_process_gives_the_same_reply(tiny_engine, tiny_gguf, saved):
    session, messages, path = saved
    backend = tiny_engine.model.backend.name
    messages.append({"role": "user", "content": QUESTIONS[3]})
    expected = session.chat(messages, max_new_tokens=12).token_ids
    script = f"""
import json, sys
sys.path.insert(0, {str(TESTS)!r})
from sirllm_fixtures import make_engine
from sirllm_agents.loading import embedded_tokenizer
engine = make_engine({backend!r}, embedded_tokenizer(), {str(tiny_gguf)!r})
session = engine.load_session({str(path)!r})
print(json.dumps(session.chat(json.loads(sys.argv[1]), max_new_tokens=12).token_ids))
"""
    import json

    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(messages)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


def test_loading_never_unpickles(tiny_engine, saved, monkeypatch):
    _, messages, path = saved

    def refuse(*args, **kwargs):
        raise AssertionError("a session file must never be unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    session = tiny_engine.load_session(path, session_id="no-pickle")
    assert session.transcript.messages == messages
    tiny_engine.drop_session("no-pickle")


def test_a_crash_while_saving_leaves_the_previous_save_intact(tiny_engine, saved, monkeypatch):
    session, messages, path = saved
    before = path.read_bytes()
    converse_more = messages + [{"role": "user", "content": QUESTIONS[3]}]
    session.chat(converse_more, max_new_tokens=4)

    def crash(fd):
        raise KeyboardInterrupt  # the process dies after writing part of the new file

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        session.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    assert tiny_engine.load_session(path, session_id="intact").transcript.messages == messages
    tiny_engine.drop_session("intact")


def _flip(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupted"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), r"truncated: 5 bytes"),
        (lambda p: _flip(p, 100), r"corrupted session file \(checksum mismatch\)"),
        (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"), "unreadable header"),
        (lambda p: p.unlink(), "cannot read the session file"),
    ],
)
def test_damaged_files_are_clear_errors_that_change_nothing(tiny_engine, saved, damage, error):
    _, messages, path = saved
    pooled = tiny_engine.load_session(path, session_id="keep-me")
    damage(path)
    with pytest.raises(SessionFileError, match=error):
        tiny_engine.load_session(path, session_id="keep-me")
    assert tiny_engine.route(messages, "keep-me") is pooled
    tiny_engine.drop_session("keep-me")


def test_a_damaged_header_is_caught_by_the_checksum(tiny_engine, saved):
    _, _, path = saved
    data = path.read_bytes()
    assert b"Name a colour." in data
    path.write_bytes(data.replace(b"Name a colour.", b"Name a colour!", 1))
    with pytest.raises(SessionFileError, match="checksum mismatch"):
        tiny_engine.load_session(path)


def test_a_plain_safetensors_file_is_not_a_session(tiny_engine, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(SessionFileError, match="not a sirllm-agents session file"):
        tiny_engine.load_session(path)


def test_another_model_or_dtype_is_refused(tokenizer, make_tiny_llama, tiny_engine, saved, tmp_path):
    _, _, path = saved
    backend = tiny_engine.model.backend.name
    weights = make_tiny_llama(seed=1)
    other = make_engine(backend, tokenizer, write_gguf(weights, tmp_path / "tiny-llama.gguf"), weights)
    with pytest.raises(SessionFileError, match=r"saved from another model \('[^']+', llama.*, 2 layers\)"):
        other.load_session(path)
    assert other.pool.live_ids() == []
    if backend == "llamacpp":
        return  # a GGUF file fixes its own types
    half = Engine(make_tiny_llama().to(torch.bfloat16), tokenizer=tokenizer)
    with pytest.raises(SessionFileError, match="saved from a float32 model; this engine runs bfloat16"):
        half.load_session(path)


def test_messages_that_are_not_json_cannot_be_saved(tiny_engine, tmp_path):
    session = tiny_engine.session()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"when": object()}}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    # Refused when the call comes in (the template writes the arguments into the prompt), before anything is cached.
    with pytest.raises(ValueError, match="not JSON data"):
        session.chat(messages + [{"role": "tool", "content": "ok", "tool_call_id": "c1"}], max_new_tokens=2)
    assert len(session) == 0 and session.transcript.messages == []
    session.save(tmp_path / "s.safetensors")
    assert tiny_engine.load_session(tmp_path / "s.safetensors").transcript.messages == []
