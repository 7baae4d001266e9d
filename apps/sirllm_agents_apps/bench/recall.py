"""The recall suite: does a fact stated early survive a bounded cache, in what the model ranks and what it says?

Each generated conversation (:mod:`.recall_data`) is fed to one session an exchange at a time, as an agent framework
would (:meth:`Session.ingest`, so decay applies per turn). At the end each fact is asked for on its own fork of the
session, so questions never see each other, and scored two ways:

* cloze: the question without options; each candidate value is scored as the assistant's reply
  (:meth:`Session.score`) and the best per token wins (per character recorded too);
* generation: the model's greedy reply, right when it names the value (and, for an updated fact, not the value it
  replaced). A reply is well-formed when it is on the question's topic (a word of the question or a candidate
  value) and copies no run of six words from a distractor turn: the failure where a model imitates the scattered
  fragments a cache kept instead of answering.

The cache budget is a share of the conversation's tokens. ``truncate`` keeps the newest whole exchanges that fit
the budget, as ``trim_messages`` does; ``full`` never evicts (a conversation past the model's length is recorded as
overflowed).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sirllm_agents.engine import Engine
from sirllm_agents.session import Session

from .recall_data import Conversation, Fact

START_SIZE = 4
MIN_CACHE = 64
ANSWER_TOKENS = 24  # generated per question, up to the end of its first line
QUESTION_ROOM = 32  # tokens a question and its generation prompt may take, for truncate's trimming
COPIED_WORDS = 6  # a reply repeating this many words of a distractor turn in a row imitates it
STOPWORDS = {"what", "when", "which", "where", "does", "will", "held", "called", "name", "waiting"}


@dataclass(frozen=True)
class Setting:
    """One column of the suite: a policy, its budget as a share of the conversation's tokens, SirLLM's decay, and
    the share of the cache kept for the newest tokens (``recent_size``)."""

    policy: str
    budget: float
    decay: float = 1.0
    recent: float = 0.0


def conversation_tokens(engine: Engine, conversation: Conversation) -> int:
    model = engine.model
    return len(model.encode(model.template.render(list(conversation.messages), add_generation_prompt=False)))


def run_conversation(engine: Engine, conversation: Conversation, setting: Setting, generate: bool = True) -> list[dict]:
    """Feed ``conversation`` under ``setting`` and ask for each fact; one record per fact (cloze only, the generation
    fields None, unless ``generate``)."""
    tokens = conversation_tokens(engine, conversation)
    size = max(MIN_CACHE, round(setting.budget * tokens))
    base = {"conversation": conversation.name, "tokens": tokens, "cache_size": size}
    messages = list(conversation.messages)
    session = None
    if setting.policy == "full":
        if tokens + QUESTION_ROOM + ANSWER_TOKENS > engine.model.max_length:
            return [base | _fact_fields(conversation, fact) | {"overflowed": True} for fact in conversation.facts]
        session = engine.session(policy="full", keep_history=True)
    elif setting.policy != "truncate":
        session = engine.session(
            keep_history=True,  # the facts' tokens are looked up by their place in the whole conversation
            cache_size=size,
            start_size=START_SIZE,
            recent_size=round(setting.recent * size),
            decay=setting.decay,
            policy=setting.policy,
        )
    if session is not None:
        for end in range(2, len(messages) + 1, 2):
            session.ingest(messages[:end])
    fragments = _distractor_runs(conversation)
    records = []
    for fact in conversation.facts:
        if session is None:
            asked = truncated(engine, messages, size - QUESTION_ROOM - ANSWER_TOKENS)
            fork = engine.session(policy="full")
        else:
            asked, fork = messages, session.fork()
        question = asked + [{"role": "user", "content": fact.question}]
        logprobs = fork.score(question, list(fact.candidates))
        reply = fork.chat(question, max_new_tokens=ANSWER_TOKENS, stop="\n").text if generate else None
        per_token = [lp / len(engine.model.encode(c)) for lp, c in zip(logprobs, fact.candidates)]
        per_char = [lp / len(c) for lp, c in zip(logprobs, fact.candidates)]
        pick = fact.candidates[_argmax(per_token)]
        records.append(
            base
            | _fact_fields(conversation, fact)
            | {
                "overflowed": False,
                "messages_kept": len(asked),
                "cloze": pick == fact.value,
                "cloze_char": _argmax(per_char) == fact.answer,
                "picked_previous": pick == fact.previous,
                **(_generation_fields(reply, fact, fragments) if generate else dict.fromkeys(GENERATION_FIELDS)),
                "kept": None if session is None else share_in_cache(fork, fact.message, fact.value),
                "kept_previous": None
                if session is None or fact.previous is None
                else share_in_cache(fork, fact.previous_message, fact.previous),
            }
        )
    return records


GENERATION_FIELDS = ("generated", "generated_previous", "well_formed", "reply")


def _generation_fields(reply: str, fact: Fact, fragments: set[tuple[str, ...]]) -> dict:
    return {
        "generated": names(reply, fact.value) and not (fact.previous and names(reply, fact.previous)),
        "generated_previous": bool(fact.previous) and names(reply, fact.previous),
        "well_formed": well_formed(reply, fact, fragments),
        "reply": reply,
    }


def _fact_fields(conversation: Conversation, fact: Fact) -> dict:
    fields = {
        "kind": fact.kind,
        "updated": fact.previous is not None,
        "depth": fact.message / len(conversation.messages),  # where the (newest) statement sits, as a share
        "value": fact.value,
        "question": fact.question,
    }
    category = getattr(fact, "category", None)  # the varied suite's questions have one (recall_varied.CATEGORIES)
    if category is not None:
        fields["category"] = category
    return fields


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def names(reply: str, value: str) -> bool:
    """Whether ``reply`` names ``value``, ignoring case, punctuation and spacing (``copper76`` in "Copper-76.")."""
    return f" {' '.join(_words(value))} " in f" {' '.join(_words(reply))} "


def _distractor_runs(conversation: Conversation) -> set[tuple[str, ...]]:
    """Every run of ``COPIED_WORDS`` words in the conversation's messages that state no fact."""
    stating = {f.message for f in conversation.facts} | {f.previous_message for f in conversation.facts}
    runs = set()
    for i, message in enumerate(conversation.messages):
        if i not in stating:
            words = _words(message["content"])
            runs.update(tuple(words[j : j + COPIED_WORDS]) for j in range(len(words) - COPIED_WORDS + 1))
    return runs


