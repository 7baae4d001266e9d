"""The recall suite: generated conversations, its scoring helpers, each policy on a tiny model, the report and plot."""

from __future__ import annotations

import json
import re

import pytest
from sirllm_agents_apps.bench import pooled, recall, recall_data
from sirllm_agents_apps.bench.plots import recall_figure, recall_plot
from sirllm_agents_apps.bench.report import report
from sirllm_agents_apps.cli import main as cli


def count_words(text: str) -> int:
    return len(text.split())


def test_conversations_are_seeded_and_state_every_fact_with_its_update():
    first = recall_data.generate(7, 600, count_words)
    assert first == recall_data.generate(7, 600, count_words)
    assert first != recall_data.generate(8, 600, count_words)
    messages = first.messages
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert sum(count_words(m["content"]) + 5 for m in messages) >= 600
    assert len({fact.kind for fact in first.facts}) == len(first.facts) == 3
    updated = [fact for fact in first.facts if fact.previous is not None]
    assert len(updated) == 1 and updated[0] is first.facts[0]
    for fact in first.facts:
        assert fact.candidates[fact.answer] == fact.value and len(set(fact.candidates)) == 5
        assert fact.value in messages[fact.message]["content"] and messages[fact.message]["role"] == "user"
        # No distractor names a candidate value.
        stating = {fact.message, fact.previous_message}
        for i, message in enumerate(messages):
            if i not in stating and message["role"] == "user":
                assert not any(recall.names(message["content"], value) for value in fact.candidates), (i, message)
    old = updated[0]
    assert old.previous in old.candidates and old.previous in messages[old.previous_message]["content"]
    assert old.previous_message < old.message and old.message / len(messages) > 0.6


def test_supersede_pairs_each_update_with_its_statement_and_no_fact_with_anything_else(tiny_engine):
    """What the ``supersede`` policy would see with the whole conversation cached: over the suite's conversations,
    each update restates its fact's first statement, and no other restatement touches a fact."""
    model = tiny_engine.model
    for seed in range(100):
        conversation = recall_data.generate(seed, 1000, lambda text: len(model.encode(text)))
        pairs = recall.restated_messages(model, list(conversation.messages))
        (updated,) = [fact for fact in conversation.facts if fact.previous is not None]
        stating = {fact.message for fact in conversation.facts} | {updated.previous_message}
        assert {pair for pair in pairs if set(pair) & stating} == {(updated.previous_message, updated.message)}


def test_a_reply_names_a_value_ignoring_case_and_punctuation():
    assert recall.names("The wifi password is Copper-76.", "copper76")
    assert recall.names("the password is COPPER76!", "copper76")
    assert recall.names("It is on March 14.", "March 14") and not recall.names("It is on March 144.", "March 14")


def test_well_formed_means_on_topic_and_no_copied_distractor():
    fact = recall_data.Fact("code", "What is my locker code?", "4821", ("4821", "1234"), 0, 0)
    runs = {("service", "auth", "status", "ok", "duration", "5")}
    assert recall.well_formed("Your locker code is 1234.", fact, runs)  # wrong, but an answer
    assert recall.well_formed("It is 4821.", fact, runs)
    assert not recall.well_formed("The weather is sunny today.", fact, runs)
    assert not recall.well_formed("Locker: service=auth status=ok duration=5s", fact, runs)
    assert not recall.well_formed("", fact, runs)


@pytest.mark.parametrize("policy", ["full", "streaming", "sirllm", "sentences", "truncate"])
def test_each_policy_answers_every_fact_with_sane_records(tiny_engine, policy):
    conversation = recall_data.generate(3, 500, lambda text: len(tiny_engine.model.encode(text)))
    tokens = recall.conversation_tokens(tiny_engine, conversation)
    records = recall.run_conversation(tiny_engine, conversation, recall.Setting(policy, 0.25, recent=0.125))
    assert len(records) == 3 and all(r["tokens"] == tokens and not r["overflowed"] for r in records)
    assert all(r["cache_size"] == max(recall.MIN_CACHE, round(0.25 * tokens)) for r in records)
    for r in records:
        assert isinstance(r["cloze"], bool) and isinstance(r["generated"], bool) and "\n" not in r["reply"]
    kept = [r["kept"] for r in records]
    if policy == "full":
        assert kept == [1.0, 1.0, 1.0] and records[0]["kept_previous"] == 1.0
    elif policy == "truncate":
        assert kept == [None] * 3 and all(r["messages_kept"] < len(conversation.messages) for r in records)
    elif policy == "streaming":
        assert records[1]["kept"] == 0.0  # stated at the start of the conversation, long out of the window
    else:
        assert all(0.0 <= k <= 1.0 for k in kept)
    summary = recall.summarize(records)
    assert summary["facts"] == 3 and summary["updated"]["facts"] == 1 and summary["plain"]["facts"] == 2


