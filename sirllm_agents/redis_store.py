"""A session store in Redis, shared by replicas on any number of machines, with fenced leases.

Each session has five keys, all under one hash tag (``sirllm:{<file key>}:...``) so that a Redis Cluster keeps them
in one slot, where one Lua script may touch them all:

- ``lease``: ``"<token> <owner>"``, set with ``NX`` and a ``PX`` expiry. ``token`` is the **fencing token**: the value
  of ``epoch``, incremented by the same script that takes the lease, so every grant of a session gets a larger one.
- ``epoch``: the last token granted (kept when the session is deleted, so tokens never go back).
- ``blob``: the session file's bytes (:func:`~sirllm_agents.persistence.session_bytes`: safetensors and JSON, never
  pickle, with its checksum), or, for a large session with a blob store configured
  (:class:`~sirllm_agents.s3_blobs.S3Blobs`), a pointer to an object written there under a key of its own before the
  commit; ``blob.previous``: the commit before it.
- ``meta`` / ``meta.previous``: a hash per blob: the token and owner that wrote it, its size, checksum and time.

Every write is one script that first checks the lease is still ``"<token> <owner>"`` of this store and that no
commit with a larger token exists: a replica that stalled (paused, partitioned) past its lease and was taken over has
its commit refused with :class:`~sirllm_agents.store.SessionBusyError`, and its pool drops the stale copy. A commit
moves the current blob to ``blob.previous`` before writing the new one, so a blob found corrupted when read (checksum
mismatch) is refused with :class:`~sirllm_agents.persistence.SessionFileError`, logged, and the previous commit is
read instead. Leases are renewed every third of ``lease_seconds`` while held (compare-and-``PEXPIRE``) and given up
by compare-and-delete.

Redis must not evict these keys (``maxmemory-policy noeviction``) and should log writes (``appendonly yes``); see
``docs/scaling.md`` for what a failover can and cannot lose.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import redis

from .persistence import SessionFileError, read_session_bytes, session_bytes
from .session import Session
from .store import (
    DEFAULT_LEASE_SECONDS,
    SessionBusyError,
    SessionStore,
    SessionStoreUnavailable,
    file_key,
    renew_leases,
)

if TYPE_CHECKING:
    from .model import Model
    from .s3_blobs import S3Blobs

log = logging.getLogger(__name__)

DEFAULT_LARGE_BLOB_BYTES = 16 * 2**20  # with a blob store, sessions this large or larger go to it

# KEYS: lease, epoch. ARGV: owner, ttl ms, the lease value this store holds ("" if none).
# Returns {0, value} when granted (or still ours, then extended), {1, holder's value, ms left} when another holds it.
# A lease under our own owner name that is not the one we hold (a previous run of this replica, or a grant whose
# release failed) is taken over at once: its holder, if alive, has its commits refused by the new token.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  if current == ARGV[3] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {0, current}
  end
  local space = string.find(current, ' ', 1, true)
  if not space or string.sub(current, space + 1) ~= ARGV[1] then
    return {1, current, redis.call('PTTL', KEYS[1])}
  end
end
local value = redis.call('INCR', KEYS[2]) .. ' ' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {0, value}
"""

# KEYS: lease. ARGV: our value, ttl ms. 1 when extended, 0 when the lease is no longer ours.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease. ARGV: our value.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# The value of a blob key that points to an object in the blob store (S3) instead of holding the bytes. Session
# bytes never start so: their first 8 bytes are a header length far past any real one.
POINTER = b"sirllm-s3:"

# Returns the value of KEYS[i] when it is a pointer, else ''. ARGV[k]: POINTER.
_POINTER_AT = """
local function pointer_at(key, marker)
  if redis.call('GETRANGE', key, 0, string.len(marker) - 1) == marker then
    return redis.call('GET', key)
  end
  return ''
end
"""

