"""Views of a session's memory: a self-contained HTML page and a ``rich`` terminal rendering.

Both show the whole conversation token by token, retained tokens shaded by their decayed score and evicted ones
greyed, with per-turn counts and the cache length after each call. They take a :class:`Memory`, so they work on a
live session (``session.memory()``) and on a saved file (``persistence.read_memory``) alike.
"""

from __future__ import annotations

import html
import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from sirllm_agents.memory import Memory, MemoryToken

_BARS = " ▁▂▃▄▅▆▇█"


def _shade(token: MemoryToken, low: float, high: float) -> float:
    """0..1: where the token's score sits among the retained scores (0 for the lowest)."""
    if token.score is None or high <= low:
        return 0.5 if token.score is not None else 0.0
    return (min(max(token.score, low), high) - low) / (high - low)


def _score_range(memory: Memory) -> tuple[float, float]:
    # Percentiles rather than min/max: sink tokens and the first token carry outlying scores.
    scores = sorted(t.score for t in memory.tokens if t.score is not None and t.score == t.score)
    if not scores:
        return 0.0, 0.0
    return scores[len(scores) // 20], scores[min(len(scores) - 1, len(scores) * 19 // 20)]


# -- HTML -----------------------------------------------------------------------------------------------------------

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; border-bottom: 1px solid #ddd; }
.conversation { white-space: pre-wrap; font: 13px/1.6 ui-monospace, monospace; border: 1px solid #ccc; padding: 1em; }
.t.k { border-radius: 2px; } .t.e { color: #b0b0b0; }
.t:hover { outline: 1px solid #333; }
#info { position: sticky; top: 0; background: #fffbe6; border: 1px solid #e6d9a2; padding: 4px 8px; min-height: 1.4em; }
.legend span { padding: 0 6px; margin-right: 6px; }
"""

_SCRIPT = """
(function () {
  const tokens = document.querySelectorAll('.conversation .t');
  const kept = document.querySelectorAll('.conversation .t.k');
  document.getElementById('summary').textContent =
    kept.length + ' of ' + tokens.length + ' tokens retained';
  const info = document.getElementById('info');
  document.querySelector('.conversation').addEventListener('mouseover', function (event) {
    const t = event.target.closest('.t');
    if (t) info.textContent = t.title;
  });
})();
"""


def _chart(memory: Memory, width: int = 640, height: int = 160) -> str:
    """An inline SVG line of the cache length after each call, with the cache size dashed."""
    lengths = memory.cache_lengths
    if not lengths:
        return "<p>No calls yet.</p>"
    top = max(memory.cache_size, max(lengths)) or 1
    step = width / max(1, len(lengths) - 1)
    points = " ".join(f"{i * step:.1f},{height - n / top * height:.1f}" for i, n in enumerate(lengths))
    limit = height - memory.cache_size / top * height
    return (
        f'<svg id="chart" viewBox="-40 -10 {width + 60} {height + 30}" width="{width + 60}" height="{height + 30}" '
        'role="img" aria-label="cache length per call">'
        f'<line x1="0" y1="{limit:.1f}" x2="{width}" y2="{limit:.1f}" stroke="#c33" stroke-dasharray="4 3"/>'
        f'<text x="-36" y="{limit + 4:.1f}" font-size="10">{memory.cache_size}</text>'
        f'<line x1="0" y1="{height}" x2="{width}" y2="{height}" stroke="#999"/>'
        f'<polyline fill="none" stroke="#2a6fdb" stroke-width="2" points="{points}"/>'
        f'<text x="0" y="{height + 16}" font-size="10">call 1</text>'
        f'<text x="{width - 40}" y="{height + 16}" font-size="10">call {len(lengths)}</text>'
        "</svg>"
    )


def render_html(memory: Memory, document: dict[str, Any] | None = None) -> str:
    """A self-contained page (no external resources) for ``memory``; ``document`` is a session file's JSON header,
    for the title and settings."""
    low, high = _score_range(memory)
    spans = []
    for token in memory.conversation:
        text = html.escape(token.text)
        if token.retained:
            alpha = 0.12 + 0.78 * _shade(token, low, high)
            title = f"position {token.position} · turn {token.turn} · score {token.score:.3f}"
            spans.append(
                f'<span class="t k" style="background:rgba(255,140,0,{alpha:.2f})" title="{title}">{text}</span>'
            )
        else:
            title = f"position {token.position} · turn {token.turn} · evicted"
            spans.append(f'<span class="t e" title="{title}">{text}</span>')
    rows = "".join(
        f"<tr><td>{t.turn}</td><td>{t.ingested}</td><td>{t.retained}</td><td>{t.evicted}</td></tr>"
        for t in memory.turns
    )
    about = ""
    if document is not None:
        model = document.get("model", {})
        about = (
            f"<p>Session <code>{html.escape(str(document.get('session_id')))}</code> on "
            f"<code>{html.escape(str(model.get('name')))}</code> ({html.escape(str(model.get('dtype')))}), "
            f"settings <code>{html.escape(json.dumps(document.get('settings')))}</code></p>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sirllm-agents memory</title>
<style>{_STYLE}</style></head>
<body>
<h1>Session memory</h1>
{about}
<p>Policy <b>{html.escape(memory.policy)}</b>, cache {len(memory.tokens)} / {memory.cache_size} tokens.
<span id="summary"></span></p>
<h2>Cache length after each call</h2>
{_chart(memory)}
<h2>Per turn</h2>
<table><tr><th>turn</th><th>ingested</th><th>retained</th><th>evicted</th></tr>{rows}</table>
<h2>Conversation</h2>
<p class="legend"><span style="background:rgba(255,140,0,0.9)">high score</span>
<span style="background:rgba(255,140,0,0.12)">low score</span><span class="t e">evicted</span></p>
<div id="info"></div>
<div class="conversation">{"".join(spans)}</div>
<script>{_SCRIPT}</script>
</body></html>
"""


# -- terminal -------------------------------------------------------------------------------------------------------


def print_memory(memory: Memory, console: Console, last_tokens: int | None = None) -> None:
    """Print ``memory`` with ``rich``: the per-turn table, the cache-length sparkline and the conversation (only its
    ``last_tokens`` tokens when given)."""
    console.print(Text(f"memory: {len(memory.tokens)} / {memory.cache_size} tokens retained ({memory.policy})"))
    table = Table()
    for column in ("turn", "ingested", "retained", "evicted"):
        table.add_column(column, justify="right")
    for t in memory.turns:
        table.add_row(str(t.turn), str(t.ingested), str(t.retained), str(t.evicted))
    console.print(table)
    if memory.cache_lengths:
        top = max(memory.cache_size, max(memory.cache_lengths)) or 1
        line = "".join(_BARS[round(n / top * (len(_BARS) - 1))] for n in memory.cache_lengths)
        console.print(Text(f"cache length per call (max {memory.cache_size}): ") + Text(line, style="blue"))
    low, high = _score_range(memory)
    shown = memory.conversation if last_tokens is None else memory.conversation[-last_tokens:]
    text = Text()
    if len(shown) < len(memory.conversation):
        text.append(f"… {len(memory.conversation) - len(shown)} earlier tokens not shown …\n", style="italic")
    for token in shown:
        if token.retained:
            level = _shade(token, low, high)
            text.append(token.text, style=f"black on rgb(255,{int(235 - 110 * level)},{int(200 - 200 * level)})")
        else:
            text.append(token.text, style="grey50")
    console.print(text)
    console.print(Text("retained: shaded by score (darker = higher); evicted: grey", style="italic"))
