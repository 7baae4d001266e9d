"""LoCoMo's conversations as a chat app would send them, their questions, and the cloze candidates of each question.

LoCoMo (Maharana et al., ACL 2024) holds ten conversations between two people over 19-32 dated sessions, with
annotated questions and the turns (``dia_id``) that hold each answer. The data is read from the folder given with
``--data`` (``NN.json`` files); it is never shipped with the package.

Each speaker's turn becomes one message: the first speaker's turns are ``user`` messages, the second's ``assistant``
messages, each led by the speaker's name (``"Caroline: ..."``), a shared image given by its caption. The first turn
of a session opens with a line holding the session's date, so that "yesterday" can be placed.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ROUND_ROBIN = (4, 1, 2, 3, 5)  # the order categories take turns in when questions are chosen
ADVERSARIAL = 5
# The gold reply of an adversarial question (its premise is false, the conversation never says so): the right
# answer says it is not there. Its adversarial answer (what the other speaker did) is the first wrong candidate.
NOT_MENTIONED = "That is not mentioned in the conversation."
DISTRACTORS = 4  # wrong candidates per question, as the issue asks: five candidates, chance 1/5
_DIA_ID = re.compile(r"D:?(\d+):(\d+)")  # the annotations also write "D:11:26", "D30:05" and several ids in one
_MONTHS = "january february march april may june july august september october november december"
_WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday"
_DATE_WORDS = set(_MONTHS.split()) | set(_WEEKDAYS.split()) | {"yesterday", "week", "weekend", "month", "year"}
_NUMBER_WORDS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"}


class LocomoDataMissingError(FileNotFoundError):
    """The data folder holds no LoCoMo conversation."""


@dataclass(frozen=True)
class Question:
    """One annotated question. ``answer`` is the gold reply the cloze scores (for an adversarial question
    :data:`NOT_MENTIONED`); ``evidence`` the indexes of the messages that hold the answer; ``session`` the index of
    the session holding the last of them."""

    index: int  # in the conversation's ``qa`` list
    text: str
    answer: str
    category: int
    evidence: tuple[int, ...]
    session: int
    adversarial_answer: str | None = None


@dataclass(frozen=True)
class Conversation:
    """One LoCoMo conversation as chat messages. ``session_ends[k]`` is the number of messages once session ``k``
    is over; ``sessions[i]`` is message ``i``'s session; ``oracle_texts[i]`` is message ``i`` with its session's
    date however far into the session it comes (what the oracle context is made of)."""

    name: str
    messages: tuple[dict, ...]
    sessions: tuple[int, ...]
    session_ends: tuple[int, ...]
    oracle_texts: tuple[str, ...]
    questions: tuple[Question, ...]
    unanswerable: int  # questions none of whose evidence ids is a turn of the conversation: never asked

    def oracle_messages(self, question: Question) -> list[dict]:
        """Only the question's evidence turns, in order, each with its session's date: a perfect memory's context."""
        return [{"role": self.messages[i]["role"], "content": self.oracle_texts[i]} for i in question.evidence]


def find_files(data: str | Path) -> list[Path]:
    """The conversation files (``NN.json``) in ``data``, in name order."""
    root = Path(data).expanduser()
    paths = sorted(p for p in root.glob("*.json") if p.stem.isdigit())
    if not paths:
        raise LocomoDataMissingError(
            f"no LoCoMo conversation (NN.json) in {root}: unpack data/locomo10.zip of github.com/snap-research/locomo "
            "as one file per conversation and pass that folder with --data"
        )
    return paths


def load(data: str | Path, which: str | None = None) -> list[Conversation]:
    """The conversations in ``data``: all of them, or as ``which`` says: a count (``"3"``: the first three files)
    or a comma list of file stems (``"26,41"``; a single number that names a file is that file)."""
    paths = find_files(data)
    if which:
        known = {p.stem: p for p in paths}
        names = [n.strip() for n in which.split(",")]
        if len(names) == 1 and names[0].isdigit() and names[0] not in known:
            paths = paths[: int(names[0])]
        else:
            unknown = [n for n in names if n not in known]
            if unknown:
                raise LocomoDataMissingError(f"conversations {unknown} not in {data} (it holds {', '.join(known)})")
            paths = [known[n] for n in names]
    return [parse(p.stem, json.loads(p.read_text(encoding="utf-8"))) for p in paths]


def _dia_key(text: str) -> tuple[int, int] | None:
    match = _DIA_ID.fullmatch(text.strip())
    return (int(match[1]), int(match[2])) if match else None


def _turn_text(turn: dict) -> str:
    text = f"{turn['speaker']}: {turn['text'].strip()}"
    if turn.get("blip_caption"):
        text += f" [shares an image: {turn['blip_caption'].strip()}]"
    return text


