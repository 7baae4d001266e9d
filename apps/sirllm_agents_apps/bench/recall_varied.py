"""The recall suite's second generator ("varied"), written apart from :mod:`.recall_data` so that no policy can be
tuned to one template.

Each question belongs to one category, and the conversation holds the sentences that category is about:

* ``plain``: a fact stated once, in one of several phrasings (the subject first, last, after a preamble, or in a
  second sentence of a message);
* ``update-free``: a fact stated, then changed later in a free-form sentence that shares no clause opening of four
  words with the statement ("They reset the alarm at the studio, it takes 5173 now.");
* ``update-restated``: a fact whose later change opens with the statement's own words at the start of a message
  ("The alarm code at the studio is 5173 now.");
* ``same-opening``: a fact, then later a second true sentence that opens with the same four words and says something
  else, with no value of the fact ("My sister lives in Lisbon." ... "My sister lives in a flat with two cats."):
  the first value is still the answer;
* ``tool-output``: a value inside a long tool output (JSON or a log of a few hundred tokens), pasted by the user or
  returned as the observation of a ReAct step.

Between them: long tool outputs that hold nothing asked, ReAct traces ("Thought: I need to ...", "Action: ...",
"Observation: ..."), short questions with their answers, and small talk. The answer of every question is its newest
value, stated once in the whole conversation (``Fact.message`` at character ``Fact.offset``); its wrong candidates
(the replaced value among them for an update) appear nowhere but where an update's old value was stated. Everything
follows from the seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

CATEGORIES = ("plain", "update-free", "update-restated", "same-opening", "tool-output")
DEFAULT_COUNTS = dict.fromkeys(CATEGORIES, 1)
LEAD_WORDS = 4  # how many opening words make two clauses "open alike"
TEMPLATE_TOKENS = 5  # a message's role markers and end of turn, added to its text's tokens
FIRST_STATEMENTS = 0.55  # first statements go in the first 55% of the conversation's tokens
LATER = (0.62, 0.88)  # updates and same-opening sentences: this span of it
RETRIES = 50  # draws of a distractor before giving up on one that names no candidate

# --- values --------------------------------------------------------------------------------------------------------

PEOPLE = (
    "Ottoline", "Bartholomew", "Griselda", "Anselm", "Wendeline", "Casimir", "Hortense", "Leofric", "Philomena",
    "Thaddeus", "Ysolde", "Mortimer", "Esmeralda", "Gideon", "Rosamund", "Quentin", "Isadora", "Fitzroy", "Albertine",
    "Crispin",
)  # fmt: skip
TOWNS = (
    "Antwerp", "Nagasaki", "Bilbao", "Quito", "Tromso", "Bologna", "Tbilisi", "Galway", "Leipzig", "Mombasa",
    "Rosario", "Aarhus", "Hanoi", "Tampere", "Zagreb", "Nantes", "Windhoek", "Izmir", "Utrecht", "Arequipa",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
COLOURS = (
    "teal", "maroon", "ochre", "lilac", "charcoal", "mustard", "turquoise", "crimson", "burgundy", "lavender",
    "amber", "indigo",
)  # fmt: skip
PASS_WORDS = (
    "pelican", "tangerine", "basalt", "hazelnut", "kestrel", "origami", "paprika", "sequoia", "umbrella", "velvet",
    "zeppelin", "marzipan",
)  # fmt: skip


def _value(rng: random.Random, kind: str) -> str:
    if kind == "code":
        return str(rng.randint(3000, 9999))  # above the years of the logs' time stamps
    if kind == "number":
        return str(rng.randint(101, 989))
    if kind == "person":
        return rng.choice(PEOPLE)
    if kind == "town":
        return rng.choice(TOWNS)
    if kind == "weekday":
        return rng.choice(WEEKDAYS)
    if kind == "colour":
        return rng.choice(COLOURS)
    if kind == "passphrase":
        return f"{rng.choice(PASS_WORDS)}-{rng.randint(11, 98)}"
    if kind == "tracking":
        return "".join(rng.choice("KMRVXZ") for _ in range(2)) + str(rng.randint(100000, 999999))
    if kind == "gate":
        return f"{rng.choice('ABCDEF')}{rng.randint(2, 48)}"
    if kind == "release":
        return f"v{rng.randint(2, 9)}.{rng.randint(10, 39)}.{rng.randint(1, 9)}"
    if kind == "error":
        return f"E{rng.randint(3000, 9999)}"
    if kind == "ticket":
        return f"INC-{rng.randint(20000, 89999)}"
    raise ValueError(f"unknown value kind {kind!r}")


# --- what users tell ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topic:
    """Something a user can tell and be asked about. ``lead`` opens a message in the same-opening categories (its
    first four words hold no value); ``phrasings`` are other ways of saying it; ``changes`` say it changed without
    opening like any of those; ``echoes`` open like ``lead`` and are true without giving a value."""

    kind: str
    question: str
    lead: str
    phrasings: tuple[str, ...]
    changes: tuple[str, ...]
    echoes: tuple[str, ...]


TOPICS = (
    Topic(
        "code",
        "What is the alarm code at the studio?",
        "The alarm code at the studio is {v}",
        ("the studio alarm takes {v}", "I set the alarm at the studio to {v}", "to disarm the studio you key in {v}"),
        (
            "They reset the alarm at the studio, it takes {v} now.",
            "The security firm came by and reprogrammed the studio panel; key in {v} from today.",
            "Scratch that about the studio, the installer switched it to {v}.",
        ),
        (
            "The alarm code at the studio is written on a card in the top drawer.",
            "The alarm code at the studio is shared with the cleaning crew.",
        ),
    ),
    Topic(
        "code",
        "What is the combination for my bike lock?",
        "The combination for my bike lock is {v}",
        ("my bike lock opens with {v}", "I use {v} on the bike lock"),
        (
            "I bought a new lock for the bike yesterday, its combination is {v}.",
            "Someone fiddled with the bike lock so I re-set it to {v}.",
        ),
        (
            "The combination for my bike lock is easy to forget, so I keep it in my notes.",
            "The combination for my bike lock is not the same as the one for the shed.",
        ),
    ),
    Topic(
        "code",
        "What is the PIN for the storage unit?",
        "The PIN for the storage unit is {v}",
        ("the storage unit opens with {v}", "I was given {v} as the storage unit PIN"),
        (
            "The storage company emailed a fresh keypad number this morning: {v}.",
            "They locked everyone out of the units, the keypad wants {v} now.",
        ),
        (
            "The PIN for the storage unit is in the welcome email somewhere.",
            "The PIN for the storage unit is only valid during opening hours.",
        ),
    ),
    Topic(
        "town",
        "Which city does my sister live in?",
        "My sister lives in {v}",
        ("my sister moved to {v} a couple of years ago", "you can find my sister in {v} these days"),
        (
            "Turns out my sister relocated last month, she's in {v} now.",
            "Big family news: my sister took a job in {v} and has already moved.",
        ),
        ("My sister lives in a flat with two cats.", "My sister lives in the old part of town, close to the river."),
    ),
    Topic(
        "town",
        "Which city is my conference in this year?",
        "My conference this year is in {v}",
        ("I'm flying to {v} for the conference", "the conference will take me to {v}"),
        (
            "The organisers switched venues, so we all go to {v} instead.",
            "Change of plans for the conference: it's {v} after all.",
        ),
        ("My conference this year is mostly about databases.", "My conference this year is three days long."),
    ),
    Topic(
        "weekday",
        "Which day is the planning meeting?",
        "The planning meeting is on {v}",
        ("we hold the planning meeting every {v}", "planning happens on {v} mornings"),
        (
            "Scratch that, planning moved to {v}.",
            "Heads up: they pushed planning to {v} and it's staying there.",
            "Everyone voted to shift planning, so it's {v} from now on.",
        ),
        (
            "The planning meeting is usually in the big room upstairs.",
            "The planning meeting is where we sort out the next sprint.",
        ),
    ),
    Topic(
        "weekday",
        "Which day are the bins collected on our street?",
        "Bin collection on our street is on {v}",
        ("the bins get emptied every {v}", "the council empties our bins on {v}"),
        ("The council changed the rota, bins go out on {v} now.", "From this month the truck comes on {v} instead."),
        (
            "Bin collection on our street is a noisy affair at six in the morning.",
            "Bin collection on our street is run by a private company.",
        ),
    ),
    Topic(
        "person",
        "Who is my new team lead?",
        "My new team lead is {v}",
        ("I report to {v} since the reorg", "the person I report to is called {v}"),
        (
            "The reorg changed things again and I answer to {v} instead.",
            "Management shuffled the teams; {v} is running ours.",
        ),
        ("My new team lead is very keen on written updates.", "My new team lead is based in another office."),
    ),
    Topic(
        "person",
        "What is our cat called?",
        "Our cat is called {v}",
        ("we named the cat {v}", "the kids picked {v} as the name for our cat"),
        ("The kids changed their minds and renamed the cat {v}.", "After a family vote the cat goes by {v}."),
        ("Our cat is called in for her jabs next month.", "Our cat is called a menace by the neighbours."),
    ),
    Topic(
        "person",
        "What is my landlord's name?",
        "My landlord's name is {v}",
        ("the flat belongs to {v}", "I rent the flat from {v}"),
        ("The building was sold, and the new owner is {v}.", "Since the sale I pay the rent to {v}."),
        ("My landlord's name is on the lease if you ever need it.", "My landlord's name is hard to pronounce."),
    ),
    Topic(
        "number",
        "What number is my parking space at work?",
        "My parking space at work is number {v}",
        ("I park in space {v} at the office", "the garage at work assigned me spot {v}"),
        (
            "Facilities moved everyone around, I'm parking in {v} now.",
            "They repainted the garage lines and gave me spot {v} instead.",
        ),
        (
            "My parking space at work is right next to the lift.",
            "My parking space at work is covered, which helps in winter.",
        ),
    ),
    Topic(
        "number",
        "Which room am I staying in at the hotel?",
        "My room at the hotel is {v}",
        ("they put me in room {v} at the hotel", "I'm staying in room {v} of the hotel"),
        (
            "The air conditioning broke, so reception moved me to {v}.",
            "I had to switch rooms at the hotel; I'm in {v} now.",
        ),
        ("My room at the hotel is on the quiet side.", "My room at the hotel is small but spotless."),
    ),
    Topic(
        "colour",
        "What colour is our front door?",
        "Our front door is painted {v}",
        ("we went with {v} for the front door", "the door at the front of our house is {v}"),
        (
            "We got bored of the old look and repainted it {v} at the weekend.",
            "The painter finished yesterday, so the entrance is {v} now.",
        ),
        (
            "Our front door is painted every few years because of the sea air.",
            "Our front door is painted with a special outdoor varnish.",
        ),
    ),
    Topic(
        "colour",
        "What colour is my new car?",
        "My new car is {v}",
        ("I picked the {v} one when I bought the car", "the car I just bought is {v}"),
        ("The dealer swapped it for a {v} one after the scratch.", "I traded it in, and the replacement is {v}."),
        ("My new car is an electric one.", "My new car is parked on the street tonight."),
    ),
    Topic(
        "passphrase",
        "What is the guest wifi password?",
        "The guest wifi password is {v}",
        ("guests can log on to the wifi with {v}", "for the guest network use {v}"),
        (
            "The router got replaced, the guest network takes {v} these days.",
            "I rotated the credentials for visitors; it's {v} now.",
        ),
        (
            "The guest wifi password is printed on the back of the router.",
            "The guest wifi password is different from the main one.",
        ),
    ),
    Topic(
        "passphrase",
        "What is the password for the family photo album?",
        "The password for the family photo album is {v}",
        ("the photo album site logs in with {v}", "to open the family album, type {v}"),
        ("Mum changed the album login, it's {v} these days.", "The album site forced a reset, so it takes {v} now."),
        (
            "The password for the family photo album is something my dad chose.",
            "The password for the family photo album is the same for all of us.",
        ),
    ),
)

# How a first statement is wrapped (``{s}`` the statement, its first letter as the wrapper needs it).
OPENERS = (
    "{S}.",
    "Before I forget: {s}.",
    "Quick thing to keep in mind, {s}.",
    "For the record, {s}.",
    "I sorted out some admin today. {S}.",
    "Oh, and {s}, in case it comes up.",
    "Can you remember something for me? {S}.",
)
# Endings of a lead sentence that opens its message (same-opening categories).
LEAD_ENDINGS = ("{S}.", "{S}, just so you know.", "{S}. That one matters.", "{S}, by the way.")
# A restating update: the lead sentence with its new value, then one of these.
RESTATED = ("{S} now.", "{S} as of this week.", "{S} from today, it changed.", "{S} now; please use that.")
ACKS = (
    "Thanks, noted.",
    "All right, I'll keep that in mind.",
    "Okay, got it.",
    "Noted, thank you.",
    "Sure, I've made a note.",
)
ACKS_CHANGE = ("Understood, I'll go with the new one.", "Got it, I've updated my notes.", "Okay, noted the change.")
ACKS_ECHO = ("Good to know.", "Ha, fair enough.", "Thanks for the detail.")

# --- tool outputs that hold a value ----------------------------------------------------------------------------------

TOOL_FACTS = (
    ("tracking", "What tracking number did the order lookup return?", "order_lookup"),
    ("gate", "Which gate did the flight status tool give?", "flight_status"),
    ("release", "Which release tag did the deploy log show?", "deploy_log"),
    ("error", "What error code did the build log report?", "build_log"),
    ("ticket", "Which incident ticket did the alerting tool open?", "alert_tool"),
)

KINDS = tuple(sorted({t.kind for t in TOPICS} | {kind for kind, _, _ in TOOL_FACTS}))

# --- distractors ---------------------------------------------------------------------------------------------------

HOSTS = ("web", "api", "db", "cache", "queue", "worker", "edge", "batch")
PRODUCTS = ("desk lamp", "kettle", "backpack", "headphones", "notebook", "water bottle", "doormat", "toaster")
LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN")
SMALL_TALK = (
    ("I tried baking sourdough again and it came out flat.", "Flat loaves usually mean a tired starter; feed it "
     "twice the day before and give the dough a longer rise."),
    ("The neighbours are renovating and it's so loud.", "That sounds draining. Noise-cancelling headphones or a "
     "morning at a library could help until they finish."),
    ("I can't get into the new season of that show.", "Some seasons take a few episodes to find their feet; it's "
     "fine to drop it if it isn't fun."),
    ("I finally cleaned out the garage.", "Nice work! It's satisfying to get the floor back."),
    ("My knee has been sore after football.", "Rest it for a few days, and if it stays sore, a physio can check it."),
    ("I'm thinking of taking up chess.", "Good choice. Short puzzles every day build pattern sense quickly."),
    ("The train was late again this morning.", "Annoying. Some operators refund delays, so it may be worth a claim."),
    ("We adopted a rescue tortoise.", "Lovely! They need warmth and a lot of patience."),
)  # fmt: skip
CONVERSIONS = (("kilometres", "miles", 0.621), ("kilograms", "pounds", 2.205), ("litres", "gallons", 0.264))
TASKS = (
    ("find out whether the {h} queue is backed up", "queue_depth", "consumer_count"),
    ("check why the {h} nodes are slow today", "node_metrics", "recent_deploys"),
    ("see if any {h} jobs failed overnight", "job_history", "job_logs"),
)
THOUGHTS = (
    "Thought: I need to look at {t} for the {h} service first.",
    "Thought: I need to check {t} before I answer.",
    "Thought: I need to compare this with {t}.",
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def names_any(text: str, values: list[str]) -> bool:
    """Whether ``text`` names any of ``values`` as words (case and punctuation ignored): ``B23`` in "b-23"."""
    words = f" {' '.join(_words(text))} "
    return any(f" {' '.join(_words(v))} " in words for v in values)


def clauses(text: str) -> list[list[str]]:
    """The clauses of ``text`` as lists of words (case kept), split at ``, : ; . ! ?`` and line breaks."""
    return [c.split() for c in re.split(r"[,:;.!?\n]+(?:\s|$)|\n", text) if c.split()]


def openings(text: str, words: int = LEAD_WORDS) -> list[tuple[str, ...]]:
    """The first ``words`` words of each clause of ``text`` that has that many."""
    return [tuple(c[:words]) for c in clauses(text) if len(c) >= words]


@dataclass(frozen=True)
class Fact:
    """One question and its answer, shaped as :class:`.recall_data.Fact` for :mod:`.recall` plus where things are:
    ``message`` states ``value`` at character ``offset``; an update's ``previous`` is at ``previous_offset`` of
    ``previous_message``; a same-opening question's later sentence is message ``echo_message``."""

    kind: str
    category: str
    question: str
    value: str
    candidates: tuple[str, ...]
    answer: int
    message: int
    offset: int
    previous: str | None = None
    previous_message: int | None = None
    previous_offset: int | None = None
    echo_message: int | None = None


