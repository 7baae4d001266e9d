"""Session stores: where a pool's idle sessions are written, and, for a store shared by several processes, who may
serve a session.

A :class:`SessionStore` keeps session files (safetensors tensors and a JSON header, never pickle: see
:mod:`sirllm_agents.persistence`) by session id. :class:`DirectoryStore` is one process's private spill folder.
:class:`SharedDirectoryStore` is a folder that several server processes (replicas) share, for example on one machine
or on a network file system, so a conversation saved by one continues on another;
:class:`~sirllm_agents.redis_store.RedisStore` is the same in Redis, for replicas on several machines.
:func:`open_store` picks one from a URL or a folder. A shared store's pool commits every turn to it before the turn
is answered (:meth:`SessionStore.commit`), so a process that dies loses no acknowledged turn.

Two replicas must never serve one session at once, so a shared store grants **leases**. A process must hold a
session's lease to have it in memory, serve it, save it or delete it:

- ``<key>.lease`` is a JSON record ``{"session_id", "owner", "token", "expires"}``; ``expires`` is wall-clock time.
  Every read-modify-write of it happens under an exclusive ``fcntl.flock`` on one of 256 lock files in ``.locks/``
  (chosen by the key's first two hex digits, so their number stays fixed however many sessions come and go), so two
  processes never both see a lease free and take it.
- Taking a lease that another owner holds and that has not expired raises :class:`SessionBusyError` with a
  ``retry_after``. An expired lease (its holder died or stalled) may be taken over.
- The holder renews its leases every third of ``lease_seconds`` from a background thread, for as long as the session
  stays in its memory; saving the session to the store and releasing the lease hands it over.
- Each grant gets a fresh random ``token``. Before serving a session it holds in memory, and before writing it, a
  process checks that the token is still its own: a holder that stalled past expiry and was taken over finds a
  different token, drops its stale copy and reads the store's. A taken-over session therefore continues from the last
  turn committed to the store, or starts afresh from the messages the client sends; either gives the right reply.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .session import Session

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 30.0


class SessionBusyError(RuntimeError):
    """Another process holds the session's lease: it is serving the session or has it in memory. Retry after
    ``retry_after`` seconds (or send the request to the process that holds it: ``owner``)."""

    def __init__(self, session_id: str, owner: str, retry_after: float):
        super().__init__(
            f"session {session_id!r} is held by another server ({owner}); retry in {math.ceil(retry_after)} s"
        )
        self.session_id, self.owner, self.retry_after = session_id, owner, retry_after


class SessionStoreUnavailable(ConnectionError):
    """The session store could not be reached (or refused the write): the turn was not made durable, so it is not
    acknowledged. Retry once the store is back; the session continues from its last commit."""


def file_key(session_id: str) -> str:
    """The file name stem of a session: a digest, so any id is a safe file name."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


class SessionStore(ABC):
    """Saved sessions by id, for a :class:`~sirllm_agents.pool.SessionPool` to spill idle sessions to and read them
    back from. ``shared`` stores are used by several processes at once and grant leases (see the module docstring);
    for a private store the lease methods always succeed."""

    shared: bool = False

    @abstractmethod
    def save(self, session: Session) -> bool:
        """Write ``session``; False, writing nothing, while it is in a call."""

    @abstractmethod
    def take(self, model: Model, session_id: str) -> Session | None:
        """The saved session ``session_id`` on ``model``, or None when there is none. A private store forgets its
        copy (the caller's is now the only one); a shared store keeps it until the next save. Raises
        ``SessionFileError`` for a file that cannot be used."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Forget the saved session, if any (and release its lease)."""

    def commit(self, session: Session) -> None:
        """Write ``session`` now, waiting for a call in progress to end, so that its latest turn outlives this process
        (a shared store's pool calls it before a turn is acknowledged). Raises :class:`SessionBusyError` when another
        process holds the session's lease now (this copy is stale). A private store loses its sessions with the
        process anyway: it writes nothing."""
        return None

    @abstractmethod
    def acquire(self, session_id: str) -> None:
        """Take the lease of ``session_id``, or raise :class:`SessionBusyError` when another process holds it."""

    @abstractmethod
    def holds(self, session_id: str) -> bool:
        """Whether this process still holds the lease (renewing it): False once another process has taken it over, so
        the copy in memory is stale."""

    @abstractmethod
    def release(self, session_id: str) -> None:
        """Give the lease of ``session_id`` up."""