def parse(name: str, raw: dict) -> Conversation:
    """One conversation file's content as a :class:`Conversation`."""
    numbers = sorted(int(k.split("_")[1]) for k in raw if re.fullmatch(r"session_\d+", k) and raw[k])
    messages, sessions, session_ends, oracle_texts, index_of = [], [], [], [], {}
    for session, number in enumerate(numbers):
        date = raw[f"session_{number}_date_time"].strip()
        for position, turn in enumerate(raw[f"session_{number}"]):
            key = _dia_key(turn["dia_id"])
            if key is not None:
                index_of[key] = len(messages)
            role = "user" if turn["speaker"] == raw["speaker_a"] else "assistant"
            text = _turn_text(turn)
            messages.append({"role": role, "content": f"[{date}]\n{text}" if position == 0 else text})
            oracle_texts.append(f"[{date}]\n{text}")
            sessions.append(session)
        session_ends.append(len(messages))
    questions, unanswerable = [], 0
    for index, qa in enumerate(raw["qa"]):
        keys = [(int(s), int(t)) for ids in qa["evidence"] for s, t in _DIA_ID.findall(ids)]
        evidence = tuple(sorted({index_of[k] for k in keys if k in index_of}))
        if not evidence:
            unanswerable += 1
            continue
        adversarial = qa["category"] == ADVERSARIAL
        questions.append(
            Question(
                index=index,
                text=qa["question"].strip(),
                answer=NOT_MENTIONED if adversarial else str(qa["answer"]).strip(),
                category=qa["category"],
                evidence=evidence,
                session=sessions[evidence[-1]],
                adversarial_answer=str(qa["adversarial_answer"]).strip() if adversarial else None,
            )
        )
    return Conversation(
        name, tuple(messages), tuple(sessions), tuple(session_ends), tuple(oracle_texts), tuple(questions), unanswerable
    )


def first_sessions(conversation: Conversation, count: int) -> Conversation:
    """The conversation cut after its first ``count`` sessions, with the questions whose evidence all lies in them
    (a short slice for smoke runs; the candidates then come from those questions alone)."""
    end = conversation.session_ends[count - 1]
    questions = tuple(q for q in conversation.questions if q.evidence[-1] < end)
    return Conversation(
        conversation.name,
        conversation.messages[:end],
        conversation.sessions[:end],
        conversation.session_ends[:count],
        conversation.oracle_texts[:end],
        questions,
        conversation.unanswerable,
    )


def normalize_answer(text: str) -> str:
    """LoCoMo's (and SQuAD's) answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def token_f1(prediction: str, gold: str) -> float:
    """The F1 of the normalized words of ``prediction`` against ``gold``'s (counting repeats), as LoCoMo scores a
    generated answer."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def says_not_mentioned(reply: str) -> bool:
    """Whether a generated reply declines an adversarial question the way LoCoMo's evaluation accepts."""
    lowered = reply.lower()
    return "not mentioned" in lowered or "no information available" in lowered


def answer_kind(answer: str) -> str:
    """A coarse shape of an answer, so a question's wrong candidates look like its answer: ``yes/no``, ``date``,
    ``number`` or ``text``."""
    words = normalize_answer(answer).split()
    if not words:
        return "text"
    if words[0] in ("yes", "no") or words[:2] in (["likely", "yes"], ["likely", "no"]):
        return "yes/no"
    if _DATE_WORDS & set(words) or any(re.fullmatch(r"(19|20)\d\d(s)?", w) for w in words):
        return "date"
    if len(words) <= 3 and (words[0].isdigit() or words[0] in _NUMBER_WORDS):
        return "number"
    return "text"


def candidates(conversation: Conversation, question: Question, seed: int = 0) -> tuple[list[str], int]:
    """The cloze candidates of ``question`` and the gold's index among them: the gold answer and
    :data:`DISTRACTORS` answers of other questions of its category in the same conversation, those shaped like the
    gold (:func:`answer_kind`) first, none equal to it or to each other once normalized; in an order drawn from
    ``seed``, the conversation and the question, so every run asks the same. An adversarial question's wrong
    candidates are its own adversarial answer and other adversarial questions' adversarial answers. Fewer
    distractors when the category has too few other answers."""
    rng = random.Random(f"{seed}/{conversation.name}/{question.index}")
    adversarial = question.category == ADVERSARIAL
    seen = {normalize_answer(question.answer)}
    chosen = []
    if adversarial:
        chosen.append(question.adversarial_answer)
        seen.add(normalize_answer(question.adversarial_answer))
    others = []
    for other in conversation.questions:
        if other.category != question.category or other.index == question.index:
            continue
        text = other.adversarial_answer if adversarial else other.answer
        key = normalize_answer(text)
        if key and key not in seen:
            seen.add(key)
            others.append(text)
    rng.shuffle(others)
    shape = answer_kind(question.adversarial_answer if adversarial else question.answer)
    others.sort(key=lambda text: answer_kind(text) != shape)  # stable: same-shaped first, each group shuffled
    chosen += others[: DISTRACTORS - len(chosen)]
    options = [question.answer, *chosen]
    rng.shuffle(options)
    return options, options.index(question.answer)


def choose_questions(conversation: Conversation, limit: int | None, seed: int = 0) -> list[Question]:
    """Up to ``limit`` of the conversation's questions that have all their candidates (all of them when None),
    spread over the categories: each category's questions in an order drawn from ``seed`` and the conversation,
    the categories taking turns (:data:`ROUND_ROBIN`) until ``limit``; returned in conversation order."""
    rng = random.Random(f"{seed}/{conversation.name}/questions")
    queues = {}
    for category in ROUND_ROBIN:
        pool = [
            q
            for q in conversation.questions
            if q.category == category and len(candidates(conversation, q, seed)[0]) == DISTRACTORS + 1
        ]
        rng.shuffle(pool)
        queues[category] = pool
    chosen: list[Question] = []
    while any(queues.values()) and (limit is None or len(chosen) < limit):
        for category in ROUND_ROBIN:
            if queues[category] and (limit is None or len(chosen) < limit):
                chosen.append(queues[category].pop(0))
    return sorted(chosen, key=lambda q: q.index)