@dataclass(frozen=True)
class Conversation:
    name: str
    messages: tuple[dict, ...]
    facts: tuple[Fact, ...]


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _lower(text: str) -> str:
    return text if text.startswith("I ") or text.startswith("I'") else text[0].lower() + text[1:]


def _wrap(form: str, statement: str) -> str:
    return form.replace("{S}", _capital(statement)).replace("{s}", _lower(statement))


def _place(text: str, value: str) -> tuple[str, int]:
    """``text`` with ``{v}`` replaced by ``value``, and where the value starts."""
    offset = text.index("{v}")
    return text.replace("{v}", value), offset


class _Writer:
    """One conversation's random draws, the values it must keep out of distractors, and its messages."""

    def __init__(self, seed: int, count_tokens: Callable[[str], int]):
        self.rng = random.Random(seed)
        self.count = count_tokens
        self.reserved: list[str] = []  # every candidate of every question, in draw order
        self.messages: list[dict] = []
        self.tokens = 0

    def values(self, kind: str, n: int) -> list[str]:
        drawn: list[str] = []
        while len(drawn) < n:
            v = self._fresh(kind)
            if v not in drawn:
                drawn.append(v)
        self.reserved += drawn
        return drawn

    def _fresh(self, kind: str) -> str:
        for _ in range(1000):
            v = _value(self.rng, kind)
            if kind == "passphrase" and any(v.split("-")[0] == r.split("-")[0] for r in self.reserved):
                continue  # "pelican-45" against "pelican-49" would test the digits alone
            if not names_any(v, self.reserved) and not any(names_any(r, [v]) for r in self.reserved):
                return v
        raise ValueError(f"no fresh {kind} value left")

    def add(self, user: str, assistant: str) -> int:
        """Append one exchange; returns the user message's index."""
        index = len(self.messages)
        for role, text in (("user", user), ("assistant", assistant)):
            self.messages.append({"role": role, "content": text})
            self.tokens += self.count(text) + TEMPLATE_TOKENS
        return index

    def number(self, low: int, high: int) -> int:
        """A number for a distractor that names no candidate."""
        for _ in range(1000):
            n = self.rng.randint(low, high)
            if not names_any(str(n), self.reserved):
                return n
        raise ValueError("no fresh number")