# KEYS: lease, blob, blob.previous, meta, meta.previous. ARGV: our value, our token, ttl ms, POINTER, the blob, then
# the meta hash's field/value pairs. {1, the pointer the commit dropped or ''}: committed; {0}: the lease is not ours;
# {-1}: a commit with a larger token exists.
_COMMIT = (
    _POINTER_AT
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0}
end
local last = tonumber(redis.call('HGET', KEYS[4], 'token') or '0')
if tonumber(ARGV[2]) < last then
  return {-1}
end
local dropped = pointer_at(KEYS[3], ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('RENAME', KEYS[4], KEYS[5])
end
redis.call('SET', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[4], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, dropped}
"""
)

# KEYS: lease, blob, blob.previous, meta, meta.previous. ARGV: our value, POINTER. {1, the pointers dropped, or ''}:
# deleted; {0}: the lease is not ours.
_DELETE = (
    _POINTER_AT
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {0}
end
local dropped = {1, pointer_at(KEYS[2], ARGV[2]), pointer_at(KEYS[3], ARGV[2])}
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return dropped
"""
)


class SessionKeys:
    """The Redis keys of one session (for an operator's ``redis-cli``: :meth:`RedisStore.keys` gives them)."""

    def __init__(self, prefix: str, session_id: str):
        base = f"{prefix}{{{file_key(session_id)}}}"
        self.lease, self.epoch = f"{base}:lease", f"{base}:epoch"
        self.blob, self.previous = f"{base}:blob", f"{base}:blob.previous"
        self.meta, self.meta_previous = f"{base}:meta", f"{base}:meta.previous"

    @property
    def written(self) -> list[str]:
        """The keys a commit or a deletion touches, in the scripts' order."""
        return [self.lease, self.blob, self.previous, self.meta, self.meta_previous]


