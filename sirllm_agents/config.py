"""A session's cache settings: the one home of every default, validated where it is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .policies import POLICIES, Policy, make_policy

DEFAULT_CACHE_SIZE = 1024
MIN_FREE_SLOTS = 16  # room a cache keeps beyond sinks and protected recent tokens, so prefill can make progress


@dataclass(frozen=True)
class SessionConfig:
    """How one session's KV cache is bounded.

    ``policy`` chooses who stays when the cache is full: ``"sirllm"`` (sinks + highest token entropy, the paper),
    ``"streaming"`` (sinks + newest), ``"full"`` (never evict), or a variant (``"words"``, ``"sentences"``,
    ``"structure"``; see ``sirllm_agents.policies``), or a :class:`~sirllm_agents.policies.Policy` object.
    ``cache_size=None`` means 1024 tokens, or the model's maximum length for ``"full"``. ``decay`` multiplies every
    stored score after each turn so old key tokens can fade. ``prefill_chunk`` bounds one forward pass.
    """

    cache_size: int | None = None
    start_size: int = 4
    recent_size: int = 0
    decay: float = 1.0
    policy: str | Policy = "sirllm"
    prefill_chunk: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.policy, str) and self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        for name in ("start_size", "recent_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay!r}")
        if not _is_int(self.prefill_chunk) or self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be a positive integer, got {self.prefill_chunk!r}")
        reserved = self.make_policy().start_size + self.make_policy().recent_size
        if self.cache_size is not None and (
            not _is_int(self.cache_size) or self.cache_size < reserved + MIN_FREE_SLOTS
        ):
            raise ValueError(
                f"cache_size must be at least start_size + recent_size + {MIN_FREE_SLOTS} = "
                f"{reserved + MIN_FREE_SLOTS}, got {self.cache_size!r}"
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
        if isinstance(self.policy, str):
            return make_policy(self.policy, self.start_size, self.recent_size)
        return self.policy

    @property
    def policy_name(self) -> str:
        return self.policy if isinstance(self.policy, str) else self.policy.name

    def sized(self, max_length: int) -> SessionConfig:
        """This config with ``cache_size`` filled in for a model of ``max_length`` positions; a size past it is an
        error (cache positions past the model's length were never trained)."""
        size = self.cache_size
        if size is None:
            size = max_length if self.policy_name == "full" else min(DEFAULT_CACHE_SIZE, max_length)
        if size > max_length:
            raise ValueError(
                f"cache_size {size} is larger than the model's maximum length {max_length}; cache positions past it "
                "were never trained"
            )
        return replace(self, cache_size=size)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON data (a built-in policy only: a policy object cannot be saved)."""
        if not isinstance(self.policy, str):
            raise ValueError(f"policy {self.policy.name!r} is not a built-in policy and cannot be saved")
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