def generate(
    seed: int,
    length: int,
    count_tokens: Callable[[str], int],
    counts: Mapping[str, int] = DEFAULT_COUNTS,
    candidates: int = 5,
) -> Conversation:
    """A conversation of about ``length`` tokens (message texts as ``count_tokens`` counts them plus
    ``TEMPLATE_TOKENS`` a message) asking ``counts[category]`` questions of each category."""
    unknown = set(counts) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}: expected some of {', '.join(CATEGORIES)}")
    w = _Writer(seed, count_tokens)
    rng = w.rng
    asked = [category for category in CATEGORIES for _ in range(counts.get(category, 0))]
    rng.shuffle(asked)  # which category goes first, and so how deep each one sits, varies by seed
    user_topics = _pick_topics(rng, sum(c != "tool-output" for c in asked))
    tool_topics = rng.sample(TOOL_FACTS, min(len(TOOL_FACTS), asked.count("tool-output")))
    if asked.count("tool-output") > len(TOOL_FACTS):
        raise ValueError(f"at most {len(TOOL_FACTS)} tool-output questions per conversation")
    plans = []
    for category in asked:
        topic = tool_topics.pop() if category == "tool-output" else user_topics.pop()
        kind = topic[0] if category == "tool-output" else topic.kind
        updated = category in ("update-free", "update-restated")
        values = w.values(kind, candidates)  # an update: the old value, the new one, then the spares
        plans.append({"category": category, "topic": topic, "kind": kind, "values": values, "updated": updated})
    # Events: (share of the conversation, plan index, what). First statements spread over the first part; updates
    # and same-opening sentences in the later span, in random order.
    events = [(FIRST_STATEMENTS * i / max(1, len(plans)), i, "state") for i in range(len(plans))]
    later = [i for i, p in enumerate(plans) if p["updated"] or p["category"] == "same-opening"]
    marks = sorted(rng.uniform(*LATER) for _ in later)
    rng.shuffle(later)
    events += [(mark, i, "later") for mark, i in zip(marks, later)]
    events.sort()
    where: dict[tuple[int, str], tuple[int, int | None]] = {}
    long_outputs = 0
    while w.tokens < length or events:
        if events and w.tokens >= events[0][0] * length:
            _, i, what = events.pop(0)
            where[(i, what)] = _write_event(w, plans[i], what)
            continue
        kind = rng.choices(("long", "react", "qa", "talk"), weights=(3 if long_outputs < 3 else 0, 2, 3, 2))[0]
        long_outputs += kind == "long"
        _distractor(w, kind)
    facts = []
    for i, plan in enumerate(plans):
        values = plan["values"]
        value, previous = values[0], None
        message, offset = where[(i, "state")]
        fact = {"message": message, "offset": offset}
        if plan["updated"]:
            previous, value = values[0], values[1]
            new_message, new_offset = where[(i, "later")]
            fact = {
                "message": new_message,
                "offset": new_offset,
                "previous": previous,
                "previous_message": message,
                "previous_offset": offset,
            }
        elif plan["category"] == "same-opening":
            fact["echo_message"] = where[(i, "later")][0]
        # Wrong candidates: the replaced value first (for an update), then the spares.
        wrong = [v for v in values if v != value]
        options = wrong[: candidates - 1] + [value]
        rng.shuffle(options)
        question = plan["topic"][1] if plan["category"] == "tool-output" else plan["topic"].question
        facts.append(
            Fact(
                kind=plan["kind"],
                category=plan["category"],
                question=question,
                value=value,
                candidates=tuple(options),
                answer=options.index(value),
                **fact,
            )
        )
    conversation = Conversation(f"varied-{seed}", tuple(w.messages), tuple(facts))
    problem = misplaced(conversation)
    if problem:
        raise ValueError(f"seed {seed}: {problem}")
    return conversation


