"""Batched decoding: many conversations decoded in the same forward passes, each equal to the same conversation run
alone. On llama.cpp they are sequences of one context, equal bit for bit to a context of their own; on PyTorch their
caches are stacked and padded into one batch, equal up to float rounding.

The conversations here drive their runners directly (greedy tokens, SirLLM eviction by token entropy when a runner is
full), so eviction, chunked prefill and decode steps of different conversations meet in the same calls.
"""

from __future__ import annotations

import gc

import pytest
import torch
from sirllm_fixtures import LLAMACPP_MISSING, held_lengths, tiny_llama

from sirllm_agents.loading import embedded_model_path
from sirllm_agents.policies import CachedTokens, SirLLMPolicy
from sirllm_agents.runners.torch import TorchBackend

needs_llamacpp = pytest.mark.skipif(bool(LLAMACPP_MISSING), reason=str(LLAMACPP_MISSING))

POLICY, SINKS, RECENT = SirLLMPolicy(), 4, 8
EVICTION_SLACK = 8  # an eviction frees this many cells, so it comes every few tokens, not on every one
REPLY_TOKENS = 40
INTERJECTION_AT = 20
TOPICS = ["lighthouses", "volcanoes", "honey bees", "night trains", "glaciers", "chess openings", "green tea", "comets"]


@pytest.fixture(scope="module")
def torch_backend(tiny_weights) -> TorchBackend:
    """The tiny random-weight Llama on PyTorch (float32, eager attention)."""
    return TorchBackend(tiny_weights)


@pytest.fixture(scope="module")
def backend():
    from sirllm_agents.runners.llamacpp import LlamaCppBackend

    return LlamaCppBackend(embedded_model_path(), threads=1)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """Eight chat prompts of about 40 tokens (the template adds a system prompt), and the fourth a long one of 314
    (five prefill chunks, and more than 256 cells: its attention spans more cells than the others')."""
    texts = [f"Tell me three facts about {topic}, one per line." for topic in TOPICS]
    texts[3] = " ".join(f"Fact {i}: the train leaves platform {i % 7} at {i}:15." for i in range(16))
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        for text in texts
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]


@pytest.fixture(scope="module")
def interjection(tokenizer) -> list[int]:
    """A tool's output of 16 tokens, fed with a reply token mid-reply."""
    ids = tokenizer("\nTool output: 17 rows, 3 columns, no errors.", add_special_tokens=False)["input_ids"]
    assert len(ids) == 16
    return ids


class Conversation:
    """A greedy conversation on one runner: its prompt, then each greedy token fed back (with ``interjection``, like
    a tool's output, after the ``INTERJECTION_AT``-th), evicting by SirLLM token entropy when the next input would
    not fit."""

    def __init__(self, runner, prompt: list[int], interjection: list[int] = (), capacity: int | None = None):
        self.runner = runner
        self.capacity = capacity or runner.capacity
        self.interjection = list(interjection)
        self.pending = list(prompt)
        self.scores = torch.empty(0)
        self.reply: list[int] = []
        self.evictions = 0

    @property
    def done(self) -> bool:
        return len(self.reply) == REPLY_TOKENS and not self.pending

    def next_input(self) -> list[int]:
        if not self.pending:
            self.reply.append(int(self.runner.logits.argmax()))
            self.pending = self.reply[-1:] + (self.interjection if len(self.reply) == INTERJECTION_AT else [])
        if len(self.runner) + len(self.pending) > self.capacity:
            tokens = CachedTokens(self.scores, *[torch.zeros(len(self.scores), dtype=torch.bool)] * 4, self.scores)
            keep = POLICY.keep(tokens, self.capacity - max(EVICTION_SLACK, len(self.pending)), SINKS, RECENT)
            self.runner.retain(keep)
            self.scores = self.scores[keep]
            self.evictions += 1
        ids, self.pending = self.pending, []
        return ids

    def took(self, scores: torch.Tensor) -> None:
        self.scores = torch.cat((self.scores, scores))
        assert len(self.runner) == len(self.scores) <= self.capacity


def run_alone(backend, prompt: list[int], capacity: int, interjection: list[int] = ()) -> Conversation:
    conversation = Conversation(backend.new_runner(capacity), prompt, interjection, capacity)
    while not conversation.done:
        conversation.took(conversation.runner.ingest(conversation.next_input()))
    return conversation


def step_together(conversations: list[Conversation]) -> None:
    active = [c for c in conversations if not c.done]
    inputs = [c.next_input() for c in active]
    for conversation, scores in zip(
        active, active[0].runner.backend.decode_together([c.runner for c in active], inputs)
    ):
        conversation.took(scores)


