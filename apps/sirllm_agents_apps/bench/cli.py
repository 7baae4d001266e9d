"""The ``sirllm-agents bench`` subcommand: run a task, write its JSON results and PNG plot, or report them all."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sirllm_agents.model import BACKENDS
from sirllm_agents.policies import POLICIES

from .. import extras
from .recall_data import SUBJECTS
from .recall_varied import CATEGORIES

MEMORY_TASKS = ("grocery", "dailydialog", "rps")
BENCH_EXTRA = 'pip install "sirllm-agents-apps[bench]"'


def _numbers(kind):
    return lambda text: [kind(x) for x in text.split(",")]


SERVE_EXTRA = 'pip install "sirllm-agents-apps[serve]"'


def add_parser(commands) -> None:
    """Add ``bench`` to the ``sirllm-agents`` subcommands."""
    bench = commands.add_parser("bench", help="benchmarks: the paper's memory tasks, the agent loop, the report")
    tasks = bench.add_subparsers(dest="task", required=True)
    for task in MEMORY_TASKS:
        p = tasks.add_parser(task, help=f"the paper's {task} task under each cache policy")
        p.add_argument("--data", required=True, help="folder with the paper's data files (SirLLM repository, data/)")
        p.add_argument(
            "--limit",
            type=int,
            default=None,
            help="episodes to play (rps: rounds per player type; default: all, rps 2000)",
        )
        p.add_argument("--policies", default="full,streaming,sirllm,truncate")
        p.add_argument("--cache-size", type=_numbers(int), default=[512], help="comma list for a sweep")
        _entropy_options(p)
        p.add_argument(
            "--score",
            choices=("text", "letter"),
            default="text",
            help="which option log-likelihood picks the reply appended to the conversation",
        )
        p.add_argument("--model", default=None, help="model folder, hub id or .gguf file (default: embedded SmolLM2)")
        p.add_argument("--backend", default="auto", choices=BACKENDS, help="llamacpp for GGUF files, else torch")
        _common(p)
    recall = tasks.add_parser(
        "recall", help="the project's recall suite: generated conversations, cloze and generation"
    )
    recall.add_argument(
        "--suite",
        choices=("generated", "varied"),
        default="generated",
        help="generated: the first generator (recall_data); varied: the second one (recall_varied: free-form "
        "updates, same-opening sentences, ReAct traces, long tool outputs), scored per question category",
    )
    recall.add_argument("--conversations", type=int, default=100, help="conversations per length")
    recall.add_argument(
        "--length",
        type=_numbers(int),
        default=None,
        help="tokens per conversation (comma list; default 1000, varied 1500)",
    )
    recall.add_argument(
        "--budget",
        type=_numbers(float),
        default=[0.125, 0.25, 0.5, 1.0],
        help="cache size as a share of the conversation (comma list)",
    )
    recall.add_argument("--policies", default="full,streaming,sirllm,truncate")
    _entropy_options(recall)
    recall.add_argument(
        "--facts", type=int, default=3, help="generated suite: facts per conversation (the first is later updated)"
    )
    recall.add_argument(
        "--no-update", action="store_true", help="generated suite: state every fact once, never updated"
    )
    recall.add_argument(
        "--kinds",
        default=",".join(SUBJECTS),
        help=f"generated suite: fact kinds to draw from (of {', '.join(SUBJECTS)})",
    )
    recall.add_argument(
        "--categories",
        default=",".join(CATEGORIES),
        help=f"varied suite: question categories to ask (of {', '.join(CATEGORIES)})",
    )
    recall.add_argument("--per-category", type=int, default=1, help="varied suite: questions per category")
    recall.add_argument("--seed", type=int, default=0, help="the first conversation's seed")
    recall.add_argument(
        "--no-generation",
        action="store_true",
        help="cloze only: skip the greedy replies (most of a small model's time)",
    )
    recall.add_argument("--model", default=None, help="model folder, hub id or .gguf file (default: embedded SmolLM2)")
    recall.add_argument("--backend", default="auto", choices=BACKENDS, help="llamacpp for GGUF files, else torch")
    _common(recall)
    _locomo_parser(tasks)
    merge = tasks.add_parser(
        "merge", help="LoCoMo results run in parts (other conversations or settings, in parallel) as one result"
    )
    merge.add_argument("files", nargs="+", help="the parts' JSON results")
    merge.add_argument("--out", default="bench-results", help="folder for the merged JSON result and PNG plot")
    loop = tasks.add_parser("agent-loop", help="per-step latency and memory of SirLLM against stateless and llama.cpp")
    loop.add_argument("--steps", type=int, default=100)
    loop.add_argument("--peers", default="sirllm,stateless,llamacpp")
    loop.add_argument("--cache-size", type=int, default=1024)
    loop.add_argument("--time-limit", type=float, default=None, help="seconds after which a peer stops early")
    _common(loop)
    long_run = tasks.add_parser(
        "long-run", help="thousands of agent steps on one session: per-step time and memory against the history"
    )
    long_run.add_argument("--steps", type=int, default=None, help="default: 10000 on llama.cpp, 3000 on PyTorch")
    long_run.add_argument("--backend", default="auto", choices=BACKENDS, help="llamacpp when installed, else torch")
    long_run.add_argument("--cache-size", type=int, default=512)
    long_run.add_argument("--reply-every", type=int, default=10, help="every Nth step's reply is generated")
    long_run.add_argument("--reply-tokens", type=int, default=16, help="each generated reply's bound")
    _common(long_run)
    backends = tasks.add_parser(
        "backends", help="llama.cpp session overhead; PyTorch float32, bfloat16 and int8: speed and greedy agreement"
    )
    backends.add_argument("--prompts", type=int, default=50, help="one-turn conversations to decode")
    backends.add_argument("--tokens", type=int, default=32, help="greedy tokens per reply")
    backends.add_argument("--llamacpp-only", action="store_true", help="skip the PyTorch variants")
    _common(backends)
    serve = tasks.add_parser(
        "serve",
        help="load on the HTTP server: concurrent chats (stateful and stateless), or agent loops against servers",
    )
    serve.add_argument(
        "--workload",
        choices=("chat", "agent"),
        default="chat",
        help="chat: open chats, stateful then stateless; agent: tool outputs of ~100 tokens and 32-token greedy "
        "replies, against each of --targets",
    )
    serve.add_argument(
        "--conversations",
        type=_numbers(int),
        default=None,
        help="conversations sent concurrently; agent: a comma list, one run per value (default: chat 4, agent 1,4,8)",
    )
    serve.add_argument("--turns", type=int, default=None, help="turns per conversation (default: chat 6, agent 10)")
    serve.add_argument("--max-tokens", type=int, default=32, help="each reply's bound")
    serve.add_argument(
        "--url",
        default=None,
        help="a running sirllm-agents server (chat: instead of one started here; agent: the target url=URL)",
    )
    serve.add_argument("--model", default=None, help="the model of the server started here (default: embedded)")
    serve.add_argument("--cache-size", type=int, default=None, help="the cache bound of the server started here")
    serve.add_argument(
        "--llamacpp-server",
        action="store_true",
        help="chat: then the same conversations on llama-cpp-python's own server (needs llama-cpp-python[server])",
    )
    serve.add_argument(
        "--targets",
        default=None,
        help="agent: comma list of here (a sirllm-agents server started here), llama-server (llama.cpp's C++ server, "
        "--parallel N, started per N) and NAME=URL (a running sirllm-agents server, e.g. "
        "today=http://127.0.0.1:8001); default: here,llama-server, or url=URL with --url",
    )
    serve.add_argument(
        "--llama-server-bin",
        default=None,
        help="agent: the llama-server binary (default: where benchmarks/build_llama_server.sh puts it)",
    )
    serve.add_argument(
        "--slot-context",
        type=int,
        default=4096,
        help="agent: llama-server's context per slot, in tokens (--ctx-size is N times this)",
    )
    _common(serve)
    structured = tasks.add_parser(
        "structured", help="how often constrained JSON replies come out whole: repetition penalties and closing"
    )
    structured.add_argument("--prompts", type=int, default=50, help="generated prompts per schema")
    structured.add_argument("--max-new-tokens", type=int, default=128, help="each reply's bound")
    structured.add_argument(
        "--variants", default="plain,defaults", help="comma list of structured.VARIANTS (default: before and after)"
    )
    structured.add_argument("--schemas", default=None, help="comma list of structured.SCHEMAS (default: all five)")
    structured.add_argument("--backend", default="auto", choices=BACKENDS, help="llamacpp or torch")
    structured.add_argument(
        "--tuning", action="store_true", help="the 10 tuning topics (where defaults are chosen), not the measured ones"
    )
    _common(structured)
    report = tasks.add_parser("report", help="the markdown tables of every JSON result in a folder")
    report.add_argument("--results", default="bench-results")
    pool = tasks.add_parser(
        "pool", help="the recall suite's results pooled across files: one table and one plot per model"
    )
    pool.add_argument("--results", default="bench-results", help="folder with the recall-*.json results")
    pool.add_argument("--out", default=None, help="folder for the plots (default: --results)")


def _locomo_parser(tasks) -> None:
    locomo = tasks.add_parser(
        "locomo", help="LoCoMo's long conversations: cloze, evidence kept and the oracle, per category and policy"
    )
    locomo.add_argument("--data", required=True, help="folder with LoCoMo's conversations as NN.json files")
    locomo.add_argument(
        "--conversations", default=None, help="how many (the first N files) or which (comma list of file stems)"
    )
    locomo.add_argument(
        "--questions", type=int, default=None, help="per conversation, spread over the categories (default: all)"
    )
    locomo.add_argument("--sessions", type=int, default=None, help="only each conversation's first N sessions")
    locomo.add_argument("--policies", default="streaming,truncate,sirllm,default", help="comma list; full cannot fit")
    locomo.add_argument("--cache-size", type=_numbers(int), default=[1024], help="comma list for a sweep")
    _entropy_options(locomo)
    locomo.add_argument("--mode", default="end,evidence", help="when questions are asked: end, evidence or both")
    locomo.add_argument(
        "--later-sessions", type=int, default=2, help="mode evidence: sessions fed after the last evidence turn's"
    )
    locomo.add_argument("--generate", action="store_true", help="also a greedy reply per question, scored by token F1")
    locomo.add_argument("--seed", type=int, default=0, help="question choice, candidates and bootstrap resamples")
    locomo.add_argument("--model", default=None, help="model folder, hub id or .gguf file (default: embedded SmolLM2)")
    locomo.add_argument("--backend", default="auto", choices=BACKENDS, help="llamacpp for GGUF files, else torch")
    _common(locomo)


def _entropy_options(parser) -> None:
    """The sweeps of the entropy policies' settings, shared by the memory tasks and the recall suite."""
    parser.add_argument("--decay", type=_numbers(float), default=[1.0], help="comma list (entropy policies)")
    parser.add_argument(
        "--recent",
        type=_numbers(float),
        default=[0.0],
        help="share of the cache kept for the newest tokens (comma list; entropy policies)",
    )


