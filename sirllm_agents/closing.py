"""The shortest way to finish a JSON value that a constrained reply has begun, under its schema.

When a grammar-constrained reply is about to run out of ``max_new_tokens``, the decode loop writes this closing
instead of letting the limit cut the value off: an open string is closed, a half-written key completed, every
required key still missing is added with the smallest value its schema allows (``""``, ``0`` or the minimum, the
shortest enum member, ``[]`` or ``minItems`` smallest items, an object of its own required keys), and the open arrays
and objects are closed. The text follows the compact layout the grammar enforces (``", "`` and ``": "``; see
:mod:`sirllm_agents.constrained`). Where no closing can be built here (a string held to a ``pattern`` or ``format``,
a schema this module does not read), :meth:`JsonCloser.close` says None and the reply may still be cut off, which
the callers then report as ``finish_reason="length"``. The grammar's matcher checks every closing before it is
written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "
_NUMBER_CHARS = frozenset("-+.eE0123456789")
_LITERALS = ("true", "false", "null")


class _Unclosable(Exception):
    """The text so far does not follow the schema as this module reads it, or its value cannot be closed here."""


class JsonCloser:
    """Closes ``prefix`` + a JSON value under ``schema`` + ``suffix`` (the tool-call markup around a call's JSON)."""

    def __init__(self, schema: Mapping[str, Any], prefix: str = "", suffix: str = ""):
        self.root = dict(schema)
        self.prefix, self.suffix = prefix, suffix

    def close(self, text: str) -> str | None:
        """The text that completes ``text`` (what the reply wrote so far) into a whole valid reply, or None."""
        try:
            if not text.startswith(self.prefix):
                if not self.prefix.startswith(text):
                    return None
                return self.prefix[len(text) :] + self.minimal(self.root) + self.suffix
            body = text[len(self.prefix) :]
            end, rest = self._value(body, 0, self.root)
        except _Unclosable:
            return None
        if rest is not None:
            return rest + self.suffix
        tail = body[end:]
        return self.suffix[len(tail) :] if self.suffix.startswith(tail) else None

    # -- the smallest value of a schema ----------------------------------------------------------------------------

    def minimal(self, schema: Mapping[str, Any]) -> str:
        """The shortest JSON text (in this module's reading) valid under ``schema``."""
        schema = self._resolve(schema)
        if "const" in schema:
            return _dumps(schema["const"])
        if "enum" in schema:
            return min((_dumps(v) for v in schema["enum"]), key=len)
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            return _shortest(self._minimal_or_none(branch) for branch in branches)
        kinds = schema.get("type")
        if isinstance(kinds, list):
            return _shortest(self._minimal_or_none({**schema, "type": kind}) for kind in kinds)
        kind = kinds or ("object" if "properties" in schema else "array" if "items" in schema else "null")
        if kind == "object":
            return "{" + self._pairs(schema, list(schema.get("required", [])), first=True) + "}"
        if kind == "array":
            item = self.minimal(schema.get("items") or {})
            return "[" + ITEM_SEPARATOR.join([item] * int(schema.get("minItems", 0))) + "]"
        if kind == "string":
            if "pattern" in schema or "format" in schema:
                raise _Unclosable("a string held to a pattern or format")
            return '"' + "a" * int(schema.get("minLength", 0)) + '"'
        if kind in ("integer", "number"):
            return str(_smallest_number(schema, kind))
        if kind == "boolean":
            return "false"
        if kind == "null":
            return "null"
        raise _Unclosable(f"unknown type {kind!r}")

    def _minimal_or_none(self, schema: Mapping[str, Any]) -> str | None:
        try:
            return self.minimal(schema)
        except _Unclosable:
            return None

    def _pairs(self, schema: Mapping[str, Any], keys: list[str], first: bool) -> str:
        """``"key": smallest`` for each of ``keys``, separated, led by a separator unless ``first``."""
        properties = schema.get("properties", {})
        pairs = [f"{_dumps(key)}{KEY_SEPARATOR}{self.minimal(properties.get(key, {}))}" for key in keys]
        text = ITEM_SEPARATOR.join(pairs)
        return text if first or not text else ITEM_SEPARATOR + text

    # -- reading the value written so far --------------------------------------------------------------------------
    # Each reader returns (end, None) when the value ends at ``end`` in the text, or (None, rest) when the text ends
    # inside it and ``rest`` is what closes it.

    def _value(self, text: str, i: int, schema: Mapping[str, Any]) -> tuple[int | None, str | None]:
        schema = self._resolve(schema)
        if i == len(text):
            return None, self.minimal(schema)
        if "const" in schema or "enum" in schema:
            return _one_of_texts(text, i, [_dumps(v) for v in schema.get("enum", [schema.get("const")])])
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            return self._branches(text, i, branches)
        kind = schema.get("type")
        if isinstance(kind, list):
            return self._branches(text, i, [{**schema, "type": k} for k in kind])
        first = text[i]
        readers = {"{": ("object", self._object), "[": ("array", self._array), '"': ("string", self._string)}
        if first in readers:
            expected, reader = readers[first]
            if kind not in (None, expected):
                raise _Unclosable(f"{expected} where the schema has {kind}")
            return reader(text, i, schema)
        if first in _NUMBER_CHARS:
            if kind not in (None, "integer", "number"):
                raise _Unclosable(f"a number where the schema has {kind}")
            return _number(text, i, schema)
        literals = {None: _LITERALS, "boolean": ("true", "false"), "null": ("null",)}
        if kind not in literals:
            raise _Unclosable(f"a literal where the schema has {kind}")
        return _one_of_texts(text, i, list(literals[kind]))

    def _branches(self, text: str, i: int, branches: list) -> tuple[int | None, str | None]:
        """The first branch the text follows that ends, else the shortest closing among the open ones."""
        open_rests = []
        for branch in branches:
            try:
                end, rest = self._value(text, i, branch)
            except _Unclosable:
                continue
            if rest is None:
                return end, None
            open_rests.append(rest)
        if not open_rests:
            raise _Unclosable("no branch of anyOf / oneOf follows the text")
        return None, min(open_rests, key=len)

    def _object(self, text: str, i: int, schema: Mapping[str, Any]) -> tuple[int | None, str | None]:
        """An object; its keys come in the order the schema declares them (the grammar holds them to it)."""
        properties = schema.get("properties", {})
        order = list(properties) + [key for key in schema.get("required", []) if key not in properties]
        required = set(schema.get("required", []))
        seen: list[str] = []
        i += 1

        def missing(also: str | None = None) -> list[str]:
            return [key for key in order if key in required and key not in seen and key != also]

        while True:
            if i == len(text):
                return None, self._pairs(schema, missing(), first=not seen) + "}"
            if text[i] == "}":
                return i + 1, None
            if seen:
                i, rest = _separator(text, i, ITEM_SEPARATOR)
                if rest is not None:
                    return None, rest + self._next_pair(schema, order, seen, missing()) + "}"
            if i == len(text):
                return None, self._next_pair(schema, order, seen, missing()) + "}"
            end, partial = _string_end(text, i)
            if end is None:  # inside the key
                key = self._key_from(schema, order, partial, seen, required)
                value = self.minimal(properties.get(key, {}))
                rest = _string_rest(partial, key) + KEY_SEPARATOR + value
                return None, rest + self._pairs(schema, missing(key), first=False) + "}"
            key = json.loads(text[i:end])
            i, rest = _separator(text, end, KEY_SEPARATOR)
            if rest is not None:
                value = self.minimal(properties.get(key, {}))
                return None, rest + value + self._pairs(schema, missing(key), first=False) + "}"
            end, rest = self._value(text, i, properties[key] if key in properties else _extra(schema))
            if rest is not None:
                return None, rest + self._pairs(schema, missing(key), first=False) + "}"
            seen.append(key)
            i = end

    def _next_pair(self, schema: Mapping[str, Any], order: list[str], seen: list[str], missing: list[str]) -> str:
        """The pairs to write after a separator: the missing required keys, or else the next declared key."""
        if missing:
            return self._pairs(schema, missing, first=True)
        unused = _after(order, seen)
        if not unused:
            raise _Unclosable("a separator with no key left to write")
        return self._pairs(schema, unused[:1], first=True)

    def _key_from(
        self, schema: Mapping[str, Any], order: list[str], partial: str, seen: list[str], required: set[str]
    ) -> str:
        """The key a half-written key name can become: the first declared key after those written that it begins,
        none of the required keys between them skipped."""
        begun = _unescaped(partial)
        for key in _after(order, seen):
            if key.startswith(begun):
                return key
            if key in required:
                break
        if schema.get("additionalProperties", True) is not False:
            return begun
        raise _Unclosable(f"no key starts with {partial!r}")

    def _array(self, text: str, i: int, schema: Mapping[str, Any]) -> tuple[int | None, str | None]:
        items = schema.get("items") or {}
        least = int(schema.get("minItems", 0))
        count = 0
        i += 1

        def more(written: int) -> str:
            return (ITEM_SEPARATOR + self.minimal(items)) * max(0, least - written)

        while True:
            if i == len(text):
                if count == 0:
                    return None, ITEM_SEPARATOR.join([self.minimal(items)] * least) + "]"
                return None, more(count) + "]"
            if text[i] == "]":
                return i + 1, None
            if count:
                i, rest = _separator(text, i, ITEM_SEPARATOR)
                if rest is not None:
                    return None, rest + self.minimal(items) + more(count + 1) + "]"
            end, rest = self._value(text, i, items)
            count += 1
            if rest is not None:
                return None, rest + more(count) + "]"
            i = end

    def _string(self, text: str, i: int, schema: Mapping[str, Any]) -> tuple[int | None, str | None]:
        end, partial = _string_end(text, i)
        if end is not None:
            return end, None
        if "pattern" in schema or "format" in schema:
            raise _Unclosable("inside a string held to a pattern or format")
        rest = _escape_rest(partial)
        written = len(_unescaped(partial + rest))
        return None, rest + "a" * max(0, int(schema.get("minLength", 0)) - written) + '"'

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """``schema`` with local ``$ref`` followed and ``allOf`` merged."""
        seen = 0
        while isinstance(schema, Mapping) and "$ref" in schema:
            seen += 1
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#") or seen > 32:
                raise _Unclosable(f"cannot follow $ref {ref!r}")
            node: Any = self.root
            for part in [p for p in ref[1:].split("/") if p]:
                node = node[part.replace("~1", "/").replace("~0", "~")]
            schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
        if not isinstance(schema, Mapping):
            raise _Unclosable("a schema that is not an object")
        if "allOf" in schema:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part)
                merged["properties"] = {**merged.get("properties", {}), **part.get("properties", {})}
                merged["required"] = [*merged.get("required", []), *part.get("required", [])]
                merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
            schema = merged
        return schema


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR))