def test_a_cloze_only_run_scores_the_same_cloze_and_leaves_generation_out(tiny_engine):
    conversation = recall_data.generate(3, 500, lambda text: len(tiny_engine.model.encode(text)))
    setting = recall.Setting("sirllm", 0.25)
    both = recall.run_conversation(tiny_engine, conversation, setting)
    cloze_only = recall.run_conversation(tiny_engine, conversation, setting, generate=False)
    assert [r["cloze"] for r in cloze_only] == [r["cloze"] for r in both]
    assert all(r[f] is None for r in cloze_only for f in recall.GENERATION_FIELDS)
    summary = recall.summarize(cloze_only)["all"]
    assert "generated" not in summary and "well_formed" not in summary and "cloze" in summary


def test_full_overflows_past_the_model_length_and_says_so(tiny_engine, monkeypatch):
    conversation = recall_data.generate(3, 400, lambda text: len(tiny_engine.model.encode(text)))
    monkeypatch.setattr(tiny_engine.model, "max_length", 200)
    records = recall.run_conversation(tiny_engine, conversation, recall.Setting("full", 1.0))
    assert all(r["overflowed"] for r in records)
    assert recall.summarize(records) == {"facts": 3, "overflowed": 3}


def test_recall_report_and_plot(tmp_path):
    def run(policy, budget, length, cloze, generated=0.5):
        summary = {
            "facts": 6,
            "overflowed": 0,
            "all": {"cloze": cloze, "cloze_char": cloze, "generated": generated, "well_formed": 1.0, "kept": 0.5},
            "updated": {"cloze": 0.5, "generated": 0.0, "generated_previous": 1.0, "facts": 2},
        }
        return {
            "length": length,
            "policy": policy,
            "budget": budget,
            "decay": 1.0,
            "recent": 0.0,
            "summary": summary,
            "samples": [],
            "records": [],
            "seconds": 3.0,
        }

    runs = [
        run("full", 1.0, 1000, 0.9),
        run("sirllm", 0.25, 1000, 0.75),
        run("sirllm", 0.5, 1000, 0.8),
        run("streaming", 0.25, 1000, 0.25),
        run("sirllm", 0.25, 2000, 0.7),
        {**run("full", 1.0, 2000, 0), "summary": {"facts": 6, "overflowed": 6}},
    ]
    results = {
        "task": "recall",
        "model": "tiny",
        "conversations": 2,
        "seed": 0,
        "facts": 3,
        "lengths": [1000, 2000],
        "threads": 1,
        "runs": runs,
    }
    (tmp_path / "recall-20261123-000000.json").write_text(json.dumps(results))
    table = report(tmp_path)
    assert "| 1000 | sirllm | 0.25 | 1.0 | 0.0 | 75.0 | 75.0 | 50.0 | 100.0 | 50.0 | 50.0 | 0.0 | 100.0 | 3 |" in table
    assert re.search(r"\| 2000 \| full \| 1.0 \| +\| +\| overflowed", table)
    recall_plot(results, tmp_path / "recall.png")
    from matplotlib.image import imread

    assert imread(tmp_path / "recall.png").shape[:2] == (570, 2400)  # 4 panels, a legend row of 3 settings
    colours = {}  # a setting keeps its colour in every panel, the length panel included
    figure = recall_figure(results)
    for ax in figure.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert colours["sirllm decay=1.0"] == {"C0"} and colours["streaming"] == {"C1"}
    assert colours["full (no eviction)"] == {"black"}
    (legend,) = figure.legends  # one legend for every panel, each setting once
    assert [text.get_text() for text in legend.get_texts()] == ["full (no eviction)", "sirllm decay=1.0", "streaming"]
    many = [run("sirllm", 0.25, 1000, 0.5) | {"decay": 0.5 + index / 20} for index in range(12)]
    lines = recall_figure(results | {"lengths": [1000], "runs": many}).axes[0].get_lines()
    assert len({tuple(line.get_color()) for line in lines}) == 12  # past ten settings, still one colour each


