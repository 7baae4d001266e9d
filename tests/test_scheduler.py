"""The scheduler: requests admitted up to a bound, and the forwards of requests asking at the same time run in one
call of the backend. First its rules, on a backend that records its calls; then sessions on real models, whose
replies under concurrency equal the replies each conversation gets alone."""

from __future__ import annotations

import threading

import pytest
import torch
from sirllm_fixtures import LLAMACPP_MISSING, tiny_llama

from sirllm_agents import Engine, SessionConfig
from sirllm_agents.scheduler import EngineBusyError, Scheduler

NEVER = 60.0  # a gather window no test waits out: a step that runs proves the scheduler saw it was ready
JOIN = 30.0  # seconds a test thread may take before the test fails instead of hanging


class FakeRunner:
    def __init__(self, name: str):
        self.name = name
        self.length = 0
        self.logits = None

    def __len__(self) -> int:
        return self.length

    def ingest(self, ids):
        return FakeBackend.shared.decode_together([self], [ids])[0]

    def truncate(self, length: int) -> None:
        self.length, self.logits = length, None


class FakeBackend:
    """Records each call as ``[(runner name, token count), ...]``; scores are the tokens' indices in their chunk."""

    shared: FakeBackend
    step_tokens = 4

    def __init__(self):
        self.calls: list[list[tuple[str, int]]] = []
        self.bad: set[str] = set()
        FakeBackend.shared = self

    def batch_key(self, runner, tokens):
        return 0

    def decode_together(self, runners, tokens):
        for runner in runners:
            if runner.name in self.bad:
                raise ValueError(f"{runner.name} is bad")
        self.calls.append([(runner.name, len(chunk)) for runner, chunk in zip(runners, tokens)])
        for runner, chunk in zip(runners, tokens):
            runner.length += len(chunk)
        return [torch.arange(len(chunk), dtype=torch.float32) for chunk in tokens]


def run_threads(*targets) -> list:
    """Run each target in a thread; returns each one's result or exception, failing the test on a hang."""
    results: list = [None] * len(targets)

    def run(i, target):
        try:
            results[i] = target()
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i, t), daemon=True) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
        assert not thread.is_alive(), "a request hung: the scheduler waited for a step that never became ready"
    return results


def test_a_request_alone_runs_at_once_and_a_long_input_in_steps():
    backend = FakeBackend()
    scheduler = Scheduler(backend, gather_seconds=NEVER)
    runner = FakeRunner("a")

    def alone():
        with scheduler.request():
            return scheduler.ingest(runner, range(10))

    (scores,) = run_threads(alone)
    assert backend.calls == [[("a", 4)], [("a", 4)], [("a", 2)]]
    assert scores.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert len(runner) == 10


def test_requests_asking_at_once_share_one_call():
    backend = FakeBackend()
    scheduler = Scheduler(backend, max_running=4, gather_seconds=NEVER)
    admitted = threading.Barrier(4)

    def request(name):
        def run():
            with scheduler.request():
                admitted.wait()
                return scheduler.ingest(FakeRunner(name), [7])

        return run

    results = run_threads(*(request(name) for name in "abcd"))
    assert [r.tolist() for r in results] == [[0.0]] * 4
    assert len(backend.calls) == 1 and sorted(backend.calls[0]) == [(name, 1) for name in "abcd"]
    assert (scheduler.calls, scheduler.forwards) == (1, 4)


def test_without_batching_each_forward_runs_at_once_in_its_own_thread():
    backend = FakeBackend()
    scheduler = Scheduler(backend, max_running=2, gather_seconds=NEVER, batching=False)
    admitted, first_done = threading.Barrier(2), threading.Event()

    def first():
        with scheduler.request():
            admitted.wait()
            scheduler.ingest(FakeRunner("first"), [1])
            first_done.set()

    def second():
        with scheduler.request():
            admitted.wait()
            first_done.wait(JOIN)  # admitted but asking nothing: a batching scheduler would wait for it
            return scheduler.ingest(FakeRunner("second"), [1, 2, 3, 4, 5])

    run_threads(first, second)
    assert backend.calls == [[("first", 1)], [("second", 5)]]  # whole, not cut into steps
    assert (scheduler.calls, scheduler.forwards) == (2, 2)