def misplaced(conversation: Conversation) -> str | None:
    """What is wrong with where the values sit, or None: each answer at its ``offset`` of its ``message`` and named
    nowhere else, an update's old value only in its first statement, the other candidates nowhere."""
    texts = [m["content"] for m in conversation.messages]
    for fact in conversation.facts:
        allowed = {fact.value: {fact.message}}
        if fact.previous is not None:
            allowed[fact.previous] = {fact.previous_message}
        if texts[fact.message][fact.offset : fact.offset + len(fact.value)] != fact.value:
            return f"{fact.question!r}: {fact.value!r} is not at message {fact.message}, character {fact.offset}"
        for value in fact.candidates:
            where = {i for i, text in enumerate(texts) if names_any(text, [value])}
            if where != allowed.get(value, set()):
                return f"{fact.question!r}: candidate {value!r} is named in messages {sorted(where)}"
    return None


def _pick_topics(rng: random.Random, n: int) -> list[Topic]:
    """``n`` different topics, at most one of a kind with few values (weekdays: 7, so one question's five
    candidates and an update's spare leave too few for a second)."""
    order = list(TOPICS)
    rng.shuffle(order)
    picked: list[Topic] = []
    for topic in order:
        if topic.kind == "weekday" and any(t.kind == "weekday" for t in picked):
            continue
        picked.append(topic)
        if len(picked) == n:
            return picked
    raise ValueError(f"at most {len(picked)} questions about what the user tells per conversation")


