"""Grammar-constrained decoding: tool calls and JSON that even a 135M model always writes validly.

The grammars are compiled and enforced by llguidance (https://github.com/guidance-ai/llguidance): per decoded token it
computes the set of allowed tokens as a bitmask over the vocabulary, which the session applies to the logits before
sampling. On this project's 2-core CPU that costs about 0.05 ms per token for the embedded 49152-token vocabulary
(see ``integrations/langchain/README.md`` for the measurements against xgrammar, outlines-core and
lm-format-enforcer), next to about 70 ms for the model's forward pass.

JSON is written compactly with the separators of Python's ``json.dumps`` (``", "`` and ``": "``) and no other
whitespace, so small models cannot wander off into endless blank lines, and a call re-rendered with
:func:`sirllm_agents.tools.format_tool_call` is the text the model wrote.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.torch
import torch

from .closing import JsonCloser
from .tools import TOOL_CALL_END, TOOL_CALL_START, normalize_tools

if TYPE_CHECKING:
    from .generation import TokenConstraint
    from .model import Model

logger = logging.getLogger(__name__)

# Compact JSON with json.dumps separators; unknown keywords and formats are ignored rather than rejected.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


class GrammarConstraint:
    """A :class:`~sirllm_agents.generation.TokenConstraint` that keeps decoding inside an llguidance grammar.

    One instance serves one reply. Once the grammar is complete only the end-of-turn tokens stay allowed, and
    ``is_finished()`` tells the decode loop to stop.

    With a ``closer`` (JSON grammars), :meth:`closing` gives the tokens that would finish the value from any point,
    so the decode loop can close it within ``max_new_tokens`` (``closed_at_limit`` is then set)."""

    def __init__(self, model: Model, grammar: str, closer: JsonCloser | None = None):
        tokenizer = model.grammar_tokenizer
        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self._matcher.is_error():
            raise ValueError(f"the grammar was rejected: {self._matcher.get_error()}")
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, tokenizer.vocab_size)
        self._tokenizer = model.tokenizer
        self._closer = closer
        self.closed_at_limit = False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` (one row) with every token the grammar forbids set to ``-inf``."""
        llguidance.torch.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        masked = logits.clone()
        llguidance.torch.apply_token_bitmask_inplace(masked, self._bitmask[0].to(masked.device))
        return masked

    def accept(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    def is_finished(self) -> bool:
        return self._matcher.is_stopped() or self._matcher.is_error()

    def forces_text(self) -> bool:
        """Whether the grammar allows exactly one text next (a key, punctuation): no choice for the model."""
        return bool(self._matcher.compute_ff_bytes())

    def closing(self, token_ids: list[int]) -> list[int] | None:
        """The tokens that finish the value after the reply's ``token_ids``, or None when no closing is known."""
        if self._closer is None:
            return None
        rest = self._closer.close(self._tokenizer.decode(token_ids, skip_special_tokens=False))
        return None if rest is None else self._tokenizer.encode(rest, add_special_tokens=False)

    def can_close_with(self, tokens: list[int]) -> bool:
        """Whether the grammar, from where it is, takes ``tokens`` and is then complete."""
        if self._matcher.validate_tokens(tokens) != len(tokens):
            return False
        probe = self._matcher.deep_copy()
        probe.consume_tokens(tokens)
        return probe.is_accepting()


def json_schema_constraint(model: Model, schema: Mapping[str, Any], close_at_limit: bool = True) -> TokenConstraint:
    """Decode exactly one JSON value valid under ``schema``, closed within ``max_new_tokens`` (see
    :mod:`sirllm_agents.closing`) unless ``close_at_limit`` is false.

    Objects that do not say otherwise get ``additionalProperties: false``: a small model is kept to the declared
    keys."""
    closed = _closed(schema)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(closed, defaults=JSON_FORMAT)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"this JSON schema cannot be enforced: {error}")
    return GrammarConstraint(model, grammar, JsonCloser(closed) if close_at_limit else None)


def json_object_constraint(model: Model) -> TokenConstraint:
    """Decode exactly one JSON object (JSON mode: any keys, any values), closed within ``max_new_tokens``."""
    schema = {"type": "object"}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_FORMAT)
    return GrammarConstraint(model, grammar, JsonCloser(schema))


def tool_call_constraint(
    model: Model, tools: Sequence[Mapping[str, Any]], tool_choice: str = "required"
) -> TokenConstraint:
    """Decode exactly one tool call, ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, with the
    arguments valid under the tool's parameter schema.

    ``tool_choice`` is ``"required"`` (any of ``tools``) or the name of the tool to call."""
    specs = [t["function"] for t in normalize_tools(tools)]
    if tool_choice not in ("any", "required"):
        specs = [s for s in specs if s["name"] == tool_choice]
        if not specs:
            names = ", ".join(repr(t["function"]["name"]) for t in normalize_tools(tools))
            raise ValueError(f"tool_choice {tool_choice!r} is not one of the tools ({names}) or 'required'")
    calls = [_call_schema(spec) for spec in specs]
    schema = {"anyOf": calls, "x-guidance": JSON_FORMAT} if len(calls) > 1 else {**calls[0], "x-guidance": JSON_FORMAT}
    before, after = TOOL_CALL_START + "\n", "\n" + TOOL_CALL_END
    grammar = f"start: {json.dumps(before)} call {json.dumps(after)}\ncall: %json {json.dumps(schema)}\n"
    closer = JsonCloser(schema, prefix=before, suffix=after)
    return GrammarConstraint(model, llguidance.grammar_from("lark", grammar), closer)


def _call_schema(spec: Mapping[str, Any]) -> dict:
    arguments = _closed(spec.get("parameters") or {"type": "object", "properties": {}})
    error = llguidance.LLMatcher.validate_grammar(
        llguidance.LLMatcher.grammar_from_json_schema(arguments, defaults=JSON_FORMAT)
    )
    if error:
        logger.warning(
            "tool %r: its parameter schema cannot be enforced (%s); only a JSON object is", spec["name"], error
        )
        arguments = {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": spec["name"]}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _closed(schema: Mapping[str, Any]) -> dict:
    """A copy of ``schema`` where every object with ``properties`` and no ``additionalProperties`` gets ``false``."""

    def close(node: Any) -> Any:
        if isinstance(node, dict):
            node = {key: close(value) for key, value in node.items()}
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
        elif isinstance(node, list):
            node = [close(item) for item in node]
        return node

    return close(dict(schema))