def _entropy_grid(policy: str, args: argparse.Namespace) -> list[tuple[float, float]]:
    """The (decay, recent) pairs to run ``policy`` under: the sweep for an entropy policy; (1.0, 0.0) for the others,
    which keep no scores."""
    if not _ranks_by_entropy(policy):
        return [(1.0, 0.0)]
    return [(decay, recent) for decay in args.decay for recent in args.recent]


def _ranks_by_entropy(policy: str) -> bool:
    """Whether a setting's policy keeps entropy scores (the benchmarks' own ``truncate`` and ``default`` are not
    library policies)."""
    return policy in POLICIES and POLICIES[policy].scored


def _common(parser) -> None:
    parser.add_argument("--out", default="bench-results", help="folder for the JSON results and PNG plots")
    parser.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads (default: torch's)")


def needs(args: argparse.Namespace) -> list[str]:
    """The modules of the bench extra that ``args.task`` imports: matplotlib for every task's plot; for the agent
    loop also psutil and each chosen peer's (see ``agent_loop.PEER_NEEDS``; llama.cpp is not in the extra, and its peer
    is skipped when missing). The report needs none."""
    if args.task in ("report", "serve", "structured"):  # serve needs the serve extra, checked when it starts it
        return []
    if args.task == "long-run":
        return ["matplotlib", "psutil"]
    if args.task != "agent-loop":
        return ["matplotlib"]
    from . import agent_loop

    peers = args.peers.split(",")
    unknown = set(peers) - set(agent_loop.PEERS)
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}: expected some of {', '.join(agent_loop.PEERS)}")
    modules = ["matplotlib", "psutil"]
    for peer in peers:
        if peer not in agent_loop.OPTIONAL_PEERS:
            modules += agent_loop.PEER_NEEDS[peer]
    return modules