def well_formed(reply: str, fact: Fact, fragments: set[tuple[str, ...]]) -> bool:
    """An answer to the question: on its topic, and no copy of a distractor turn (see the module docstring)."""
    words = _words(reply)
    if any(tuple(words[j : j + COPIED_WORDS]) in fragments for j in range(len(words) - COPIED_WORDS + 1)):
        return False
    topic = {w for w in _words(fact.question) if len(w) > 3 and w not in STOPWORDS}
    return bool(topic & set(words)) or any(names(reply, value) for value in fact.candidates)


def truncated(engine: Engine, messages: list[dict], budget: int) -> list[dict]:
    """The newest whole exchanges (user then assistant) whose rendering fits ``budget`` tokens: what
    ``trim_messages`` does to an agent's history. Empty when not even the last exchange fits."""
    start = 0
    while start < len(messages):
        text = engine.model.template.render(messages[start:], add_generation_prompt=False)
        if len(engine.model.encode(text)) <= budget:
            break
        start += 2
    return messages[start:]


def value_tokens(session: Session, message: int, value: str) -> list[tuple[str, bool]]:
    """The tokens of ``value`` where message ``message`` states it, each with whether the cache still holds it."""
    begin, end = session.transcript.spans[message]
    tokens = session.memory().conversation[begin:end]
    text = "".join(token.text for token in tokens)
    start = text.rfind(value)
    if start < 0:
        raise ValueError(f"message {message} does not state {value!r}")
    stop, offset, pieces = start + len(value), 0, []
    for token in tokens:
        if offset < stop and offset + len(token.text) > start:
            pieces.append((token.text, token.retained))
        offset += len(token.text)
    return pieces


def share_in_cache(session: Session, message: int, value: str) -> float:
    """The share of ``value``'s tokens, where message ``message`` states it, that the cache still holds."""
    kept = [retained for _, retained in value_tokens(session, message, value)]
    return sum(kept) / len(kept)


