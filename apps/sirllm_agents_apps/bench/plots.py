"""PNG plots of benchmark results (matplotlib, without a display)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# What picking an option at random scores: Grocery recall and DailyDialog have 4 options, RPS 3 moves.
CHANCE = {"grocery": 1 / 4, "dailydialog": 1 / 4, "rps": 1 / 3}
FULL_LABEL = "full (no eviction)"
LEGEND_COLUMNS = 4  # the recall plot's one legend, below its panels
LEGEND_ROW_INCHES = 0.25


def headline(task: str, run: dict, scoring: str) -> float:
    """The figure a memory run is plotted by (in cloze form when recorded): ACC_g, accuracy, or the mean win rate over
    player types."""
    metrics = run["metrics"].get("cloze", run["metrics"][scoring])
    if task == "grocery":
        return metrics["acc_g"]
    if task == "dailydialog":
        return metrics["accuracy"]
    return sum(m["win"] for m in metrics.values()) / len(metrics)


def memory_plot(results: dict, path: Path) -> None:
    """The headline metric against cache size, one line per policy (and per decay for SirLLM); ``full`` is a
    horizontal line, being unbounded. Grocery runs add a panel of the grocery's share kept in the cache."""
    plt = _pyplot()
    task, scoring = results["task"], results["scoring"]
    with_key = task == "grocery" and all("key_in_cache" in run for run in results["runs"])
    fig, axes = plt.subplots(1, 1 + with_key, figsize=(12 if with_key else 7, 4.5), squeeze=False)
    cloze = all("cloze" in run["metrics"] for run in results["runs"])
    metric = {"grocery": "ACC_g", "dailydialog": "accuracy", "rps": "win rate (mean over players)"}[task]
    _policy_lines(axes[0][0], results["runs"], lambda run: headline(task, run, scoring), CHANCE[task])
    axes[0][0].set(
        ylabel=f"{metric} ({'cloze' if cloze else scoring} scoring)",
        title=f"{task}: {results['episodes']} episodes, {results['model']}",
    )
    if with_key:
        _policy_lines(axes[0][1], results["runs"], lambda run: run["key_in_cache"], None)
        axes[0][1].set(ylabel="share of the grocery's tokens in the cache", title="the key fact at the recall question")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _policy_lines(ax, runs: list[dict], value: Callable[[dict], float], chance: float | None) -> None:
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    lines: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        if run["policy"] == "full":
            ax.axhline(value(run), color="black", linestyle="--", label="full (no eviction)")
            continue
        lines.setdefault(_setting_label(run), []).append((run["cache_size"], value(run)))
    for label, points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set(xlabel="cache size (tokens)", ylim=(0, 1.02))
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)


def agent_loop_plot(results: dict, path: Path) -> None:
    """Per-step latency and resident memory against the step index, one line per peer."""
    plt = _pyplot()
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, peer in results["peers"].items():
        steps = peer.get("steps")
        if not steps:
            continue
        [line] = latency.plot([s["seconds"] for s in steps], label=f"{name}: {peer['backend']}"[:60])
        if peer["stopped"]:  # a cross where the peer stopped early (an error or the time limit)
            latency.plot(len(steps) - 1, steps[-1]["seconds"], "x", color=line.get_color(), markersize=9)
        memory.plot([s["rss_mib"] for s in steps], label=name)
    # Log scale: the stateless peer's growing steps would otherwise flatten the others into the axis.
    latency.set_yscale("log")
    threads = results["threads"]
    title = f"agent loop ({threads} thread{'s' * (threads != 1)})"
    latency.set(xlabel="step", ylabel="seconds per step (log)", title=title)
    memory.set(xlabel="step", ylabel="resident memory (MiB)", title="memory")
    latency.legend(fontsize=7)
    memory.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def long_run_plot(results: dict, path: Path) -> None:
    """Each step's time (ingested and generated steps apart, with each tenth's median) and resident memory against the
    step index."""
    plt = _pyplot()
    fig, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4.5))
    records = results["records"]
    for generated, label, colour in ((False, "ingested steps", "tab:blue"), (True, "generated steps", "tab:orange")):
        part = [r for r in records if r["generated"] == generated]
        latency.plot([r["step"] for r in part], [1000 * r["seconds"] for r in part], ".", ms=1, color=colour, alpha=0.3)
        latency.plot([], [], ".", color=colour, label=label)
    deciles = results["summary"]["deciles"]
    middles = [(d["steps"][0] + d["steps"][1]) / 2 for d in deciles]
    latency.plot(middles, [d["median_ms"] for d in deciles], "k-o", label="median of each tenth")
    latency.plot(middles, [d["median_cpu_ms"] for d in deciles], "k--s", label="median CPU time of each tenth")
    latency.set_yscale("log")
    title = f"{results['steps']} steps on {results['backend']}, cache {results['cache_size']}"
    latency.set(xlabel="step", ylabel="milliseconds per step (log)", title=title)
    memory.plot([r["step"] for r in records], [r["rss_mib"] for r in records])
    memory.set(xlabel="step", ylabel="resident memory (MiB)", title="memory", ylim=(0, None))
    latency.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _setting_label(run: dict) -> str:
    label = run["policy"]
    if run["policy"] not in ("full", "streaming", "truncate"):
        label += f" decay={run['decay']}" + (f" recent={run['recent']}" if run.get("recent") else "")
    return label


