"""``bench report``: the JSON results of a folder as the markdown tables of the README."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

# The paper's Table (Yao et al., ACL 2024) for reference: Grocery ACC_g with 6B-34B chat models, cache 4+1020.
PAPER_GROCERY = "paper (Yi-6B/34B-Chat, Vicuna-7B, cache 4+1020): ACC_g 96-99% SirLLM vs 24-29% StreamingLLM"
CLOZE_NOTE = (
    "Cloze: each turn also asked without its lettered options, on a fork, each option's text scored as the reply "
    "(best per token); results written before 2026-12-06 have none ('-'). The other columns: the paper's form."
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _policy(run: dict) -> str:
    """A memory run's policy, with its recent window when it has one (runs before 2026-11-24 have none)."""
    return run["policy"] + (f" + recent {run['recent']:g}" if run.get("recent") else "")


def _memory_table(results: dict) -> list[str]:
    task, scoring = results["task"], results["scoring"]
    other = "letter" if scoring == "text" else "text"
    head = f"### {task}: {results['episodes']} episodes, {results['model']}, `{scoring}` scoring (primary)"
    lines = [head, ""]
    if task == "grocery":
        lines += [
            f"| policy | cache | decay | ACC_g cloze | ACC_g cloze (per char) | ACC_g ({scoring}) | "
            f"ACC_c ({scoring}) | ACC_g ({other}) | ACC_c ({other}) | grocery in cache | seconds |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for run in results["runs"]:
            m, o = run["metrics"][scoring], run["metrics"][other]
            # Neither the cloze form nor the grocery in cache was recorded before 2026-11-23.
            cloze = [_pct(run["metrics"][s]["acc_g"]) if s in run["metrics"] else "-" for s in ("cloze", "cloze_char")]
            key = _pct(run["key_in_cache"]) if "key_in_cache" in run else "-"
            lines.append(
                f"| {_policy(run)} | {run['cache_size'] or 'max'} | {run['decay']} | {cloze[0]} | "
                f"{cloze[1]} | {_pct(m['acc_g'])} | {_pct(m['acc_c'])} | {_pct(o['acc_g'])} | "
                f"{_pct(o['acc_c'])} | {key} | {run['seconds']:.0f} |"
            )
        lines += [
            "",
            "ACC_g cloze: the recall question asked without its options, each option's text scored as the "
            "reply (best per token). The other ACC_g columns: the paper's form, the options listed in the "
            "question. Grocery in cache: the share of the grocery's tokens from the first turn that the cache "
            "holds when the recall question is scored.",
            f"For reference, {PAPER_GROCERY}.",
        ]
    elif task == "dailydialog":
        lines += [
            f"| policy | cache | decay | accuracy, cloze | accuracy ({scoring}) | accuracy ({other}) | seconds |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for run in results["runs"]:
            accuracy = {s: _pct(m["accuracy"]) for s, m in run["metrics"].items()}
            lines.append(
                f"| {_policy(run)} | {run['cache_size'] or 'max'} | {run['decay']} | {accuracy.get('cloze', '-')} | "
                f"{accuracy[scoring]} | {accuracy[other]} | {run['seconds']:.0f} |"
            )
        lines += ["", CLOZE_NOTE]
    else:
        lines += [
            "| policy | cache | decay | scoring | player | win | tie | lose |",
            "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
        ]
        for run in results["runs"]:
            for form in ("cloze", scoring):
                for player, m in run["metrics"].get(form, {}).items():
                    lines.append(
                        f"| {_policy(run)} | {run['cache_size'] or 'max'} | {run['decay']} | {form} | {player} | "
                        f"{_pct(m['win'])} | {_pct(m['tie'])} | {_pct(m['lose'])} |"
                    )
        lines += ["", CLOZE_NOTE]
    return lines


def _agent_table(results: dict) -> list[str]:
    lines = [
        f"### agent loop: {results['steps']} steps, {results['threads']} threads, SirLLM cache {results['cache_size']}",
        "",
        "| peer | backend | steps done | total s | last 10 / steps 10-20 | peak RSS MiB | RSS growth MiB | "
        "past the context window | stopped early |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    summary = results["summary"]
    for name, peer in results["peers"].items():
        if "skipped" in peer:
            lines.append(f"| {name} | {peer['skipped']} | | | | | | | |")
            continue
        s = summary[name]
        flat = f"{s['flatness']:.2f}" if "flatness" in s else "-"
        lines.append(
            f"| {name} | {peer['backend']} | {s['steps_done']} | {s['total_seconds']:.1f} | {flat} | "
            f"{s['peak_rss_mib']:.0f} | {s['rss_growth_mib']:.0f} | {peer['overflow']} | "
            f"{peer['stopped'] or '-'} |"
        )
    for other in ("sirllm-llamacpp", "stateless", "llamacpp"):
        ratio = summary.get(f"{other}_over_sirllm")
        if ratio:
            lines.append(f"\n{other} time / sirllm time over the first {ratio['steps']} steps: {ratio['ratio']:.2f}")
    deciles = {name: s["decile_medians"] for name, s in summary.items() if "decile_medians" in s}
    if deciles:
        lines += ["", "Median step latency (s) per tenth of the loop:", ""]
        lines.append("| peer | " + " | ".join(f"{10 * i}-{10 * i + 10}%" for i in range(10)) + " |")
        lines.append("| --- |" + " ---: |" * 10)
        for name, medians in deciles.items():
            cells = " | ".join("-" if m is None else f"{m:.2f}" for m in medians)
            lines.append(f"| {name} | {cells} |")
    return lines


def _recall_table(results: dict) -> list[str]:
    if results.get("suite", "generated") != "generated":
        return _varied_table(results)
    updated = " (one updated)" if results.get("updates", True) else ""
    kinds = f", kinds {', '.join(results['kinds'])}" if "kinds" in results else ""
    lines = [
        f"### recall suite: {results['conversations']} conversations per length, {results['facts']} facts "
        f"each{updated}{kinds}, {results['model']}",
        "",
        "| length | policy | budget | decay | recent | cloze | cloze (per char) | generated | well-formed | "
        "value kept | updated: cloze | updated: generated | updated: old value said | seconds |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in results["runs"]:
        summary = run["summary"]
        if "all" not in summary:
            lines.append(
                f"| {run['length']} | {run['policy']} | {run['budget']} | | | overflowed: the conversation "
                "passes the model's length | | | | | | | | |"
            )
            continue
        a, u = summary["all"], summary.get("updated", {})
        kept = _pct(a.get("kept"))
        updated = [_pct(u.get(f)) for f in ("cloze", "generated", "generated_previous")]
        lines.append(
            f"| {run['length']} | {run['policy']} | {run['budget']} | {run['decay']} | {run['recent']} | "
            f"{_pct(a['cloze'])} | {_pct(a['cloze_char'])} | {_pct(a.get('generated'))} | "
            f"{_pct(a.get('well_formed'))} | {kept} | {' | '.join(updated)} | {run['seconds']:.0f} |"
        )
    lines += [
        "",
        "Budget: the cache size as a share of the conversation's tokens. Recent: the share of the cache kept "
        "for the newest tokens. Value kept: the share of the fact's value tokens still cached at the question.",
    ]
    return lines


def _varied_table(results: dict) -> list[str]:
    """The varied suite (``recall_varied``): per setting, cloze and generated recall with 95% bootstrap intervals,
    over all questions and per question category, and how often an updated fact's old value won."""
    from .recall_varied import CATEGORIES

    counts = ", ".join(f"{c} {n}" for c, n in results["categories"].items())
    lines = [
        f"### recall suite, varied generator: {results['conversations']} conversations per length, questions per "
        f"conversation: {counts}; {results['model']} on {results['backend']}",
        "",
        "| length | policy | budget | recent | metric | all | " + " | ".join(CATEGORIES) + " |",
        "| ---: | --- | ---: | ---: | --- | " + " | ".join("---:" for _ in range(len(CATEGORIES) + 1)) + " |",
    ]
    for run in results["runs"]:
        summary = run["summary"]
        if "all" not in summary:
            continue  # full overflowed
        categories = summary.get("categories", {})
        for metric in ("cloze", "generated", "picked_previous", "well_formed", "kept"):
            cells = [_varied_cell(summary["all"], metric)]
            cells += [_varied_cell(categories[c], metric) if c in categories else "" for c in CATEGORIES]
            if not any(cell not in ("", "-") for cell in cells):
                continue
            lines.append(
                f"| {run['length']} | {run['policy']} | {run['budget']} | {run['recent']:g} | {metric} | "
                + " | ".join(cells)
                + " |"
            )
    lines += [
        "",
        "Cells: percent of questions, with the 95% percentile-bootstrap interval over questions. picked_previous: "
        "an updated fact's replaced value ranked first in the cloze. kept: the share of the answer's tokens cached.",
    ]
    return lines


def _varied_cell(shares: dict, metric: str) -> str:
    if metric in shares.get("intervals", {}):
        return _interval(shares["intervals"][metric])
    return _pct(shares.get(metric)) if metric in shares else "-"


def _backends_table(results: dict) -> list[str]:
    lines = [
        f"### Backends: {results['prompts']} prompts, {results['tokens']} greedy tokens, {results['threads']} threads",
        "",
        "| variant | prefill tok/s | decode tok/s | replies equal to float32's | shared prefix |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, v in results["variants"].items():
        agree = v.get("agreement_with_float32")
        if agree:
            same = f"{agree['identical_replies']:.0%} | {agree['mean_shared_prefix']:.0%}"
        else:
            same = "(reference) | " if label == "torch float32" else "- | -"
        lines.append(f"| {label} | {v['prefill_tokens_per_s']:.0f} | {v['decode_tokens_per_s']:.1f} | {same} |")
    overhead = results.get("llamacpp_session_overhead")
    if overhead:
        lines.append(
            f"\nllama.cpp session decode: {overhead['session_s_per_token'] * 1000:.1f} ms/token against a bare "
            f"llama.cpp loop's {overhead['bare_s_per_token'] * 1000:.1f} ms (x{overhead['ratio']:.2f})"
        )
    elif "llamacpp" in results:
        lines.append(f"\nllama.cpp: {results['llamacpp']}")
    return lines


def _serve_table(results: dict) -> list[str]:
    from .serve_load import table

    head = (
        f"### serve: {results['conversations']} conversations x {results['turns']} turns, {results['model']}, "
        f"replies of at most {results['max_tokens']} tokens"
    )
    return [head, "", table(results).rstrip("\n")]


def _interval(cell: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """``mean [low, high]`` of a bootstrap cell, as percentages by default; ``-`` when absent."""
    if not cell:
        return "-"
    return f"{scale * cell['mean']:.{digits}f} [{scale * cell['low']:.{digits}f}, {scale * cell['high']:.{digits}f}]"


def _locomo_table(results: dict) -> list[str]:
    from .locomo import evidence_use
    from .plots import LOCOMO_GROUPS, locomo_label

    oracle = results["oracle"]["summary"]
    groups = [g for g in LOCOMO_GROUPS if g in oracle]
    counts = ", ".join(f"{g} {oracle[g]['questions']}" for g in groups)
    lines = [
        f"### LoCoMo: conversations {', '.join(results['conversations'])}, {results['model']} on "
        f"{results['backend']}; questions: {counts}",
        "",
        "Cloze accuracy per category, % [bootstrap 95% interval]; evidence kept and the answer's log-likelihood gap "
        "to the oracle (nats per token), over all questions.",
        "",
        "| setting | cache | mode | " + " | ".join(groups) + " | evidence kept | gap to oracle | seconds |",
        "| --- | ---: | --- |" + " ---: |" * (len(groups) + 3),
    ]
    cells = " | ".join(_interval(oracle[g].get("cloze")) for g in groups)
    lines.append(f"| oracle (evidence turns only) | | | {cells} | {_interval(oracle['all']['evidence_kept'])} | | |")
    for run in results["runs"]:
        for mode in results["modes"]:
            summary = run["summary"][mode]
            cells = " | ".join(_interval(summary.get(g, {}).get("cloze")) for g in groups)
            lines.append(
                f"| {locomo_label(run)} | {run['cache_size']} | {mode} | {cells} | "
                f"{_interval(summary['all'].get('evidence_kept'))} | "
                f"{_interval(summary['all'].get('oracle_gap'), 1.0, 2)} | {run['seconds']:.0f} |"
            )
    if results.get("generate"):
        lines += ["", "Greedy reply, LoCoMo token F1 (%), over all questions:", ""]
        lines.append(f"- oracle: {_interval(oracle['all'].get('f1'))}")
        for run in results["runs"]:
            for mode in results["modes"]:
                lines.append(f"- {locomo_label(run)}, {mode}: {_interval(run['summary'][mode]['all'].get('f1'))}")
    if results.get("targets"):
        lines += [
            "",
            "Targets (cache 1024, mode end), paired per question: difference [95% interval]; met by the estimate, "
            "clear when the whole interval meets it.",
            "",
            "| target | questions | difference | met | clear |",
            "| --- | --- | ---: | --- | --- |",
        ]
        for t in results["targets"]:
            d = t["difference"]
            lines.append(
                f"| {t['target']} | {t['category']} ({d['n']}) | {_interval(d, 1.0, 3)} | "
                f"{'yes' if t['met'] else 'no'} | {'yes' if t['clear'] else 'no'} |"
            )
    if results.get("paired_with_default"):
        lines += [
            "",
            "The default's cloze minus each setting's, paired per question (points, [95% interval]):",
            "",
            "| setting | cache | mode | all | answerable | single-hop |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        rows: dict[tuple, dict] = {}
        for p in results["paired_with_default"]:
            key = (locomo_label(p), p["cache_size"], p["mode"])
            rows.setdefault(key, {})[p["category"]] = p["difference"]
        for (label, size, mode), cells in rows.items():
            row = " | ".join(_interval(cells.get(g)) for g in ("all", "answerable", "single-hop"))
            lines.append(f"| {label} | {size} | {mode} | {row} |")
    lines += [
        "",
        "Answerable questions by the share of their evidence the cache held, every setting and mode pooled (a "
        "question counts once per setting and mode), against the oracle's cloze on the same questions:",
        "",
        "| evidence kept | asked | cloze | oracle's cloze, same questions |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in evidence_use(results):
        lines.append(
            f"| {row['evidence_kept']} | {row['cloze']['n']} | {_interval(row['cloze'])} | "
            f"{_interval(row['oracle_cloze'])} |"
        )
    return lines


def _table_of(module: str, function: str) -> Callable[[dict], list[str]]:
    """The table a task's own module prints after its run, imported only when a result of that task is read."""

    def table(results: dict) -> list[str]:
        render = getattr(importlib.import_module(f".{module}", __package__), function)
        return [f"### {results['task']}", "", render(results).rstrip("\n")]

    return table


def report(folder: str | Path) -> str:
    """Markdown for every ``*.json`` result in ``folder``, by task, oldest first."""
    sections = []
    for path in sorted(Path(folder).glob("*.json")):  # names are TASK-TIMESTAMP
        results = json.loads(path.read_text())
        tables = {
            "agent-loop": _agent_table,
            "recall": _recall_table,
            "backends": _backends_table,
            "serve": _serve_table,
            "locomo": _locomo_table,
            "long-run": _table_of("long_run", "table"),
            "serve-agent": _table_of("serve_load", "agent_table"),
            "structured": _table_of("structured", "table"),
        }
        table = tables.get(results["task"], _memory_table)(results)
        sections.append("\n".join(table + ["", f"(from `{path.name}`)"]))
    return "\n\n".join(sections) + "\n"