def _write_event(w: _Writer, plan: dict, what: str) -> tuple[int, int]:
    """Write a plan's first statement or its later sentence; returns (user message index, value's offset)."""
    rng, category, values = w.rng, plan["category"], plan["values"]
    if category == "tool-output":
        text, offset = _tool_fact(w, plan["topic"][2], values[0])
        if rng.random() < 0.5:
            return _react_fact(w, plan["topic"][2], text, offset)
        intro = rng.choice(("Here is what {t} printed:\n", "Output of {t}:\n", "{t} came back with this:\n"))
        intro = intro.format(t=plan["topic"][2])
        ask = rng.choice(("Anything odd in there?", "Can you keep this around?", "Just so you have it."))
        user = f"{intro}{text}\n{ask}"
        reply = rng.choice(("Thanks, I have it.", "Received; nothing alarming at a glance."))
        return w.add(user, reply), len(intro) + offset
    topic: Topic = plan["topic"]
    if what == "later" and category == "same-opening":
        return w.add(rng.choice(topic.echoes), rng.choice(ACKS_ECHO)), None
    if what == "later":  # an update
        if category == "update-free":
            user, offset = _place(rng.choice(topic.changes), values[1])
        else:
            user, offset = _place(_wrap(rng.choice(RESTATED), topic.lead), values[1])
        return w.add(user, rng.choice(ACKS_CHANGE)), offset
    if category in ("update-restated", "same-opening"):
        # The lead opens the message, so that the later sentence opens exactly as this one.
        user, offset = _place(_wrap(rng.choice(LEAD_ENDINGS), topic.lead), values[0])
    else:
        statement = rng.choice((topic.lead, *topic.phrasings))
        user, offset = _place(_wrap(rng.choice(OPENERS), statement), values[0])
    return w.add(user, rng.choice(ACKS)), offset


