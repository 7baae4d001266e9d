"""Measure the per-token cost of JSON-schema constrained decoding with candidate grammar libraries on CPU.

Each library prepares the embedded SmolLM2 tokenizer (49152 tokens) once, then, several times over, compiles the same
tool-call schema and walks the tokens of a valid call: per token it computes the allowed-token mask, applies it to a
logits row and accepts the token. Run: ``python integrations/langchain/scripts/bench_grammar.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from sirllm_agents.loading import embedded_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
TARGET = {"name": "get_weather", "arguments": {"city": "San Francisco, California", "unit": "celsius", "days": 3}}
RUNS = 5

# One decoding step, a generator: it computes the allowed-token mask, yields, applies the mask to a logits row,
# checks that the token is allowed, and accepts it.
Step = Callable[[torch.Tensor, int], Iterator[None]]


def xgrammar_compiler(tokenizer, vocab: int) -> Callable[[], Step]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile_schema() -> Step:
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(SCHEMA, any_whitespace=False))
        bitmask = xgr.allocate_token_bitmask(1, vocab)

        def step(logits, token):
            matcher.fill_next_token_bitmask(bitmask)
            yield
            xgr.apply_token_bitmask_inplace(logits[None], bitmask)
            assert logits[token] > float("-inf") and matcher.accept_token(token)

        return step

    return compile_schema


def llguidance_compiler(tokenizer, vocab: int) -> Callable[[], Step]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    defaults = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile_schema() -> Step:
        matcher = llguidance.LLMatcher(info, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=defaults))
        bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

        def step(logits, token):
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            yield
            llguidance.torch.apply_token_bitmask_inplace(logits, bitmask[0])
            assert logits[token] > float("-inf") and matcher.consume_token(token), matcher.get_error()

        return step

    return compile_schema


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte in token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def outlines_core_compiler(tokenizer, vocab: int) -> Callable[[], Step]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from outlines_core.kernels.torch import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

    byte_of = {c: b for b, c in byte_level_alphabet().items()}
    tokens: dict[bytes, list[int]] = {}
    for text, index in tokenizer.get_vocab().items():
        if index not in tokenizer.all_special_ids:
            tokens.setdefault(bytes(byte_of[c] for c in text), []).append(index)
    vocabulary = Vocabulary(tokenizer.eos_token_id, tokens)

    def compile_schema() -> Step:
        guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary))
        mask = allocate_token_bitmask(vocab)

        def step(logits, token):
            fill_next_token_bitmask(guide, mask)
            yield
            apply_token_bitmask_inplace(logits[None], mask)
            assert logits[token] > float("-inf")
            guide.advance(token)

        return step

    return compile_schema


def lm_format_enforcer_compiler(tokenizer, vocab: int) -> Callable[[], Step]:
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer, TokenEnforcerTokenizerData

    # Its transformers helper imports a module that transformers 5 removed: build the same tokenizer data here.
    zero = tokenizer.encode("0")[-1]
    regular = []
    for index in range(vocab):
        if index not in tokenizer.all_special_ids:
            after_zero = tokenizer.decode([zero, index])[1:]
            regular.append((index, after_zero, len(after_zero) > len(tokenizer.decode([index]))))
    data = TokenEnforcerTokenizerData(regular, tokenizer.decode, tokenizer.eos_token_id, False, vocab)

    def compile_schema() -> Step:
        enforcer = TokenEnforcer(data, JsonSchemaParser(SCHEMA))
        prefix: list[int] = []

        def step(logits, token):
            allowed = enforcer.get_allowed_tokens(prefix)
            allowed = allowed if isinstance(allowed, list) else allowed.allowed_tokens
            yield
            keep = torch.full_like(logits, float("-inf"))
            keep[allowed] = 0
            logits += keep
            assert logits[token] > float("-inf")
            prefix.append(token)

        return step

    return compile_schema


def main() -> None:
    tokenizer = embedded_tokenizer()
    vocab = len(tokenizer)
    ids = tokenizer(json.dumps(TARGET), add_special_tokens=False)["input_ids"]
    logits = torch.randn(vocab)
    print(
        f"vocab {vocab}; {len(ids)} tokens per call; {RUNS} runs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'library':<20}{'tokenizer':>11}{'compile':>10}{'cold mask':>13}{'first mask':>12}{'mask p50':>11}"
        f"{'mask max':>10}"
        f"{'apply+accept':>12}"
    )
    for name, prepare in [
        ("xgrammar", xgrammar_compiler),
        ("llguidance", llguidance_compiler),
        ("outlines-core", outlines_core_compiler),
        ("lm-format-enforcer", lm_format_enforcer_compiler),
    ]:
        start = time.perf_counter()
        compile_schema = prepare(tokenizer, vocab)
        setup = time.perf_counter() - start
        compiles, firsts, masks, applies = [], [], [], []
        for _ in range(RUNS):
            start = time.perf_counter()
            step = compile_schema()
            compiles.append(time.perf_counter() - start)
            for i, token in enumerate(ids):
                row = logits.clone()
                parts = step(row, token)
                start = time.perf_counter()
                next(parts)
                middle = time.perf_counter()
                for _ in parts:
                    pass
                (firsts if i == 0 else masks).append(middle - start)
                applies.append(time.perf_counter() - middle)
        print(
            f"{name:<20}{setup * 1e3:>9.0f}ms{statistics.median(compiles) * 1e3:>8.1f}ms{firsts[0] * 1e3:>11.1f}ms"
            f"{statistics.median(firsts[1:]) * 1e3:>10.2f}ms{statistics.median(masks) * 1e3:>11.3f}ms"
            f"{max(masks) * 1e3:>8.2f}ms{statistics.median(applies) * 1e3:>12.3f}ms"
        )


if __name__ == "__main__":
    main()
