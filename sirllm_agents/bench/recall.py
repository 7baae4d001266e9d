"""The recall suite: does a fact stated early survive a bounded cache, in what the model can rank and what it says?

Each generated conversation (:mod:`.recall_data`) is fed to one session an exchange at a time, as an agent framework
would (:meth:`Session.ingest`, so decay applies per turn). At the end each fact is asked for on its own fork of the
session, so questions never see each other, and scored two ways:

* cloze: the question without options; each candidate value is scored as the assistant's reply
  (:meth:`Session.score`) and the best per token wins (per character recorded too);
* generation: the model's greedy reply to the question, right when it contains the value (and, for an updated fact,
  not the value it replaced).

The cache budget is a share of the conversation's tokens. ``truncate`` keeps the newest whole exchanges that fit
the budget, as ``trim_messages`` does; ``full`` never evicts (``None`` where the conversation passes the model's
length).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..engine import Engine
from ..session import Session
from .recall_data import Conversation, Fact

START_SIZE = 4
MIN_CACHE = 64
ANSWER_TOKENS = 24  # generated per question


@dataclass(frozen=True)
class Setting:
    """One column of the suite: a policy, its budget as a share of the conversation, and SirLLM's decay."""

    policy: str
    budget: float  # cache size / conversation tokens (1.0 for "full")
    decay: float = 1.0


def conversation_tokens(engine: Engine, conversation: Conversation) -> int:
    return len(engine.encode(engine.template.render(list(conversation.messages), add_generation_prompt=False)))


def cache_size(setting: Setting, tokens: int) -> int:
    return max(MIN_CACHE, round(setting.budget * tokens))


def run_conversation(engine: Engine, conversation: Conversation, setting: Setting) -> list[dict]:
    """Feed ``conversation`` under ``setting`` and ask for each fact; one record per fact."""
    tokens = conversation_tokens(engine, conversation)
    size = cache_size(setting, tokens)
    messages = list(conversation.messages)
    if setting.policy == "truncate":
        session = None
    else:
        if setting.policy == "full":
            if tokens + 64 > engine.max_length:  # the question and the reply must fit too
                return [_record(conversation, fact, tokens, None, setting) for fact in conversation.facts]
            session = engine.session(policy="full")
        else:
            session = engine.session(cache_size=size, start_size=START_SIZE, decay=setting.decay,
                                     policy=setting.policy)
        for end in range(2, len(messages) + 1, 2):
            session.ingest(messages[:end])
    records = []
    for fact in conversation.facts:
        if session is None:
            asked, kept = truncated(engine, messages, size - ANSWER_TOKENS), None
            fork = engine.session(policy="full")
        else:
            asked, fork = messages, session.fork()
        question = asked + [{"role": "user", "content": fact.question}]
        logprobs = fork.score(question, list(fact.candidates))
        reply = fork.chat(question, max_new_tokens=ANSWER_TOKENS)
        if session is not None:
            kept = {
                "value": share_in_cache(fork, fact.message, fact.value),
                "previous": None if fact.previous is None else share_in_cache(fork, fact.previous_message, fact.previous),
            }
        answer = {
            "logprobs": logprobs,
            "reply": reply.text,
            "kept": kept,
            "messages_kept": len(asked),
        }
        records.append(_record(conversation, fact, tokens, answer, setting, size, engine))
    return records


def _record(conversation: Conversation, fact: Fact, tokens: int, answer: dict | None, setting: Setting,
            size: int | None = None, engine: Engine | None = None) -> dict:
    record = {
        "conversation": conversation.name,
        "tokens": tokens,
        "cache_size": size,
        "kind": fact.kind,
        "updated": fact.previous is not None,
        "depth": fact.message / len(conversation.messages),  # where the (newest) statement sits, as a share
        "value": fact.value,
        "overflowed": answer is None,
    }
    if answer is None:
        return record
    logprobs = answer["logprobs"]
    ntokens = [len(_reply_ids(engine, c)) for c in fact.candidates]
    per_token = [lp / n for lp, n in zip(logprobs, ntokens)]
    per_char = [lp / len(c) for lp, c in zip(logprobs, fact.candidates)]
    reply = answer["reply"]
    record.update(
        cloze=_argmax(per_token) == fact.answer,
        cloze_char=_argmax(per_char) == fact.answer,
        picked_previous=fact.previous is not None and fact.candidates[_argmax(per_token)] == fact.previous,
        generated=contains(reply, fact.value) and not (fact.previous and contains(reply, fact.previous)),
        generated_previous=bool(fact.previous) and contains(reply, fact.previous),
        reply=reply,
        kept=answer["kept"],
        messages_kept=answer["messages_kept"],
    )
    return record


def _reply_ids(engine: Engine, text: str) -> list[int]:
    return engine.encode(text)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def contains(reply: str, value: str) -> bool:
    """Whether ``reply`` names ``value``, ignoring case, punctuation and spacing (``copper76`` in "Copper-76.")."""

    def words(text: str) -> str:
        return " " + " ".join(re.findall(r"[a-z]+|\d+", text.lower())) + " "

    return words(value) in words(reply)


def truncated(engine: Engine, messages: list[dict], budget: int) -> list[dict]:
    """The newest whole exchanges (user then assistant) whose rendering, with a question of up to 32 tokens, fits
    ``budget`` tokens: what ``trim_messages`` does to an agent's history."""
    start = 0
    while start < len(messages):
        text = engine.template.render(messages[start:], add_generation_prompt=False)
        if len(engine.encode(text)) + 32 <= budget:
            break
        start += 2
    return messages[start:]


def share_in_cache(session: Session, message: int, value: str) -> float:
    """The share of ``value``'s tokens, where message ``message`` states it, that the cache still holds."""
    begin, end = session.transcript.spans[message]
    tokens = session.memory().conversation[begin:end]
    text = "".join(token.text for token in tokens)
    start = text.rfind(value)
    if start < 0:
        raise ValueError(f"message {message} does not state {value!r}")
    stop, offset, kept = start + len(value), 0, []
    for token in tokens:
        if offset < stop and offset + len(token.text) > start:
            kept.append(token.retained)
        offset += len(token.text)
    return sum(kept) / len(kept)


def run_setting(engine: Engine, conversations: list[Conversation], setting: Setting,
                advance: Callable[[], None]) -> dict:
    start = time.perf_counter()
    records = []
    for conversation in conversations:
        records += run_conversation(engine, conversation, setting)
        advance()
    return {**asdict(setting), "records": records, "seconds": round(time.perf_counter() - start, 2)}