def recall_plot(results: dict, path: Path) -> None:
    """The recall suite: cloze and generated recall and the value's tokens kept, against the cache budget (a share of
    the conversation), one line per setting at the first length; with several lengths, a last panel of cloze recall
    against the length at the budget closest to 1/4. One legend below the panels names every setting."""
    fig = recall_figure(results)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def recall_figure(results: dict) -> Figure:
    """The figure ``recall_plot`` saves."""
    plt = _pyplot()
    lengths = results["lengths"]
    panels = [
        ("cloze", "cloze recall (best per token)"),
        ("generated", "generated recall (value in the reply)"),
        ("kept", "share of the value's tokens kept"),
    ]
    # One colour per setting in every panel, so one legend serves them all; `full` is the black dashed line.
    settings = sorted({_setting_label(run) for run in results["runs"] if run["policy"] != "full"})
    columns = len(panels) + (len(lengths) > 1)
    legend_rows = -(-(len(settings) + 1) // LEGEND_COLUMNS)
    fig, axes = plt.subplots(1, columns, figsize=(5 * columns, 4.5 + LEGEND_ROW_INCHES * legend_rows))
    first = [run for run in results["runs"] if run["length"] == lengths[0]]
    palette = [f"C{index}" for index in range(10)] if len(settings) <= 10 else plt.get_cmap("tab20").colors
    colours = {label: palette[index % len(palette)] for index, label in enumerate(settings)}
    for ax, (field, title) in zip(axes, panels):
        lines: dict[str, list[tuple[float, float]]] = {}
        for run in first:
            value = run["summary"].get("all", {}).get(field)
            if value is None:
                continue
            if run["policy"] == "full":
                ax.axhline(value, color="black", linestyle="--", label=FULL_LABEL)
            else:
                lines.setdefault(_setting_label(run), []).append((run["budget"], value))
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colours[label])
        ax.set(xlabel="cache budget (share of the conversation)", title=title, ylim=(0, 1.02))
        ax.set_xscale("log", base=2)
    axes[0].set_ylabel(f"{results['conversations']} conversations of ~{lengths[0]} tokens, {results['model']}")
    if len(lengths) > 1:
        budgets = sorted({run["budget"] for run in results["runs"] if run["policy"] != "full"})
        quarter = min(budgets, key=lambda b: abs(b - 0.25)) if budgets else 1.0
        lines = {}
        for run in results["runs"]:
            if run["policy"] == "full" or run["budget"] == quarter:
                value = run["summary"].get("all", {}).get("cloze")
                if value is not None:
                    lines.setdefault(_setting_label(run), []).append((run["length"], value))
        ax = axes[-1]
        for label, points in sorted(lines.items()):
            points.sort()
            if label == "full":
                style = {"color": "black", "linestyle": "--", "label": FULL_LABEL}
            else:
                style = {"color": colours[label], "label": label}
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", **style)
        ax.set(xlabel="conversation length (tokens)", title=f"cloze recall at budget {quarter}", ylim=(0, 1.02))
        ax.set_xscale("log", base=2)
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=LEGEND_COLUMNS, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, LEGEND_ROW_INCHES * legend_rows / fig.get_figheight(), 1, 1))
    return fig


def backends_plot(results: dict, path: Path) -> None:
    """Decode speed per backend variant, and greedy agreement with PyTorch float32."""
    plt = _pyplot()
    variants = results["variants"]
    labels = list(variants)
    fig, (speed, agree) = plt.subplots(1, 2, figsize=(11, 4))
    speed.barh(labels, [variants[v]["decode_tokens_per_s"] for v in labels])
    speed.set(xlabel="decode tokens / s (median)", title=f"speed ({results['threads']} threads)")
    scored = [v for v in labels if "agreement_with_float32" in variants[v]]
    agree.barh(scored, [variants[v]["agreement_with_float32"]["identical_replies"] for v in scored])
    agree.set(xlim=(0, 1), xlabel=f"replies equal to float32's ({results['tokens']} tokens)", title="agreement")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LOCOMO_GROUPS = ("all", "answerable", "single-hop", "multi-hop", "temporal", "open-domain", "adversarial")
