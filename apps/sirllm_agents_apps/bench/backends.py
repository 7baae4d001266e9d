"""What each backend costs and how close it stays to float32 PyTorch, on the embedded model.

* **Session overhead on llama.cpp**: per generated token, a session on the llama.cpp backend (entropy bookkeeping,
  every token's logits, the reply's text) against a bare llama.cpp loop on the same weights (``llama_decode`` of one
  token, then the argmax of its logits), on the same prompts and the same number of tokens.
* **PyTorch variants**: float32, bfloat16 and int8 dynamic quantization (``torch.ao``): prefill and decode speed, and
  greedy agreement with float32 (the share of replies whose first tokens are all equal, and the share of tokens
  equal before the first difference). The llama.cpp backend is scored the same way against float32.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np
import torch

from sirllm_agents import Engine, SessionConfig
from sirllm_agents.loading import embedded_model_path
from sirllm_agents.model import Model

TOPICS = ("photosynthesis", "the moon", "tax forms", "a bicycle", "coffee", "the ocean", "chess", "volcanoes")
TOPICS += ("trains", "bread", "the internet", "bees", "glaciers", "a violin", "elections", "rainbows", "fungi")
ASKS = ("Explain {} to a child.", "Write a short poem about {}.", "Give three facts about {}.")


def prompts(n: int) -> list[list[dict]]:
    """``n`` different one-turn conversations, the same every run."""
    asks = [ask.format(topic) for topic in TOPICS for ask in ASKS]
    return [[{"role": "user", "content": asks[i % len(asks)]}] for i in range(n)]


def _session_config() -> SessionConfig:
    return SessionConfig(cache_size=1024)


def greedy(engine: Engine, conversation: list[dict], tokens: int) -> tuple[list[int], float, float, int]:
    """A fresh session's greedy reply of at most ``tokens`` tokens: (token ids, prefill s, decode-loop s per token,
    prompt tokens). The decode loop is timed from the first streamed piece to the last, so it leaves out the
    prefill and the turn's close (the end-of-turn marker ingested after the reply)."""
    session = engine.session(_session_config())
    stream = session.stream(conversation, max_new_tokens=tokens)
    stamps = [time.perf_counter() for _ in stream]
    reply = stream.finish()
    per_token = (stamps[-1] - stamps[0]) / max(1, len(reply.token_ids) - 1)
    return reply.token_ids, reply.stats.prefill_seconds, per_token, reply.stats.input_tokens


def bare_llamacpp_per_token(model: Model, conversation: list[dict], tokens: int, threads: int) -> float:
    """Seconds per token of a bare llama.cpp greedy loop on the prompt of ``conversation``, one token per decode."""
    import llama_cpp as llama

    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 1024, 512, 512
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the backend runs
    context = llama.llama_init_from_model(model.backend.model, params)
    try:
        ids = model.encode(model.template.render(conversation, add_generation_prompt=True))
        prompt = (llama.llama_token * len(ids))(*ids)  # the batch points into it: keep it alive through the decode
        if llama.llama_decode(context, llama.llama_batch_get_one(prompt, len(ids))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        vocab = model.backend.vocab_size
        token = int(np.argmax(np.ctypeslib.as_array(llama.llama_get_logits_ith(context, -1), shape=(vocab,))))
        start = time.perf_counter()
        for _ in range(tokens):
            one = (llama.llama_token * 1)(token)
            if llama.llama_decode(context, llama.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed while decoding")
            logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(context, -1), shape=(vocab,))
            token = int(np.argmax(logits))
        return (time.perf_counter() - start) / tokens
    finally:
        llama.llama_free(context)


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How far ``other``'s greedy replies follow ``reference``'s."""
    same = sum(a == b for a, b in zip(reference, other))
    prefix = []
    for a, b in zip(reference, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(1, len(a)))
    return {"identical_replies": same / len(reference), "mean_shared_prefix": statistics.mean(prefix)}


def _int8(engine: Engine) -> Engine:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice: measured here, not offered
        weights = quantize_dynamic(engine.model.backend.weights, {torch.nn.Linear}, dtype=torch.qint8)
    return Engine(weights, tokenizer=engine.model.tokenizer)


def run(n_prompts: int, tokens: int, threads: int, progress=None, torch_variants: bool = True) -> dict:
    """Every measurement above (without the PyTorch variants when not ``torch_variants``; llama.cpp's agreement is
    then not scored); ``progress(label)`` is called before each configuration."""
    conversations = prompts(n_prompts)
    variants = {}

    def measure(label: str, engine: Engine) -> list[list[int]]:
        if progress:
            progress(label)
        replies, prefill_rates, per_token = [], [], []
        for conversation in conversations:
            ids, prefill, step, prompt_tokens = greedy(engine, conversation, tokens)
            replies.append(ids)
            prefill_rates.append(prompt_tokens / prefill)
            per_token.append(step)
        variants[label] = {
            "prefill_tokens_per_s": statistics.median(prefill_rates),
            "decode_tokens_per_s": 1 / statistics.median(per_token),
        }
        return replies

    reference = None
    if torch_variants:
        fp32 = Engine(backend="torch")
        reference = measure("torch float32", fp32)
        for label, engine in (
            ("torch bfloat16", Engine(backend="torch", dtype="bfloat16")),
            ("torch int8 dynamic", _int8(fp32)),
        ):
            variants[label]["agreement_with_float32"] = agreement(reference, measure(label, engine))
    results = {
        "task": "backends",
        "prompts": n_prompts,
        "tokens": tokens,
        "threads": threads,
        "variants": variants,
    }
    try:
        cpp = Engine(backend="llamacpp", threads=threads)
    except Exception as error:  # not installed, or refused: say so in the results
        results["llamacpp"] = f"skipped: {error}"
        return results
    replies = measure("llamacpp Q4_1", cpp)
    if reference is not None:
        variants["llamacpp Q4_1"]["agreement_with_float32"] = agreement(reference, replies)
    if progress:
        progress("bare llama.cpp loop")
    bare, session = [], []
    for conversation in conversations[: max(5, n_prompts // 5)]:
        _, _, step, _ = greedy(cpp, conversation, tokens)
        session.append(step)
        bare.append(bare_llamacpp_per_token(cpp.model, conversation, tokens, threads))
    results["llamacpp_session_overhead"] = {
        "session_s_per_token": statistics.median(session),
        "bare_s_per_token": statistics.median(bare),
        "ratio": statistics.median(session) / statistics.median(bare),
        "gguf": str(embedded_model_path().name),
    }
    return results
