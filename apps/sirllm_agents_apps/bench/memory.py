"""Memory quality: the paper's multiple-choice protocol, run under each cache policy.

One session per episode. Each turn sends the user question with its lettered choices; the session scores every
option from one shared prefix (:meth:`Session.score`): the letters by their log-likelihood, the option texts by
their log-likelihood per character (lm-eval's ``acc_norm``, so long options are not penalized for their length).
The option chosen under the primary scoring (``--score``) is appended as the assistant's reply, so later turns see
it in the cache; the other scoring is recorded on the same conversation.

A recall turn (Grocery's last), a DailyDialog response and an RPS round are also asked in cloze form, on a fork of
the session taken just before the turn: the question without its lettered options, each option's text scored as the
whole reply, the best per token winning (``cloze``; per character: ``cloze_char``). With the options in the prompt a
small model picks among the texts it has just read, whatever it remembers; without them, only what the cache holds
can favour the right one. Grocery runs also record how much of the first turn's grocery the cache still holds at the
recall question.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from sirllm_agents.engine import Engine
from sirllm_agents.policies import POLICIES as LIBRARY_POLICIES
from sirllm_agents.policies import ContextOverflowError
from sirllm_agents.session import Session

from .data import Episode, Turn

POLICIES = (*LIBRARY_POLICIES, "truncate")
SCORINGS = ("letter", "text")  # every turn; the CLOZE_KINDS of turns add "cloze" and "cloze_char"
CLOZE_KINDS = ("recall", "response", "round")  # Grocery's recall, DailyDialog's responses, RPS rounds
START_SIZE = 4  # attention sinks, as in the paper


@dataclass
class Setting:
    """One column of a sweep: a policy, its cache budget in tokens, the per-turn decay of the entropy policies, and
    the share of the cache they keep for the newest tokens (``recent_size``)."""

    policy: str
    cache_size: int | None  # None for "full": the model's maximum length
    decay: float
    recent: float = 0.0


@dataclass
class Tally:
    """Per turn kind and scoring, how many turns and how many right; for RPS also ties. A turn the policy could not
    fit (``truncate`` only) counts as wrong, and in ``overflowed``."""

    overflowed: int = 0
    turns: dict[str, int] = field(default_factory=dict)
    right: dict[str, dict[str, int]] = field(default_factory=dict)
    ties: dict[str, dict[str, int]] = field(default_factory=dict)
    key_in_cache: list[float] = field(default_factory=list)  # Grocery: per recall turn, see `key_share_in_cache`

    def add(self, group: str, turn: Turn, picks: dict[str, int]) -> None:
        self.turns[group] = self.turns.get(group, 0) + 1
        for scoring, pick in picks.items():
            right = self.right.setdefault(scoring, {})
            right[group] = right.get(group, 0) + (pick == turn.answer)
            if turn.user_move is not None:
                ties = self.ties.setdefault(scoring, {})
                ties[group] = ties.get(group, 0) + (pick == turn.user_move)

    def rate(self, scoring: str, group: str, counts: str = "right") -> float:
        return getattr(self, counts)[scoring].get(group, 0) / self.turns[group]


class Player:
    """Plays episodes under one setting: a fresh session per episode; ``truncate`` trims the oldest whole messages
    so the prompt fits the budget (what ``trim_messages`` and memory buffers do), on a never-evicting cache."""

    def __init__(self, engine: Engine, setting: Setting):
        self.engine = engine
        self.setting = setting
        self.session: Session | None = None

    def fork(self) -> Player:
        """A player on a copy of this one's session (see :meth:`Session.fork`)."""
        twin = Player(self.engine, self.setting)
        twin.session = self.session.fork()
        return twin

    def new_episode(self) -> None:
        s = self.setting
        if s.policy == "truncate":
            self.session = self.engine.session(cache_size=s.cache_size, policy="full")
        else:
            size = None if s.policy == "full" else s.cache_size
            self.session = self.engine.session(
                cache_size=size,
                start_size=START_SIZE,
                recent_size=round(s.recent * size) if size else 0,
                decay=s.decay,
                policy=s.policy,
            )

    def score(self, messages: list[dict], options: list[str]) -> list[float] | None:
        """The options' log-likelihoods, or None when ``truncate`` cannot fit even the last message alone."""
        assert self.session is not None
        if self.setting.policy != "truncate":
            return self.session.score(messages, options)
        try:
            return self.session.score(self.trimmed(messages, options), options)
        except ContextOverflowError:
            self.session.reset()  # keeps the session's totals
            return None

    def trimmed(self, messages: list[dict], options: list[str]) -> list[dict]:
        """The newest messages, starting at a user message, whose prompt and longest option fit the budget."""
        budget = self.setting.cache_size - max(len(self.engine.model.encode(o)) for o in options)
        start = 0
        while start < len(messages) - 1:
            prompt = self.engine.model.template.render(messages[start:], add_generation_prompt=True)
            if len(self.engine.model.encode(prompt)) <= budget:
                break
            start += 2  # a user message and the reply to it
        return messages[start:]


