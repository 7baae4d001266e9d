"""The SirLLM paper's three data sets, read from the folder the paper's repository publishes (``data/``).

Every task becomes a list of :class:`Episode`: one session each (a Grocery or DailyDialog dialogue, an RPS game), made
of multiple-choice :class:`Turn`. The user messages follow the paper's prompts: the question, then its lettered
choices.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FILES = {
    "grocery": ["keys.jsonl"],
    "dailydialog": ["dailydialog.jsonl"],
    "rps": [f"rock_paper_scissors_dominant_{move}.jsonl" for move in ("rock", "paper", "scissors")],
}
# Where the files sit in a clone of the paper's repository (Zoeyyao27/SirLLM), if not directly in the folder.
SUBFOLDERS = {"grocery": "grocery_keys", "dailydialog": "dailydialog", "rps": "rock_paper_scissors"}
RPS_FIRST = "Let's play a game of Rock-Paper-Scissors. Choose one option from: (A) rock (B) paper (C) scissors."
RPS_NEXT = (
    "I chose [{move}]. Analyze my preferences to maximize your winning rate and proceed to the next round. "
    "Choices: (A) rock (B) paper (C) scissors. You choose:"
)
# The same rounds asked without lettered choices, for the cloze form (the reply is the move itself).
RPS_FIRST_STEM = "Let's play a game of Rock-Paper-Scissors. Rock, paper or scissors?"
RPS_NEXT_STEM = (
    "I chose [{move}]. Analyze my preferences to maximize your winning rate and proceed to the next round. "
    "Rock, paper or scissors?"
)


@dataclass
class Turn:
    """One user question with its options; ``kind`` tells what it counts towards (see each task's metrics)."""

    question: str
    letters: list[str]
    texts: list[str]
    answer: int  # index of the right option (for RPS: the winning move)
    kind: str  # grocery: "key", "commonsense" or "recall"; dailydialog: "response"; rps: "round"
    user_move: int | None = None  # RPS: index of the player's move this round
    stem: str = ""  # the question without its lettered choices (what the turn asks in cloze form)


@dataclass
class Episode:
    """One session's worth of turns."""

    name: str
    turns: list[Turn]


class DataMissingError(FileNotFoundError):
    """The data folder lacks a task's files."""


def find_files(data: str | Path, task: str) -> list[Path]:
    """The task's files in ``data`` (the paper's ``data/`` folder or a flat copy of its files)."""
    root = Path(data).expanduser()
    for folder in (root, root / SUBFOLDERS[task]):
        paths = [folder / name for name in FILES[task]]
        if all(p.is_file() for p in paths):
            return paths
    raise DataMissingError(
        f"{task}: {', '.join(FILES[task])} not found in {root} (get them from the data/ folder of the SirLLM "
        "repository, github.com/Zoeyyao27/SirLLM, and pass that folder with --data)"
    )


def load(task: str, data: str | Path, limit: int | None = None) -> list[Episode]:
    """The task's episodes, the first ``limit`` of them (for RPS: three games, one per player type, of ``limit``
    rounds; the paper plays 2000)."""
    paths = find_files(data, task)
    if task == "grocery":
        return _take(_grocery(_rows(paths[0])), limit)
    if task == "dailydialog":
        return _take(_dailydialog(_rows(paths[0])), limit)
    return [_rps(path, limit or 2000) for path in paths]


def _rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _take(episodes: Iterator[Episode], limit: int | None) -> list[Episode]:
    taken = []
    for episode in episodes:
        if limit is not None and len(taken) == limit:
            break
        taken.append(episode)
    return taken


def _choice_turn(row: dict, question: str, kind: str) -> Turn:
    choices = row["question"]["choices"]
    letters = [c["label"] for c in choices]
    texts = [c["text"].strip() for c in choices]
    listed = " ".join(f"({c['label']}) {c['text'].strip()}" for c in choices)
    return Turn(f"{question} Choices: {listed}", letters, texts, letters.index(row["answerKey"]), kind, stem=question)


def _grocery(rows: Iterator[dict]) -> Iterator[Episode]:
    turns: list[Turn] = []
    for row in rows:
        row_id, stem = str(row["id"]), row["question"]["stem"].strip()
        if row_id.startswith("key_"):
            turns = [Turn(stem, ["A"], ["OK"], 0, "key")]
        elif row_id.startswith("answer_"):
            turns.append(_choice_turn(row, stem, "recall"))
            yield Episode(f"grocery-{row_id.split('_', 1)[1]}", turns)
        else:
            turns.append(_choice_turn(row, stem, "commonsense"))


def _dailydialog(rows: Iterator[dict]) -> Iterator[Episode]:
    name, turns = None, []
    for row in rows:
        dialogue = str(row["id"]).split("_")[0]
        if dialogue != name and turns:
            yield Episode(f"dailydialog-{name}", turns)
            turns = []
        name = dialogue
        question = "Choose the best response for the input: " + row["question"]["stem"].strip()
        turns.append(_choice_turn(row, question, "response"))
    if turns:
        yield Episode(f"dailydialog-{name}", turns)


def _rps(path: Path, rounds: int) -> Episode:
    turns, previous = [], None
    for row in _rows(path):
        if len(turns) == rounds:
            break
        choices = row["question"]["choices"]
        letters = [c["label"] for c in choices]
        texts = [c["text"] for c in choices]
        question = RPS_FIRST if previous is None else RPS_NEXT.format(move=previous)
        stem = RPS_FIRST_STEM if previous is None else RPS_NEXT_STEM.format(move=previous)
        move = letters.index(row["user_choice"])
        turns.append(Turn(question, letters, texts, letters.index(row["answerKey"]), "round", move, stem))
        previous = texts[move]
    return Episode(path.stem.replace("rock_paper_scissors_", "rps-"), turns)