def require(task: str, modules: list[str]) -> None:
    """Exit at once (status 2, one line naming what is missing and the install that fixes it) when any of
    ``modules`` is not installed: a run must not fail at its plot after its hours of work."""
    extras.require(f"sirllm-agents bench {task}", modules, BENCH_EXTRA)


def main(args: argparse.Namespace) -> None:
    require(args.task, needs(args))
    if args.task == "report":
        from .report import report

        print(report(args.results), end="")
        return
    if args.task == "merge":
        _merge(args)
        return
    if args.task == "pool":
        from .pooled import write

        print(write(args.results, args.out or args.results), end="")
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y%m%d-%H%M%S")
    if args.task == "serve":
        _serve(args, threads, out, started)
        return
    if args.task == "structured":
        from rich.progress import Progress

        from . import structured

        schemas = args.schemas.split(",") if args.schemas else None
        with Progress() as bars:

            def progress(variant: str):
                bar = bars.add_task(variant, total=args.prompts * len(schemas or structured.SCHEMAS))
                return lambda: bars.advance(bar)

            results = structured.run(
                args.backend,
                args.variants.split(","),
                args.prompts,
                args.max_new_tokens,
                threads,
                schemas,
                progress,
                tuning=args.tuning,
            )
        stem = _write_new(out / f"structured-{results['backend']}-{started}", json.dumps(results, indent=1))
        print(structured.table(results), end="")
        print(f"wrote {stem}.json")
        return
    if args.task == "agent-loop":
        from . import agent_loop, plots

        results = agent_loop.run(args.peers.split(","), args.steps, args.cache_size, threads, args.time_limit)
        plot = plots.agent_loop_plot
    elif args.task == "long-run":
        from . import long_run, plots

        results = _long_run(args, threads)
        print(long_run.table(results), end="")
        plot = plots.long_run_plot
    elif args.task == "recall":
        from . import plots

        results = _recall(args, threads)
        plot = plots.recall_plot
    elif args.task == "locomo":
        from . import plots

        results = _locomo(args, threads)
        plot = plots.locomo_plot
    elif args.task == "backends":
        from . import backends, plots

        results = backends.run(
            args.prompts,
            args.tokens,
            threads,
            progress=lambda label: print(f"measuring {label}"),
            torch_variants=not args.llamacpp_only,
        )
        plot = plots.backends_plot
    else:
        from . import plots

        results = _memory(args, threads)
        plot = plots.memory_plot
    name = f"{args.task}-{started}"
    if args.task == "recall" and args.suite != "generated":
        name += f"-{args.suite}"
    stem = _write_new(out / name, json.dumps(results, indent=1))
    plot(results, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png")


def _merge(args: argparse.Namespace) -> None:
    from . import locomo, plots

    try:
        results = locomo.merge([json.loads(Path(f).read_text()) for f in args.files], args.files)
    except (OSError, ValueError) as error:
        raise SystemExit(f"bench merge: {error}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _write_new(out / f"locomo-{time.strftime('%Y%m%d-%H%M%S')}", json.dumps(results, indent=1))
    plots.locomo_plot(results, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png")


def _write_new(stem: Path, text: str) -> Path:
    """Write ``text`` to ``STEM.json``, or ``STEM-2.json`` ... when taken (runs started in the same second, in
    parallel, must not write over each other); returns the stem used."""
    for n in range(1, 1000):
        candidate = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
        try:
            with candidate.with_suffix(".json").open("x", encoding="utf-8") as file:
                file.write(text)
        except FileExistsError:
            continue
        return candidate
    raise SystemExit(f"could not find a free result name like {stem}.json")


def _serve(args: argparse.Namespace, threads: int, out: Path, started: str) -> None:
    from . import serve_load

    if args.workload == "agent":
        _serve_agents(args, out, started)
        return
    conversations = args.conversations or [4]
    if len(conversations) != 1:
        raise SystemExit("bench serve --workload chat takes one --conversations value")
    if args.targets or args.llama_server_bin:
        raise SystemExit("--targets and --llama-server-bin are for --workload agent")
    if args.url is None:
        extras.require("sirllm-agents bench serve", ["fastapi", "uvicorn"], SERVE_EXTRA)
    results = serve_load.run(
        conversations[0],
        args.turns or 6,
        args.max_tokens,
        args.url,
        args.model,
        args.cache_size,
        llamacpp_threads=threads if args.llamacpp_server else None,
    )
    results["threads"] = threads
    stem = _write_new(out / f"serve-{started}", json.dumps(results, indent=1))
    print(serve_load.table(results), end="")
    print(f"wrote {stem}.json")


def _serve_agents(args: argparse.Namespace, out: Path, started: str) -> None:
    """The agent workload: both servers get ``--threads`` threads, 2 unless given (the issue's setting)."""
    from . import serve_load

    if args.llamacpp_server:
        raise SystemExit(
            "--llamacpp-server is for --workload chat; the agent workload's llama.cpp target is llama-server"
        )
    text = args.targets or ("" if args.url else "here,llama-server")
    if args.url:
        text += f",url={args.url}"
    try:
        targets = serve_load.parse_targets(text)
    except ValueError as error:
        raise SystemExit(f"--targets: {error}") from None
    if any(t.kind == "here" for t in targets):
        extras.require("sirllm-agents bench serve", ["fastapi", "uvicorn"], SERVE_EXTRA)
    if any(t.kind == "llama-server" for t in targets):
        try:
            serve_load.llama_server_files(args.model, args.llama_server_bin)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"sirllm-agents bench serve: {error}") from None
    threads = args.threads or 2
    import torch

    torch.set_num_threads(threads)
    results = serve_load.run_agent_bench(
        targets,
        args.conversations or [1, 4, 8],
        turns=args.turns or 10,
        max_tokens=args.max_tokens,
        model=args.model,
        cache_size=args.cache_size,
        threads=threads,
        llama_server_binary=args.llama_server_bin,
        slot_context=args.slot_context,
        report=print,
    )
    stem = _write_new(out / f"serve-agent-{started}", json.dumps(results, indent=1))
    print(serve_load.agent_table(results), end="")
    print(f"wrote {stem}.json")


def _long_run(args: argparse.Namespace, threads: int) -> dict:
    from rich.progress import Progress

    from sirllm_agents.engine import Engine

    from . import long_run

    engine = Engine(backend=args.backend, threads=threads)
    backend = engine.model.backend.name
    steps = args.steps or (10_000 if backend == "llamacpp" else 3_000)
    with Progress() as bar:
        task = bar.add_task(f"long run on {backend}", total=steps)
        return long_run.run(
            engine,
            steps,
            args.cache_size,
            args.reply_every,
            args.reply_tokens,
            threads,
            progress=lambda done, _: bar.update(task, completed=done),
        )


def _memory(args: argparse.Namespace, threads: int) -> dict:
    from rich.progress import Progress

    from sirllm_agents.engine import Engine

    from . import data
    from .memory import POLICIES, Setting, run_setting

    policies = args.policies.split(",")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}: expected some of {', '.join(POLICIES)}")
    try:
        episodes = data.load(args.task, args.data, args.limit)
    except data.DataMissingError as error:
        raise SystemExit(str(error)) from None
    settings = []
    for policy in policies:
        sizes = [None] if policy == "full" else args.cache_size
        settings += [Setting(policy, size, *pair) for size in sizes for pair in _entropy_grid(policy, args)]
    engine = Engine(args.model, backend=args.backend)
    turns = sum(len(e.turns) for e in episodes)
    runs = []
    with Progress() as progress:
        for setting in settings:
            label = f"{args.task} {setting.policy} cache={setting.cache_size or 'max'} decay={setting.decay}"
            label += f" recent={setting.recent}" if setting.recent else ""
            bar = progress.add_task(label, total=turns)
            runs.append(
                run_setting(engine, args.task, episodes, setting, args.score, lambda bar=bar: progress.advance(bar))
            )
    return {
        "task": args.task,
        "model": engine.model.name,
        "backend": engine.model.backend.name,
        "data": str(args.data),
        "limit": args.limit,
        "episodes": len(episodes),
        "scoring": args.score,
        "threads": threads,
        "runs": runs,
    }


def _recall(args: argparse.Namespace, threads: int) -> dict:
    from rich.progress import Progress

    from sirllm_agents.engine import Engine
    from sirllm_agents.policies import POLICIES

    from . import recall_varied
    from .recall import Setting, run_setting
    from .recall_data import generate

    kinds = args.kinds.split(",")
    if set(kinds) - set(SUBJECTS) or len(kinds) < args.facts:
        raise SystemExit(f"--kinds must name at least --facts ({args.facts}) of {', '.join(SUBJECTS)}, got {kinds}")
    varied = args.suite == "varied"
    categories = args.categories.split(",")
    if varied and (set(categories) - set(CATEGORIES) or args.per_category < 1):
        raise SystemExit(f"--categories must name some of {', '.join(CATEGORIES)} and --per-category be >= 1")
    counts = dict.fromkeys(categories, args.per_category)
    lengths = args.length or [1500 if varied else 1000]
    policies = args.policies.split(",")
    unknown = set(policies) - set(POLICIES) - {"truncate"}
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}: expected some of {', '.join([*POLICIES, 'truncate'])}")
    settings = []
    for policy in policies:
        if policy == "full":
            settings.append(Setting("full", 1.0))
            continue
        settings += [Setting(policy, budget, *pair) for budget in args.budget for pair in _entropy_grid(policy, args)]
    engine = Engine(args.model, backend=args.backend)
    count = lambda text: len(engine.model.encode(text))  # noqa: E731
    runs = []
    with Progress() as progress:
        for length in lengths:
            seeds = range(args.seed, args.seed + args.conversations)
            if varied:
                conversations = [recall_varied.generate(seed, length, count, counts) for seed in seeds]
            else:
                conversations = [
                    generate(seed, length, count, facts=args.facts, update=not args.no_update, kinds=kinds)
                    for seed in seeds
                ]
            for setting in settings:
                label = f"recall {length} tok {setting.policy} budget={setting.budget} decay={setting.decay}"
                bar = progress.add_task(
                    label + (f" recent={setting.recent}" if setting.recent else ""), total=len(conversations)
                )
                run = run_setting(
                    engine,
                    conversations,
                    setting,
                    lambda bar=bar: progress.advance(bar),
                    generate=not args.no_generation,
                )
                runs.append({"length": length, **run})
    results = {
        "task": "recall",
        "model": engine.model.name,
        "backend": engine.model.backend.name,
        "conversations": args.conversations,
        "seed": args.seed,
        "facts": sum(counts.values()) if varied else args.facts,
        "updates": varied or not args.no_update,
        "kinds": list(recall_varied.KINDS) if varied else kinds,
        "lengths": lengths,
        "threads": threads,
        "runs": runs,
    }
    if varied:
        results |= {"suite": "varied", "categories": counts}
    return results