def _shortest(texts) -> str:
    found = [t for t in texts if t is not None]
    if not found:
        raise _Unclosable("no branch can be closed")
    return min(found, key=len)


def _smallest_number(schema: Mapping[str, Any], kind: str) -> int | float:
    low = schema.get("minimum")
    if schema.get("exclusiveMinimum") is not None and not isinstance(schema["exclusiveMinimum"], bool):
        low = schema["exclusiveMinimum"] + 1 if kind == "integer" else None
    high = schema.get("maximum")
    value = 0
    if low is not None and low > 0:
        value = low
    elif high is not None and high < 0:
        value = high
    if kind == "integer":
        if value != int(value):
            raise _Unclosable("a bound that is not an integer")
        return int(value)
    return value


def _after(order: list[str], seen: list[str]) -> list[str]:
    """The declared keys that may still follow the keys written (in order)."""
    last = max((order.index(key) for key in seen if key in order), default=-1)
    return [key for key in order[last + 1 :] if key not in seen]


def _extra(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    extra = schema.get("additionalProperties", True)
    if extra is False:
        raise _Unclosable("a key the schema does not declare")
    return extra if isinstance(extra, Mapping) else {}


def _separator(text: str, i: int, separator: str) -> tuple[int, str | None]:
    """Past ``separator`` at ``i``: (its end, None), or (end of text, the rest of it) when the text ends in it."""
    got = text[i : i + len(separator)]
    if got == separator:
        return i + len(separator), None
    if i + len(got) == len(text) and separator.startswith(got):
        return len(text), separator[len(got) :]
    raise _Unclosable(f"expected {separator!r}")


def _string_end(text: str, i: int) -> tuple[int | None, str]:
    """The end of the JSON string opening at ``i`` (past its closing quote), or (None, what follows the opening
    quote) when the text ends inside it."""
    if text[i] != '"':
        raise _Unclosable("expected a string")
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 6 if text[j + 1 : j + 2] == "u" else 2
        elif text[j] == '"':
            return j + 1, ""
        else:
            j += 1
    partial = text[i + 1 :]
    if "\ufffd" in partial[-1:]:  # the text ends inside a multi-byte character
        raise _Unclosable("inside a character")
    return None, partial


def _escape_rest(partial: str) -> str:
    """What finishes an escape sequence cut off at the end of ``partial`` ("" when none is)."""
    tail = partial[-6:]
    slash = tail.rfind("\\")
    if slash < 0:
        return ""
    backslashes = len(tail[: slash + 1]) - len(tail[: slash + 1].rstrip("\\"))
    if backslashes % 2 == 0:
        return ""
    escape = tail[slash:]
    if escape == "\\":
        return "\\"
    if escape.startswith("\\u"):
        return "0" * (6 - len(escape))
    return ""


def _string_rest(partial: str, key: str) -> str:
    """The rest of ``key``'s JSON string after ``partial`` (what was written after its opening quote)."""
    whole = _dumps(key)[1:]
    if not whole.startswith(partial):
        raise _Unclosable(f"the key {key!r} is not spelled as {partial!r} began it")
    return whole[len(partial) :]


def _unescaped(partial: str) -> str:
    try:
        return json.loads('"' + partial + _escape_rest(partial) + '"')
    except ValueError as error:
        raise _Unclosable(f"a string that cannot be read: {error}") from None


def _one_of_texts(text: str, i: int, options: list[str]) -> tuple[int | None, str | None]:
    """One of the literal ``options`` at ``i``: (its end, None), or (None, its rest) when the text ends in it."""
    written = text[i:]
    done = [o for o in options if written.startswith(o)]
    if done:
        return i + len(max(done, key=len)), None
    started = [o for o in options if o.startswith(written)]
    if not started:
        raise _Unclosable(f"none of {options} at {written[:20]!r}")
    return None, min(started, key=len)[len(written) :]


def _number(text: str, i: int, schema: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """A number; one the text ends in is finished with a digit where it needs one, and an integer below its
    ``minimum`` grows digits until it reaches it (the grammar then takes "3" -> "30" for a minimum of 18)."""
    j = i
    while j < len(text) and text[j] in _NUMBER_CHARS:
        j += 1
    if j < len(text):
        return j, None
    written = text[i:]
    if written[-1] in "-+.eE":
        return None, "0"
    low = schema.get("minimum")
    if low is None or not written.isdigit():
        return None, ""
    zeros = ""
    while int(written + zeros) < low:
        if int(written) == 0:
            raise _Unclosable("an integer below its minimum")
        zeros += "0"
    return None, zeros