def _stamp(w: _Writer, minute: int) -> str:
    return f"2025-{w.rng.randint(1, 12):02d}-{w.rng.randint(1, 28):02d} {minute // 60 % 24:02d}:{minute % 60:02d}"


def _clock(second: int) -> str:
    return f"{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}"


def _tool_fact(w: _Writer, tool: str, value: str) -> tuple[str, int]:
    """A long tool output with ``value`` in one field or line; returns the text and the value's offset."""
    rng = w.rng
    if tool in ("order_lookup", "flight_status", "alert_tool"):
        if tool == "order_lookup":
            record = {
                "order_id": w.number(10000, 99999),
                "status": rng.choice(("shipped", "in_transit")),
                "carrier": rng.choice(("ParcelGo", "SwiftShip")),
                "tracking_number": "{v}",
                "items": [
                    {"sku": f"SKU-{w.number(100, 999)}", "name": rng.choice(PRODUCTS), "qty": w.number(1, 4)}
                    for _ in range(rng.randint(3, 5))
                ],
                "events": [
                    {"at": _stamp(w, w.number(0, 1439)), "where": rng.choice(HOSTS) + " hub", "code": w.number(10, 99)}
                    for _ in range(rng.randint(3, 5))
                ],
            }
        elif tool == "flight_status":
            record = {
                "flight": f"QF{w.number(100, 999)}",
                "scheduled": _stamp(w, w.number(0, 1439)),
                "estimated": _stamp(w, w.number(0, 1439)),
                "terminal": w.number(1, 5),
                "gate": "{v}",
                "baggage_belt": w.number(1, 19),
                "aircraft": rng.choice(("A320", "B737", "E190")),
                "seats_free": w.number(0, 40),
                "history": [{"at": _stamp(w, w.number(0, 1439)), "note": "gate assigned"} for _ in range(3)],
            }
        else:
            record = {
                "alert": rng.choice(("disk_almost_full", "error_rate_high", "latency_p99")),
                "service": rng.choice(HOSTS),
                "ticket": "{v}",
                "severity": rng.choice(("sev2", "sev3")),
                "samples": [
                    {"host": f"{rng.choice(HOSTS)}-{w.number(1, 30)}", "value": w.number(50, 99)}
                    for _ in range(rng.randint(4, 6))
                ],
            }
        text = json.dumps(record, indent=1)
        offset = text.index("{v}")
        return text.replace("{v}", value), offset
    # Logs: one line holds the value.
    lines = []
    second = w.number(0, 80000)
    total = rng.randint(9, 13)
    at = rng.randint(3, total - 2)
    for n in range(total):
        second += rng.randint(1, 90)
        stamp = _clock(second)
        if n == at:
            line = (
                f"{stamp} INFO release tagged {{v}} by pipeline {w.number(100, 999)}"
                if tool == "deploy_log"
                else f"{stamp} ERROR compile step failed with {{v}} in module {rng.choice(HOSTS)}"
            )
        else:
            step = rng.choice(("fetch", "resolve", "compile", "package", "upload", "verify"))
            line = f"{stamp} {rng.choice(LEVELS)} {step} {rng.choice(HOSTS)} took {w.number(20, 900)} ms"
        lines.append(line)
    text = "\n".join(lines)
    offset = text.index("{v}")
    return text.replace("{v}", value), offset


