"""A session's cache settings: the one home of every default, validated where it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .policies import POLICIES, Policy, policy_class

DEFAULT_CACHE_SIZE = 1024
DEFAULT_POLICY = "supersede"
RECENT_SHARE = 8  # recent_size=None keeps the newest cache_size // 8 tokens under the entropy policies
MIN_FREE_SLOTS = 16  # room a cache keeps beyond sinks and protected recent tokens, so prefill can make progress
# Without keep_history a session records the newest HISTORY_TOKENS ingested tokens (up to twice as many) and the
# figures of its newest TURN_LOG_CALLS calls, so its memory and its files stay bounded however long it runs.
HISTORY_TOKENS = 8192
TURN_LOG_CALLS = 1024


@dataclass(frozen=True)
class SessionConfig:
    """How one session's KV cache is bounded.

    ``policy`` chooses who stays when the cache is full: ``"supersede"`` (the default: SirLLM over whole sentences,
    ranked by mean token entropy, where a restated subject keeps only its newest statement), ``"sirllm"`` (sinks +
    highest token entropy, the paper), ``"streaming"`` (sinks + newest), ``"full"`` (never evict), another variant
    (``"words"``, ``"sentences"``, ``"density"``, ``"structure"``; see ``sirllm_agents.policies``), or a
    :class:`~sirllm_agents.policies.Policy` object. ``cache_size=None`` means 1024 tokens, or the model's maximum
    length for ``"full"``. Under any policy the first ``start_size`` tokens (attention sinks) and the ``recent_size``
    newest are never evicted; ``recent_size=None`` means an eighth of the cache for the policies that rank by entropy
    (so replies keep their form) and none for ``"streaming"`` and ``"full"``.
    ``decay`` multiplies every stored score after each turn so old key tokens can fade. ``prefill_chunk`` bounds one
    forward pass. ``keep_history`` keeps the record of every token ingested and every call's figures (for the memory
    view of a whole conversation); by default a session keeps the newest ``HISTORY_TOKENS`` tokens' and
    ``TURN_LOG_CALLS`` calls' records, so its memory and files stay bounded.
    """

    cache_size: int | None = None
    start_size: int = 4
    recent_size: int | None = None
    decay: float = 1.0
    policy: str | Policy = DEFAULT_POLICY
    prefill_chunk: int = 512
    keep_history: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.policy, str) and self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if not isinstance(self.policy, (str, Policy)):
            raise ValueError(
                f"policy must be a built-in policy's name or a sirllm_agents.policies.Policy, got {self.policy!r}"
            )
        for name in ("start_size", "recent_size"):
            value = getattr(self, name)
            if (name == "start_size" or value is not None) and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay!r}")
        if not isinstance(self.keep_history, bool):
            raise ValueError(f"keep_history must be True or False, got {self.keep_history!r}")
        if not _is_int(self.prefill_chunk) or self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
        if self.cache_size is None:
            return
        if not _is_int(self.cache_size):
            raise ValueError(f"cache_size must be an integer or None, got {self.cache_size!r}")
        reserved = sum(self.protected(self.cache_size))
        if self.cache_size < reserved + MIN_FREE_SLOTS:
            window = " (recent_size: an eighth of the cache unless given)" if self.recent_size is None else ""
            raise ValueError(
                f"cache_size must be at least start_size + recent_size + {MIN_FREE_SLOTS} = "
                f"{reserved + MIN_FREE_SLOTS}, got {self.cache_size!r}{window}"
            )

    @classmethod
    def of(cls, config: SessionConfig | None = None, **settings: Any) -> SessionConfig:
        """``config`` (default: the defaults) with ``settings`` replacing some of its fields."""
        return replace(config or cls(), **settings)

    @classmethod
    def gather(cls, options: Any) -> Any:
        """``options`` (keyword arguments, as a dict) with any :class:`SessionConfig` fields among them folded into
        ``options["config"]``: how the adapters take ``cache_size=...`` beside ``config=...``. Non-dicts pass as is."""
        names = [f.name for f in fields(cls)]
        if not isinstance(options, dict) or not any(name in options for name in names):
            return options
        options = dict(options)
        settings = {name: options.pop(name) for name in names if name in options}
        options["config"] = cls.of(options.get("config"), **settings)
        return options

    def make_policy(self) -> Policy:
        """The policy object (a new one for a built-in policy's name)."""
        return policy_class(self.policy)() if isinstance(self.policy, str) else self.policy

    def protected(self, cache_size: int | None = None) -> tuple[int, int]:
        """The (attention sinks, newest tokens) that a full cache of ``cache_size`` (default: this config's) never
        evicts: what the settings give, the recent window by default an eighth of the cache for a policy that ranks
        by entropy (``Policy.scored``); none for a policy that never evicts."""
        kind = self._policy_kind
        if not kind.evicts:
            return 0, 0
        size = self.cache_size if cache_size is None else cache_size
        if self.recent_size is not None:
            return self.start_size, self.recent_size
        return self.start_size, size // RECENT_SHARE if kind.scored and size is not None else 0

    @property
    def _policy_kind(self) -> type[Policy] | Policy:
        """What the policy declares (``scored``, ``evicts``), read without making one."""
        return policy_class(self.policy) if isinstance(self.policy, str) else self.policy

    @property
    def policy_name(self) -> str:
        return self.policy if isinstance(self.policy, str) else self.policy.name

    def sized(self, max_length: int) -> SessionConfig:
        """This config with ``cache_size`` filled in for a model of ``max_length`` positions; a size past it is an
        error (cache positions past the model's length were never trained)."""
        size = self.cache_size
        if size is None:
            size = min(DEFAULT_CACHE_SIZE, max_length) if self._policy_kind.evicts else max_length
        if size > max_length:
            raise ValueError(
                f"cache_size {size} is larger than the model's maximum length {max_length}; cache positions past it "
                "were never trained"
            )
        return replace(self, cache_size=size, recent_size=self.protected(size)[1])

    @property
    def history_window(self) -> int | None:
        """How many of the newest ingested tokens the session's history records (None: all of them)."""
        return None if self.keep_history else HISTORY_TOKENS

    @property
    def turn_log_calls(self) -> int | None:
        """How many of the newest calls' figures the session keeps (None: all of them)."""
        return None if self.keep_history else TURN_LOG_CALLS

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON data (a built-in policy only: a policy object cannot be saved)."""
        if not isinstance(self.policy, str):
            raise ValueError(f"policy {self.policy.name!r} is not a built-in policy and cannot be saved")
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
