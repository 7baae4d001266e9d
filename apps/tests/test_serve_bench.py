"""``sirllm-agents bench serve --workload agent``: the agent workload's generator, its figures, its targets, and tiny
runs end to end against sirllm-agents servers on the tiny random-weight model (llama-server itself is not run here:
it is built by hand with ``benchmarks/build_llama_server.sh``)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra")
pytest.importorskip("uvicorn", reason="the server needs the serve extra")
pytest.importorskip("httpx", reason="the benchmark's client")

from sirllm_agents_apps.bench import cli, serve_load
from sirllm_fixtures import tiny_llama

from sirllm_agents import Engine, SessionConfig

CACHE = 256  # below a 3-turn conversation's ~500 tokens, so the runs evict


@pytest.fixture(scope="module")
def make_engine(tokenizer):
    weights = tiny_llama(tokenizer)
    return lambda conversations: Engine(
        weights, tokenizer=tokenizer, config=SessionConfig(cache_size=CACHE), max_live_sessions=16
    )


def test_the_workload_is_ten_turns_of_tool_outputs_of_about_100_tokens_the_same_every_time(tokenizer):
    conversations = [serve_load.agent_turns(c, 10) for c in range(8)]
    assert conversations == [serve_load.agent_turns(c, 10) for c in range(8)]
    assert serve_load.agent_turns(3, 4) == conversations[3][:4]
    lengths = []
    for turns in conversations:
        assert len(turns) == 10
        first, *later = turns
        assert [m["role"] for m in first] == ["system", "user"] and first[0]["content"] == serve_load.AGENT_SYSTEM
        assert all([m["role"] for m in added] == ["user"] for added in later)
        for added in turns:
            text = added[-1]["content"]
            assert "Tool `" in text and "` returned:\n" in text
    outputs = [serve_load.tool_output(c, t) for c in range(8) for t in range(10)]
    assert len({text for _, text in outputs}) == len(outputs)  # no two turns alike
    assert {name for name, _ in outputs} == set(serve_load.TOOLS)
    for name, text in outputs:
        if name != "read_logs":
            json.loads(text)
        lengths.append(len(tokenizer(text)["input_ids"]))
    assert min(lengths) >= 80 and max(lengths) <= 120, (min(lengths), max(lengths))
    assert 95 <= sum(lengths) / len(lengths) <= 105


def test_the_figures_of_a_run():
    def turn(conversation, turn, seconds, reused):
        return {
            "conversation": conversation,
            "turn": turn,
            "seconds": seconds,
            "prompt_tokens": 200,
            "reused_tokens": reused,
            "completion_tokens": 32,
        }

    records = [turn(0, 0, 1.0, 0), turn(0, 1, 2.0, 150), turn(1, 0, 3.0, 0), turn(1, 1, 4.0, 170)]
    figures = serve_load.agent_figures(records, wall=8.0)
    assert figures["requests"] == 4 and figures["generated_tokens"] == 128
    assert figures["generated_tokens_per_second"] == 16.0  # over the wall time, not summed per conversation
    assert figures["turn_latency_p50"] == 2.5 and figures["turn_latency_p95"] == pytest.approx(3.85)
    assert figures["prompt_tokens_per_turn"] == 200 and figures["reused_tokens_per_turn"] == 80
    assert figures["reused_tokens_per_later_turn"] == 160 and figures["reused_share"] == 0.4
    records[1]["reused_tokens"] = None  # a server that does not say
    unknown = serve_load.agent_figures(records, wall=8.0)
    assert unknown["reused_tokens_per_turn"] is None and unknown["reused_share"] is None


def test_targets_are_named_and_checked():
    targets = serve_load.parse_targets("today=http://127.0.0.1:8001/, here,llama-server")
    assert targets == [
        serve_load.Target("today", "url", "http://127.0.0.1:8001"),
        serve_load.Target("here", "here"),
        serve_load.Target("llama-server", "llama-server"),
    ]
    for bad in ("vllm", "x=ftp://host", "here,here", "", "=http://h:1"):
        with pytest.raises(ValueError):
            serve_load.parse_targets(bad)


def test_llama_server_without_its_binary_names_the_build_script(tmp_path):
    missing = tmp_path / "llama-server"
    with pytest.raises(FileNotFoundError, match=r"benchmarks/build_llama_server\.sh"):
        serve_load.run_agent_bench(
            [serve_load.Target("llama-server", "llama-server")], [1], llama_server_binary=missing
        )


def test_a_tiny_run_against_the_server_here_holds_the_bound_and_reuses_each_turn(make_engine):
    lines = []
    results = serve_load.run_agent_bench(
        [serve_load.Target("here", "here")], [1, 2], turns=3, max_tokens=8, make_engine=make_engine, report=lines.append
    )
    assert json.loads(json.dumps(results)) == results
    assert results["task"] == "serve-agent" and results["llama_server"] is None
    alone, two = results["runs"]
    assert [(r["target"], r["conversations"]) for r in results["runs"]] == [("here", 1), ("here", 2)]
    assert len(lines) == 2 and lines[1].startswith("here N=2:")
    for run in (alone, two):
        n = run["conversations"]
        assert run["requests"] == 3 * n and run["generated_tokens"] == 8 * 3 * n
        assert [(r["conversation"], r["turn"]) for r in run["per_request"]] == [
            (c, t) for c in range(n) for t in range(3)
        ]
        assert len({r["session_id"] for r in run["per_request"]}) == n
        # Each later turn prefills only its new messages: the earlier prompt and reply are reused, though the cache
        # holds fewer tokens than the conversation.
        for before, r in zip(run["per_request"], run["per_request"][1:], strict=False):
            if r["turn"] == 0:
                assert r["reused_tokens"] == 0
            else:
                assert before["prompt_tokens"] + before["completion_tokens"] <= r["reused_tokens"] < r["prompt_tokens"]
        assert run["per_request"][0]["reused_tokens"] == 0 and run["per_request"][-1]["prompt_tokens"] > CACHE
        assert run["cache_size"] == CACHE and run["bound_held"] and CACHE // 2 < run["largest_cache_len"] <= CACHE
        assert run["turn_latency_p50"] <= run["turn_latency_p95"]
    # Greedy: conversation 0 replies the same beside another conversation as alone.
    assert two["conversation_0_as_alone"] is True
    table = serve_load.agent_table(results)
    assert f"| here | 2 | 3 | {two['generated_tokens_per_second']:.1f} |" in table and f"/ {CACHE} |" in table


def test_the_command_runs_the_workload_against_a_running_server_and_writes_its_json(make_engine, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    threads = torch.get_num_threads()
    try:
        with serve_load.serving(make_engine(2)) as url:
            command = ["bench", "serve", "--workload", "agent", "--url", url, "--conversations", "2", "--turns", "2"]
            args = parser.parse_args([*command, "--max-tokens", "4", "--out", str(tmp_path)])
            cli.main(args)
    finally:
        torch.set_num_threads(threads)  # the command sets its own (2 unless --threads)
    (written,) = tmp_path.glob("serve-agent-*.json")
    results = json.loads(written.read_text())
    (run,) = results["runs"]
    assert (run["target"], run["kind"], run["url"], run["conversations"]) == ("url", "url", url, 2)
    assert run["requests"] == 4 and "largest_cache_len" not in run  # not known from outside the server
    assert results["threads"] == 2 and results["workload"]["turns"] == 2
    assert "| url | 2 | 2 |" in capsys.readouterr().out
