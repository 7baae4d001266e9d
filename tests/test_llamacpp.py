"""The llama.cpp backend against llama.cpp itself and against the PyTorch backend on the same weights.

The rest of the library's suite runs on both backends through the ``tiny_engine`` and ``embedded_engine`` fixtures;
these tests check what only a second backend raises: agreement with llama-cpp-python's own decoding, the entropies,
eviction (llama.cpp shifts cache positions itself), state files and the choice of backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sirllm_fixtures import BACKENDS, LLAMACPP_MISSING, held_lengths, make_engine, tiny_llama, write_gguf

from sirllm_agents import Engine
from sirllm_agents.loading import ModelLoadError, embedded_model_path
from sirllm_agents.persistence import SessionFileError
from sirllm_agents.runners.torch import TorchBackend

pytestmark = pytest.mark.skipif(bool(LLAMACPP_MISSING), reason=str(LLAMACPP_MISSING))

# The two backends run the tiny model's F32 weights; llama.cpp keeps keys and values in float16, so their logits
# differ by up to ~0.011 (measured: 0.0098 on a 20-token prompt, 0.0106 after an eviction). Bounds below allow 5x.
CROSS_BACKEND_ATOL = 0.05

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "My locker code is 4471. Tell me a short story about a cat named Pickles in Paris."},
]


@pytest.fixture(scope="module")
def llamacpp_engine() -> Engine:
    return Engine(backend="llamacpp")


@pytest.fixture(scope="module")
def reference_llama():
    """llama-cpp-python's own high-level class on the embedded GGUF, every token's logits kept."""
    from llama_cpp import Llama

    return Llama(str(embedded_model_path()), n_ctx=2048, logits_all=True, verbose=False)


def prompt_ids(engine: Engine, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    return engine.model.encode(engine.model.template.render(messages, add_generation_prompt=add_generation_prompt))


def test_auto_picks_llamacpp_for_a_gguf_and_torch_otherwise(llamacpp_engine, tokenizer):
    assert Engine(backend="auto").model.backend.name == "llamacpp"
    assert Engine(backend="auto", dtype="float32").model.backend.name == "torch"  # a torch dtype asks for torch
    assert Engine(tiny_llama(tokenizer), tokenizer=tokenizer).model.backend.name == "torch"


def test_greedy_replies_equal_llamacpp_own_greedy_decoding(llamacpp_engine, reference_llama):
    reply = llamacpp_engine.session(cache_size=1024).chat(MESSAGES, max_new_tokens=64)
    expected = []
    for token in reference_llama.generate(prompt_ids(llamacpp_engine, MESSAGES), top_k=1, temp=0.0, reset=True):
        if token in llamacpp_engine.model.stop_token_ids or len(expected) == len(reply.token_ids):
            break
        expected.append(token)
    assert len(reply.token_ids) == 64  # the whole budget: a long stretch to agree on
    assert reply.token_ids == expected


def test_stored_entropies_equal_log_softmax_of_llamacpp_logits(llamacpp_engine, reference_llama):
    ids = prompt_ids(llamacpp_engine, MESSAGES, add_generation_prompt=False)
    session = llamacpp_engine.session(cache_size=1024)
    session.ingest(MESSAGES)
    reference_llama.reset()
    reference_llama.eval(ids)
    logits = torch.from_numpy(np.array(reference_llama.scores[: len(ids)]))
    expected = -logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert session.cache.token_ids.tolist() == ids
    torch.testing.assert_close(session.cache.scores[1:], expected, atol=1e-4, rtol=1e-4)
    assert session.cache.scores[0] == torch.inf


def test_eviction_gives_the_torch_backends_logits(tokenizer, tiny_gguf):
    """The PyTorch backend re-rotates keys exactly (``test_rope.py``); llama.cpp's own shift must land on the same
    next-token logits after the same eviction."""
    weights = tiny_llama(tokenizer)
    cpp = Engine(tiny_gguf, backend="llamacpp", tokenizer=tokenizer).model.new_runner(256)
    ref = TorchBackend(weights).new_runner(256)
    ids = tokenizer("Hello world, my locker code is 4471 and the weather is nice today in Paris, they say.")[
        "input_ids"
    ]
    assert len(ids) > 20
    for runner in (cpp, ref):
        runner.ingest(ids)
    torch.testing.assert_close(cpp.logits, ref.logits, atol=CROSS_BACKEND_ATOL, rtol=0)
    keep = torch.tensor([0, 1, 2, 3, 7, 8, 9, 12, 15, len(ids) - 1])
    for runner in (cpp, ref):
        runner.retain(keep)
    assert len(cpp) == len(ref) == keep.numel()
    scores = [runner.ingest([5, 6, 7]) for runner in (cpp, ref)]
    torch.testing.assert_close(scores[0], scores[1], atol=CROSS_BACKEND_ATOL, rtol=0)
    torch.testing.assert_close(cpp.logits, ref.logits, atol=CROSS_BACKEND_ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_an_eviction_logits_equal_a_fresh_evaluation_of_the_kept_tokens(backend, tokenizer, tmp_path):
    """In a one-layer model a token's key and value depend on the token and its position only, so after an eviction
    the kept tokens, moved to their new indices, must score the next tokens exactly as a fresh evaluation of the
    kept tokens does. Measured gap on llama.cpp (float16 cache): about 0.01 in logits; PyTorch: about 1e-5."""
    weights = tiny_llama(tokenizer, num_hidden_layers=1)
    engine = make_engine(backend, tokenizer, write_gguf(weights, tmp_path / "one-layer.gguf"), weights)
    ids = tokenizer(" ".join(f"fact {i} is {i * 37 % 101}." for i in range(40)))["input_ids"]
    keep = torch.sort(torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))[: len(ids) // 3]).values
    evicted, fresh = engine.model.new_runner(512), engine.model.new_runner(512)
    evicted.ingest(ids)
    evicted.retain(keep)
    fresh.ingest([ids[i] for i in keep.tolist()])
    new = tokenizer(" and the answer is", add_special_tokens=False)["input_ids"]
    scores = evicted.ingest(new), fresh.ingest(new)
    atol = CROSS_BACKEND_ATOL if backend == "llamacpp" else 1e-3
    torch.testing.assert_close(evicted.logits, fresh.logits, atol=atol, rtol=0)
    torch.testing.assert_close(scores[0][1:], scores[1][1:], atol=atol, rtol=0)


def test_session_files_are_refused_by_the_other_backend(tmp_path, tokenizer, tiny_gguf):
    cpp = Engine(tiny_gguf, backend="llamacpp", tokenizer=tokenizer)
    ref = Engine(tiny_llama(tokenizer), tokenizer=tokenizer)
    for saver, loader in ((cpp, ref), (ref, cpp)):
        session = saver.session(cache_size=64)
        session.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=4)
        path = tmp_path / f"{saver.model.backend.name}.safetensors"
        session.save(path)
        with pytest.raises(SessionFileError, match=saver.model.backend.name):
            loader.load_session(path)


def test_a_20k_token_input_stays_within_the_cache(tokenizer, tiny_gguf):
    engine = Engine(tiny_gguf, backend="llamacpp", tokenizer=tokenizer)
    session = engine.session(cache_size=512)
    text = " ".join(f"item {i} costs {i * 7 % 100} euros." for i in range(3400))
    messages = [{"role": "user", "content": text}]
    assert len(tokenizer(text)["input_ids"]) > 20_000
    reply = session.chat(messages, max_new_tokens=8)
    assert len(session.cache) <= 512
    assert len(session.cache.runner) == len(session.cache)
    assert session.stats.input_tokens > 20_000 and session.stats.evicted_tokens > 19_000
    assert len(reply.token_ids) > 0


def test_bad_backend_choices_name_the_problem(tokenizer):
    with pytest.raises(ValueError, match="backend must be one of"):
        Engine(backend="vllm")
    with pytest.raises(ModelLoadError, match="GGUF"):
        Engine(tiny_llama(tokenizer), tokenizer=tokenizer, backend="llamacpp")
    with pytest.raises(ValueError, match="drop device= and dtype="):
        Engine(backend="llamacpp", dtype="bfloat16")


def test_an_interrupt_after_a_decode_leaves_the_session_consistent(tokenizer, tiny_gguf, monkeypatch):
    """llama.cpp has cached a decode's tokens when the interrupt comes: the rollback must remove them too."""
    import sirllm_agents.runners.llamacpp as backend

    engine = Engine(tiny_gguf, backend="llamacpp", tokenizer=tokenizer)
    session = engine.session(cache_size=256)
    messages = [{"role": "user", "content": "Name three colours."}]
    messages.append({"role": "assistant", "content": session.chat(messages, max_new_tokens=6).text})
    messages.append({"role": "user", "content": "And three animals?"})
    real, calls = backend.llama.llama_decode, {"n": 0}

    def decode_then_interrupt(context, batch):
        status = real(context, batch)
        calls["n"] += 1
        if calls["n"] == 4:  # mid-reply, after llama.cpp cached the token
            raise KeyboardInterrupt
        return status

    monkeypatch.setattr(backend.llama, "llama_decode", decode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        session.chat(messages, max_new_tokens=12)
    monkeypatch.undo()
    assert held_lengths(session.cache.runner) == {len(session)}
    retried = session.chat(messages, max_new_tokens=8)
    assert retried.stats.restarts == 0
    assert retried.token_ids == engine.session(cache_size=256).chat(messages, max_new_tokens=8).token_ids
