"""The ``sirllm-agents`` command."""

from __future__ import annotations

import argparse
import gc

from sirllm_agents.config import DEFAULT_POLICY, RECENT_SHARE, SessionConfig
from sirllm_agents.generation import GenerationConfig
from sirllm_agents.model import BACKENDS
from sirllm_agents.policies import POLICIES
from sirllm_agents.scheduler import DEFAULT_PARALLEL

from .bench import cli as bench_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sirllm-agents", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="a fact, a long conversation on a small cache, and the question: what each policy still knows"
    )
    demo.add_argument("--seed", type=int, default=0, help="which generated conversation")
    demo.add_argument("--length", type=int, default=1200, help="the conversation's tokens")
    demo.add_argument("--budget", type=float, default=0.25, help="cache size as a share of the conversation")
    demo.add_argument("--model", default=None, help="model folder, hub id or .gguf file (default: embedded SmolLM2)")
    demo.add_argument("--backend", default="auto", choices=BACKENDS, help="llamacpp for GGUF files, else torch")
    bench_cli.add_parser(commands)

    chat = commands.add_parser("chat", help="an interactive chat with /stats, /memory, /save, /load, /reset")
    chat.add_argument("--model", default=None, help="model folder, hub id or .gguf file (default: embedded SmolLM2)")
    chat.add_argument("--backend", default="auto", choices=BACKENDS, help="llamacpp for GGUF files, else torch")
    _session_options(chat)
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    _repetition_options(chat)
    chat.add_argument("--load", default=None, metavar="SESSION_FILE", help="resume a saved session")

    inspect = commands.add_parser("inspect", help="show what a saved session's cache retains and evicted")
    inspect.add_argument("session_file")
    inspect.add_argument("--html", default=None, metavar="OUT", help="write a self-contained HTML page here")
    inspect.add_argument("--last", type=int, default=None, metavar="N", help="print only the last N tokens")

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)")
    serve.add_argument("--model", default=None, help="model folder, hub id or .gguf file (default: embedded SmolLM2)")
    serve.add_argument("--backend", default="auto", choices=BACKENDS, help="llamacpp for GGUF files, else torch")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also $SIRLLM_API_KEY)")
    serve.add_argument("--max-live-sessions", type=int, default=16, help="sessions kept in memory; more spill to disk")
    serve.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL,
        help=f"requests run at once; more wait their turn (default {DEFAULT_PARALLEL})",
    )
    serve.add_argument(
        "--batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the forwards of the requests running at once together (default: on torch yes, on llama.cpp no)",
    )
    _session_options(serve)
    serve.add_argument("--max-queue", type=int, default=16, help="chat requests in flight or waiting; past it, 429")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request body; past it, 413")
    serve.add_argument(
        "--max-tokens",
        type=int,
        default=GenerationConfig.max_new_tokens,
        help="a reply's bound when the request gives none (default: the library's)",
    )
    serve.add_argument(
        "--session-store",
        default=None,
        metavar="URL_OR_DIR",
        help="shared with other replicas: redis://host:port/db (sessions committed every turn, fenced leases) or a "
        "folder (one host); sessions move between servers, one at a time",
    )
    serve.add_argument(
        "--blob-store",
        default=None,
        metavar="S3_URL",
        help="with a redis:// store, s3://bucket/prefix for large sessions (endpoint, keys: boto3 config, AWS_*)",
    )
    serve.add_argument(
        "--blob-store-min-mb", type=float, default=16.0, help="sessions this large or larger go to --blob-store"
    )
    serve.add_argument(
        "--replica-name", default=None, help="this server's name in session leases, unique per replica (host:pid)"
    )
    serve.add_argument(
        "--lease-seconds", type=float, default=30.0, help="a session lease's length, renewed while held (default 30)"
    )
    serve.add_argument(
        "--handoff-idle",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --session-store, hand a session idle this long to the store (default 30)",
    )

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(seed=args.seed, length=args.length, budget=args.budget, model=args.model, backend=args.backend)
    elif args.command == "bench":
        bench_cli.main(args)
    elif args.command == "chat":
        from .chat import main as chat_main

        try:
            config = _session_config(args)
            penalties = _penalties(args)
        except ValueError as error:
            raise SystemExit(f"sirllm-agents chat: {error}") from None
        chat_main(
            args.model,
            backend=args.backend,
            config=config,
            system=args.system,
            max_new_tokens=args.max_new_tokens,
            load=args.load,
            penalties=penalties,
        )
    elif args.command == "inspect":
        _inspect(args.session_file, args.html, args.last)
    elif args.command == "serve":
        _serve(args)


SESSION_OPTIONS = ("cache_size", "policy", "recent_size", "decay")


def _session_options(parser: argparse.ArgumentParser) -> None:
    """Each session's cache settings; one left out keeps ``SessionConfig``'s default."""
    parser.add_argument("--cache-size", type=int, default=None, help="each session's KV cache, in tokens")
    parser.add_argument("--policy", default=None, choices=list(POLICIES), help=f"default: {DEFAULT_POLICY}")
    parser.add_argument(
        "--recent-size",
        type=int,
        default=None,
        help=f"newest tokens never evicted (default: 1/{RECENT_SHARE} of the cache)",
    )
    parser.add_argument(
        "--decay",
        type=float,
        default=None,
        help=f"per-turn decay of the stored entropies (default {SessionConfig.decay})",
    )


