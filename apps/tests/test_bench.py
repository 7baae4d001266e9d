"""Benchmarks at smoke size: the paper's data as episodes, each memory task under the four policies, the agent loop,
the CLI's JSON and PNG files and the report. Data tests skip when ../shared/data/sirllm is absent."""

from __future__ import annotations

import json
from functools import partial
from operator import itemgetter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sirllm_agents_apps.bench import agent_loop, backends, data, locomo_data
from sirllm_agents_apps.bench.memory import POLICIES, Player, Setting, cloze_picks, key_share_in_cache, run_setting
from sirllm_agents_apps.bench.plots import agent_loop_plot, memory_plot
from sirllm_agents_apps.bench.report import report
from sirllm_agents_apps.cli import main as cli

from sirllm_agents.memory import MemoryToken

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sirllm"
needs_data = pytest.mark.skipif(
    not (DATA / "keys.jsonl").is_file(), reason=f"the SirLLM data folder is absent ({DATA})"
)


@needs_data
def test_episodes_follow_the_paper_data():
    grocery = data.load("grocery", DATA)
    assert len(grocery) == 548
    assert all(len(e.turns) == 22 for e in grocery)
    first = grocery[0].turns
    assert [t.kind for t in (first[0], first[1], first[-1])] == ["key", "commonsense", "recall"]
    assert "[chocolate]" in first[0].question and first[-1].texts[first[-1].answer] == "chocolate"
    assert "(A) vanilla extract (B) tea (C) chocolate (D) eggs" in first[-1].question

    assert [len(e.turns) for e in data.load("dailydialog", DATA, limit=3)] == [6, 2, 3]  # ids 0_1..0_11, 1_1, 1_3, ...
    dialogues = data.load("dailydialog", DATA)
    assert (len(dialogues), sum(len(e.turns) for e in dialogues)) == (1000, 3700)
    games = data.load("rps", DATA, limit=5)
    assert [g.name for g in games] == ["rps-dominant_rock", "rps-dominant_paper", "rps-dominant_scissors"]
    assert all(len(g.turns) == 5 for g in games)
    assert games[0].turns[1].question.startswith("I chose [rock].")  # the player's previous move
    # Each turn's cloze form: the question without its lettered choices.
    for turn in (games[0].turns[0], games[0].turns[1], dialogues[0].turns[0], first[-1]):
        assert turn.stem and "Choices" not in turn.stem and "(A)" not in turn.stem
    assert games[0].turns[1].stem.startswith("I chose [rock].")
    assert len(data.load("rps", DATA)[0].turns) == 2000  # the paper plays 2000 rounds


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataMissingError, match="Zoeyyao27/SirLLM"):
        data.load("grocery", tmp_path)


@needs_data
@pytest.mark.parametrize("task", ["grocery", "dailydialog"])
def test_each_policy_plays_a_dialogue_with_sane_figures(tiny_engine, task):
    # DailyDialog's second dialogue has a blank option (``"\n"``): only the letter scoring can pick it.
    episodes = data.load(task, DATA, limit=2)[-1:]
    if task == "dailydialog":
        assert "" in episodes[0].turns[1].texts
    turns = len(episodes[0].turns)
    for policy in POLICIES:
        advanced = []
        setting = Setting(policy, 128, 0.9)
        run = run_setting(tiny_engine, task, episodes, setting, "text", partial(advanced.append, 1))
        assert (run["episodes"], run["turns"], len(advanced)) == (1, turns, turns)
        for scoring in ("text", "letter"):
            values = run["metrics"][scoring].values()
            assert values and all(0.0 <= v <= 1.0 for v in values)
        # Grocery's recall turn, and every DailyDialog response, also in cloze form.
        assert set(run["metrics"]) == {"text", "letter", "cloze", "cloze_char"}
        metric = "acc_g" if task == "grocery" else "accuracy"
        assert all(list(run["metrics"][s]) == [metric] for s in ("cloze", "cloze_char"))
        assert run["prefilled_tokens"] > 0
        # Only truncate can fail a turn: when the newest message alone passes the budget.
        assert run["overflowed_turns"] == 0 or policy == "truncate"
        if policy in ("full", "truncate"):
            assert run["evicted_tokens"] == 0
        else:
            assert run["evicted_tokens"] > 0  # a dialogue does not fit 128 tokens
        if task == "grocery":
            # The first turn's grocery: all there with no eviction; gone from the recent window and from the trimmed
            # messages; the entropy policies keep whatever their scores say.
            if policy in ("full", "streaming", "truncate"):
                assert run["key_in_cache"] == {"full": 1.0, "streaming": 0.0, "truncate": 0.0}[policy]
            else:
                assert 0.0 <= run["key_in_cache"] <= 1.0
        else:
            assert "key_in_cache" not in run


def test_a_setting_keeps_its_share_of_the_cache_for_the_newest_tokens(tiny_engine):
    player = Player(tiny_engine, Setting("words", 128, 0.9, recent=0.25))
    player.new_episode()
    cache = player.session.cache
    assert (type(cache.policy).__name__, cache.start_size, cache.recent_size) == ("WordsPolicy", 4, 32)
    assert player.session.config.decay == 0.9