class DirectoryStore(SessionStore):
    """One process's sessions in a folder: ``folder`` (made when first needed), or a private temporary folder removed
    with the store."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self._folder = Path(folder) if folder is not None else None

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="sirllm-agents-spill-"))
            # A folder the store made itself goes with it; a folder the caller named is left alone.
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def path(self, session_id: str) -> Path:
        """The file of ``session_id``."""
        return self.folder / f"{file_key(session_id)}.safetensors"

    def save(self, session: Session) -> bool:
        return session.save(self.path(session.session_id), wait=False)

    def take(self, model: Model, session_id: str) -> Session | None:
        path = self.path(session_id)
        if not path.exists():
            return None
        session = Session.load(model, path, session_id)
        path.unlink(missing_ok=True)
        return session

    def delete(self, session_id: str) -> None:
        self.path(session_id).unlink(missing_ok=True)

    # A private store has no other process to exclude: every lease is granted and kept.
    def acquire(self, session_id: str) -> None:
        return None

    def holds(self, session_id: str) -> bool:
        return True

    def release(self, session_id: str) -> None:
        return None


class SharedDirectoryStore(DirectoryStore):
    """Sessions in a folder shared by several processes, with a lease per session (see the module docstring).

    ``owner`` names this process in leases and errors (default ``host:pid``); ``lease_seconds`` is how long a lease
    lasts unless renewed, so how long a crashed process's sessions stay blocked. The folder must support ``flock``
    (local disks do; on NFS use v4, whose locks Linux maps ``flock`` onto)."""

    shared = True

    def __init__(
        self, folder: str | os.PathLike, *, owner: str | None = None, lease_seconds: float = DEFAULT_LEASE_SECONDS
    ):
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds!r}")
        super().__init__(folder)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_seconds = float(lease_seconds)
        self._held: dict[str, str] = {}  # session id -> the token of our lease
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    # -- leases ---------------------------------------------------------------------------------------------------

    def acquire(self, session_id: str) -> None:
        with self._guard(session_id):
            lease, now = self._read_lease(session_id), time.time()
            mine = self._held.get(session_id)
            if lease and lease["token"] != mine and lease["expires"] > now:
                raise SessionBusyError(session_id, lease["owner"], lease["expires"] - now)
            token = mine if lease and lease["token"] == mine else uuid.uuid4().hex
            self._write_lease(session_id, token, now)
        with self._held_lock:
            self._held[session_id] = token
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=renew_leases, args=(weakref.ref(self),), daemon=True)
                self._renewer.start()

    def holds(self, session_id: str) -> bool:
        with self._guard(session_id):
            return self._renew(session_id)

    def release(self, session_id: str) -> None:
        with self._guard(session_id):
            if self._still_mine(session_id):
                self._lease_path(session_id).unlink(missing_ok=True)
            with self._held_lock:
                self._held.pop(session_id, None)

    def release_all(self) -> None:
        for session_id in self.held():
            self.release(session_id)

    def held(self) -> list[str]:
        """The sessions whose lease this process holds."""
        with self._held_lock:
            return list(self._held)

    # -- files ----------------------------------------------------------------------------------------------------

    def save(self, session: Session) -> bool:
        with self._guard(session.session_id):
            self._check_still_mine(session.session_id)
            return super().save(session)

    def commit(self, session: Session) -> None:
        with self._guard(session.session_id):
            self._check_still_mine(session.session_id)
            session.save(self.path(session.session_id))

    def _check_still_mine(self, session_id: str) -> None:
        """Renew our lease, or raise :class:`SessionBusyError` when it was taken over (what we hold is stale, the
        store's copy is newer). Called under the session's guard."""
        if not self._renew(session_id):
            lease = self._read_lease(session_id) or {"owner": "nobody", "expires": time.time()}
            raise SessionBusyError(session_id, lease["owner"], lease["expires"] - time.time())

    def take(self, model: Model, session_id: str) -> Session | None:
        path = self.path(session_id)
        # Kept after loading: should this process die, the next holder continues from this copy (an earlier state
        # of the same conversation, which the client's messages extend).
        return Session.load(model, path, session_id) if path.exists() else None

    def delete(self, session_id: str) -> None:
        self.acquire(session_id)
        with self._guard(session_id):
            self.path(session_id).unlink(missing_ok=True)
            self._lease_path(session_id).unlink(missing_ok=True)
            with self._held_lock:
                self._held.pop(session_id, None)

    # -- internals ------------------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self, session_id: str) -> Iterator[None]:
        """Exclusive access to the session's lease record, across processes (and threads: each call opens its own
        file description, and flock excludes between descriptions)."""
        locks = self.folder / ".locks"
        locks.mkdir(exist_ok=True)
        with open(locks / f"{file_key(session_id)[:2]}.lock", "a") as file:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(file.fileno(), fcntl.LOCK_UN)

    def _lease_path(self, session_id: str) -> Path:
        return self.folder / f"{file_key(session_id)}.lease"

    def _read_lease(self, session_id: str) -> dict[str, Any] | None:
        try:
            lease = json.loads(self._lease_path(session_id).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:  # unreadable: treated as expired, so it can be taken over
            log.warning("unreadable lease for session %s, treating it as expired: %s", session_id, error)
            return None
        return lease if isinstance(lease, dict) and {"owner", "token", "expires"} <= lease.keys() else None

    def _write_lease(self, session_id: str, token: str, now: float) -> None:
        record = {"session_id": session_id, "owner": self.owner, "token": token, "expires": now + self.lease_seconds}
        path = self._lease_path(session_id)
        staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        staging.write_text(json.dumps(record))
        os.replace(staging, path)  # readers see the old record or the new, never half of one

    def _still_mine(self, session_id: str) -> bool:
        lease = self._read_lease(session_id)
        return lease is not None and lease["token"] == self._held.get(session_id)

    def _renew(self, session_id: str) -> bool:
        """Extend our lease; False (and forgotten) when it is no longer ours. Called under the session's guard."""
        if self._still_mine(session_id):
            self._write_lease(session_id, self._held[session_id], time.time())
            return True
        with self._held_lock:
            self._held.pop(session_id, None)
        return False


