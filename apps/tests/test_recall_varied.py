"""The recall suite's second generator (``recall_varied``): seeded, every answer where it says, the categories as
they claim to be, and its results kept apart from the first generator's in summaries, reports and pooling."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import pytest
from sirllm_agents_apps.bench import pooled, recall, recall_data
from sirllm_agents_apps.bench import recall_varied as varied
from sirllm_agents_apps.bench.report import report
from sirllm_agents_apps.cli import main as cli

SEEDS = range(120)


def count_words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def conversations():
    return [varied.generate(seed, 1500, count_words) for seed in SEEDS]


def lower_openings(text: str) -> set[tuple[str, ...]]:
    return {tuple(word.lower() for word in opening) for opening in varied.openings(text)}


def test_conversations_follow_from_the_seed():
    first = varied.generate(11, 1500, count_words)
    assert first == varied.generate(11, 1500, count_words)
    assert first.messages != varied.generate(12, 1500, count_words).messages
    assert first.name == "varied-11"


def test_messages_alternate_and_reach_the_length(conversations):
    for conversation in conversations:
        messages = conversation.messages
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert sum(count_words(m["content"]) + varied.TEMPLATE_TOKENS for m in messages) >= 1500


def test_every_answer_is_where_the_generator_says_and_is_the_newest_value(conversations):
    for conversation in conversations:
        texts = [m["content"] for m in conversation.messages]
        questions = [fact.question for fact in conversation.facts]
        assert len(set(questions)) == len(questions)
        for fact in conversation.facts:
            assert fact.candidates[fact.answer] == fact.value and len(set(fact.candidates)) == 5
            assert texts[fact.message][fact.offset : fact.offset + len(fact.value)] == fact.value
            # recall.value_tokens looks the value up with rfind: it must find this very place.
            assert texts[fact.message].rfind(fact.value) == fact.offset
            assert conversation.messages[fact.message]["role"] == "user"
            named = {
                value: [i for i, text in enumerate(texts) if recall.names(text, value)] for value in fact.candidates
            }
            assert named[fact.value] == [fact.message]
            if fact.previous is None:
                assert all(named[v] == [] for v in fact.candidates if v != fact.value)
                continue
            # An update: the old value is a wrong candidate, stated once, before the new one.
            assert fact.previous in fact.candidates and fact.previous != fact.value
            assert named[fact.previous] == [fact.previous_message] and fact.previous_message < fact.message
            prev_text = texts[fact.previous_message]
            assert prev_text[fact.previous_offset : fact.previous_offset + len(fact.previous)] == fact.previous
            assert all(named[v] == [] for v in fact.candidates if v not in (fact.value, fact.previous))
        assert varied.misplaced(conversation) is None


def test_misplaced_catches_a_value_said_twice():
    conversation = varied.generate(4, 1500, count_words)
    fact = conversation.facts[0]
    messages = list(conversation.messages)
    messages[-2] = {"role": "user", "content": f"Unrelated, but {fact.value} came up."}
    assert "named in messages" in varied.misplaced(dataclasses.replace(conversation, messages=tuple(messages)))
    moved = dataclasses.replace(fact, offset=fact.offset + 1)
    wrong = dataclasses.replace(conversation, facts=(moved, *conversation.facts[1:]))
    assert "is not at message" in varied.misplaced(wrong)


def test_per_category_counts_are_as_configured(conversations):
    for conversation in conversations:
        assert Counter(f.category for f in conversation.facts) == Counter(varied.CATEGORIES)
    counts = {"plain": 2, "same-opening": 3, "tool-output": 2}
    for seed in range(30):
        conversation = varied.generate(seed, 1500, count_words, counts)
        assert Counter(f.category for f in conversation.facts) == counts
        updated = [f for f in conversation.facts if f.previous is not None]
        assert updated == []
    with pytest.raises(ValueError, match="unknown categories"):
        varied.generate(0, 1500, count_words, {"plain": 1, "updates": 1})


def test_free_form_updates_share_no_opening_with_their_statement(conversations):
    free = [(c, f) for c in conversations for f in c.facts if f.category == "update-free"]
    assert len(free) == len(SEEDS)
    for conversation, fact in free:
        statement = conversation.messages[fact.previous_message]["content"]
        update = conversation.messages[fact.message]["content"]
        assert lower_openings(update) and not lower_openings(update) & lower_openings(statement), (statement, update)
    # Many forms, not one template: the updates differ once their values are taken out.
    forms = {conversation.messages[f.message]["content"].replace(f.value, "{v}") for conversation, f in free}
    assert len(forms) >= 20


POOLS = {
    "person": varied.PEOPLE,
    "town": varied.TOWNS,
    "weekday": varied.WEEKDAYS,
    "colour": varied.COLOURS,
    "passphrase": varied.PASS_WORDS,
}


def test_every_template_keeps_its_category_s_promise():
    """Over all templates, not only those a sample of seeds draws: no change opens like any statement of its topic,
    every lead opens with four words that hold no value, and every echo opens like its lead and names no value."""
    for topic in varied.TOPICS:
        statements = [topic.lead, *topic.phrasings]
        assert "{v}" not in " ".join(topic.lead.split()[: varied.LEAD_WORDS])
        for change in topic.changes:
            for statement in statements:
                assert not lower_openings(change) & lower_openings(statement), (change, statement)
        lead = tuple(topic.lead.split()[: varied.LEAD_WORDS])
        for echo in topic.echoes:
            assert varied.openings(echo)[0] == lead, echo
            assert not re.search(r"\d", echo) and not varied.names_any(echo, list(POOLS.get(topic.kind, ()))), echo


def test_restated_updates_open_with_their_statement_s_words(conversations):
    for conversation in conversations:
        for fact in conversation.facts:
            if fact.category != "update-restated":
                continue
            statement = conversation.messages[fact.previous_message]["content"]
            update = conversation.messages[fact.message]["content"]
            lead = varied.openings(statement)[0]
            assert varied.openings(update)[0] == lead and fact.previous not in update
            assert fact.previous not in " ".join(lead)  # the four words hold no value


def test_same_opening_sentences_are_no_updates(conversations):
    for conversation in conversations:
        (fact,) = [f for f in conversation.facts if f.category == "same-opening"]
        texts = [m["content"] for m in conversation.messages]
        statement, echo = texts[fact.message], texts[fact.echo_message]
        assert fact.message < fact.echo_message and fact.previous is None
        # The later sentence opens with the same four words, exactly, and goes on to something else.
        assert varied.openings(echo)[0] == varied.openings(statement)[0]
        assert varied.clauses(echo)[0] != varied.clauses(statement)[0]
        # It names no candidate: the first statement's value is still the answer.
        assert not any(recall.names(echo, value) for value in fact.candidates)
        assert statement[fact.offset : fact.offset + len(fact.value)] == fact.value


def test_plain_facts_come_in_many_phrasings(conversations):
    forms = Counter()
    for conversation in conversations:
        for fact in conversation.facts:
            if fact.category == "plain":
                forms[conversation.messages[fact.message]["content"].replace(fact.value, "{v}")] += 1
    assert len(forms) >= 40 and max(forms.values()) <= 5


def test_tool_outputs_are_long_and_react_traces_repeat_their_openings(conversations):
    long_outputs = 0
    for conversation in conversations:
        texts = [m["content"] for m in conversation.messages]
        (fact,) = [f for f in conversation.facts if f.category == "tool-output"]
        holder = texts[fact.message]
        # A JSON record or a log of 9-13 lines (about 100-400 of SmolLM2's tokens), the value in one field or line.
        assert len(holder) >= 300 and ("{" in holder or re.search(r"\d\d:\d\d:\d\d", holder))
        long_outputs += sum(len(t) >= 700 for i, t in enumerate(texts) if i != fact.message)
    assert long_outputs >= len(SEEDS)  # about one long distractor output a conversation or more
    thoughts = Counter(
        text.split("\n")[0][: len("Thought: I need to")]
        for conversation in conversations
        for text in (m["content"] for m in conversation.messages)
        if text.startswith("Thought:")
    )
    assert thoughts["Thought: I need to"] >= 2 * len(SEEDS)
    assert sum(text.startswith("Observation: ") for c in conversations for text in (m["content"] for m in c.messages))


def test_supersede_s_rule_meets_each_category_as_designed(tiny_engine):
    """With the whole conversation cached, ``supersede`` pairs a restated update with its statement and a
    same-opening sentence with the fact it does not update (the suite's hard negative), and never a free-form update
    with its statement: the suite tests the rule where it helps, where it hurts and where it cannot see."""
    model = tiny_engine.model
    for seed in range(40):
        conversation = varied.generate(seed, 1500, lambda text: len(model.encode(text)))
        pairs = recall.restated_messages(model, list(conversation.messages))
        facts = {f.category: f for f in conversation.facts}
        restated, free, same = facts["update-restated"], facts["update-free"], facts["same-opening"]
        assert (restated.previous_message, restated.message) in pairs
        assert (same.message, same.echo_message) in pairs
        assert (free.previous_message, free.message) not in pairs


def test_each_question_is_scored_with_its_category(tiny_engine):
    conversation = varied.generate(2, 700, lambda text: len(tiny_engine.model.encode(text)))
    records = recall.run_conversation(tiny_engine, conversation, recall.Setting("full", 1.0), generate=False)
    assert [r["category"] for r in records] == [f.category for f in conversation.facts]
    assert all(r["kept"] == 1.0 for r in records)
    assert [r["updated"] for r in records] == [f.previous is not None for f in conversation.facts]
    summary = recall.summarize(records)
    assert sorted(summary["categories"]) == sorted(varied.CATEGORIES)
    for shares in summary["categories"].values():
        assert shares["facts"] == 1
        interval = shares["intervals"]["cloze"]
        assert interval["low"] == interval["mean"] == interval["high"] == shares["cloze"] and interval["n"] == 1
    assert "picked_previous" in summary["categories"]["update-free"]["intervals"]
    assert "picked_previous" not in summary["categories"]["plain"]["intervals"]
    # The first generator's records have no category, and their summary no categories or intervals.
    first = recall_data.generate(2, 500, lambda text: len(tiny_engine.model.encode(text)))
    plain = recall.summarize(recall.run_conversation(tiny_engine, first, recall.Setting("full", 1.0), generate=False))
    assert "categories" not in plain and "intervals" not in plain["all"]


def _record(conversation: int, category: str, cloze: bool) -> dict:
    updated = category.startswith("update")
    return {
        "conversation": f"varied-{conversation}",
        "question": category,
        "category": category,
        "kind": "code",
        "overflowed": False,
        "updated": updated,
        "cloze": cloze,
        "cloze_char": cloze,
        "picked_previous": updated and not cloze,
        "generated": cloze,
        "generated_previous": False,
        "well_formed": True,
        "reply": "x",
        "kept": 1.0,
    }


def test_report_and_pool_keep_the_varied_suite_apart(tmp_path):
    records = [_record(i, c, i % 2 == 0 or c == "plain") for i in range(4) for c in varied.CATEGORIES]
    run = {"length": 1500, "policy": "supersede", "budget": 0.25, "decay": 1.0, "recent": 0.125}
    results = {
        "task": "recall",
        "model": "m",
        "backend": "llamacpp",
        "conversations": 4,
        "facts": 5,
        "updates": True,
        "kinds": list(varied.KINDS),
        "lengths": [1500],
        "suite": "varied",
        "categories": dict.fromkeys(varied.CATEGORIES, 1),
        "runs": [run | {"summary": recall.summarize(records), "records": records, "seconds": 1.0}],
    }
    (tmp_path / "recall-20261203-000000-varied.json").write_text(json.dumps(results))
    first = results | {
        "facts": 3,
        "kinds": list(recall_data.SUBJECTS),
        "runs": [run | {"summary": recall.summarize(records[:1]), "records": records[:1], "seconds": 1.0}],
    }
    del first["suite"], first["categories"]
    (tmp_path / "recall-20261202-000000.json").write_text(json.dumps(first))
    studies = pooled.pool(tmp_path)
    assert sorted(study["suite"] for study in studies) == ["generated", "varied"]
    markdown = pooled.write(tmp_path, tmp_path / "plots")
    assert "recall suite (varied), pooled" in markdown
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "recall-pooled-m-varied.png",
        "recall-pooled-m.png",
    ]
    text = report(tmp_path)
    assert "recall suite, varied generator: 4 conversations" in text
    # cloze over all 20 questions: plain 4/4, every other category 2/4 -> 60%; plain's interval is [100, 100].
    row = next(line for line in text.splitlines() if "| supersede |" in line and "| cloze |" in line)
    assert "| 60.0 [" in row and "| 100.0 [100.0, 100.0] |" in row


@pytest.mark.slow
def test_cli_runs_the_varied_suite(tmp_path):
    out = tmp_path / "results"
    args = ["bench", "recall", "--suite", "varied", "--conversations", "1", "--length", "600", "--budget", "0.5"]
    args += ["--policies", "supersede", "--recent", "0.125", "--categories", "plain,update-free,tool-output"]
    cli([*args, "--per-category", "1", "--no-generation", "--threads", "1", "--out", str(out)])
    [result] = out.glob("recall-*-varied.json")
    results = json.loads(result.read_text())
    assert results["suite"] == "varied" and results["facts"] == 3
    assert results["categories"] == {"plain": 1, "update-free": 1, "tool-output": 1}
    [run] = results["runs"]
    assert sorted(run["summary"]["categories"]) == ["plain", "tool-output", "update-free"]
    assert run["length"] == 600 and {r["conversation"] for r in run["records"]} == {"varied-0"}
