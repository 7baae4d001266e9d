"""LoCoMo under each cache policy: what a bounded cache keeps of conversations nobody here wrote.

Each conversation (:mod:`.locomo_data`) is fed to one session per setting a message at a time, as a chat app would
(:meth:`Session.ingest`). At each question's point the session is forked, so questions never see each other, and
the question is asked as the next user message:

* mode ``end``: after the whole conversation;
* mode ``evidence``: right after the session that holds the question's last evidence turn, plus ``later_sessions``
  more sessions (or at the end, when fewer are left).

Measured per question:

* **cloze**: the gold answer and four other answers of its category (:func:`.locomo_data.candidates`) scored as the
  assistant's reply (:meth:`Session.score`), best per token winning;
* **answer log-likelihood** of the gold per token, and its gap to the oracle's (``oracle_gap``, negative: less
  likely than with a perfect memory);
* **evidence kept**: the share of the evidence messages' tokens (their chat-template rendering) the cache holds
  when the question is scored;
* optionally a greedy reply scored by LoCoMo's token F1 (adversarial questions: 1 when it says the answer is not
  mentioned, as LoCoMo's evaluation does).

The **oracle** asks each question once on a session holding only its evidence turns (each with its session's date):
what a perfect memory would give this model. ``truncate`` keeps the newest whole messages that fit the cache with
the question and its longest candidate, on a session that never evicts (what ``trim_messages`` does); its evidence
kept is the share of the evidence messages' content tokens among the messages it kept. ``default`` is a session with
the library's defaults and the cache size alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from sirllm_agents.engine import Engine
from sirllm_agents.policies import POLICIES as LIBRARY_POLICIES
from sirllm_agents.session import Session

from .bootstrap import mean_interval
from .locomo_data import ADVERSARIAL, CATEGORIES, Conversation, Question, candidates, says_not_mentioned, token_f1

MODES = ("end", "evidence")
TRUNCATE = "truncate"
DEFAULT = "default"  # the library's defaults: only the cache size is given
POLICIES = (*(p for p in LIBRARY_POLICIES if p != "full"), TRUNCATE, DEFAULT)
START_SIZE = 4  # attention sinks, as in the paper and the other memory benchmarks
ANSWER_TOKENS = 32  # a generated reply's bound, up to its first line break
FIT_MARGIN = 2  # tokens truncate leaves beyond the prompt and the longest reply (the refed newest token, rounding)
ANSWERABLE = "answerable"
FIELDS = ("cloze", "answer_logprob", "oracle_gap", "evidence_kept", "f1")


@dataclass(frozen=True)
class Setting:
    """One column of the benchmark: a policy (:data:`POLICIES`), its cache size in tokens, the entropy policies'
    per-turn decay and the share of the cache they keep for the newest tokens (``default`` takes the library's)."""

    policy: str
    cache_size: int
    decay: float = 1.0
    recent: float = 0.0


@dataclass(frozen=True)
class Asked:
    """A question with its cloze candidates and the gold's index among them."""

    question: Question
    options: tuple[str, ...]
    gold: int


def prepare(conversation: Conversation, questions: Sequence[Question], seed: int = 0) -> list[Asked]:
    """The questions with their candidates (see :func:`.locomo_data.candidates`)."""
    asked = []
    for question in questions:
        options, gold = candidates(conversation, question, seed)
        asked.append(Asked(question, tuple(options), gold))
    return asked


def points(
    conversation: Conversation, asked: Sequence[Asked], modes: Sequence[str], later_sessions: int
) -> dict[int, list[tuple[str, Asked]]]:
    """Per number of messages fed, the (mode, question) pairs asked right after them."""
    last = len(conversation.session_ends) - 1
    at: dict[int, list[tuple[str, Asked]]] = {}
    for mode in modes:
        for a in asked:
            if mode == "end":
                point = len(conversation.messages)
            else:
                point = conversation.session_ends[min(a.question.session + later_sessions, last)]
            at.setdefault(point, []).append((mode, a))
    return at


def new_session(engine: Engine, setting: Setting) -> Session:
    """A session bounded as ``setting`` says (``truncate`` has none: see :func:`run_truncated`)."""
    if setting.policy == DEFAULT:
        return engine.session(cache_size=setting.cache_size)
    return engine.session(
        cache_size=setting.cache_size,
        start_size=START_SIZE,
        recent_size=round(setting.recent * setting.cache_size),
        decay=setting.decay,
        policy=setting.policy,
    )


def _question_message(question: Question) -> dict:
    return {"role": "user", "content": question.text}


def score(session: Session, context: Sequence[dict], asked: Asked) -> dict:
    """Cloze on ``session`` holding ``context``: whether the gold wins per token, what won, and the gold's
    log-likelihood per token."""
    encode = session.model.encode
    logprobs = session.score([*context, _question_message(asked.question)], list(asked.options))
    per_token = [lp / len(encode(option)) for lp, option in zip(logprobs, asked.options)]
    pick = max(range(len(per_token)), key=per_token.__getitem__)
    return {"cloze": pick == asked.gold, "picked": asked.options[pick], "answer_logprob": per_token[asked.gold]}


def reply_fields(session: Session, context: Sequence[dict], asked: Asked) -> dict:
    """The greedy reply to the question (to its first line break) and its LoCoMo score."""
    reply = session.chat([*context, _question_message(asked.question)], max_new_tokens=ANSWER_TOKENS, stop="\n").text
    if asked.question.category == ADVERSARIAL:
        return {"reply": reply, "f1": float(says_not_mentioned(reply))}
    return {"reply": reply, "f1": token_f1(reply, asked.question.answer)}


def evidence_kept(session: Session, messages: Sequence[int]) -> float:
    """The share of the tokens of ``messages`` (indexes into the session's transcript) the cache holds now."""
    cached = set(session.cache.positions.tolist())
    spans = [session.transcript.spans[i] for i in messages]
    total = sum(end - begin for begin, end in spans)
    return sum(p in cached for begin, end in spans for p in range(begin, end)) / total


def _record(conversation: Conversation, mode: str, point: int, asked: Asked) -> dict:
    q = asked.question
    return {
        "conversation": conversation.name,
        "question": q.index,
        "category": CATEGORIES[q.category],
        "mode": mode,
        "point": point,
    }


def run_cached(
    engine: Engine,
    conversation: Conversation,
    asked: Sequence[Asked],
    setting: Setting,
    modes: Sequence[str],
    later_sessions: int,
    generate: bool = False,
    advance: Callable[[], None] = lambda: None,
) -> tuple[list[dict], list[Session]]:
    """Feed the conversation under a cached ``setting`` and ask each question at its points; the records and the
    session, in a list (for its totals). ``advance`` is called after each message."""
    session = new_session(engine, setting)
    at = points(conversation, asked, modes, later_sessions)
    messages = list(conversation.messages)
    records = []
    for end in range(1, len(messages) + 1):
        session.ingest(messages[:end])
        advance()
        for mode, a in at.get(end, []):
            fork, context = session.fork(), messages[:end]
            record = _record(conversation, mode, end, a) | score(fork, context, a)
            record["evidence_kept"] = evidence_kept(fork, a.question.evidence)
            if generate:
                record |= reply_fields(fork, context, a)
            records.append(record)
    return records, [session]


def reply_room(engine: Engine, asked: Asked, generate: bool) -> int:
    """Tokens a reply to ``asked`` may take: its longest candidate, or a generated reply when longer."""
    longest = max(len(engine.model.encode(option)) for option in asked.options)
    return max(longest, ANSWER_TOKENS + 1) if generate else longest


def trimmed_start(
    engine: Engine, messages: Sequence[dict], questions: Sequence[Asked], cache_size: int, generate: bool = False
) -> int:
    """The first of the newest whole ``messages`` that fit ``cache_size`` together with any of ``questions`` (the
    user message, the generation prompt and its longest reply): what ``trim_messages`` keeps. Raises ValueError when
    a question does not fit even alone."""
    template, encode = engine.model.template, engine.model.encode

    def fits(start: int) -> bool:
        for a in questions:
            prompt = template.render([*messages[start:], _question_message(a.question)], add_generation_prompt=True)
            if len(encode(prompt)) + reply_room(engine, a, generate) + FIT_MARGIN > cache_size:
                return False
        return True

    low, high = 0, len(messages)  # the answer lies in [low, high]: fewer messages never take more tokens
    if not fits(high):
        raise ValueError(f"a question with its reply does not fit a cache of {cache_size} tokens even alone")
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return low


def run_truncated(
    engine: Engine,
    conversation: Conversation,
    asked: Sequence[Asked],
    setting: Setting,
    modes: Sequence[str],
    later_sessions: int,
    generate: bool = False,
    advance: Callable[[], None] = lambda: None,
) -> tuple[list[dict], list[Session]]:
    """``truncate``: at each point the newest whole messages that fit the cache with every question asked there,
    ingested once on a session that never evicts and forked per question. Returns the records and the sessions."""
    messages = list(conversation.messages)
    content_tokens = [len(engine.model.encode(m["content"])) for m in messages]
    records, sessions = [], []
    at = points(conversation, asked, modes, later_sessions)
    for end in sorted(at):
        context = messages[:end]
        start = trimmed_start(engine, context, [a for _, a in at[end]], setting.cache_size, generate)
        kept = context[start:]
        session = engine.session(cache_size=setting.cache_size, policy="full")
        if kept:
            session.ingest(kept)
        sessions.append(session)
        for mode, a in at[end]:
            fork = session.fork()
            record = _record(conversation, mode, end, a) | score(fork, kept, a)
            evidence = a.question.evidence
            record["evidence_kept"] = sum(content_tokens[i] for i in evidence if i >= start) / sum(
                content_tokens[i] for i in evidence
            )
            record["messages_kept"] = len(kept)
            if generate:
                record |= reply_fields(fork, kept, a)
            records.append(record)
    for _ in messages:
        advance()
    return records, sessions


def run_oracle(
    engine: Engine, conversation: Conversation, asked: Sequence[Asked], generate: bool = False
) -> list[dict]:
    """Each question asked once on a session that holds only its evidence turns (the same in every mode)."""
    records = []
    for a in asked:
        context = conversation.oracle_messages(a.question)
        session = engine.session(policy="full")
        record = _record(conversation, "oracle", len(context), a) | score(session, context, a)
        record["evidence_kept"] = evidence_kept(session, range(len(context)))
        if generate:
            record |= reply_fields(session, context, a)
        records.append(record)
    return records


def with_oracle_gap(records: list[dict], oracle: list[dict]) -> list[dict]:
    """``records`` with ``oracle_gap``: the gold's log-likelihood per token minus the oracle's for that question."""
    reference = {(r["conversation"], r["question"]): r["answer_logprob"] for r in oracle}
    return [r | {"oracle_gap": r["answer_logprob"] - reference[r["conversation"], r["question"]]} for r in records]


def summarize(records: list[dict], seed: int = 0) -> dict[str, dict]:
    """Per category, over all questions (``all``) and over all but the adversarial ones (``answerable``: a policy
    that forgets everything may still pick "not mentioned"), the mean of each measured field with its bootstrap 95%
    interval (questions resampled; see :func:`.bootstrap.mean_interval`)."""
    groups = {name: [r for r in records if _in_group(r, name)] for name in ("all", ANSWERABLE, *CATEGORIES.values())}
    summary = {}
    for name, rows in groups.items():
        if not rows:
            continue
        cell: dict = {"questions": len(rows)}
        for field in FIELDS:
            values = [float(r[field]) for r in rows if r.get(field) is not None]
            if values:
                cell[field] = mean_interval(values, seed)
        summary[name] = cell
    return summary


def run_setting(
    engine: Engine,
    conversations: Sequence[tuple[Conversation, list[Asked]]],
    setting: Setting,
    oracle: list[dict],
    modes: Sequence[str],
    later_sessions: int,
    generate: bool = False,
    seed: int = 0,
    advance: Callable[[], None] = lambda: None,
) -> dict:
    """Every conversation under ``setting``: the setting, the summary per mode, every record, and costs."""
    start = time.perf_counter()
    runner = run_truncated if setting.policy == TRUNCATE else run_cached
    records, prefilled, evicted, config = [], 0, 0, None
    for conversation, asked in conversations:
        rows, sessions = runner(engine, conversation, asked, setting, modes, later_sessions, generate, advance)
        records += rows
        for session in sessions:
            prefilled += session.stats.prefilled_tokens
            evicted += session.stats.evicted_tokens
            config = session.config
    records = with_oracle_gap(records, oracle)
    return {
        **asdict(setting),
        # What the cache ran under (for ``default``, the library's choices).
        "session_policy": config.policy_name if config else None,
        "recent_size": config.recent_size if config else None,
        "summary": {mode: summarize([r for r in records if r["mode"] == mode], seed) for mode in modes},
        "records": records,
        "prefilled_tokens": prefilled,
        "evicted_tokens": evicted,
        "seconds": round(time.perf_counter() - start, 2),
    }


# The targets: at cache 1024, questions asked after the whole conversation.
TARGET_CACHE = 1024
TARGET_MODE = "end"


def targets(results: dict, seed: int = 0) -> list[dict]:
    """Each target of the issue, met or not, where the run holds the settings it compares: the paired difference
    (per question, bootstrap 95% interval) of the default's cloze against ``truncate``'s and ``streaming``'s (at
    least +0.10) and against the oracle's (at most 0.10 below), overall and on single-hop; and the default's evidence
    kept against twice ``streaming``'s (the margin ``default - 2 x streaming`` at least 0). ``met``: the estimate
    meets the target; ``clear``: the whole interval does."""
    runs = {
        run["policy"]: run
        for run in results["runs"]
        if run["cache_size"] == TARGET_CACHE and run["policy"] in (DEFAULT, TRUNCATE, "streaming")
    }
    if DEFAULT not in runs or TARGET_MODE not in results["modes"]:
        return []

    def by_question(records: list[dict], category: str) -> dict[tuple, dict]:
        return {
            (r["conversation"], r["question"]): r
            for r in records
            if r["mode"] in (TARGET_MODE, "oracle") and category in ("all", r["category"])
        }

    def paired(other: list[dict], field: str, category: str, weight: float = 1.0) -> dict:
        mine, theirs = by_question(runs[DEFAULT]["records"], category), by_question(other, category)
        keys = sorted(mine.keys() & theirs.keys())
        return mean_interval([float(mine[k][field]) - weight * float(theirs[k][field]) for k in keys], seed)

    found = []
    for category in ("all", "single-hop"):
        for other in (TRUNCATE, "streaming"):
            if other in runs:
                d = paired(runs[other]["records"], "cloze", category)
                found.append(_target(f"default cloze - {other} cloze >= 0.10", category, d, 0.10))
        d = paired(results["oracle"]["records"], "cloze", category)
        found.append(_target("default cloze - oracle cloze >= -0.10", category, d, -0.10))
    if "streaming" in runs:
        d = paired(runs["streaming"]["records"], "evidence_kept", "all", weight=2.0)
        found.append(_target("default evidence kept - 2 x streaming's >= 0", "all", d, 0.0))
    return found


def _target(name: str, category: str, difference: dict, threshold: float) -> dict:
    return {
        "target": name,
        "category": category,
        "difference": difference,
        "threshold": threshold,
        "met": difference["mean"] >= threshold,
        "clear": difference["low"] >= threshold,
    }


def paired_with_default(results: dict, seed: int = 0) -> list[dict]:
    """The default's cloze minus every other setting's, paired per question at the same cache size and mode, with
    its bootstrap 95% interval, over all, answerable and single-hop questions: what choosing a default between the
    settings needs (the intervals of two unpaired means overlap far more than the paired difference's)."""
    defaults = {run["cache_size"]: run for run in results["runs"] if run["policy"] == DEFAULT}
    found = []
    for run in results["runs"]:
        mine = defaults.get(run["cache_size"])
        if mine is None or run is mine:
            continue
        for mode in results["modes"]:
            for category in ("all", ANSWERABLE, "single-hop"):
                found.append(
                    {
                        "policy": run["policy"],
                        "cache_size": run["cache_size"],
                        "decay": run["decay"],
                        "recent": run["recent"],
                        "mode": mode,
                        "category": category,
                        "difference": _paired_cloze(mine["records"], run["records"], mode, category, seed),
                    }
                )
    return found


def _paired_cloze(mine: list[dict], theirs: list[dict], mode: str, category: str, seed: int) -> dict:
    def chosen(records: list[dict]) -> dict[tuple, float]:
        return {
            (r["conversation"], r["question"]): float(r["cloze"])
            for r in records
            if r["mode"] == mode and _in_group(r, category)
        }

    a, b = chosen(mine), chosen(theirs)
    return mean_interval([a[k] - b[k] for k in sorted(a.keys() & b.keys())], seed)


# Shares of a question's evidence the cache held, as ``evidence_use`` groups them: (label, from, up to but not with).
EVIDENCE_BINS = (("under 10%", 0.0, 0.1), ("10-90%", 0.1, 0.9), ("90% or more", 0.9, 1.1))


def evidence_use(results: dict, seed: int = 0) -> list[dict]:
    """Whether the model uses the evidence a cache kept: the cloze of answerable questions under every setting and
    mode, pooled and grouped by the share of their evidence the cache held (``EVIDENCE_BINS``), beside the oracle's
    cloze on the same questions. Where the cache held the evidence and the cloze still falls short of the oracle's,
    what is missing is the model reading it among everything else, not a policy that keeps it. A question counts once
    per setting and mode it was asked in, so the intervals are indicative."""
    oracle = {(r["conversation"], r["question"]): float(r["cloze"]) for r in results["oracle"]["records"]}
    asked = [r for run in results["runs"] for r in run["records"] if _in_group(r, ANSWERABLE)]
    found = []
    for label, low, high in EVIDENCE_BINS:
        chosen = [r for r in asked if low <= r["evidence_kept"] < high]
        if chosen:
            found.append(
                {
                    "evidence_kept": label,
                    "cloze": mean_interval([float(r["cloze"]) for r in chosen], seed),
                    "oracle_cloze": mean_interval([oracle[r["conversation"], r["question"]] for r in chosen], seed),
                }
            )
    return found


def _in_group(record: dict, group: str) -> bool:
    """Whether ``record`` counts in ``group``: ``all``, ``answerable`` (not adversarial) or a category's name."""
    if group == "all":
        return True
    if group == ANSWERABLE:
        return record["category"] != CATEGORIES[ADVERSARIAL]
    return record["category"] == group


# What runs merged into one result must share: the same benchmark, asked the same way.
SHARED_FIELDS = (
    "task",
    "model",
    "backend",
    "data",
    "sessions",
    "questions_per_conversation",
    "modes",
    "later_sessions",
    "generate",
    "seed",
    "threads",
)


def merge(parts: Sequence[dict], names: Sequence[str]) -> dict:
    """One result from runs of the same benchmark on parts of it, each run in its own process (other conversations,
    other settings), as if one run had done them all: records joined per setting, summaries, the oracle and the
    targets computed again over the whole. Every setting must cover every conversation exactly once, so that no
    table mixes question sets; ``ValueError`` says what is missing or doubled."""
    if not parts:
        raise ValueError("nothing to merge: give the LoCoMo result files of the parts")
    first = parts[0]
    for name, part in zip(names, parts):
        if part.get("task") != "locomo":
            raise ValueError(f"{name} holds a {part.get('task')!r} result: only LoCoMo results merge")
        differ = [field for field in SHARED_FIELDS if part.get(field) != first.get(field)]
        if differ:
            raise ValueError(f"{name} differs from {names[0]} in {', '.join(differ)}: they are not one benchmark")
    conversations = list(dict.fromkeys(c for part in parts for c in part["conversations"]))
    questions = {(q["conversation"], q["question"]): q for part in parts for q in part["questions"]}
    oracle = list({(r["conversation"], r["question"]): r for part in parts for r in part["oracle"]["records"]}.values())
    runs: dict[tuple, dict] = {}
    covered: dict[tuple, list[str]] = {}
    for name, part in zip(names, parts):
        for run in part["runs"]:
            key = (run["policy"], run["cache_size"], run["decay"], run["recent"])
            doubled = set(covered.get(key, ())) & set(part["conversations"])
            if doubled:
                raise ValueError(f"{name} runs {_key_label(key)} again on conversations {sorted(doubled)}")
            covered.setdefault(key, []).extend(part["conversations"])
            if key not in runs:
                runs[key] = {**run, "records": [], "prefilled_tokens": 0, "evicted_tokens": 0, "seconds": 0.0}
            merged = runs[key]
            merged["records"] += run["records"]
            for field in ("prefilled_tokens", "evicted_tokens", "seconds"):
                merged[field] += run[field]
    for key, done in covered.items():
        missing = [c for c in conversations if c not in done]
        if missing:
            raise ValueError(
                f"{_key_label(key)} did not run on conversations {missing}: run it there or leave them out"
            )
    seed = first["seed"]
    for run in runs.values():
        run["records"] = with_oracle_gap(run["records"], oracle)
        run["summary"] = {
            mode: summarize([r for r in run["records"] if r["mode"] == mode], seed) for mode in first["modes"]
        }
        run["seconds"] = round(run["seconds"], 2)
    results = {
        **{field: first.get(field) for field in SHARED_FIELDS},
        "conversations": conversations,
        "questions": list(questions.values()),
        "merged_from": list(names),
        "oracle": {"summary": summarize(oracle, seed), "records": oracle},
        "runs": list(runs.values()),
    }
    results["targets"] = targets(results, seed)
    results["paired_with_default"] = paired_with_default(results, seed)
    return results


def _key_label(key: tuple) -> str:
    policy, cache_size, decay, recent = key
    return f"{policy} (cache {cache_size}, decay {decay}, recent {recent})"