def renew_leases(store_ref: weakref.ref[SessionStore]) -> None:
    """Renew a store's leases every third of their length while it holds any (and while the store exists): the
    background thread of a shared store (one with ``lease_seconds``, ``held()``, ``_held`` and its ``_held_lock``,
    ``_renewer``)."""
    while True:
        store = store_ref()
        if store is None:
            return
        held, pause = store.held(), store.lease_seconds / 3
        if not held:
            with store._held_lock:
                if not store._held:
                    store._renewer = None
                    return
            continue
        for session_id in held:
            try:
                if not store.holds(session_id):
                    log.warning("lost the lease of session %s to another process", session_id)
            except OSError as error:
                log.warning("could not renew the lease of session %s: %s", session_id, error)
        del store
        time.sleep(pause)


def open_store(
    location: str,
    *,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    blob_store: str | None = None,
    large_blob_bytes: int | None = None,
) -> SessionStore:
    """The shared store at ``location``: a ``redis://``, ``rediss://`` or ``unix://`` URL is a
    :class:`~sirllm_agents.redis_store.RedisStore` (needs the ``redis`` extra), anything else a folder for a
    :class:`SharedDirectoryStore`. ``owner`` and ``lease_seconds`` as for either store. With Redis, ``blob_store``
    (``s3://bucket/prefix``, the ``s3`` extra) takes the sessions of ``large_blob_bytes`` or more (default 16 MiB)."""
    if not (location.split("://", 1)[0] in ("redis", "rediss", "unix") and "://" in location):
        if blob_store is not None:
            raise ValueError("a blob store goes with a Redis session store (redis://...), not with a folder")
        return SharedDirectoryStore(location, owner=owner, lease_seconds=lease_seconds)
    try:
        from .redis_store import DEFAULT_LARGE_BLOB_BYTES, RedisStore
    except ImportError as error:
        raise ValueError(
            f'{location!r} is a Redis URL, and redis-py is not installed: pip install "sirllm-agents[redis]"'
        ) from error
    large_blobs = None
    if blob_store is not None:
        try:
            from .s3_blobs import S3Blobs
        except ImportError as error:
            raise ValueError(
                f'{blob_store!r} is an S3 blob store, and boto3 is not installed: pip install "sirllm-agents[s3]"'
            ) from error
        large_blobs = S3Blobs.from_url(blob_store)
    limit = DEFAULT_LARGE_BLOB_BYTES if large_blob_bytes is None else large_blob_bytes
    return RedisStore(
        location, owner=owner, lease_seconds=lease_seconds, large_blobs=large_blobs, large_blob_bytes=limit
    )