@pytest.mark.parametrize("policy", ["sirllm", "truncate"])
def test_cloze_form_runs_on_a_fork_and_ranks_per_token(tiny_engine, policy):
    player = Player(tiny_engine, Setting(policy, 96, 1.0))
    player.new_episode()
    messages = []
    for i in range(6):
        messages.append({"role": "user", "content": f"Question {i}: which colour is grass? Choices: (A) green (B) red"})
        player.score(messages, ["A", "B"])
        messages.append({"role": "assistant", "content": "A"})
    turn = data.Turn(
        "Which grocery? Choices: (A) tea (B) peanut butter",
        ["A", "B"],
        ["tea", "peanut butter"],
        1,
        "recall",
        stem="Which grocery?",
    )
    before = (player.session.cache.token_ids.clone(), player.session.transcript.messages[:])
    picks = cloze_picks(player, messages, turn)
    # The session the lettered question goes to is untouched.
    assert torch.equal(player.session.cache.token_ids, before[0]) and player.session.transcript.messages == before[1]
    scores = player.fork().score(messages + [{"role": "user", "content": "Which grocery?"}], turn.texts)
    per_token = [s / len(tiny_engine.model.encode(t)) for s, t in zip(scores, turn.texts)]
    per_char = [s / len(t) for s, t in zip(scores, turn.texts)]
    assert picks == {"cloze": per_token.index(max(per_token)), "cloze_char": per_char.index(max(per_char))}


def test_cloze_form_never_picks_a_blank_option(tiny_engine):
    player = Player(tiny_engine, Setting("sirllm", 96, 1.0))
    player.new_episode()
    texts = ["hello", "", "bye"]
    turn = data.Turn(
        "Reply to: hi. Choices: (A) hello (B) (C) bye", ["A", "B", "C"], texts, 0, "response", stem="Reply to: hi."
    )
    picks = cloze_picks(player, [], turn)
    scores = player.fork().score([{"role": "user", "content": turn.stem}], ["hello", "bye"])
    per_token = [s / len(tiny_engine.model.encode(t)) for s, t in zip(scores, ["hello", "bye"])]
    assert picks["cloze"] == (0 if per_token[0] >= per_token[1] else 2)


def test_key_share_counts_the_grocery_tokens_the_cache_still_holds():
    def session(*pieces_kept):
        tokens = [MemoryToken(i, i, piece, 0, 1.0 if kept else None) for i, (piece, kept) in enumerate(pieces_kept)]
        return SimpleNamespace(memory=lambda: SimpleNamespace(conversation=tokens))

    # The brackets' tokens do not count; a token that holds part of the name does.
    held = session(("I buy [", False), ("ch", True), ("ocol", False), ("ate].", True), (" Choices: chocolate", False))
    assert key_share_in_cache(held, "chocolate") == pytest.approx(2 / 3)
    assert key_share_in_cache(session(("GROCERY: [", True), ("tea", True), ("]", False)), "tea") == 1.0
    assert (
        key_share_in_cache(
            session(
                ("Choices: (A) tea", True),
            ),
            "tea",
        )
        == 0.0
    )  # the first turn was trimmed


def test_truncate_keeps_the_newest_whole_messages_within_the_budget(tiny_engine):
    player = Player(tiny_engine, Setting("truncate", 128, 1.0))
    messages = []
    for i in range(12):
        messages += [
            {"role": "user", "content": f"Question number {i}: is {i} even?"},
            {"role": "assistant", "content": "B"},
        ]
    messages.append({"role": "user", "content": "Last question: (A) yes (B) no"})
    kept = player.trimmed(messages, ["A", "B"])
    assert kept == messages[-len(kept) :] and kept[0]["role"] == "user" and 1 < len(kept) < len(messages)
    prompt = tiny_engine.model.template.render(kept, add_generation_prompt=True)
    assert len(tiny_engine.model.encode(prompt)) + 1 <= 128
    longer = tiny_engine.model.template.render(messages[-len(kept) - 2 :], add_generation_prompt=True)
    assert len(tiny_engine.model.encode(longer)) + 1 > 128  # it kept as much as fits

    player.new_episode()
    assert len(player.score(messages, ["A", "B"])) == 2
    assert len(player.session.cache) <= 128