@needs_llamacpp
def test_eight_conversations_decoded_together_equal_their_serial_runs(backend, prompts, interjection):
    """Conversation k joins at step k, so prompts (the long one in five chunks) are prefilled in the calls that
    decode the others' tokens; conversations 2 and 4 take a 16-token interjection mid-reply while the others decode
    single tokens; conversations 1, 4 and 6 have small caches and evict several times."""
    capacities = [56 if k in (1, 4, 6) else 384 for k in range(8)]
    interjections = [interjection if k in (2, 4) else [] for k in range(8)]
    alone = [run_alone(backend, *inputs) for inputs in zip(prompts, capacities, interjections)]
    shared = backend.shared_context(8, 384)
    together = [
        Conversation(shared.new_runner(capacity), prompt, extra)
        for prompt, capacity, extra in zip(prompts, capacities, interjections)
    ]
    for joined in range(1, 9):
        step_together(together[:joined])
    while not all(c.done for c in together):
        step_together(together)
    for k, (serial, batched) in enumerate(zip(alone, together)):
        assert batched.reply == serial.reply, f"conversation {k}"
        assert torch.equal(batched.scores, serial.scores), f"conversation {k}"
        assert torch.equal(batched.runner.logits, serial.runner.logits), f"conversation {k}"
        assert batched.evictions == serial.evictions
        assert batched.evictions >= 3 if k in (1, 4, 6) else batched.evictions == 0
        assert held_lengths(batched.runner) == {len(batched.runner)}
    assert len({tuple(c.reply) for c in together}) == 8  # eight different replies: no conversation echoes another


@needs_llamacpp
def test_a_sequence_state_moves_between_shared_and_own_contexts_while_others_decode(backend, prompts):
    shared = backend.shared_context(3, 256)
    first, second = Conversation(shared.new_runner(), prompts[0]), Conversation(shared.new_runner(), prompts[1])
    for _ in range(6):
        step_together([first, second])
    saved = second.runner.state()
    # The session file's layout is a context of its own's: sequence 0, fed the same inputs alone, exports the very
    # bytes; sequence 1 as many (its bytes name sequence 1 where a context of its own names 0).
    alone = backend.new_runner(256)
    for ids in [prompts[0]] + [[token] for token in first.reply]:
        alone.ingest(ids)
    assert torch.equal(first.runner.state()["llamacpp.sequence"], alone.state()["llamacpp.sequence"])
    own = backend.new_runner(256)
    own.ingest(prompts[1] + second.reply)
    assert saved["llamacpp.sequence"].numel() == own.state()["llamacpp.sequence"].numel()

    moved = backend.new_runner(256)
    moved.load_state(saved)
    back = shared.new_runner()  # the third sequence, loaded with a state exported by a context of its own
    back.load_state(moved.state())
    assert torch.equal(moved.logits, second.runner.logits) and torch.equal(back.logits, second.runner.logits)
    from sirllm_agents.runners.llamacpp import decode_together

    token = int(second.runner.logits.argmax())
    after = decode_together([first.runner, second.runner, back], [first.next_input(), [token], [token]])
    first.took(after[0])
    moved_scores = moved.ingest([token])
    assert torch.equal(after[1], moved_scores) and torch.equal(after[2], moved_scores)
    assert torch.equal(back.logits, moved.logits) and torch.equal(second.runner.logits, moved.logits)
    # The first conversation decoded on through all of it exactly as alone.
    while not first.done:
        step_together([first])
    assert first.reply == run_alone(backend, prompts[0], 256).reply


@needs_llamacpp
def test_a_bad_input_names_its_runner_and_leaves_every_sequence_as_it_was(backend, prompts):
    from sirllm_agents.runners.llamacpp import LlamaCppError, decode_together

    shared = backend.shared_context(3, 256)
    conversations = [Conversation(shared.new_runner(), prompt) for prompt in prompts[:3]]
    for _ in range(4):
        step_together(conversations)
    runners = [c.runner for c in conversations]
    before = [(len(r), r.logits.clone()) for r in runners]
    good = [int(r.logits.argmax()) for r in runners[:2]]
    bad_inputs = {
        "runner 2 \\(sequence 2\\): token id 49152 is outside the vocabulary \\(0-49151\\)": [backend.vocab_size],
        "runner 2 \\(sequence 2\\): token id -1 is outside the vocabulary": [-1],
        "runner 2 \\(sequence 2\\): cannot cache 300 more tokens": [5] * 300,
    }
    for message, bad in bad_inputs.items():
        with pytest.raises((ValueError, LlamaCppError), match=message):
            decode_together(runners, [[good[0]], [good[1]], bad])
        assert all(len(r) == n and torch.equal(r.logits, logits) for r, (n, logits) in zip(runners, before))
        assert [held_lengths(r) for r in runners] == [{n} for n, _ in before]
    with pytest.raises(ValueError, match=r"runner 1 \(sequence 1\) appears twice"):
        decode_together([runners[1], runners[1]], [[1], [2]])
    with pytest.raises(ValueError, match=r"runner 1 \(sequence 0\) is in another llama\.cpp context"):
        decode_together([runners[0], backend.new_runner(64)], [[1], [2]])
    with pytest.raises(ValueError, match="2 runners but 1 token lists"):
        decode_together(runners[:2], [[1]])
    # The conversations go on as if nothing had been asked.
    while not all(c.done for c in conversations):
        step_together(conversations)
    for conversation, prompt in zip(conversations, prompts):
        assert conversation.reply == run_alone(backend, prompt, 256).reply


