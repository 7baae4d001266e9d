"""``sirllm-agents chat``: an interactive conversation on one session, with commands to look inside its memory."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from sirllm_agents.config import SessionConfig
from sirllm_agents.engine import Engine
from sirllm_agents.generation import GenerationConfig
from sirllm_agents.session import Session

from .memory_view import print_memory

HELP = """commands:
  /stats          figures of the session so far
  /memory         what the cache retains (the last 1500 tokens of the conversation)
  /save PATH      save the session
  /load PATH      resume a saved session (the current one is kept if PATH cannot be loaded)
  /file PATH      send the contents of a text file as your message
  /reset          forget the conversation
  /help, /quit"""


class ChatLoop:
    """Reads lines, runs commands, and streams replies; ``read`` raises EOFError to end."""

    def __init__(
        self,
        engine: Engine,
        session: Session,
        *,
        read: Callable[[str], str] = input,
        console: Console | None = None,
        system: str | None = None,
        max_new_tokens: int = GenerationConfig.max_new_tokens,
        penalties: dict | None = None,
    ):
        self.engine, self.read, self.console = engine, read, console or Console()
        self.system, self.max_new_tokens = system, max_new_tokens
        self.penalties = dict(penalties or {})  # repetition penalties, as Session.stream takes them
        self.session = session
        self.messages = list(session.transcript.messages) or self._start()
        self._attach(session)

    def run(self) -> None:
        self.console.print("sirllm-agents chat: /help for commands, /quit or Ctrl-D to leave")
        while True:
            try:
                line = self.read("you> ")
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            if line.strip() == "/quit":
                return
            if line.startswith("/"):
                self.command(line.strip())
            elif line.strip():
                self.say(line)

    def command(self, line: str) -> None:
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/save", "/load", "/file") and not argument:
            self.console.print(f"{name} needs a path")
        elif name == "/stats":
            self._print_stats()
        elif name == "/memory":
            print_memory(self.session.memory(), self.console, last_tokens=1500)
        elif name == "/save":
            self.session.save(argument)
            self.console.print(f"saved to {argument}")
        elif name == "/load":
            try:
                session = self.engine.load_session(argument)
            except ValueError as error:
                self.console.print(f"[red]not loaded:[/] {error}", highlight=False)
                return
            self._attach(session)
            self.session, self.messages = session, list(session.transcript.messages)
            self.console.print(f"loaded {argument}: {len(self.messages)} messages, {len(session)} tokens cached")
        elif name == "/file":
            try:
                with open(argument, encoding="utf-8") as file:
                    text = file.read()
            except OSError as error:
                self.console.print(f"[red]cannot read {argument}:[/] {error.strerror}", highlight=False)
                return
            self.say(text)
        elif name == "/reset":
            self.session.reset()
            self.messages = self._start()
            self.console.print("conversation forgotten")
        else:
            self.console.print(HELP, highlight=False)

    def say(self, text: str) -> None:
        """Send a user message and stream the reply; an interrupted reply is rolled back and not kept."""
        messages = self.messages + [{"role": "user", "content": text}]
        stream = self.session.stream(messages, max_new_tokens=self.max_new_tokens, **self.penalties)
        try:
            for piece in stream.text():
                self._end_progress()
                self.console.print(piece, end="", markup=False, highlight=False)
        except KeyboardInterrupt:
            stream.close()
            self._end_progress()
            self.console.print("\n[interrupted: the reply was dropped]", markup=False)
            return
        self._end_progress()
        self.console.print()
        assert stream.reply is not None
        self.messages = messages + [stream.reply.as_message()]

    # -- helpers --------------------------------------------------------------------------------------------------

    def _start(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _attach(self, session: Session) -> None:
        self._progress_shown = False

        def progress(done: int, total: int) -> None:
            # Only inputs that take more than one prefill chunk are worth a progress line.
            if total > session.config.prefill_chunk:
                self.console.file.write(f"\ringesting: {done}/{total} tokens")
                self.console.file.flush()
                self._progress_shown = True

        session.progress = progress

    def _end_progress(self) -> None:
        if self._progress_shown:
            self.console.file.write("\r" + " " * 40 + "\r")
            self._progress_shown = False

    def _print_stats(self) -> None:
        stats = self.session.stats
        table = Table(title=f"session {self.session.session_id}")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for name, value in vars(stats).items():
            table.add_row(name, f"{value:.2f}" if isinstance(value, float) else str(value))
        table.add_row("cache", f"{len(self.session)} / {self.session.cache_size}")
        self.console.print(table)


def main(
    model: str | None = None,
    *,
    backend: str = "auto",
    config: SessionConfig | None = None,
    system: str | None = None,
    max_new_tokens: int = GenerationConfig.max_new_tokens,
    load: str | None = None,
    penalties: dict | None = None,
) -> None:
    console = Console()
    with console.status("loading the model"):
        engine = Engine(model, backend=backend)
    session = engine.load_session(load) if load else engine.session(config)
    ChatLoop(engine, session, console=console, system=system, max_new_tokens=max_new_tokens, penalties=penalties).run()
