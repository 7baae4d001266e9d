"""The demo's tables on a tiny random model: the per-turn figures and, per policy, what the cache holds of the fact."""

from __future__ import annotations

import re

from rich.console import Console
from sirllm_agents_apps import demo


def test_demo_shows_each_policy_and_what_its_cache_holds_of_the_fact(tiny_engine, monkeypatch, capsys):
    monkeypatch.setattr(demo, "Engine", lambda model, backend: tiny_engine)
    monkeypatch.setattr(demo, "Console", lambda **options: Console(width=300, **options))
    demo.main(seed=1, length=400, budget=0.25)
    out = capsys.readouterr().out
    tokens, cache = map(int, re.search(r"a (\d+)-token conversation on a (\d+)-token cache", out).groups())
    assert cache == round(0.25 * tokens)
    answers = {
        line.split("│")[1].strip(): line
        for line in out.splitlines()
        if re.match(r"│ (full|streaming|sirllm|default: supersede \+ recent 1/8) ", line)
    }
    assert set(answers) == {label for label, _ in demo.COLUMNS}
    held = {policy: re.search(r"\((\d+) of (\d+)\)", line).groups() for policy, line in answers.items()}
    kept, total = map(int, held["full"])
    assert kept == total > 0  # nothing evicted: the whole value is held
    assert held["streaming"][0] == "0"  # stated at turn 1, long out of StreamingLLM's window
    assert all(re.search(r"rank [1-5] of 5", line) for line in answers.values())
    # per turn, full never evicts and the others stay within the cache
    rows = re.findall(r"│\s+\d+ │\s+\d+ │\s+\d+ │(.*)│", out)
    assert len(rows) >= 3
    for row in rows:
        cells = [cell.strip() for cell in row.split("│")]
        evicted_full, _ = cells[0].split(" / ")
        assert evicted_full == "0"
        assert all(int(cell.split(" / ")[1]) <= cache for cell in cells[1:])