@pytest.mark.slow
def test_cli_runs_the_suite_on_the_embedded_model(tmp_path):
    out = tmp_path / "results"
    cli(
        [
            "bench",
            "recall",
            "--conversations",
            "1",
            "--length",
            "300",
            "--budget",
            "0.5",
            "--policies",
            "full,sirllm,truncate",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    [result] = out.glob("recall-*.json")
    assert result.with_suffix(".png").stat().st_size > 1000
    results = json.loads(result.read_text())
    assert [(r["policy"], r["budget"]) for r in results["runs"]] == [("full", 1.0), ("sirllm", 0.5), ("truncate", 0.5)]
    assert all(len(r["records"]) == 3 for r in results["runs"])
    assert "| 300 | sirllm | 0.5 |" in report(out)


def _record(
    conversation: int, question: str, cloze: bool, reply: str | None, updated: bool = False, kind: str = "code"
) -> dict:
    return {
        "conversation": f"recall-{conversation}",
        "question": question,
        "kind": kind,
        "overflowed": False,
        "updated": updated,
        "cloze": cloze,
        "cloze_char": cloze,
        "picked_previous": updated and not cloze,
        "generated": None if reply is None else reply == "right",
        "generated_previous": None if reply is None else False,
        "well_formed": None if reply is None else True,
        "reply": reply,
        "kept": 1.0 if cloze else 0.0,
    }


def _results(model: str, runs: list[tuple[str, list[dict]]], backend: str | None = None, facts: int = 3) -> dict:
    results = {"task": "recall", "model": model, "facts": facts, "updates": True, "lengths": [1000]}
    results["runs"] = [
        {"length": 1000, "policy": policy, "budget": 0.25, "decay": 1.0, "recent": 0.125, "records": records}
        for policy, records in runs
    ]
    return results | ({"backend": backend} if backend else {})


def test_pooling_counts_each_fact_once_per_setting_and_keeps_studies_apart(tmp_path):
    first = [
        _record(0, "q1", True, None),
        _record(0, "q2", False, None, updated=True, kind="date"),
        _record(1, "q1", False, None),
    ]
    # A later file: conversation 1 again (its record replaces the first one's) and conversation 2, with replies.
    second = [_record(1, "q1", True, "right"), _record(2, "q1", True, "wrong")]
    files = {
        "recall-20261124-000000": _results("m", [("words", first)]),  # no backend: a PyTorch run
        "recall-20261124-010000": _results("m", [("words", second)], backend="llamacpp"),
        "recall-20261124-020000": _results("m", [("words", [_record(0, "q1", False, None)])], facts=1),
    }
    for stem, results in files.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(results))
    (main, other) = sorted(pooled.pool(tmp_path), key=lambda study: study["facts"], reverse=True)
    (run,) = main["runs"]
    assert (run["conversations"], run["backends"]) == (3, ["llamacpp", "torch"])
    assert run["files"] == ["recall-20261124-000000", "recall-20261124-010000"]
    summary = run["summary"]
    assert (summary["facts"], summary["all"]["cloze"], summary["updated"]["cloze"]) == (4, 0.75, 0.0)
    assert (summary["all"]["replies"], summary["all"]["generated"]) == (2, 0.5)  # over the facts with a reply
    assert other["facts"] == 1 and other["runs"][0]["summary"]["all"]["cloze"] == 0.0
    kinds = summary["kinds"]
    assert (kinds["code"]["facts"], kinds["code"]["cloze"], kinds["code"]["generated"]) == (3, 1.0, 0.5)
    assert (kinds["date"]["facts"], kinds["date"]["cloze"], kinds["date"]["kept"]) == (1, 0.0, 0.0)

    markdown = pooled.write(tmp_path, tmp_path / "plots")
    row = "| 1000 | words | 0.25 | 1.0 | 0.125 | 3 | 75.0 | 50.0 (2) | 100.0 | 75.0 | 100.0 | 0.0 | 100.0 |"
    assert row in markdown
    kinds_row = "| 1000 | words | 0.25 | 1.0 | 0.125 | 100.0 / 50.0 / 100.0 | - | - | - | 0.0 / - / 0.0 |"
    assert kinds_row in markdown
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "recall-pooled-m-1facts-code-name-place-password-date.png",
        "recall-pooled-m.png",
    ]