def _react_fact(w: _Writer, tool: str, output: str, offset: int) -> tuple[int, int]:
    """A ReAct step whose observation is the tool output holding the value."""
    rng = w.rng
    w.add(
        rng.choice(("Please pull up the latest {t} result.", "Run {t} for me, would you?")).format(t=tool),
        f"Thought: I need to call {tool} to get the details.\nAction: {tool}[latest]",
    )
    prefix = "Observation: "
    index = w.add(prefix + output, "Thought: I have the result now.\nFinal Answer: the output is above.")
    return index, len(prefix) + offset


def _distractor(w: _Writer, kind: str) -> None:
    """Append a distractor that names no candidate: draws again while it would."""
    for _ in range(RETRIES):
        exchanges = _draw_distractor(w, kind)
        if not any(names_any(text, w.reserved) for exchange in exchanges for text in exchange):
            for user, assistant in exchanges:
                w.add(user, assistant)
            return
    raise ValueError(f"could not draw a {kind} distractor free of the candidate values")


def _draw_distractor(w: _Writer, kind: str) -> list[tuple[str, str]]:
    rng = w.rng
    if kind == "talk":
        return [rng.choice(SMALL_TALK)]
    if kind == "qa":
        form = rng.randrange(3)
        if form == 0:
            unit, other, factor = rng.choice(CONVERSIONS)
            amount = rng.randint(2, 60)
            return [(f"Can you convert {amount} {unit} to {other}?", f"{amount} {unit} is about "
                     f"{amount * factor:.1f} {other}.")]  # fmt: skip
        if form == 1:
            a, b = rng.randint(21, 97), rng.randint(21, 97)
            return [(f"Can you add {a} and {b} for me?", f"{a} plus {b} makes {a + b}.")]
        word = rng.choice(("necessary", "rhythm", "separate", "definitely", "accommodate", "conscience"))
        return [(f"Can you spell {word} backwards?", f"Backwards it is {word[::-1]}.")]
    if kind == "react":
        task, first, second = rng.choice(TASKS)
        host = rng.choice(HOSTS)
        opening = w.rng.choice(THOUGHTS[:2]).format(t=first, h=host)
        steps = [(f"Task: {task.format(h=host)}.", opening + f"\nAction: {first}[{host}]")]
        for tool in (second, None):
            observation = "Observation: " + json.dumps(
                {
                    "service": host,
                    "samples": [w.number(1, 500) for _ in range(rng.randint(4, 8))],
                    "window_min": w.number(5, 60),
                    "healthy": rng.random() < 0.6,
                }
            )
            if tool:
                steps.append((observation, _thought(w, tool, host) + f"\nAction: {tool}[{host}]"))
            else:
                steps.append((observation, "Thought: I now know enough to answer.\nFinal Answer: nothing there "
                              "needs action right now; the numbers look normal."))  # fmt: skip
        return steps
    # A long tool output: metrics, search results or a service log.
    form = rng.randrange(3)
    if form == 0:
        rows = [
            {"host": f"{rng.choice(HOSTS)}-{w.number(1, 40)}", "cpu_pct": w.number(3, 97),
             "mem_mb": w.number(200, 7900), "disk_pct": w.number(5, 95), "uptime_h": w.number(1, 900)}
            for _ in range(rng.randint(5, 7))
        ]  # fmt: skip
        text = json.dumps({"cluster": rng.choice(HOSTS), "nodes": rows})
        busiest = max(rows, key=lambda r: r["cpu_pct"])
        return [(f"The metrics tool returned:\n{text}\nWhich node is the busiest?",
                 f"{busiest['host']} is the busiest, at {busiest['cpu_pct']}% CPU.")]  # fmt: skip
    if form == 1:
        rows = [
            {"title": rng.choice(PRODUCTS), "price": f"{w.number(3, 240)}.{rng.randint(10, 99)}",
             "rating": round(rng.uniform(2.5, 5.0), 1), "reviews": w.number(4, 2900), "in_stock": rng.random() < 0.7}
            for _ in range(rng.randint(5, 7))
        ]  # fmt: skip
        text = json.dumps({"query": rng.choice(PRODUCTS), "results": rows})
        best = max(rows, key=lambda r: r["rating"])
        return [(f"Search results from the shop tool:\n{text}\nWhat is the best rated one?",
                 f"The best rated is the {best['title']}, at {best['rating']} stars.")]  # fmt: skip
    lines = []
    second = w.number(0, 80000)
    for _ in range(rng.randint(10, 14)):
        second += rng.randint(1, 90)
        lines.append(
            f"{_clock(second)} {rng.choice(LEVELS)} "
            f"{rng.choice(HOSTS)} request={rng.choice('abcdef')}{w.number(100, 999)} "
            f"status={rng.choice((200, 200, 304, 500))} "
            f"latency_ms={w.number(3, 980)}"
        )
    return [("Here is the service log from the last hour:\n" + "\n".join(lines) + "\nAnything worrying?",
             "A few requests returned 500, but most completed normally.")]  # fmt: skip


def _thought(w: _Writer, tool: str, host: str) -> str:
    return w.rng.choice(THOUGHTS).format(t=tool, h=host)