@pytest.mark.parametrize("batching", [True, False])
def test_an_empty_input_runs_no_forward(batching):
    backend = FakeBackend()
    scheduler = Scheduler(backend, batching=batching)
    with scheduler.request():
        assert scheduler.ingest(FakeRunner("idle"), []).numel() == 0
    assert backend.calls == [] and (scheduler.calls, scheduler.forwards) == (0, 0)


def test_a_prompt_being_prefilled_shares_each_step_with_another_requests_decoding():
    backend = FakeBackend()
    scheduler = Scheduler(backend, max_running=2, gather_seconds=NEVER)
    admitted = threading.Barrier(2)

    def prefill():
        with scheduler.request():
            admitted.wait()
            return scheduler.ingest(FakeRunner("prompt"), range(12))

    def decode():
        with scheduler.request():
            admitted.wait()
            return [scheduler.ingest(FakeRunner(f"token{i}"), [i]) for i in range(3)]

    run_threads(prefill, decode)
    assert [sorted(call) for call in backend.calls] == [[("prompt", 4), (f"token{i}", 1)] for i in range(3)]


def test_a_bad_input_fails_only_its_own_request():
    backend = FakeBackend()
    backend.bad.add("bad")
    scheduler = Scheduler(backend, max_running=2, gather_seconds=NEVER)
    admitted = threading.Barrier(2)

    def request(name):
        def run():
            with scheduler.request():
                admitted.wait()
                return scheduler.ingest(FakeRunner(name), [1, 2])

        return run

    good, bad = run_threads(request("good"), request("bad"))
    assert good.tolist() == [0.0, 1.0]
    assert isinstance(bad, ValueError) and "bad is bad" in str(bad)
    assert backend.calls == [[("good", 2)]]


def test_an_interrupted_forward_is_dropped_and_the_next_runs_alone():
    backend = FakeBackend()
    scheduler = Scheduler(backend, gather_seconds=NEVER)
    runner = FakeRunner("a")
    real = backend.decode_together

    def interrupted(runners, tokens):
        backend.decode_together = real
        raise KeyboardInterrupt

    backend.decode_together = interrupted
    with pytest.raises(KeyboardInterrupt), scheduler.request():
        scheduler.ingest(runner, [1, 2, 3])
    with scheduler.request():
        assert scheduler.ingest(runner, [4]).tolist() == [0.0]
    assert backend.calls == [[("a", 1)]] and len(runner) == 1


def test_a_request_handing_a_result_to_its_caller_holds_no_step():
    backend = FakeBackend()
    scheduler = Scheduler(backend, max_running=2, gather_seconds=NEVER)
    away, done = threading.Event(), threading.Event()

    def streaming():
        with scheduler.request() as ticket, ticket.away():
            away.set()
            done.wait(JOIN)

    def other():
        away.wait(JOIN)
        with scheduler.request():
            scores = scheduler.ingest(FakeRunner("other"), [1])
        done.set()
        return scores

    _, scores = run_threads(streaming, other)
    assert scores.tolist() == [0.0]


def test_admission_bounds_the_running_requests_and_the_queue():
    scheduler = Scheduler(FakeBackend(), max_running=1, max_waiting=1)
    running, release = threading.Event(), threading.Event()
    order = []

    def first():
        with scheduler.request():
            running.set()
            release.wait(JOIN)
            order.append("first")

    def second():
        running.wait(JOIN)
        with scheduler.request():
            order.append("second")

    threads = [threading.Thread(target=t, daemon=True) for t in (first, second)]
    for thread in threads:
        thread.start()
    running.wait(JOIN)
    while scheduler.waiting < 1:
        threading.Event().wait(0.01)
    assert scheduler.running == 1
    with pytest.raises(EngineBusyError, match=r"1 requests running and 1 waiting \(at most 1\)"), scheduler.request():
        pass
    release.set()
    for thread in threads:
        thread.join(JOIN)
    assert order == ["first", "second"]
    assert (scheduler.running, scheduler.waiting) == (0, 0)