def _locomo(args: argparse.Namespace, threads: int) -> dict:
    from rich.progress import Progress

    from sirllm_agents.engine import Engine

    from . import locomo, locomo_data

    policies = args.policies.split(",")
    if "full" in policies:
        raise SystemExit("full does not fit LoCoMo's conversations (past 8,192 positions): the oracle stands in for it")
    unknown = set(policies) - set(locomo.POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}: expected some of {', '.join(locomo.POLICIES)}")
    modes = args.mode.split(",")
    if not modes or set(modes) - set(locomo.MODES):
        raise SystemExit(f"--mode must name some of {', '.join(locomo.MODES)}, got {args.mode!r}")
    try:
        conversations = locomo_data.load(args.data, args.conversations)
    except locomo_data.LocomoDataMissingError as error:
        raise SystemExit(str(error)) from None
    if args.sessions:
        conversations = [locomo_data.first_sessions(c, args.sessions) for c in conversations]
    settings = []
    for policy in policies:
        grid = [(1.0, 0.0)] if policy == locomo.DEFAULT else _entropy_grid(policy, args)
        settings += [locomo.Setting(policy, size, *pair) for size in args.cache_size for pair in grid]
    engine = Engine(args.model, backend=args.backend, threads=threads)
    asked = [
        (c, locomo.prepare(c, locomo_data.choose_questions(c, args.questions, args.seed), args.seed))
        for c in conversations
    ]
    oracle = [r for c, a in asked for r in locomo.run_oracle(engine, c, a, args.generate)]
    messages = sum(len(c.messages) for c in conversations)
    runs = []
    with Progress() as progress:
        for setting in settings:
            label = f"locomo {setting.policy} cache={setting.cache_size}"
            if _ranks_by_entropy(setting.policy):
                label += f" decay={setting.decay}" + (f" recent={setting.recent}" if setting.recent else "")
            bar = progress.add_task(label, total=messages)
            runs.append(
                locomo.run_setting(
                    engine,
                    asked,
                    setting,
                    oracle,
                    modes,
                    args.later_sessions,
                    args.generate,
                    args.seed,
                    lambda bar=bar: progress.advance(bar),
                )
            )
    results = {
        "task": "locomo",
        "model": engine.model.name,
        "backend": engine.model.backend.name,
        "data": str(args.data),
        "conversations": [c.name for c in conversations],
        "sessions": args.sessions,
        "questions_per_conversation": args.questions,
        "questions": [
            {
                "conversation": c.name,
                "question": a.question.index,
                "category": locomo_data.CATEGORIES[a.question.category],
                "text": a.question.text,
                "options": list(a.options),
                "gold": a.gold,
                "evidence": list(a.question.evidence),
            }
            for c, chosen in asked
            for a in chosen
        ],
        "modes": modes,
        "later_sessions": args.later_sessions,
        "generate": args.generate,
        "seed": args.seed,
        "threads": threads,
        "oracle": {"summary": locomo.summarize(oracle, args.seed), "records": oracle},
        "runs": runs,
    }
    results["targets"] = locomo.targets(results, args.seed)
    results["paired_with_default"] = locomo.paired_with_default(results, args.seed)
    return results
