"""The main job: does the model still know a fact after its cache has evicted most of the conversation?

One scripted conversation from the recall suite: a fact first, then exchanges that state nothing to remember
(questions with their answers, tool outputs, chit-chat), fed to one session per policy an exchange at a time on a
cache of a quarter of the conversation's tokens; then the question. Per policy: what each turn prefilled and evicted,
the model's reply, where the true value ranks by likelihood among five candidates, and which of the value's tokens
the cache still holds.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from sirllm_agents.config import DEFAULT_POLICY, RECENT_SHARE
from sirllm_agents.engine import Engine
from sirllm_agents.session import Session

from .bench.recall import names, value_tokens
from .bench.recall_data import Conversation, generate

# The fact kind the embedded 135M model names in its replies with no eviction (names, places, passwords and dates it
# does not; see the README for the rates).
KINDS = ("code",)
# Each column: a label and its session settings beside the cache size. The last is the library's default (see the
# README for why), which keeps the newest 1/RECENT_SHARE of the cache.
COLUMNS = (
    ("full", {"policy": "full"}),
    ("streaming", {"policy": "streaming"}),
    ("sirllm", {"policy": "sirllm", "recent_size": 0}),
    (f"default: {DEFAULT_POLICY} + recent 1/{RECENT_SHARE}", {}),
)


def feed(session: Session, conversation: Conversation, on_turn) -> None:
    messages = list(conversation.messages)
    for end in range(2, len(messages) + 1, 2):
        on_turn(end // 2, session.ingest(messages[:end]), len(session))


def main(
    seed: int = 0, length: int = 1200, budget: float = 0.25, model: str | None = None, backend: str = "auto"
) -> None:
    console = Console(highlight=False)
    with console.status("loading the model"):
        engine = Engine(model, backend=backend)
    encode, template = engine.model.encode, engine.model.template
    conversation = generate(seed, length, lambda text: len(encode(text)), facts=1, update=False, kinds=KINDS)
    fact = conversation.facts[0]
    tokens = len(encode(template.render(list(conversation.messages), add_generation_prompt=False)))
    cache_size = round(budget * tokens)
    console.rule(f"{engine.model.name}: a {tokens}-token conversation on a {cache_size}-token cache")
    console.print(f"turn 1, user: [bold]{conversation.messages[0]['content']}[/]")
    console.print(f"turns 2-{len(conversation.messages) // 2}: questions, tool outputs and chit-chat, none about it")
    console.print(
        f"then the question: [bold]{fact.question}[/]  (true value {fact.value!r}; candidates "
        f"{', '.join(fact.candidates)})\n"
    )

    turns = Table(title="per turn: tokens prefilled (only the new exchange), and evicted / cached under each policy")
    for column in ("turn", "prefilled", "reused", *(label for label, _ in COLUMNS)):
        turns.add_column(column, justify="right")
    rows: dict[int, list[str]] = {}
    sessions = {}
    for label, settings in COLUMNS:
        size = None if settings.get("policy") == "full" else cache_size
        session = engine.session(cache_size=size, **settings)

        def on_turn(number, turn, cached):
            row = rows.setdefault(number, [str(number), str(turn.prefilled_tokens), str(turn.reused_tokens)])
            row.append(f"{turn.evicted_tokens} / {cached}")

        with console.status(f"feeding the conversation under {label}"):
            feed(session, conversation, on_turn)
        sessions[label] = session
    last = max(rows)
    for number, row in rows.items():
        if number == 1 or number % 5 == 0 or number == last:
            turns.add_row(*row)
    console.print(turns)

    answers = Table(title=f"the question: {fact.question}")
    for column in ("policy", "the model's reply", "true value by likelihood", "its tokens in the cache"):
        answers.add_column(column)
    question = list(conversation.messages) + [{"role": "user", "content": fact.question}]
    for label, session in sessions.items():
        with console.status(f"asking under {label}"):
            scores = session.score(question, list(fact.candidates))
            per_token = [score / len(encode(c)) for score, c in zip(scores, fact.candidates)]
            rank = 1 + sum(s > per_token[fact.answer] for s in per_token)
            reply = session.chat(question, max_new_tokens=24, stop="\n").text
        kept = value_tokens(session, fact.message, fact.value)
        shown = "".join(f"[bold green]{text}[/]" if retained else f"[strike dim]{text}[/]" for text, retained in kept)
        mark = "[green]✓[/]" if names(reply, fact.value) else "[red]✗[/]"
        answers.add_row(
            label,
            f"{mark} {reply}",
            f"{'[green]' if rank == 1 else '[red]'}rank {rank} of {len(fact.candidates)}[/]",
            f"{shown}  ({sum(r for _, r in kept)} of {len(kept)})",
        )
    console.print(answers)
    console.print(
        "Likelihood: each candidate scored as the whole reply, per token. In the cache column, kept tokens "
        "are green and evicted ones struck through."
    )
