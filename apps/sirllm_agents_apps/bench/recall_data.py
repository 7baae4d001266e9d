"""The recall suite's conversations, generated from a seed (no copied data).

A conversation is a scripted chat, user and assistant turns both written here: facts of several kinds (codes, names,
places, passwords, dates) stated early, distractor turns of several kinds (questions with their answers, tool-like
outputs, chit-chat) until the conversation reaches its length, and one fact later updated to a new value. At the end
each fact is asked for; the newest value is the answer, and the value it replaced is among the wrong candidates.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Per kind: (statement, question) pairs, and how to draw a value. The subject of each pair is unique across kinds,
# so that no two facts of one conversation are asked with the same question.
SUBJECTS: dict[str, list[tuple[str, str]]] = {
    "code": [
        ("my locker code is {v}", "What is my locker code?"),
        ("the code for my bike lock is {v}", "What is the code for my bike lock?"),
        ("the door code at the office is {v}", "What is the door code at the office?"),
        ("my garage PIN is {v}", "What is my garage PIN?"),
    ],
    "name": [
        ("my dog's name is {v}", "What is my dog's name?"),
        ("my new manager's name is {v}", "What is my new manager's name?"),
        ("my neighbour's name is {v}", "What is my neighbour's name?"),
        ("my boat is called {v}", "What is my boat called?"),
    ],
    "place": [
        ("my sister lives in {v}", "Which city does my sister live in?"),
        ("our team offsite will be held in {v}", "Where will our team offsite be held?"),
        ("I was born in {v}", "Which city was I born in?"),
        ("my parcel is waiting for me in {v}", "Where is my parcel waiting for me?"),
    ],
    "password": [
        ("the wifi password is {v}", "What is the wifi password?"),
        ("the password for the shared drive is {v}", "What is the password for the shared drive?"),
        ("my library card password is {v}", "What is my library card password?"),
    ],
    "date": [
        ("my dentist appointment is on {v}", "When is my dentist appointment?"),
        ("my passport expires on {v}", "When does my passport expire?"),
        ("the project deadline is {v}", "When is the project deadline?"),
        ("my cousin's wedding is on {v}", "When is my cousin's wedding?"),
    ],
}
NAMES = [
    "Pickles",
    "Marlowe",
    "Juniper",
    "Tobias",
    "Rosalind",
    "Ferdinand",
    "Clementine",
    "Barnaby",
    "Odessa",
    "Percival",
    "Wilhelmina",
    "Ignatius",
    "Saffron",
    "Leopold",
    "Marigold",
    "Cornelius",
    "Philippa",
    "Archibald",
    "Delphine",
    "Evander",
    "Henrietta",
    "Lysander",
    "Rufus",
    "Tamsin",
]
CITIES = [
    "Lisbon",
    "Reykjavik",
    "Montreal",
    "Valparaiso",
    "Krakow",
    "Hobart",
    "Porto",
    "Tallinn",
    "Cartagena",
    "Ljubljana",
    "Marrakesh",
    "Winnipeg",
    "Adelaide",
    "Bergen",
    "Cusco",
    "Gdansk",
    "Halifax",
    "Seville",
    "Trieste",
    "Zanzibar",
    "Bruges",
    "Salzburg",
    "Dunedin",
]
WORDS = [
    "orchid",
    "falcon",
    "granite",
    "lantern",
    "copper",
    "meadow",
    "walrus",
    "tundra",
    "saffron",
    "harbor",
    "quartz",
    "juniper",
    "cobalt",
    "pepper",
    "glacier",
    "nutmeg",
    "willow",
    "comet",
    "thistle",
    "marble",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

STATE = ["Please remember this: {s}.", "A note for later: {s}.", "By the way, {s}.", "Keep this in mind: {s}."]
UPDATE = ["Update: {s} now, not the old one.", "Correction, that changed: {s} now."]
ACKNOWLEDGE = ["Got it, I'll remember that.", "Noted.", "Okay, I've made a note of it.", "Understood, thanks."]

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Egypt", "Cairo"),
    ("Chile", "Santiago"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Greece", "Athens"),
    ("Ireland", "Dublin"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
]
OPPOSITES = [
    ("ancient", "modern"),
    ("generous", "selfish"),
    ("shallow", "deep"),
    ("narrow", "wide"),
    ("rough", "smooth"),
    ("loud", "quiet"),
    ("early", "late"),
    ("heavy", "light"),
    ("fragile", "sturdy"),
]
CHAT = [
    ("I had a long day at work today.", "Sorry to hear that. A short walk or a quiet evening might help you unwind."),
    ("I'm thinking about learning to paint.", "That sounds like a lovely hobby. Watercolours are a gentle start."),
    ("The weather has been strange this week.", "It has been unpredictable. A light jacket covers most of it."),
    ("I finally finished the book I was reading.", "Congratulations! Finishing a book is always satisfying."),
    ("My plants keep dying on the windowsill.", "They may get too much direct sun. Try a spot with softer light."),
    ("I want to cook something new this weekend.", "How about a simple risotto? It is forgiving and comforting."),
    ("I can't decide what to watch tonight.", "A short documentary could be a nice change from the usual."),
    ("I've started going for morning runs.", "Great habit! Remember to stretch and build the distance slowly."),
    ("My coffee machine broke this morning.", "That's a rough start. A pour-over or a French press can tide you over."),
    ("I'm trying to drink more water.", "Keeping a bottle on your desk makes it much easier to remember."),
]
SERVICES = ["billing", "search", "auth", "storage", "mailer", "scheduler", "indexer", "gateway"]
CONDITIONS = ["cloudy", "sunny", "rainy", "windy", "foggy", "clear"]


@dataclass(frozen=True)
class Fact:
    """One fact of a conversation and how it is asked for. ``value`` is its newest value, ``previous`` the value an
    update replaced (None if never updated). ``message`` is the index of the user message stating ``value``;
    ``candidates`` hold ``value`` at ``answer`` and wrong values of the same kind (``previous`` among them)."""

    kind: str
    question: str
    value: str
    candidates: tuple[str, ...]
    answer: int
    message: int
    previous: str | None = None
    previous_message: int | None = None


@dataclass(frozen=True)
class Conversation:
    """A scripted conversation (alternating user / assistant messages) and the facts it states."""

    name: str
    messages: tuple[dict, ...]
    facts: tuple[Fact, ...]


def generate(
    seed: int,
    length: int,
    count_tokens: Callable[[str], int],
    facts: int = 3,
    candidates: int = 5,
    update: bool = True,
    kinds: Sequence[str] = tuple(SUBJECTS),
) -> Conversation:
    """A conversation of about ``length`` tokens (message texts as ``count_tokens`` counts them, plus a few per
    message for the chat template). ``facts`` facts of different ``kinds`` are stated over the first half; with
    ``update``, the first of them gets a new value at about three quarters of the way."""
    rng = random.Random(seed)
    kinds = rng.sample(list(kinds), facts)
    drawn = [_draw_fact(rng, kind, candidates) for kind in kinds]
    used = {v for _, _, values in drawn for v in values}
    # Where each statement goes, as a share of the conversation's tokens.
    marks = [0.5 * i / facts for i in range(facts)]
    if update:
        marks.append(0.75)
    messages: list[dict] = []
    tokens = 0
    stated: dict[int, int] = {}
    events = list(range(len(marks)))
    while tokens < length or events:
        if events and tokens >= marks[events[0]] * length:
            event = events.pop(0)
            index = event if event < facts else 0
            statement, _, values = drawn[index]
            value = values[1] if event >= facts else values[0]
            template = UPDATE if event >= facts else STATE
            user = rng.choice(template).format(s=statement.format(v=value))
            stated[event] = len(messages)
            exchange = (user[0].upper() + user[1:], rng.choice(ACKNOWLEDGE))
        else:
            exchange = _distractor(rng, used)
        for role, text in zip(("user", "assistant"), exchange):
            messages.append({"role": role, "content": text})
            tokens += count_tokens(text) + 5  # the template's role markers and end of turn
    result = []
    for index, (_, question, values) in enumerate(drawn):
        updated = update and index == 0
        value, previous = (values[1], values[0]) if updated else (values[0], None)
        wrong = [v for v in values if v != value]
        if not updated:
            wrong = wrong[1:]  # the spare second value is used only by an update
        options = wrong[: candidates - 1] + [value]
        rng.shuffle(options)
        result.append(
            Fact(
                kind=kinds[index],
                question=question,
                value=value,
                candidates=tuple(options),
                answer=options.index(value),
                message=stated[facts] if updated else stated[index],
                previous=previous,
                previous_message=stated[index] if updated else None,
            )
        )
    return Conversation(f"recall-{seed}", tuple(messages), tuple(result))


def _draw_fact(rng: random.Random, kind: str, candidates: int) -> tuple[str, str, list[str]]:
    """A subject of ``kind`` and ``candidates + 1`` distinct values (the second one is an update's new value)."""
    statement, question = rng.choice(SUBJECTS[kind])
    values: list[str] = []
    while len(values) < candidates + 1:
        value = _value(rng, kind)
        if value not in values:
            values.append(value)
    return statement, question, values


def _value(rng: random.Random, kind: str) -> str:
    if kind == "code":
        return str(rng.randint(1000, 9999))
    if kind == "name":
        return rng.choice(NAMES)
    if kind == "place":
        return rng.choice(CITIES)
    if kind == "password":
        return f"{rng.choice(WORDS)}{rng.randint(10, 99)}"
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"


def _distractor(rng: random.Random, used: set[str]) -> tuple[str, str]:
    """A user / assistant exchange that states nothing to remember: a question with its answer, a tool-like output
    and its summary, or chit-chat. Numbers and names in it never equal a fact's candidate values."""
    kind = rng.choice(("question", "tool", "chat"))
    if kind == "chat":
        return rng.choice(CHAT)
    if kind == "question":
        form = rng.randrange(4)
        if form == 0:
            a, b = rng.randint(12, 99), rng.randint(3, 19)
            return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."
        if form == 1:
            country, capital = rng.choice(CAPITALS)
            return f"What is the capital of {country}?", f"The capital of {country} is {capital}."
        if form == 2:
            word, opposite = rng.choice(OPPOSITES)
            return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{opposite}'."
        hours = rng.randint(2, 23)
        return f"How many minutes are in {hours} hours?", f"There are {hours * 60} minutes in {hours} hours."
    number = _fresh_number(rng, used)
    if rng.random() < 0.5:
        service, seconds = rng.choice(SERVICES), rng.randint(3, 90)
        log = (
            f"[job {number}] service={service} status=ok duration={seconds}s retries={rng.randint(0, 3)} "
            f"records={rng.randint(100, 9000)}"
        )
        return f"Here is the tool output:\n{log}\nSummarize it.", f"Job {number} of {service} finished in {seconds} s."
    temperature, condition = rng.randint(-5, 34), rng.choice(CONDITIONS)
    output = (
        f'{{"station": {number}, "temperature_c": {temperature}, "conditions": "{condition}", '
        f'"humidity": {rng.randint(20, 95)}}}'
    )
    return (
        f"The weather tool returned:\n{output}\nWhat is the weather like?",
        f"It is {temperature} degrees Celsius and {condition}.",
    )


def _fresh_number(rng: random.Random, used: set[str]) -> int:
    while True:
        number = rng.randint(1000, 9999)
        if str(number) not in used:
            return number