def test_a_thread_running_a_request_is_admitted_again_at_once():
    scheduler = Scheduler(FakeBackend(), max_running=1)

    def nested():
        with scheduler.request(), scheduler.request():
            return scheduler.running

    assert run_threads(nested) == [2]


def test_a_session_streaming_to_a_slow_reader_holds_up_no_other_session(tiny_torch_engine):
    engine = tiny_torch_engine
    scheduler = engine.model.scheduler
    gather, scheduler.gather_seconds = scheduler.gather_seconds, NEVER
    try:
        stream = engine.session().stream([{"role": "user", "content": "Tell me a story."}], max_new_tokens=8)
        next(iter(stream))  # decoding, and now waiting for its reader
        (reply,) = run_threads(lambda: engine.session().chat([{"role": "user", "content": "Hi"}], max_new_tokens=4))
        stream.close()
    finally:
        scheduler.gather_seconds = gather
    assert reply.stats.generated_tokens > 0


TOPICS = ["lighthouses", "volcanoes", "honey bees", "night trains", "glaciers", "chess openings", "green tea", "comets"]
FOLLOW_UP = "Now tell me one more thing, and keep it short, in a single sentence."


def conversation(session, topic: str) -> list[list[int]]:
    """Two turns on ``topic``; the reply tokens of each."""
    messages = [{"role": "user", "content": f"Tell me three facts about {topic}, one per line."}]
    replies = []
    for follow_up in (FOLLOW_UP, None):
        reply = session.chat(messages, max_new_tokens=12)
        replies.append(reply.token_ids)
        messages.append(reply.as_message())
        if follow_up:
            messages.append({"role": "user", "content": follow_up})
    return replies


@pytest.fixture(scope="module", params=["torch", "llamacpp"])
def parallel_engine(request, tokenizer) -> Engine:
    """Eight conversations at once, batched: the embedded model on llama.cpp; the tiny model in float64 on PyTorch (its
    batched forward sums in another order, and float64 keeps that far below any gap between two greedy choices)."""
    if request.param == "llamacpp":
        if LLAMACPP_MISSING:
            pytest.skip(LLAMACPP_MISSING)
        return Engine(backend="llamacpp", threads=1, parallel=8, batch=True)
    return Engine(tiny_llama(tokenizer).double(), tokenizer=tokenizer, parallel=8)


def test_conversations_run_together_reply_as_each_does_alone(parallel_engine):
    """Eight conversations with eviction (a cache of 72 tokens, each conversation about 100): alone one after
    another, then all at once, their prompts and decode steps sharing calls. Every reply is the same, token for
    token, and every cache stays within its bound."""
    engine, scheduler = parallel_engine, parallel_engine.model.scheduler
    config = SessionConfig(cache_size=72, recent_size=8)
    alone = [conversation(engine.session(config), topic) for topic in TOPICS]
    calls, forwards = scheduler.calls, scheduler.forwards
    assert forwards == calls  # one conversation at a time: nothing to batch

    started = threading.Barrier(len(TOPICS))
    sessions = [engine.session(config) for _ in TOPICS]

    def run(session, topic):
        def target():
            started.wait()
            return conversation(session, topic)

        return target

    together = run_threads(*(run(session, topic) for session, topic in zip(sessions, TOPICS)))
    assert together == alone
    assert scheduler.forwards - forwards > 2 * (scheduler.calls - calls)  # most calls carried several conversations
    assert all(0 < len(session) <= 72 and session.stats.evicted_tokens > 0 for session in sessions)
