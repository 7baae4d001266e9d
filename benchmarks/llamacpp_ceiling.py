"""What llama.cpp, driven through llama-cpp-python as this project's llama.cpp backend drives it, can do on this
machine with `bench serve --workload agent`: the bound a SirLLM server on that backend meets, however little it adds.

The same workload as `sirllm-agents bench serve --workload agent` (`serve_load.agent_turns`: N conversations of
10 turns, each turn a ~100-token tool output and a 32-token greedy reply), run straight on llama.cpp's C API with no
server, no Python per token beyond a greedy argmax, and the most favourable schedule: one context of N sequences
(each its own KV stream, as `llama-server --parallel N --no-kv-unified` has them), every conversation's new prompt
tokens decoded in one call (a prefix cache: only what the conversation adds since its last turn), then the N
conversations' replies decoded together, one token each per call, no sequence ever evicting (4096 cells each).

Two ways per N, alternated so both meet the same load:

* ``last``: only the last prompt token's logits, as llama-server asks for;
* ``all``: every prompt token's logits, which SirLLM's token entropy needs.

It prints aggregate generated tokens per second over the whole run (the bench's figure), per N and way, medians of
``--repeats`` runs. Compare with `bench serve` on the same machine: a server on this backend does not pass ``last``,
and a SirLLM server pays at least the difference to ``all``. llama.cpp's own C++ `llama-server` is not bound by it
(measured 9% faster at 1 and 4 conversations, 10% slower at 8: the bench README).

    python benchmarks/llamacpp_ceiling.py [--counts 1 4 8] [--turns 10] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import llama_cpp as llama
import numpy as np
from sirllm_agents_apps.bench.serve_load import agent_turns

from sirllm_agents.loading import embedded_model_path, embedded_tokenizer

CELLS = 4096  # per sequence: the whole conversation fits, as in llama-server's slots
BATCH = 512  # tokens per llama_decode call, llama-server's default micro-batch
WAYS = ("last", "all")


def run(model, tokenizer, conversations: int, turns: int, max_tokens: int, threads: int, way: str) -> dict:
    """One run of the workload; its wall time and generated tokens."""
    params = llama.llama_context_default_params()
    params.n_ctx = conversations * CELLS
    params.n_batch = params.n_ubatch = BATCH
    params.n_seq_max = conversations
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    context = llama.llama_init_from_model(model, params)
    memory = llama.llama_get_memory(context)
    batch = llama.llama_batch_init(BATCH, 0, 1)
    vocab = llama.llama_n_vocab(llama.llama_model_get_vocab(model))
    stops = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>"])}
    script = [agent_turns(c, turns) for c in range(conversations)]
    messages: list[list[dict]] = [[] for _ in range(conversations)]
    cached: list[list[int]] = [[] for _ in range(conversations)]  # each sequence's tokens in its KV cells

    def decode(items: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """(sequence, position, token, wants logits) in one call; the logits rows asked for, in order."""
        batch.n_tokens = len(items)
        for i, (sequence, position, token, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = sequence
        status = llama.llama_decode(context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} on {len(items)} tokens")
        rows = sum(logits for *_, logits in items)
        return np.ctypeslib.as_array(llama.llama_get_logits(context), shape=(rows, vocab))

    generated = 0
    start = time.perf_counter()
    for turn in range(turns):
        last_logits = []
        for c in range(conversations):
            messages[c] += script[c][turn]
            text = tokenizer.apply_chat_template(messages[c], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            common = 0
            while common < min(len(ids), len(cached[c])) and ids[common] == cached[c][common]:
                common += 1
            common = min(common, len(ids) - 1)  # at least one token to decode, for its logits
            llama.llama_memory_seq_rm(memory, c, common, -1)
            for begin in range(common, len(ids), BATCH):
                chunk = ids[begin : begin + BATCH]
                wants = [way == "all" or begin + i == len(ids) - 1 for i in range(len(chunk))]
                rows = decode([(c, begin + i, t, w) for i, (t, w) in enumerate(zip(chunk, wants))])
            last_logits.append(rows[-1].copy())
            cached[c] = list(ids)
        replies: list[list[int]] = [[] for _ in range(conversations)]
        live = list(range(conversations))
        next_tokens = {c: int(np.argmax(last_logits[c])) for c in live}
        for _ in range(max_tokens):
            live = [c for c in live if next_tokens[c] not in stops]
            if not live:
                break
            for c in live:
                replies[c].append(next_tokens[c])
            if len(replies[live[0]]) == max_tokens:
                break
            rows = decode([(c, len(cached[c]), next_tokens[c], True) for c in live])
            for c in live:
                cached[c].append(next_tokens[c])
            next_tokens.update({c: int(np.argmax(row)) for c, row in zip(live, rows)})
        for c in range(conversations):
            generated += len(replies[c])
            messages[c].append({"role": "assistant", "content": tokenizer.decode(replies[c])})
    seconds = time.perf_counter() - start
    llama.llama_batch_free(batch)
    llama.llama_free(context)
    return {"seconds": seconds, "generated": generated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own log lines
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(str(embedded_model_path()).encode(), llama.llama_model_default_params())
    tokenizer = embedded_tokenizer()
    print(f"llama.cpp alone, {args.threads} threads, {args.turns} turns, {args.max_tokens}-token greedy replies")
    print("| conversations | prompt logits | gen tokens | seconds (median) | gen tok/s |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for count in args.counts:
        runs: dict[str, list[dict]] = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                runs[way].append(run(model, tokenizer, count, args.turns, args.max_tokens, args.threads, way))
        for way in WAYS:
            seconds = statistics.median(r["seconds"] for r in runs[way])
            generated = runs[way][0]["generated"]
            print(f"| {count} | {way} | {generated} | {seconds:.2f} | {generated / seconds:.1f} |", flush=True)
    llama.llama_model_free(model)


if __name__ == "__main__":
    main()
