"""The recall suite pooled across result files.

One setting's conversations often come from several runs: conversations 0-49 in one file and 50-99 in another, or
each policy in its own process. Pooling counts every fact once per setting: records are keyed by the conversation
and the question, and where two files hold the same one (a rerun, or the other backend) the newer file's record is
kept. Files of different studies (model, facts per conversation, updates, fact kinds) never mix.
"""

from __future__ import annotations

import json
from pathlib import Path

from .recall import summarize
from .recall_data import SUBJECTS
from .report import _pct

SETTING = ("length", "policy", "budget", "decay", "recent")


def pool(folder: str | Path) -> list[dict]:
    """Every recall setting found in ``folder``'s ``recall-*.json`` files, its records pooled: one dict per model and
    study with ``runs`` shaped as a single run's (setting fields, ``summary``), plus each run's ``conversations``,
    ``backends`` and ``files``."""
    studies: dict[tuple, dict] = {}
    for path in sorted(Path(folder).glob("recall-*.json")):  # TASK-TIMESTAMP: oldest first, so newer records win
        results = json.loads(path.read_text())
        kinds = tuple(results.get("kinds") or SUBJECTS)  # the first files predate recording the kinds (all of them)
        suite = results.get("suite", "generated")  # the varied suite's files (recall_varied) pool apart
        study_key = (results["model"], results["facts"], results.get("updates", True), kinds, suite)
        study = studies.setdefault(
            study_key,
            {
                "suite": suite,
                "model": results["model"],
                "facts": results["facts"],
                "updates": results.get("updates", True),
                "kinds": list(kinds),
                "settings": {},
            },
        )
        backend = results.get("backend", "torch")  # files before the llama.cpp backend ran on PyTorch
        for run in results["runs"]:
            setting = study["settings"].setdefault(
                tuple(run[f] for f in SETTING), {"records": {}, "backends": set(), "files": []}
            )
            for record in run["records"]:
                setting["records"][(record["conversation"], record["question"])] = record
            setting["backends"].add(backend)
            setting["files"].append(path.stem)
    pooled = []
    for study in studies.values():
        runs = []
        for key, setting in study.pop("settings").items():
            records = list(setting["records"].values())
            runs.append(
                dict(zip(SETTING, key))
                | {
                    "summary": summarize(records),
                    "conversations": len({r["conversation"] for r in records}),
                    "backends": sorted(setting["backends"]),
                    "files": setting["files"],
                }
            )
        runs.sort(key=lambda run: (run["length"], run["policy"] != "full", run["policy"], run["budget"], -run["decay"]))
        lengths = sorted({run["length"] for run in runs})
        pooled.append(study | {"lengths": lengths, "runs": runs})
    return pooled


def table(study: dict) -> list[str]:
    """Markdown: one row per pooled setting."""
    updated = " (the first updated)" if study["updates"] and study["suite"] == "generated" else ""
    lines = [
        f"### recall suite{_suite_label(study)}, pooled: {study['model']}, {study['facts']} facts per "
        f"conversation{updated}, kinds {', '.join(study['kinds'])}",
        "",
        "| length | policy | budget | decay | recent | conversations | cloze | generated (replies) | well-formed | "
        "value kept | plain: cloze | updated: cloze | updated: old value picked | backends | files |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for run in study["runs"]:
        s = run["summary"]
        a, p, u = s.get("all", {}), s.get("plain", {}), s.get("updated", {})
        generated = f"{_pct(a['generated'])} ({a['replies']})" if "generated" in a else "-"
        lines.append(
            f"| {_setting_cells(run)} | {run['conversations']} | {_pct(a.get('cloze'))} | "
            f"{generated} | {_pct(a.get('well_formed'))} | {_pct(a.get('kept'))} | {_pct(p.get('cloze'))} | "
            f"{_pct(u.get('cloze'))} | {_pct(u.get('picked_previous'))} | {', '.join(run['backends'])} | "
            f"{', '.join(f'`{name}`' for name in run['files'])} |"
        )
    return lines


def kind_table(study: dict) -> list[str]:
    """Markdown: per pooled setting and fact kind, the cloze and generated shares and the share of the value's
    tokens kept (which kinds a policy loses, and whether eviction lost them)."""
    kinds = study["kinds"]
    cells = " | ".join(f"{k}: cloze / generated / kept" for k in kinds)
    lines = [
        f"| length | policy | budget | decay | recent | {cells} |",
        "| ---: | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |",
    ]
    for run in study["runs"]:
        shares = run["summary"].get("kinds", {})
        cells = [
            " / ".join(_pct(shares[k].get(f)) for f in ("cloze", "generated", "kept")) if k in shares else "-"
            for k in kinds
        ]
        lines.append(f"| {_setting_cells(run)} | " + " | ".join(cells) + " |")
    return lines


def _suite_label(study: dict) -> str:
    return "" if study["suite"] == "generated" else f" ({study['suite']})"


def _setting_cells(run: dict) -> str:
    """The length, policy, budget, decay and recent cells of a row (``full`` has no budget, decay or window)."""
    setting = f"{run['budget']} | {run['decay']} | {run['recent']:g}" if run["policy"] != "full" else "1 | | "
    return f"{run['length']} | {run['policy']} | {setting}"


def write(folder: str | Path, out: str | Path) -> str:
    """Pool ``folder``'s recall results; write one plot per study into ``out`` (``recall-pooled-MODEL.png``, or
    with the facts and kinds in the name for the others) and return the markdown."""
    from .plots import recall_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    main_kinds = list(SUBJECTS)
    for study in pool(folder):
        name = f"recall-pooled-{study['model']}"
        if study["suite"] != "generated":
            name += f"-{study['suite']}"
        elif (study["facts"], study["updates"], study["kinds"]) != (3, True, main_kinds):
            name += f"-{study['facts']}facts-{'-'.join(study['kinds'])}"
        counts = sorted({run["conversations"] for run in study["runs"]})
        conversations = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0])
        recall_plot(study | {"conversations": conversations}, out / f"{name}.png")
        sections.append(
            "\n".join([*table(study), "", "By fact kind:", "", *kind_table(study), "", f"(plot: `{name}.png`)"])
        )
    return "\n\n".join(sections) + "\n"