class RedisStore(SessionStore):
    """Sessions in Redis at ``url`` (``redis://host:port/db``, ``rediss://`` for TLS, ``unix://``), shared by every
    process that uses the same URL and ``prefix``, with a fenced lease per session (see the module docstring).

    ``owner`` names this process in leases and errors (default ``host:pid``), and must be unique among the processes
    running: a lease held under this owner that this store did not grant itself (a previous run of the same replica)
    is taken over at once rather than waited for. ``lease_seconds`` is how long a lease lasts unless renewed, so how
    long a crashed process's sessions stay blocked. ``client`` replaces the connection
    made from ``url`` (for example one from ``redis.Sentinel(...).master_for(...)``; ``url`` then only names it in
    errors). With ``large_blobs`` (:class:`~sirllm_agents.s3_blobs.S3Blobs`), a session of ``large_blob_bytes`` or
    more is written there under a new object key, and the commit stores a pointer to it; the object a commit or a
    deletion drops is deleted after it."""

    shared = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        owner: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        prefix: str = "sirllm:",
        client: redis.Redis | None = None,
        large_blobs: S3Blobs | None = None,
        large_blob_bytes: int = DEFAULT_LARGE_BLOB_BYTES,
    ):
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
        self.url = _redacted(url)  # for logs and errors: the URL without its password
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        if " " in self.owner:
            raise ValueError(f"owner must not contain spaces (it is stored after the lease's token): {self.owner!r}")
        self.lease_seconds = float(lease_seconds)
        self.prefix = prefix
        self.large_blobs, self.large_blob_bytes = large_blobs, large_blob_bytes
        # A stalled Redis is an error that says so rather than a hung request; long enough for a commit of tens of MB
        # on a busy machine (a timed-out commit is a turn refused).
        timeout = max(5.0, self.lease_seconds / 3)
        self._redis = client or redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._acquire, self._renew_script = self._redis.register_script(_ACQUIRE), self._redis.register_script(_RENEW)
        self._release, self._commit = self._redis.register_script(_RELEASE), self._redis.register_script(_COMMIT)
        self._delete = self._redis.register_script(_DELETE)
        self._held: dict[str, str] = {}  # session id -> our lease's value, "<token> <owner>"
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self.last_commit: tuple[int, float] | None = None  # (bytes, seconds) of this store's latest commit

    def keys(self, session_id: str) -> SessionKeys:
        """Where ``session_id`` is kept in Redis."""
        return SessionKeys(self.prefix, session_id)

    def _ttl_ms(self) -> int:
        return max(1, round(self.lease_seconds * 1000))

    # -- leases ---------------------------------------------------------------------------------------------------

    def acquire(self, session_id: str) -> None:
        keys = self.keys(session_id)
        with self._held_lock:
            mine = self._held.get(session_id, "")
        with self._reaching("take the lease of", session_id):
            granted = self._acquire(keys=[keys.lease, keys.epoch], args=[self.owner, self._ttl_ms(), mine])
        if int(granted[0]) != 0:
            _, holder = _split(granted[1].decode())
            raise SessionBusyError(session_id, holder, max(int(granted[2]), 0) / 1000)
        with self._held_lock:
            self._held[session_id] = granted[1].decode()
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=renew_leases, args=(weakref.ref(self),), daemon=True)
                self._renewer.start()

    def holds(self, session_id: str) -> bool:
        with self._held_lock:
            mine = self._held.get(session_id)
        if mine is None:
            return False
        with self._reaching("renew the lease of", session_id):
            renewed = self._renew_script(keys=[self.keys(session_id).lease], args=[mine, self._ttl_ms()])
        if not renewed:
            self._forget(session_id, mine)
        return bool(renewed)

    def release(self, session_id: str) -> None:
        with self._held_lock:
            mine = self._held.pop(session_id, None)
        if mine is not None:  # forgotten first: should Redis be unreachable, the lease simply expires
            with self._reaching("give up the lease of", session_id):
                self._release(keys=[self.keys(session_id).lease], args=[mine])

    def release_all(self) -> None:
        for session_id in self.held():
            self.release(session_id)

    def held(self) -> list[str]:
        """The sessions whose lease this process holds."""
        with self._held_lock:
            return list(self._held)

    def token(self, session_id: str) -> int | None:
        """The fencing token of our lease of ``session_id``, or None when we hold none."""
        with self._held_lock:
            mine = self._held.get(session_id)
        return None if mine is None else _split(mine)[0]

    # -- sessions -------------------------------------------------------------------------------------------------

    def save(self, session: Session) -> bool:
        """:meth:`commit`, then True. Unlike a folder store's, it waits for a call in progress on the session to end
        (the pool only spills sessions that are in no call)."""
        self.commit(session)
        return True

    def commit(self, session: Session) -> None:
        session_id, keys = session.session_id, self.keys(session.session_id)
        with self._held_lock:
            mine = self._held.get(session_id)
        if mine is None:
            raise self._busy(session_id, keys)
        started, token = time.perf_counter(), _split(mine)[0]
        data = session_bytes(session.model, *session.state())
        value, uploaded = data, None
        if self.large_blobs is not None and len(data) >= self.large_blob_bytes:
            # A key of its own per commit: a stale writer's upload can never replace a blob a commit points to.
            uploaded = f"{self.large_blobs.prefix}{file_key(session_id)}/{token}-{uuid.uuid4().hex}.safetensors"
            self.large_blobs.put(uploaded, data)
            value = POINTER + uploaded.encode()
        where = self.large_blobs.url(uploaded) if uploaded else "redis"
        meta = {"token": token, "owner": self.owner, "bytes": len(data), "blob": where, "committed_at": time.time()}
        fields = [item for pair in meta.items() for item in pair]
        # Should the script's answer be lost (a timeout), the upload stays: Redis may point to it now.
        with self._reaching("commit", session_id):
            outcome = self._commit(keys=keys.written, args=[mine, token, self._ttl_ms(), POINTER, value, *fields])
        if int(outcome[0]) != 1:
            self._drop_objects([uploaded])
            self._forget(session_id, mine)
            raise self._busy(session_id, keys)
        self._drop_objects(outcome[1:])
        self.last_commit = (len(data), time.perf_counter() - started)

    def take(self, model: Model, session_id: str) -> Session | None:
        """The last committed session (kept in Redis: should this process die, the next holder continues from it).
        A latest commit that cannot be used (corrupted, or another model's) is logged and the previous commit read
        instead; with neither usable, raises ``SessionFileError``."""
        keys = self.keys(session_id)
        with self._reaching("read", session_id):
            data = self._redis.get(keys.blob)
        if data is None:
            return None
        try:
            return self._session(model, data, keys.blob, session_id)
        except SessionFileError as error:
            with self._reaching("read", session_id):
                previous = self._redis.get(keys.previous)
            if previous is None:
                raise
            log.error("%s; continuing session %s from its previous commit (%s)", error, session_id, keys.previous)
            return self._session(model, previous, keys.previous, session_id)

    def read_state(self, model: Model, session_id: str, *, previous: bool = False) -> Session | None:
        """The session as its latest commit (or, with ``previous``, the one before) holds it, without falling back:
        raises ``SessionFileError`` for a commit that cannot be used; None when there is none."""
        keys = self.keys(session_id)
        key = keys.previous if previous else keys.blob
        with self._reaching("read", session_id):
            data = self._redis.get(key)
        return None if data is None else self._session(model, data, key, session_id)

    def delete(self, session_id: str) -> None:
        keys = self.keys(session_id)
        self.acquire(session_id)
        with self._held_lock:
            mine = self._held.pop(session_id)
        with self._reaching("delete", session_id):
            outcome = self._delete(keys=keys.written, args=[mine, POINTER])
        self._drop_objects(outcome[1:])

    # -- internals ------------------------------------------------------------------------------------------------

    def _session(self, model: Model, data: bytes, key: str, session_id: str) -> Session:
        source = f"{self.url} key {key}"
        if data.startswith(POINTER):
            data, source = self._pointed_to(data, source)
        return Session.from_state(model, *read_session_bytes(data, model, source), session_id)

    def _pointed_to(self, pointer: bytes, source: str) -> tuple[bytes, str]:
        """The bytes of the object a blob key points to, and where they came from."""
        key = pointer.removeprefix(POINTER).decode()
        if self.large_blobs is None:
            raise SessionFileError(
                f"{source}: the session is in the object store (s3 key {key}), and this store has none: give every "
                "replica the same --blob-store"
            )
        data, where = self.large_blobs.get(key), self.large_blobs.url(key)
        if data is None:
            raise SessionFileError(f"{source}: points to {where}, which does not exist (deleted by hand?)")
        return data, where

    def _drop_objects(self, pointers: list) -> None:
        """Delete the objects that ``pointers`` (object keys, or pointer values from a script; empty ones skipped)
        name; one that cannot be deleted is logged and left (it is unreferenced, so only costs storage)."""
        for pointer in pointers:
            if not pointer or self.large_blobs is None:
                continue
            key = pointer.removeprefix(POINTER).decode() if isinstance(pointer, bytes) else pointer
            try:
                self.large_blobs.delete(key)
            except SessionStoreUnavailable as error:
                log.warning("left an unreferenced session object behind: %s", error)

    def _forget(self, session_id: str, value: str) -> None:
        with self._held_lock:
            if self._held.get(session_id) == value:
                del self._held[session_id]

    def _busy(self, session_id: str, keys: SessionKeys) -> SessionBusyError:
        """The refusal for a session whose lease this store lost, naming who holds it now."""
        with self._reaching("read the lease of", session_id):
            value, left = self._redis.get(keys.lease), self._redis.pttl(keys.lease)
        holder = _split(value.decode())[1] if value else "nobody (its lease lapsed)"
        return SessionBusyError(session_id, holder, max(left, 0) / 1000)

    @contextmanager
    def _reaching(self, what: str, session_id: str) -> Iterator[None]:
        """Redis errors as :class:`SessionStoreUnavailable`, saying what could not be done and where."""
        try:
            yield
        except redis.RedisError as error:
            raise SessionStoreUnavailable(
                f"could not {what} session {session_id!r} in Redis at {self.url} ({error}); the turn was not "
                "acknowledged: retry once Redis answers"
            ) from error


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _split(value: str) -> tuple[int, str]:
    """A lease value's fencing token and owner."""
    token, _, owner = value.partition(" ")
    return int(token), owner