def play(
    player: Player, episode: Episode, scoring: str, tally: Tally, group: str | None, advance: Callable[[], None]
) -> None:
    """One episode: score each turn's options, record both scorings' picks (under ``group``, else the turn's kind),
    and reply with the primary pick. A blank option text (DailyDialog has some) has no text to score: the text
    scoring never picks it, the letter scoring may."""
    player.new_episode()
    messages: list[dict] = []
    for turn in episode.turns:
        cloze = cloze_picks(player, messages, turn) if turn.kind in CLOZE_KINDS else {}
        messages.append({"role": "user", "content": turn.question})
        texts = [text for text in turn.texts if text]
        scores = player.score(messages, turn.letters + texts)
        k = len(turn.letters)
        if scores is None:
            tally.overflowed += 1
            picks = {"letter": -1, "text": -1}
            reply = ""
        else:
            text_scores = iter(scores[k:])
            per_char = [next(text_scores) / len(text) if text else -math.inf for text in turn.texts]
            picks = {
                "letter": max(range(k), key=lambda i: scores[i]),
                "text": max(range(k), key=lambda i: per_char[i]),
            }
            reply = turn.letters[picks[scoring]] if scoring == "letter" else turn.texts[picks[scoring]]
        tally.add(group or turn.kind, turn, picks | cloze)
        if turn.kind == "recall":
            tally.key_in_cache.append(key_share_in_cache(player.session, turn.texts[turn.answer]))
        messages.append({"role": "assistant", "content": "OK" if turn.kind == "key" else reply})
        advance()


def cloze_picks(player: Player, messages: list[dict], turn: Turn) -> dict[str, int]:
    """Ask ``turn`` without its options on a fork of the player's session; each option's text is scored as the
    reply, normalized by its tokens (``cloze``) and by its characters (``cloze_char``); a blank option is never
    picked. -1 when it does not fit."""
    texts = [text for text in turn.texts if text]
    scores = player.fork().score(messages + [{"role": "user", "content": turn.stem}], texts)
    if scores is None:
        return {"cloze": -1, "cloze_char": -1}
    encode = player.engine.model.encode
    scored = dict(zip(texts, scores))
    per_token = [scored[text] / len(encode(text)) if text else -math.inf for text in turn.texts]
    per_char = [scored[text] / len(text) if text else -math.inf for text in turn.texts]
    return {"cloze": _best(per_token), "cloze_char": _best(per_char)}


def _best(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def key_share_in_cache(session: Session, grocery: str) -> float:
    """The share of the grocery's tokens, where the first turn names it (``GROCERY: [item]``), that the cache still
    holds: what the model can attend to when it answers the recall question. It shows whether a policy kept the key
    fact apart from whether the model can use it; 0 when the conversation no longer has the first turn (``truncate``).
    """
    conversation = session.memory().conversation
    text = "".join(token.text for token in conversation)
    start = text.find(f"[{grocery}]") + 1
    if start == 0:
        return 0.0
    end, offset, kept = start + len(grocery), 0, []
    for token in conversation:
        if offset < end and offset + len(token.text) > start:
            kept.append(token.retained)
        offset += len(token.text)
    return sum(kept) / len(kept)


def run_setting(
    engine: Engine, task: str, episodes: list[Episode], setting: Setting, scoring: str, advance: Callable[[], None]
) -> dict:
    """Play every episode under ``setting``; returns the setting, the task's metrics per scoring, and costs."""
    player, tally = Player(engine, setting), Tally()
    start = time.perf_counter()
    prefilled = evicted = 0
    for episode in episodes:
        group = episode.name.removeprefix("rps-dominant_") if task == "rps" else None
        play(player, episode, scoring, tally, group, advance)
        prefilled += player.session.stats.prefilled_tokens
        evicted += player.session.stats.evicted_tokens
    return {
        **asdict(setting),
        "episodes": len(episodes),
        "turns": sum(len(e.turns) for e in episodes),
        "metrics": {s: metrics(task, tally, s) for s in tally.right},
        **({"key_in_cache": sum(tally.key_in_cache) / len(tally.key_in_cache)} if tally.key_in_cache else {}),
        "overflowed_turns": tally.overflowed,
        "prefilled_tokens": prefilled,
        "evicted_tokens": evicted,
        "seconds": round(time.perf_counter() - start, 2),
    }


def metrics(task: str, tally: Tally, scoring: str) -> dict:
    """Grocery: ACC_g (recall turns) and ACC_c (CommonsenseQA turns); DailyDialog: accuracy; RPS: win / tie / lose
    rates per player type."""
    if task == "grocery":
        result = {"acc_g": tally.rate(scoring, "recall")}
        if "commonsense" in tally.right[scoring]:  # cloze scorings score only the recall turn
            result["acc_c"] = tally.rate(scoring, "commonsense")
        return result
    if task == "dailydialog":
        return {"accuracy": tally.rate(scoring, "response")}
    result = {}
    for player in tally.turns:
        win, tie = tally.rate(scoring, player), tally.rate(scoring, player, "ties")
        result[player] = {"win": win, "tie": tie, "lose": 1.0 - win - tie}
    return result
