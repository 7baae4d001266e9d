"""session.memory(), the `inspect` command (terminal and HTML), the page in headless Chromium, and `chat`."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from sirllm_agents_apps.chat import ChatLoop
from sirllm_agents_apps.cli import main as cli_main

QUESTIONS = ["Hi there!", "What is 2+2?", "Name a colour.", "Tell me a short joke.", "Thanks, bye!"]


@pytest.fixture(scope="module")
def streaming_session(converse, tiny_engine):
    """StreamingLLM keeps the sinks and the newest tokens, so which tokens each turn lost is known independently."""
    session = tiny_engine.session(cache_size=64, start_size=4, policy="streaming")
    messages, _ = converse(session, QUESTIONS)
    return session, messages


def test_memory_lists_the_retained_tokens_in_cache_order_and_evictions_per_turn(tiny_engine, streaming_session):
    session, messages = streaming_session
    memory = session.memory()
    assert [t.token_id for t in memory.tokens] == session.cache.token_ids.tolist()
    assert [t.score for t in memory.tokens] == session.cache.scores.tolist()
    assert [t.turn for t in memory.tokens] == session.cache.turns.tolist()
    assert len(memory.tokens) == 64 and memory.cache_size == 64

    # Every ingested token, in order, is the template's rendering of the conversation; pieces join to its text.
    rendered = tiny_engine.model.template.render(messages, add_generation_prompt=False)
    assert [t.token_id for t in memory.conversation] == tiny_engine.model.encode(rendered)
    assert "".join(t.text for t in memory.conversation) == rendered
    assert [t.text for t in memory.tokens] == [memory.conversation[p].text for p in session.cache.positions.tolist()]

    # Streaming keeps positions 0-3 and the newest 60: a turn's evicted count is what falls between.
    total = len(memory.conversation)
    kept = set(range(4)) | set(range(total - 60, total))
    turn_of = [t.turn for t in memory.conversation]
    for turn in memory.turns:
        of_turn = [p for p in range(total) if turn_of[p] == turn.turn]
        assert turn.ingested == len(of_turn)
        assert turn.evicted == sum(p not in kept for p in of_turn), turn
    assert sum(memory.evicted_per_turn.values()) == total - 64 == session.stats.evicted_tokens
    assert memory.cache_lengths == [t.cache_len for t in session.turn_log] and len(memory.cache_lengths) == 5


@pytest.fixture(scope="module")
def session_file(tmp_path_factory, streaming_session):
    path = tmp_path_factory.mktemp("inspect") / "session.safetensors"
    streaming_session[0].save(path)
    return path


def test_inspect_prints_the_turn_table_and_the_conversation(session_file, streaming_session, capsys):
    cli_main(["inspect", str(session_file)])
    out = capsys.readouterr().out
    memory = streaming_session[0].memory()
    assert "memory: 64 / 64 tokens retained (streaming)" in out
    for turn in memory.turns:
        assert re.search(rf"│\s+{turn.turn} │\s+{turn.ingested} │\s+{turn.retained} │\s+{turn.evicted} │", out), turn
    assert QUESTIONS[-1] in out and "evicted: grey" in out


def test_inspect_of_a_damaged_file_exits_with_the_reason(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(SystemExit, match="not a session file"):
        cli_main(["inspect", str(bad)])


def test_the_html_page_is_self_contained_and_marks_every_token(session_file, streaming_session, tmp_path):
    out = tmp_path / "memory.html"
    cli_main(["inspect", str(session_file), "--html", str(out)])
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)  # nothing fetched from elsewhere
    memory = streaming_session[0].memory()
    assert page.count('class="t k"') == 64
    assert page.count('class="t e"') == len(memory.conversation) - 64 + 1  # + the legend's sample
    assert '<svg id="chart"' in page and page.count("<tr><td>") == len(memory.turns)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium_dom(page: Path) -> tuple[str, list[str]]:
    """The DOM after load, and the page's console messages (Chromium logs them to stderr as CONSOLE lines)."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package: apt-get install -y chromium")
def test_the_page_loads_in_headless_chromium_without_console_errors(session_file, streaming_session, tmp_path):
    # The harness itself must see a broken page's errors, or the clean result below would mean nothing.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    assert any("boom" in line for line in _chromium_dom(broken)[1])

    out = tmp_path / "memory.html"
    cli_main(["inspect", str(session_file), "--html", str(out)])
    dom, console = _chromium_dom(out)
    assert console == []
    memory = streaming_session[0].memory()
    # The page's script ran: it counted the retained tokens it shows.
    assert f'<span id="summary">64 of {len(memory.conversation)} tokens retained</span>' in dom
    kept = re.findall(r'<span class="t k"[^>]*>([^<]*)</span>', dom)
    import html

    assert [html.unescape(t) for t in kept] == [t.text for t in memory.tokens]


def test_chat_commands_and_the_ingestion_progress_line(tiny_engine, tmp_path):
    long_input = tmp_path / "long.txt"
    long_input.write_text(" ".join(f"item{i}" for i in range(400)))
    saved = tmp_path / "chat.safetensors"
    lines = iter(
        [
            "Hello!",
            "",
            "/stats",
            f"/file {long_input}",
            "/memory",
            f"/save {saved}",
            "/reset",
            "/stats",
            "/load /nowhere.safetensors",
            f"/load {saved}",
            "/bogus",
            "/quit",
            "never read",
        ]
    )
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, force_terminal=False)
    session = tiny_engine.session(cache_size=256, prefill_chunk=128)
    loop = ChatLoop(tiny_engine, session, read=lambda prompt: next(lines), console=console, max_new_tokens=6)
    loop.run()
    out = buffer.getvalue()
    assert next(lines) == "never read"
    assert re.search(r"\ringesting: 128/\d+ tokens\ringesting: 256/\d+ tokens", out)
    assert "memory: " in out and "tokens retained (supersede)" in out
    assert f"saved to {saved}" in out and "conversation forgotten" in out
    assert "not loaded: /nowhere.safetensors: cannot read the session file" in out
    assert f"loaded {saved}: 4 messages" in out and "/save PATH" in out  # /bogus prints the help
    assert [m["role"] for m in loop.messages] == ["user", "assistant", "user", "assistant"]
    assert loop.session is not session and loop.session.transcript.messages == loop.messages
    tiny_engine.drop_session(loop.session.session_id)