REPETITION_OPTIONS = {
    "frequency_penalty": (float, "lower a token's logit by this much per time it occurs in the reply (OpenAI)"),
    "presence_penalty": (float, "lower the logit of every token already in the reply by this much (OpenAI)"),
    "repeat_penalty": (float, "divide the positive logits of the reply's last --repeat-last-n tokens (llama.cpp)"),
    "repeat_last_n": (int, "the window of --repeat-penalty (default 64, -1: the whole reply)"),
    "dry_multiplier": (float, "DRY: how hard to penalise the token that extends a repetition (0: off)"),
    "dry_base": (float, "DRY: the penalty's growth per repeated token (default 1.75)"),
    "dry_allowed_length": (int, "DRY: the longest repetition left alone (default 2)"),
    "dry_penalty_last_n": (int, "DRY: how far back to look (default -1: the whole reply)"),
}


def _repetition_options(parser: argparse.ArgumentParser) -> None:
    """The repetition penalties of free-text replies (see ``sirllm_agents.penalties``); off unless given."""
    for name, (kind, text) in REPETITION_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)
    parser.add_argument(
        "--dry-sequence-breaker",
        action="append",
        default=None,
        dest="dry_sequence_breakers",
        metavar="TEXT",
        help='DRY: a text no repetition reaches back past (repeatable; default "\\n", ":", \'"\', "*")',
    )


def _penalties(args: argparse.Namespace) -> dict:
    names = [*REPETITION_OPTIONS, "dry_sequence_breakers"]
    penalties = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    GenerationConfig(**penalties)  # refuses bad values, naming them
    return penalties


def _session_config(args: argparse.Namespace) -> SessionConfig:
    return SessionConfig(**{name: getattr(args, name) for name in SESSION_OPTIONS if getattr(args, name) is not None})


SERVE_EXTRA = 'pip install "sirllm-agents-apps[serve]"'
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _serve(args: argparse.Namespace) -> None:
    import os
    import sys

    from .extras import require

    require("sirllm-agents serve", ["fastapi", "uvicorn"], SERVE_EXTRA)
    import uvicorn

    from sirllm_agents import Engine, open_store

    from .server import ServerSettings, create_app

    api_key = args.api_key or os.environ.get("SIRLLM_API_KEY") or None
    if args.host not in LOOPBACK and not api_key:
        print(
            f"sirllm-agents serve: warning: listening on {args.host} with no --api-key: anyone who can reach this "
            "port can use the model and read or continue any conversation by its prefix",
            file=sys.stderr,
        )
    for name in ("max_queue", "max_body_bytes", "max_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"sirllm-agents serve: --{name.replace('_', '-')} must be at least 1")
    if args.handoff_idle < 0:
        raise SystemExit("sirllm-agents serve: --handoff-idle must be at least 0")
    try:
        config = _session_config(args)
        store = None
        if args.session_store is not None:
            store = open_store(
                args.session_store,
                owner=args.replica_name,
                lease_seconds=args.lease_seconds,
                blob_store=args.blob_store,
                large_blob_bytes=round(args.blob_store_min_mb * 2**20),
            )
        elif args.blob_store is not None:
            raise ValueError("--blob-store needs --session-store redis://...")
        engine = Engine(
            args.model,
            backend=args.backend,
            parallel=args.parallel,
            batch=args.batch,
            config=config,
            max_live_sessions=args.max_live_sessions,
            store=store,
        )
    except ValueError as error:
        raise SystemExit(f"sirllm-agents serve: {error}") from None
    settings = ServerSettings(
        api_key=api_key,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        default_max_tokens=args.max_tokens,
        handoff_idle_seconds=args.handoff_idle,
    )
    print(f"sirllm-agents serve: {engine.model.name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    _log_requests()
    # What loading left (~460k objects of torch, transformers and the tokenizer) is never garbage, yet every full
    # collection of the cyclic GC walks it again: a ~0.3 s pause in whichever request sets one off. Frozen, the
    # collector walks only what requests allocate (benchmarks/request_path.py).
    gc.collect()
    gc.freeze()
    # The server's own line per request (with its id, session, tokens and timings) replaces uvicorn's access log.
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="info", access_log=False)


def _log_requests() -> None:
    """The server's request lines and errors (logger ``sirllm_agents.server``) on standard error, unless the
    logger was already given a handler."""
    import logging

    log = logging.getLogger("sirllm_agents.server")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _inspect(path: str, html_out: str | None, last: int | None) -> None:
    from rich.console import Console

    from sirllm_agents.persistence import SessionFileError, read_memory

    from .memory_view import print_memory, render_html

    try:
        memory, document = read_memory(path)
    except SessionFileError as error:
        raise SystemExit(f"sirllm-agents inspect: {error}") from None
    if html_out:
        with open(html_out, "w", encoding="utf-8") as file:
            file.write(render_html(memory, document))
        print(f"wrote {html_out}")
    else:
        print_memory(memory, Console(), last_tokens=last)


if __name__ == "__main__":
    main()