LOCOMO_CHANCE = 1 / 5  # the gold and four other answers


def locomo_label(run: dict) -> str:
    """A LoCoMo setting's name: the policy, the entropy policies' decay and recent window when set, and what the
    library's default resolved to."""
    if run["policy"] == "default":
        return f"default ({run['session_policy']}, recent {run['recent_size']})"
    label = run["policy"]
    if run["policy"] not in ("streaming", "truncate"):
        label += f" decay={run['decay']}" if run["decay"] != 1.0 else ""
        label += f" recent={run['recent']}" if run.get("recent") else ""
    return label


def locomo_plot(results: dict, path: Path) -> None:
    """Per category (and over all questions), cloze accuracy and evidence kept, one bar per setting with its
    bootstrap 95% interval, the oracle as a black mark; one column per mode, at cache 1024 (or the first size run).
    With several cache sizes a last panel shows overall cloze against the cache size."""
    plt = _pyplot()
    sizes = sorted({run["cache_size"] for run in results["runs"]})
    size = 1024 if 1024 in sizes else sizes[0]
    runs = [run for run in results["runs"] if run["cache_size"] == size]
    modes = results["modes"]
    columns = len(modes) + (len(sizes) > 1)
    fig, axes = plt.subplots(2, columns, figsize=(7 * columns, 8.5), squeeze=False)
    oracle = results["oracle"]["summary"]
    width = 0.8 / max(1, len(runs))
    for column, mode in enumerate(modes):
        groups = [g for g in LOCOMO_GROUPS if g in oracle]
        for row, field in enumerate(("cloze", "evidence_kept")):
            ax = axes[row][column]
            for index, run in enumerate(runs):
                cells = [run["summary"][mode].get(g, {}).get(field) for g in groups]
                xs = [i + (index - (len(runs) - 1) / 2) * width for i in range(len(groups))]
                means = [c["mean"] if c else 0.0 for c in cells]
                errors = [
                    [c["mean"] - c["low"] if c else 0.0 for c in cells],
                    [c["high"] - c["mean"] if c else 0.0 for c in cells],
                ]
                ax.bar(xs, means, width, yerr=errors, capsize=2, label=locomo_label(run), color=f"C{index % 10}")
            if field == "cloze":
                for i, group in enumerate(groups):
                    ax.hlines(oracle[group]["cloze"]["mean"], i - 0.45, i + 0.45, color="black", linewidth=2)
                ax.plot([], [], color="black", linewidth=2, label="oracle (evidence turns only)")
                ax.axhline(LOCOMO_CHANCE, color="grey", linestyle=":", label="chance")
            counts = [oracle[g]["questions"] for g in groups]
            ax.set_xticks(range(len(groups)), [f"{g}\n({n})" for g, n in zip(groups, counts)], fontsize=8)
            what = "cloze accuracy" if field == "cloze" else "share of the evidence turns' tokens cached"
            ax.set(ylim=(0, 1.02), ylabel=what, title=f"mode {mode}, cache {size}")
        axes[0][column].legend(fontsize=7)
    if len(sizes) > 1:
        ax = axes[0][-1]
        mode = modes[0]
        lines: dict[str, list[tuple[int, dict]]] = {}
        for run in results["runs"]:
            lines.setdefault(locomo_label(run), []).append((run["cache_size"], run["summary"][mode]["all"]["cloze"]))
        for label, points in sorted(lines.items()):
            points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
            [line] = ax.plot(xs, [p[1]["mean"] for p in points], marker="o", label=label)
            ax.fill_between(
                xs, [p[1]["low"] for p in points], [p[1]["high"] for p in points], alpha=0.15, color=line.get_color()
            )
        ax.axhline(oracle["all"]["cloze"]["mean"], color="black", linestyle="--", label="oracle")
        ax.set(
            xlabel="cache size (tokens)",
            ylabel="cloze accuracy, all questions",
            ylim=(0, 1.02),
            title=f"mode {mode}: against the cache size",
        )
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
        axes[1][-1].axis("off")
    names = ", ".join(results["conversations"])
    fig.suptitle(f"LoCoMo conversations {names}, {results['model']}; bars: bootstrap 95% intervals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