@needs_llamacpp
def test_a_failed_decode_removes_what_the_call_added_to_every_sequence(backend, prompts, monkeypatch):
    """llama.cpp keeps the calls that succeeded; the runners must not keep their tokens uncounted."""
    import sirllm_agents.runners.llamacpp as module

    shared = backend.shared_context(2, 256)
    runners = [shared.new_runner(), shared.new_runner()]
    module.decode_together(runners, [prompts[0], prompts[1]])
    lengths = [len(r) for r in runners]
    real, calls = module.llama.llama_decode, {"n": 0}

    def fail_on_the_second_call(context, batch):
        calls["n"] += 1
        return real(context, batch) if calls["n"] == 1 else -3

    monkeypatch.setattr(module.llama, "llama_decode", fail_on_the_second_call)
    # The long input takes two calls: the first succeeds (both sequences grow), the second fails.
    with pytest.raises(
        module.LlamaCppError, match=r"status -3 \(fatal error\) on a batch of 64 tokens of sequences \[0\]"
    ):
        module.decode_together(runners, [list(range(100, 170)), [7]])
    monkeypatch.undo()
    assert [len(r) for r in runners] == lengths
    assert [held_lengths(r) for r in runners] == [{n} for n in lengths]


@needs_llamacpp
def test_a_full_shared_context_refuses_a_runner_until_one_is_dropped(backend):
    from sirllm_agents.runners.llamacpp import LlamaCppError

    shared = backend.shared_context(2, 64)
    first, second = shared.new_runner(), shared.new_runner()
    with pytest.raises(LlamaCppError, match=r"all 2 sequences of this llama\.cpp context are in use"):
        shared.new_runner()
    del first
    gc.collect()
    with pytest.raises(ValueError, match="holds at most 64 tokens, not 65"):
        shared.new_runner(65)
    second.ingest([1, 2, 3])
    twin = second.copy()  # on the freed sequence, as an independent copy
    assert twin.sequence == 0 and held_lengths(twin) == {3} and torch.equal(twin.logits, second.logits)
    twin.ingest([4])
    assert held_lengths(second) == {3}


def test_eight_conversations_decoded_together_on_pytorch_equal_their_serial_runs(torch_backend, prompts, interjection):
    """As on llama.cpp; the padded attention sums in another order, so scores and logits agree to float rounding
    (measured: up to 1.3e-5 in surprisals, 3.6e-5 in logits; bounds allow 5x) and the greedy tokens exactly."""
    capacities = [56 if k in (1, 4, 6) else 384 for k in range(8)]
    interjections = [interjection if k in (2, 4) else [] for k in range(8)]
    alone = [run_alone(torch_backend, *inputs) for inputs in zip(prompts, capacities, interjections)]
    together = [
        Conversation(torch_backend.new_runner(capacity), prompt, extra, capacity)
        for prompt, capacity, extra in zip(prompts, capacities, interjections)
    ]
    for joined in range(1, 9):
        step_together(together[:joined])
    while not all(c.done for c in together):
        step_together(together)
    for k, (serial, batched) in enumerate(zip(alone, together)):
        assert batched.reply == serial.reply, f"conversation {k}"
        torch.testing.assert_close(batched.scores, serial.scores, atol=2e-4, rtol=0)
        torch.testing.assert_close(batched.runner.logits, serial.runner.logits, atol=2e-4, rtol=0)
        assert batched.evictions == serial.evictions
        assert batched.evictions >= 3 if k in (1, 4, 6) else batched.evictions == 0
        assert held_lengths(batched.runner) == {len(batched.runner)}
    assert len({tuple(c.reply) for c in together}) == 8


def test_a_bad_input_on_pytorch_names_its_runner_and_changes_no_runner(torch_backend, prompts, tokenizer):
    runners = [torch_backend.new_runner(256) for _ in range(3)]
    torch_backend.decode_together(runners, prompts[:3])
    before = [(len(r), r.logits.clone(), r.kv.layers[0].keys.clone()) for r in runners]
    with pytest.raises(ValueError, match=r"runner 2: token id 49152 is outside the vocabulary \(0-49151\)"):
        torch_backend.decode_together(runners, [[1], [2], [torch_backend.vocab_size]])
    other = TorchBackend(tiny_llama(tokenizer, seed=1)).new_runner(8)
    with pytest.raises(ValueError, match="runner 1 runs other weights than runner 0"):
        torch_backend.decode_together([runners[0], other], [[1], [2]])
    for runner, (length, logits, keys) in zip(runners, before):
        assert len(runner) == length and torch.equal(runner.logits, logits)
        assert torch.equal(runner.kv.layers[0].keys, keys)