@needs_data
@pytest.mark.slow
def test_cli_writes_json_and_png_and_the_report_tables(tmp_path):
    out = tmp_path / "results"
    cli(
        [
            "bench",
            "rps",
            "--data",
            str(DATA),
            "--limit",
            "3",
            "--cache-size",
            "64,128",
            "--decay",
            "0.5,1.0",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    [result] = out.glob("rps-*.json")
    assert result.with_suffix(".png").stat().st_size > 1000
    results = json.loads(result.read_text())
    assert (results["task"], results["episodes"], results["scoring"]) == ("rps", 3, "text")
    settings = [(r["policy"], r["cache_size"], r["decay"]) for r in results["runs"]]
    assert settings == [
        ("full", None, 1.0),
        ("streaming", 64, 1.0),
        ("streaming", 128, 1.0),
        ("sirllm", 64, 0.5),
        ("sirllm", 64, 1.0),
        ("sirllm", 128, 0.5),
        ("sirllm", 128, 1.0),
        ("truncate", 64, 1.0),
        ("truncate", 128, 1.0),
    ]
    for run in results["runs"]:
        assert run["turns"] == 9
        assert set(run["metrics"]) == {"text", "letter", "cloze", "cloze_char"}  # every round asked both ways
        for scoring in run["metrics"]:
            for player in ("rock", "paper", "scissors"):
                rates = run["metrics"][scoring][player]
                assert all(0.0 <= v <= 1.0 for v in rates.values())
                assert rates["win"] + rates["tie"] + rates["lose"] == pytest.approx(1.0)
    table = report(out)
    assert "| sirllm | 64 | 0.5 | cloze | rock |" in table and "| full | max | 1.0 | text | scissors |" in table


@pytest.mark.slow
def test_agent_loop_runs_each_available_peer_and_reports_what_it_skipped(tmp_path, capsys):
    pytest.importorskip("langchain_huggingface", reason="the stateless peer needs the bench extra")
    peers = ["sirllm", "sirllm-llamacpp", "stateless", "llamacpp"]
    results = agent_loop.run(peers, steps=3, cache_size=256, threads=1, time_limit=None)
    for name in ("sirllm", "stateless"):
        peer = results["peers"][name]
        assert len(peer["steps"]) == 3 and peer["stopped"] is None
        assert all(s["seconds"] > 0 and s["rss_mib"] > 0 and 0 < s["reply_tokens"] <= 26 for s in peer["steps"])
        histories = [s["history_tokens"] for s in peer["steps"]]
        assert histories == sorted(histories) and histories[0] > 60
        assert results["summary"][name]["peak_rss_mib"] > 100
    assert results["summary"]["stateless_over_sirllm"]["steps"] == 3
    printed = capsys.readouterr().out
    for name in ("sirllm-llamacpp", "llamacpp"):
        peer = results["peers"][name]
        if "skipped" in peer:
            assert "llama_cpp is not installed" in peer["skipped"]
            assert f"{name}: skipped" in printed
        else:
            assert len(peer["steps"]) == 3 and peer["stopped"] is None
            medians = [m for m in results["summary"][name]["decile_medians"] if m is not None]
            assert len(medians) == 3 and all(m > 0 for m in medians)  # 3 steps: one in each of 3 tenths
    (tmp_path / "agent-loop.json").write_text(json.dumps(results))
    assert "| sirllm |" in report(tmp_path)


def test_tool_results_are_about_sixty_tokens_and_differ(tokenizer):
    lengths = [len(tokenizer.encode(agent_loop.tool_result(step))) for step in range(300)]
    assert min(lengths) >= 50 and max(lengths) <= 75
    assert len({agent_loop.tool_result(step) for step in range(300)}) == 300


def test_runs_started_in_the_same_second_keep_both_results(tmp_path):
    from sirllm_agents_apps.bench.cli import _write_new

    stems = [_write_new(tmp_path / "grocery-20261122-090205", json.dumps({"run": n})) for n in range(3)]
    assert [s.name for s in stems] == [
        "grocery-20261122-090205",
        "grocery-20261122-090205-2",
        "grocery-20261122-090205-3",
    ]
    assert [json.loads(s.with_suffix(".json").read_text())["run"] for s in stems] == [0, 1, 2]


def test_agent_report_and_plot_give_ratios_and_why_a_peer_stopped_or_was_skipped(tmp_path):
    def peer(name, seconds, stopped=None):
        steps = [
            {"seconds": s, "rss_mib": 500.0 + i, "history_tokens": 100 * (i + 1), "reply_tokens": 24}
            for i, s in enumerate(seconds)
        ]
        return {
            "peer": name,
            "backend": f"{name} backend",
            "overflow": f"{name} overflow",
            "threads": 1,
            "load_seconds": 1.0,
            "steps": steps,
            "stopped": stopped,
            "peak_rss_mib": 600.0,
        }

    results = {
        "task": "agent-loop",
        "steps": 40,
        "cache_size": 512,
        "threads": 1,
        "reply_tokens": 24,
        "peers": {
            "sirllm": peer("sirllm", [1.0] * 40),
            "stateless": peer("stateless", [2.0] * 30, stopped="time limit of 60 s reached after step 29"),
            "llamacpp": {"peer": "llamacpp", "skipped": "skipped: llama_cpp is not installed"},
        },
    }
    results["summary"] = agent_loop.summarize(results)
    assert results["summary"]["stateless_over_sirllm"] == {"steps": 30, "ratio": 2.0}
    assert "llamacpp_over_sirllm" not in results["summary"]
    (tmp_path / "agent-loop-20261122-120000.json").write_text(json.dumps(results))
    table = report(tmp_path)
    assert "| sirllm | sirllm backend | 40 | 40.0 | 1.00 | 600 | 30 | sirllm overflow | - |" in table
    assert (
        "| stateless | stateless backend | 30 | 60.0 | 1.00 | 600 | 20 | stateless overflow | "
        "time limit of 60 s reached after step 29 |"
    ) in table
    assert "| llamacpp | skipped: llama_cpp is not installed |" in table
    assert "stateless time / sirllm time over the first 30 steps: 2.00" in table
    agent_loop_plot(results, tmp_path / "agent-loop.png")
    assert (tmp_path / "agent-loop.png").stat().st_size > 1000


def test_grocery_report_and_plot_show_the_grocery_kept_in_cache(tmp_path):
    def run(policy, cache_size, acc_g, key_in_cache):
        metrics = {"acc_g": acc_g, "acc_c": 0.2}
        return {
            "policy": policy,
            "cache_size": cache_size,
            "decay": 1.0,
            "key_in_cache": key_in_cache,
            "metrics": {"text": metrics, "letter": metrics},
            "seconds": 10.0,
        }

    results = {
        "task": "grocery",
        "episodes": 40,
        "model": "tiny",
        "scoring": "text",
        "runs": [
            run("full", None, 0.5, 1.0),
            run("streaming", 256, 0.25, 0.0),
            run("streaming", 512, 0.25, 0.0),
            run("sirllm", 256, 0.4, 0.625),
            run("sirllm", 512, 0.45, 0.875),
        ],
    }
    (tmp_path / "grocery-20261123-000000.json").write_text(json.dumps(results))
    table = report(tmp_path)
    # Results written before the cloze form existed show "-" there.
    assert "| sirllm | 512 | 1.0 | - | - | 45.0 | 20.0 | 45.0 | 20.0 | 87.5 | 10 |" in table
    assert "| full | max | 1.0 | - | - | 50.0 | 20.0 | 50.0 | 20.0 | 100.0 | 10 |" in table
    del results["runs"][0]["key_in_cache"]  # results written before the column existed
    results["runs"][1]["metrics"] |= {"cloze": {"acc_g": 0.75}, "cloze_char": {"acc_g": 0.625}}
    (tmp_path / "grocery-20261123-000000.json").write_text(json.dumps(results))
    table = report(tmp_path)
    assert "| full | max | 1.0 | - | - | 50.0 | 20.0 | 50.0 | 20.0 | - | 10 |" in table
    assert "| streaming | 256 | 1.0 | 75.0 | 62.5 | 25.0 | 20.0 | 25.0 | 20.0 | 0.0 | 10 |" in table
    memory_plot(results, tmp_path / "without-key.png")
    results["runs"][0]["key_in_cache"] = 1.0
    memory_plot(results, tmp_path / "with-key.png")
    from matplotlib.image import imread

    # 7 x 4.5 inches at 120 dpi for ACC_g alone; 12 inches wide with the panel of the grocery kept.
    assert imread(tmp_path / "without-key.png").shape[:2] == (540, 840)
    assert imread(tmp_path / "with-key.png").shape[:2] == (540, 1440)


def test_dailydialog_report_shows_the_cloze_form_where_recorded(tmp_path):
    def run(policy, accuracies):
        return {
            "policy": policy,
            "cache_size": 512,
            "decay": 0.7,
            "metrics": {scoring: {"accuracy": value} for scoring, value in accuracies.items()},
            "seconds": 10.0,
        }

    results = {
        "task": "dailydialog",
        "episodes": 2,
        "model": "tiny",
        "scoring": "text",
        "runs": [
            run("sirllm", {"text": 0.25, "letter": 0.5, "cloze": 0.75, "cloze_char": 0.5}),
            run("streaming", {"text": 0.25, "letter": 0.5}),  # written before the cloze form
        ],
    }
    (tmp_path / "dailydialog-20261206-000000.json").write_text(json.dumps(results))
    table = report(tmp_path)
    assert "| sirllm | 512 | 0.7 | 75.0 | 25.0 | 50.0 | 10 |" in table
    assert "| streaming | 512 | 0.7 | - | 25.0 | 50.0 | 10 |" in table


def _uninstall(monkeypatch, modules: set[str]) -> None:
    """Make ``importlib.util.find_spec`` say ``modules`` are not installed (they may be imported already)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else find_spec(name, *a))


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["grocery", "--data", "DATA"], "matplotlib"),
        (["rps", "--data", "DATA"], "matplotlib"),
        (["recall"], "matplotlib"),
        (["agent-loop"], "psutil"),
        (["agent-loop", "--peers", "sirllm,stateless"], "langchain_huggingface"),
        (["agent-loop", "--peers", "sirllm"], "langchain_sirllm"),
    ],
)
def test_a_missing_optional_dependency_stops_the_command_before_any_work(argv, missing, tmp_path, monkeypatch, capsys):
    from sirllm_agents.engine import Engine

    _uninstall(monkeypatch, {missing})

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Engine, "__init__", no_model)
    out = tmp_path / "results"
    argv = ["bench", *[str(tmp_path) if a == "DATA" else a for a in argv], "--out", str(out)]
    with pytest.raises(SystemExit) as stopped:
        cli(argv)
    assert stopped.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert missing in line and 'pip install "sirllm-agents-apps[bench]"' in line
    assert not out.exists()  # nothing was started


def test_the_report_needs_no_optional_dependency(tmp_path, monkeypatch):
    _uninstall(monkeypatch, {"matplotlib", "psutil", "langchain_core", "langchain_huggingface", "langchain_sirllm"})
    cli(["bench", "report", "--results", str(tmp_path)])


def test_an_unknown_agent_loop_peer_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="unknown peers"):
        cli(["bench", "agent-loop", "--peers", "sirllm,vllm", "--out", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_backends_bench_measures_each_variant_against_float32(tmp_path):
    results = backends.run(n_prompts=2, tokens=4, threads=1)
    variants = results["variants"]
    assert variants["torch float32"]["decode_tokens_per_s"] > 0
    for label in ("torch bfloat16", "torch int8 dynamic"):
        agree = variants[label]["agreement_with_float32"]
        assert 0 <= agree["identical_replies"] <= agree["mean_shared_prefix"] <= 1
    if "llamacpp Q4_1" in variants:
        assert results["llamacpp_session_overhead"]["ratio"] > 0
    else:
        assert results["llamacpp"].startswith("skipped")
    (tmp_path / "backends-20261123-000000.json").write_text(json.dumps(results))
    assert "| torch bfloat16 |" in report(tmp_path)


def test_structured_bench_completeness_and_wilson_interval():
    from sirllm_agents_apps.bench.structured import SCHEMAS, parsed_complete, prompts, wilson

    assert parsed_complete('{"setup": "a", "punchline": "b"}', SCHEMAS["joke"])
    assert not parsed_complete('{"setup": "a"}', SCHEMAS["joke"])  # a required key missing
    assert not parsed_complete('{"setup": "a", "punch', SCHEMAS["joke"])  # cut off
    event = '{"title": "t", "attendees": [{"name": "Bo"}]}'
    assert not parsed_complete(event, SCHEMAS["event"])  # missing one level down
    low, high = wilson(50, 50)
    assert high == 1.0 and abs(low - 0.9287) < 1e-4
    low, high = wilson(25, 50)
    assert abs(low - 0.3664) < 1e-4 and abs(high - 0.6336) < 1e-4
    assert len(set(prompts("joke", 50))) == 50 and not set(prompts("joke", 10, tuning=True)) & set(prompts("joke", 50))


def test_long_run_records_every_step_and_summarizes_each_tenth(tiny_engine, tmp_path):
    from sirllm_agents_apps.bench.long_run import run, table
    from sirllm_agents_apps.bench.plots import long_run_plot

    results = run(tiny_engine, steps=40, cache_size=96, reply_every=10, reply_tokens=3, threads=1)
    records, summary = results["records"], results["summary"]
    assert [r["step"] for r in records] == list(range(40))
    assert [r["generated"] for r in records] == [step % 10 == 0 for step in range(40)]
    assert all(r["cpu_seconds"] >= 0 and r["seconds"] >= r["model_seconds"] >= 0 for r in records)
    assert records[-1]["messages"] == 1 + 2 * 40  # the system message, then an observation and a reply per step
    assert [d["steps"] for d in summary["deciles"]] == [[4 * i, 4 * i + 3] for i in range(10)]
    assert summary["max_cache_len"] <= 96 and summary["restarts"] == 0
    assert summary["last_over_second_cpu"] > 0
    assert "CPU time" in table(results)
    long_run_plot(results, tmp_path / "long-run.png")
    assert (tmp_path / "long-run.png").stat().st_size > 0


LOCOMO = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "locomo"
needs_locomo = pytest.mark.skipif(not any(LOCOMO.glob("*.json")), reason=f"the LoCoMo data folder is absent ({LOCOMO})")


def _locomo_raw(qa: list[dict]) -> dict:
    """A two-session LoCoMo-shaped conversation: Ann's turns D1:1, D1:3, D2:1; Bo's D1:2, D2:2."""

    def turn(speaker, dia_id, text, **extra):
        return {"speaker": speaker, "dia_id": dia_id, "text": text, **extra}

    return {
        "speaker_a": "Ann",
        "speaker_b": "Bo",
        "session_1_date_time": "1:00 pm on 3 May, 2023",
        "session_1": [
            turn("Ann", "D1:1", "Hi Bo!"),
            turn("Bo", "D1:2", "Hi Ann, I adopted a cat.", blip_caption="a photo of a grey cat"),
            turn("Ann", "D1:3", "I moved to Lisbon yesterday."),
        ],
        "session_2_date_time": "9:00 am on 1 June, 2023",
        "session_2": [turn("Ann", "D2:1", "I started painting."), turn("Bo", "D2:2", "Nice!")],
        "session_3_date_time": "a session the annotators dated but never wrote",
        "qa": qa,
    }


def _qa(question, answer, category, evidence=("D1:3",)):
    entry = {"question": question, "evidence": list(evidence), "category": category}
    return entry | ({"adversarial_answer": answer} if category == locomo_data.ADVERSARIAL else {"answer": answer})


def test_locomo_conversation_becomes_dated_messages_and_evidence_indexes():
    qa = [
        _qa("Where did Ann move?", "Lisbon", 4),
        _qa("What did Bo adopt?", "a cat", 4, ["D:1:2"]),  # the annotations' own spelling quirks
        _qa("What does Ann do and where?", "paints in Lisbon", 1, ["D1:3; D2:01"]),
        _qa("What did Ann sculpt?", "a vase", 4, ["D9:9", "D"]),  # no such turn: never asked
        _qa("Which city did Bo move to?", "Lisbon", 5),
    ]
    conversation = locomo_data.parse("99", _locomo_raw(qa))
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "user", "assistant"]
    assert conversation.messages[0]["content"] == "[1:00 pm on 3 May, 2023]\nAnn: Hi Bo!"
    assert (
        conversation.messages[1]["content"] == "Bo: Hi Ann, I adopted a cat. [shares an image: a photo of a grey cat]"
    )
    assert conversation.messages[3]["content"].startswith("[9:00 am on 1 June, 2023]\nAnn: ")
    assert conversation.session_ends == (3, 5) and conversation.sessions == (0, 0, 0, 1, 1)
    assert [q.evidence for q in conversation.questions] == [(2,), (1,), (2, 3), (2,)]
    assert [q.session for q in conversation.questions] == [0, 0, 1, 0]
    assert conversation.unanswerable == 1
    adversarial = conversation.questions[-1]
    assert (adversarial.answer, adversarial.adversarial_answer) == (locomo_data.NOT_MENTIONED, "Lisbon")
    # The oracle sees the evidence turns only, each dated, with its role.
    assert conversation.oracle_messages(conversation.questions[2]) == [
        {"role": "user", "content": "[1:00 pm on 3 May, 2023]\nAnn: I moved to Lisbon yesterday."},
        {"role": "user", "content": "[9:00 am on 1 June, 2023]\nAnn: I started painting."},
    ]
    cut = locomo_data.first_sessions(conversation, 1)
    assert len(cut.messages) == 3 and [q.index for q in cut.questions] == [0, 1, 4]


def test_locomo_token_f1_follows_locomo_normalization():
    f1 = locomo_data.token_f1
    assert f1("The cat, sat.", "a cat sat") == 1.0  # case, punctuation and articles do not count
    assert f1("cat on mat", "the cat sat on the mat") == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert f1("cat cat", "cat") == pytest.approx(2 / 3)  # a repeated word matches once
    assert f1("dog", "cat") == 0.0 and f1("", "cat") == 0.0
    assert locomo_data.says_not_mentioned("That is NOT mentioned anywhere.")
    assert not locomo_data.says_not_mentioned("In Lisbon.")


def test_locomo_candidates_come_from_other_questions_of_the_category_shaped_like_the_gold():
    dates = ["7 May 2023", "June 2023", "The week before 9 June 2023", "2022", "last Sunday in May"]
    qa = [_qa(f"When did event {i} happen?", d, 2) for i, d in enumerate(dates)]
    qa += [_qa("When did Ann paint?", "while on holiday", 2), _qa("When did Bo sing?", "June 2023.", 2)]
    qa += [_qa("Where did Ann move?", "Lisbon", 4)]
    qa += [_qa(f"What did Bo do {i}?", f"answer {i}", 5) for i in range(5)]
    conversation = locomo_data.parse("99", _locomo_raw(qa))
    question = conversation.questions[0]
    options, gold = locomo_data.candidates(conversation, question)
    assert options[gold] == "7 May 2023" and len(options) == 5
    # Four other dates: the free-text answer of the category comes last, "June 2023." only once (normalized), and
    # the single-hop answer never.
    assert sorted(options) == sorted(dates[:4] + ["last Sunday in May"])
    assert locomo_data.candidates(conversation, question) == (options, gold)  # the same on every run
    orders = {tuple(locomo_data.candidates(conversation, question, seed)[0]) for seed in range(8)}
    assert len(orders) > 1  # the seed draws the order (and which same-shaped answers, when there are more)
    # Too few other answers in its category: fewer candidates, and the question is not chosen.
    single = conversation.questions[7]
    assert locomo_data.candidates(conversation, single) == (["Lisbon"], 0)
    adversarial = conversation.questions[8]
    options, gold = locomo_data.candidates(conversation, adversarial)
    assert options[gold] == locomo_data.NOT_MENTIONED
    assert "answer 0" in options and set(options) - {locomo_data.NOT_MENTIONED} < {f"answer {i}" for i in range(5)}

    chosen = locomo_data.choose_questions(conversation, 4)
    assert [q.category for q in chosen].count(2) == 2 and [q.category for q in chosen].count(5) == 2
    assert chosen == locomo_data.choose_questions(conversation, 4)
    assert [q.index for q in chosen] == sorted(q.index for q in chosen)
    assert single not in locomo_data.choose_questions(conversation, None)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    from sirllm_agents_apps.bench.bootstrap import mean_interval

    values = [1, 0, 0, 1, 1, 0, 1, 1, 1, 0]
    cell = mean_interval(values, seed=3)
    assert cell == mean_interval(values, seed=3)
    assert cell["low"] < cell["mean"] == 0.6 < cell["high"] and cell["n"] == 10
    assert mean_interval([0.5] * 4) == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 4}


def _in_cell(record: dict, cell: str) -> bool:
    """Whether a LoCoMo record counts in a summary cell: all, its category, or the answerable (non-adversarial)."""
    answerable = cell == "answerable" and record["category"] != "adversarial"
    return cell in ("all", record["category"]) or answerable


@needs_locomo
def test_locomo_bench_writes_every_cell_and_its_measures_hold(tiny_engine, tmp_path, monkeypatch):
    import sirllm_agents.engine

    monkeypatch.setattr(sirllm_agents.engine, "Engine", lambda *args, **kwargs: tiny_engine)
    out = tmp_path / "results"
    # The first 3 sessions of conversation 26 (58 messages, ~2,600 tokens): 160 tokens evict most of them, 4096
    # hold them all.
    argv = ["bench", "locomo", "--data", str(LOCOMO), "--conversations", "26", "--sessions", "3"]
    argv += ["--questions", "6", "--cache-size", "160,4096", "--policies", "streaming,truncate,sirllm,default"]
    cli([*argv, "--later-sessions", "0", "--threads", "1", "--out", str(out)])
    [result] = out.glob("locomo-*.json")
    assert result.with_suffix(".png").stat().st_size > 1000
    results = json.loads(result.read_text())
    categories = {q["category"] for q in results["questions"]}
    assert len(results["questions"]) == 6 and categories == {"single-hop", "temporal", "adversarial"}
    cells = {"all", "answerable", *categories}
    assert set(results["oracle"]["summary"]) == cells
    assert all(r["evidence_kept"] == 1.0 for r in results["oracle"]["records"])  # the oracle holds only evidence
    settings = {(run["policy"], run["cache_size"]) for run in results["runs"]}
    assert settings == {(p, s) for p in ("streaming", "truncate", "sirllm", "default") for s in (160, 4096)}
    for run in results["runs"]:
        assert set(run["summary"]) == {"end", "evidence"}
        for mode, summary in run["summary"].items():
            assert set(summary) == cells
            for category, cell in summary.items():
                rows = [r for r in run["records"] if r["mode"] == mode and _in_cell(r, category)]
                assert cell["questions"] == len(rows) == cell["cloze"]["n"]
                assert cell["cloze"]["mean"] == pytest.approx(sum(r["cloze"] for r in rows) / len(rows))
                assert cell["cloze"]["low"] <= cell["cloze"]["mean"] <= cell["cloze"]["high"]
        assert all(0.0 <= r["evidence_kept"] <= 1.0 for r in run["records"])
        if run["cache_size"] == 4096:  # nothing evicted: every evidence token is still there
            assert all(r["evidence_kept"] == 1.0 for r in run["records"]) and run["evicted_tokens"] == 0
    by_setting = {(run["policy"], run["cache_size"]): run for run in results["runs"]}
    streaming = by_setting["streaming", 160]["records"]
    assert min(r["evidence_kept"] for r in streaming) < 1.0 and by_setting["streaming", 160]["evicted_tokens"] > 0
    # Mode evidence asks right after the session of the last evidence turn (no later sessions), before the end.
    ends = {r["point"] for r in streaming if r["mode"] == "evidence"}
    assert ends <= {18, 35, 58} and any(point < 58 for point in ends)
    # Policies differ only by what they evict: with room for everything they hold the same tokens and score alike.
    full_sized = [by_setting[p, 4096]["records"] for p in ("streaming", "sirllm", "default")]
    for rows in zip(*full_sized):
        assert len({r["picked"] for r in rows}) == 1
        assert max(r["answer_logprob"] for r in rows) - min(r["answer_logprob"] for r in rows) < 1e-4
    assert by_setting["default", 160]["session_policy"] == "supersede" and by_setting["default", 160]["recent_size"]
    table = report(out)
    assert "### LoCoMo: conversations 26" in table and "| oracle (evidence turns only) |" in table
    assert "| streaming | 160 | end |" in table


def test_evidence_use_groups_answerable_questions_by_the_evidence_kept_beside_the_oracle():
    from sirllm_agents_apps.bench import locomo

    def record(question, category, kept, cloze):
        return {"conversation": "26", "question": question, "category": category, "evidence_kept": kept, "cloze": cloze}

    oracle = [{"conversation": "26", "question": q, "cloze": q % 2 == 0} for q in range(5)]
    runs = [
        {
            "records": [
                record(0, "single-hop", 0.0, False),
                record(1, "temporal", 0.05, True),
                record(2, "adversarial", 1.0, True),
            ]
        },
        {
            "records": [
                record(0, "single-hop", 1.0, True),
                record(3, "multi-hop", 0.5, False),
                record(4, "temporal", 0.9, False),
            ]
        },
    ]
    found = locomo.evidence_use({"oracle": {"records": oracle}, "runs": runs})
    # The adversarial question is left out; question 0 counts once per setting it was asked in.
    assert [(row["evidence_kept"], row["cloze"]["n"]) for row in found] == [
        ("under 10%", 2),
        ("10-90%", 1),
        ("90% or more", 2),
    ]
    assert [row["cloze"]["mean"] for row in found] == [0.5, 0.0, 0.5]
    assert [row["oracle_cloze"]["mean"] for row in found] == [0.5, 0.0, 1.0]


@needs_locomo
def test_locomo_parts_run_apart_merge_into_the_whole_run(tiny_engine, tmp_path, monkeypatch):
    from sirllm_agents_apps.bench import locomo

    import sirllm_agents.engine

    monkeypatch.setattr(sirllm_agents.engine, "Engine", lambda *args, **kwargs: tiny_engine)

    def run(name: str, conversations: str, policies: str) -> dict:
        argv = ["bench", "locomo", "--data", str(LOCOMO), "--conversations", conversations, "--sessions", "2"]
        argv += ["--questions", "4", "--cache-size", "160", "--policies", policies, "--mode", "end"]
        cli([*argv, "--threads", "1", "--out", str(tmp_path / name)])
        [result] = (tmp_path / name).glob("locomo-*.json")
        return json.loads(result.read_text())

    whole = run("whole", "26,30", "streaming,sirllm,default")
    parts = {
        "a": run("a", "26", "streaming,default"),
        "b": run("b", "30", "streaming,default"),
        "c": run("c", "26,30", "sirllm"),
    }
    merged = locomo.merge(list(parts.values()), list(parts))
    assert merged["conversations"] == ["26", "30"] and merged["merged_from"] == ["a", "b", "c"]
    assert merged["oracle"] == whole["oracle"]
    assert sorted(merged["questions"], key=str) == sorted(whole["questions"], key=str)
    runs = {run["policy"]: run for run in merged["runs"]}
    for expected in whole["runs"]:
        got = runs[expected["policy"]]
        key = itemgetter("conversation", "question")
        assert sorted(got["records"], key=key) == sorted(expected["records"], key=key)
        assert got["summary"] == expected["summary"]
        assert got["prefilled_tokens"] == expected["prefilled_tokens"]
    assert merged["targets"] == whole["targets"] and merged["paired_with_default"] == whole["paired_with_default"]
    assert {(p["policy"], p["category"]) for p in merged["paired_with_default"]} == {
        (policy, group) for policy in ("streaming", "sirllm") for group in ("all", "answerable", "single-hop")
    }
    with pytest.raises(ValueError, match=r"did not run on conversations \['30'\]"):
        locomo.merge([parts["a"], parts["c"]], ["a", "c"])
    with pytest.raises(ValueError, match=r"runs streaming .* again on conversations"):
        locomo.merge([parts["a"], parts["a"]], ["a", "a again"])
    with pytest.raises(ValueError, match="differs from a in seed"):
        locomo.merge([parts["a"], parts["b"] | {"seed": 1}], ["a", "b"])
    out = tmp_path / "merged"
    cli(["bench", "merge", *(str(next((tmp_path / n).glob("*.json"))) for n in parts), "--out", str(out)])
    [written] = out.glob("locomo-*.json")
    assert json.loads(written.read_text())["runs"] == merged["runs"] and written.with_suffix(".png").exists()
    assert "The default's cloze minus each setting's" in report(out)


def test_locomo_greedy_replies_are_scored_by_token_f1_and_truncate_leaves_them_room(tiny_engine):
    from sirllm_agents_apps.bench import locomo

    qa = [_qa(f"Where did Ann go on trip {i}?", city, 4) for i, city in enumerate(["Lisbon", "Oslo", "Rome", "Bern"])]
    qa += [_qa("Where did Ann go first?", "Paris", 4, ["D1:1"])]
    qa += [
        _qa(f"What did Bo paint {i}?", f"a {colour} boat", 5)
        for i, colour in enumerate(["red", "blue", "green", "tan"])
    ]
    raw = _locomo_raw(qa)
    raw["session_2"] += [{"speaker": "Ann", "dia_id": f"D2:{i}", "text": "Nothing new. " * 12} for i in range(3, 9)]
    conversation = locomo_data.parse("99", raw)
    asked = locomo.prepare(conversation, locomo_data.choose_questions(conversation, None))
    oracle = locomo.run_oracle(tiny_engine, conversation, asked, generate=True)
    assert len(oracle) == 9
    for record, a in zip(oracle, asked):
        if a.question.category == locomo_data.ADVERSARIAL:
            assert record["f1"] == float(locomo_data.says_not_mentioned(record["reply"]))
        else:
            assert record["f1"] == locomo_data.token_f1(record["reply"], a.question.answer)
    # A cache of 200 tokens holds the question, a 32-token reply and the newest messages only.
    setting = locomo.Setting("truncate", 200)
    records, sessions = locomo.run_truncated(tiny_engine, conversation, asked, setting, ["end"], 0, generate=True)
    assert all(len(s.cache) <= 200 for s in sessions) and all(r["reply"] is not None for r in records)
    assert 0 < records[0]["messages_kept"] < len(conversation.messages)
    first = next(r for r in records if r["question"] == 4)  # its evidence, the first turn, was trimmed
    assert first["evidence_kept"] == 0.0


def test_the_report_reads_every_result_the_repository_keeps():
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    assert report(results).count("(from `") == len(list(results.glob("*.json")))