def restated_messages(model, messages: list[dict]) -> set[tuple[int, int]]:
    """The (older, newer) message pairs whose sentences the ``supersede`` policy would pair as restatements with the
    whole of ``messages`` cached: what its rule sees in a suite's conversation (its tests use this)."""
    import torch

    from sirllm_agents.policies import CachedTokens
    from sirllm_agents.policies.sentences import sentence_index
    from sirllm_agents.policies.supersede import restatements

    text = model.template.render(messages, add_generation_prompt=False)
    ids, marks = model.encode_marked(text, [m["content"] for m in messages])
    token_ids, template = torch.tensor(ids), torch.tensor(marks)
    tokens = CachedTokens(torch.zeros(len(ids)), template, *model.token_shapes.of(token_ids), token_ids)
    # Message texts are the runs of unmarked tokens, in order.
    run_start = ~template & torch.cat((torch.tensor([True]), template[:-1]))
    message = (run_start.cumsum(0) - 1).tolist()
    sentence = sentence_index(tokens)
    first: dict[int, int] = {}  # each sentence's first token
    for position, index in enumerate(sentence.tolist()):
        first.setdefault(index, position)
    return {(message[first[older]], message[first[newer]]) for older, newer in restatements(tokens, sentence)}


def summarize(records: list[dict]) -> dict:
    """Shares over the facts that fit (``full`` may overflow): cloze and generated recall, well-formed replies and
    the value's tokens kept, for all facts, for facts never updated, for updated ones (with how often the value
    they replaced won instead), and per fact kind (``kinds``). Generation shares count the facts that have a reply
    (``replies``): records pooled from cloze-only runs have none. Records of the varied suite (``recall_varied``)
    carry a question category: they add ``categories`` (the shares per category) and bootstrap ``intervals`` to
    each group; there ``plain`` as a group still means every question whose fact was never updated."""
    answered = [r for r in records if not r["overflowed"]]
    result = {"facts": len(records), "overflowed": len(records) - len(answered)}
    for group, rows in (
        ("all", answered),
        ("plain", [r for r in answered if not r["updated"]]),
        ("updated", [r for r in answered if r["updated"]]),
    ):
        if rows:
            result[group] = _shares(rows, updated=group == "updated")
    kinds = sorted({r["kind"] for r in answered})
    if kinds:
        result["kinds"] = {kind: _shares([r for r in answered if r["kind"] == kind]) for kind in kinds}
    categories = sorted({r["category"] for r in answered if "category" in r})
    if categories:
        # The varied suite: the same shares per question category, and bootstrap intervals for every group.
        result["categories"] = {}
        for category in categories:
            rows = [r for r in answered if r.get("category") == category]
            updated = all(r["updated"] for r in rows)
            result["categories"][category] = _shares(rows, updated) | {"intervals": _intervals(rows, updated)}
        for group in ("all", "plain", "updated"):
            if group in result:
                rows = [r for r in answered if (group == "all") or (r["updated"] == (group == "updated"))]
                result[group]["intervals"] = _intervals(rows, group == "updated")
    return result


def _intervals(rows: list[dict], updated: bool) -> dict:
    """95% percentile-bootstrap intervals of the cloze, generated and (for updated facts) old-value shares."""
    from .bootstrap import mean_interval

    fields = ["cloze", "generated", "well_formed"] + (["picked_previous", "generated_previous"] if updated else [])
    intervals = {}
    for f in fields:
        values = [float(r[f]) for r in rows if r[f] is not None]
        if values:
            intervals[f] = mean_interval(values)
    return intervals


def _shares(rows: list[dict], updated: bool = False) -> dict:
    fields = ["cloze", "cloze_char", "generated", "well_formed"]
    if updated:
        fields += ["picked_previous", "generated_previous"]
    shares = {"facts": len(rows)}
    for f in fields:
        values = [r[f] for r in rows if r[f] is not None]  # generation fields are None in a cloze-only run
        if values:
            shares[f] = sum(values) / len(values)
    replies = sum(r["reply"] is not None for r in rows)
    if replies:
        shares["replies"] = replies
    kept = [r["kept"] for r in rows if r["kept"] is not None]
    if kept:
        shares["kept"] = sum(kept) / len(kept)
    return shares


def run_setting(
    engine: Engine,
    conversations: list[Conversation],
    setting: Setting,
    advance: Callable[[], None],
    generate: bool = True,
) -> dict:
    """Every conversation under ``setting``: the setting, the summary, a few sample replies and every record."""
    start = time.perf_counter()
    records = []
    for conversation in conversations:
        records += run_conversation(engine, conversation, setting, generate)
        advance()
    samples = [
        {"question": r["question"], "value": r["value"], "reply": r["reply"]}
        for r in records
        if not r["overflowed"] and r["reply"] is not None
    ][:4]
    return {
        **asdict(setting),
        "summary": summarize(records),
        "samples": samples,
        "records": records,
        "seconds": round(time.perf_counter() - start, 2),
    }
