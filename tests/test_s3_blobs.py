"""Large session blobs in S3 behind the Redis store, against a real ``redis-server`` and moto's S3 server on
127.0.0.1: a large session's commit writes an object under a key of its own and commits a pointer to it, another
replica continues from it with the same greedy replies, only the two commits Redis points to stay in the bucket, a
stale writer's upload is removed when its commit is refused, and a corrupted object is refused clearly with the
previous commit readable."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis_fixtures import free_port, redis_server, skip_or_fail
from sirllm_fixtures import reply_token_ids

from sirllm_agents import Engine, SessionBusyError, SessionConfig, SessionFileError

SCRIPT = ["Hi there!", "What is 2+2?", "Name a colour.", "Tell me a joke."]
BUCKET = "sessions"


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def s3():
    """A boto3 S3 client on moto's server, started here on 127.0.0.1, with the bucket made."""
    try:
        import boto3
    except ImportError:
        skip_or_fail('boto3 is not installed (pip install "sirllm-agents[s3]")')
    beside = Path(sys.executable).with_name("moto_server")
    launcher = shutil.which("moto_server") or (str(beside) if beside.exists() else None)
    if launcher is None:
        skip_or_fail('moto\'s server is not installed (pip install "moto[server]")')
    port = free_port()
    process = subprocess.Popen(
        [launcher, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                assert process.poll() is None and time.monotonic() < deadline, "moto_server did not come up"
                time.sleep(0.2)
        yield client
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture
def make_store(redis, s3, request):
    """Redis stores whose every blob goes to S3 (a limit of 1 byte), under this test's own prefixes."""
    from sirllm_agents.redis_store import RedisStore
    from sirllm_agents.s3_blobs import S3Blobs

    prefix = re.sub(r"\W", "-", request.node.name)
    made = []

    def make(owner: str) -> RedisStore:
        blobs = S3Blobs(BUCKET, f"{prefix}/", client=s3)
        made.append(RedisStore(redis.url, owner=owner, prefix=f"{prefix}:", large_blobs=blobs, large_blob_bytes=1))
        return made[-1]

    yield make
    for store in made:
        with contextlib.suppress(Exception):
            store.release_all()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def replica(tiny_engine, store) -> Engine:
    return Engine(tiny_engine.model, config=SessionConfig(cache_size=512), store=store)


def test_large_sessions_go_to_s3_and_continue_on_another_replica(tiny_engine, make_store, redis, s3):
    import redis as redis_py

    uninterrupted = reply_token_ids(tiny_engine.session(cache_size=512), SCRIPT)
    stores = [make_store("a"), make_store("b")]
    messages = []
    for turn, text in enumerate(SCRIPT):
        store = stores[turn % 2]
        messages.append(user(text))
        reply = replica(tiny_engine, store).chat(messages, "conv", max_new_tokens=6)
        assert reply.token_ids == uninterrupted[turn], turn
        assert turn == 0 or reply.stats.reused_tokens > 0  # read back from the object the last commit points to
        messages.append({"role": "assistant", "content": reply.text})
        store.release("conv")  # handed over, as on SIGTERM or when idle
    with redis_py.Redis.from_url(redis.url) as client:
        keys = stores[0].keys("conv")
        pointer, size = client.get(keys.blob), client.hget(keys.meta, "bytes")
    assert pointer.startswith(b"sirllm-s3:") and len(pointer) < 200 and int(size) > 10_000  # Redis holds a pointer
    # Of the four commits' objects, the two Redis points to (the latest and the previous) are all that is left.
    objects = stores[0].large_blobs.keys()
    assert len(objects) == 2 and pointer.removeprefix(b"sirllm-s3:").decode() in objects


def test_a_refused_commit_leaves_no_object_behind(tiny_engine, make_store, redis):
    import redis as redis_py

    a, b = make_store("a"), make_store("b")
    stale = replica(tiny_engine, a)
    stream = stale.stream([user(SCRIPT[0])], "conv", max_new_tokens=6)
    stream.finish()
    with redis_py.Redis.from_url(redis.url) as client:
        client.delete(a.keys("conv").lease)  # a stalled past its lease
    b.acquire("conv")
    with pytest.raises(SessionBusyError, match=r"\(b\)"):
        a.commit(stream.session)
    assert len(a.large_blobs.keys()) == 1  # the first commit's object only: the refused upload was deleted


def test_a_corrupted_object_is_refused_clearly_and_the_previous_commit_stays_readable(
    tiny_engine, make_store, redis, s3
):
    import redis as redis_py

    uninterrupted = reply_token_ids(tiny_engine.session(cache_size=512), SCRIPT)
    store = make_store("a")
    server, messages = replica(tiny_engine, store), []
    for text in SCRIPT[:2]:
        messages.append(user(text))
        messages.append({"role": "assistant", "content": server.chat(messages, "conv", max_new_tokens=6).text})
    store.release("conv")
    with redis_py.Redis.from_url(redis.url) as client:
        newest = client.get(store.keys("conv").blob).removeprefix(b"sirllm-s3:").decode()
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=newest)["Body"].read())
    data[-10:-6] = b"\xff" * 4  # a few bytes of the tensors flipped
    s3.put_object(Bucket=BUCKET, Key=newest, Body=bytes(data))

    other = make_store("b")
    with pytest.raises(SessionFileError, match=re.escape(f"s3://{BUCKET}/{newest}: corrupted session file")):
        other.read_state(tiny_engine.model, "conv")
    assert len(other.read_state(tiny_engine.model, "conv", previous=True).transcript.messages) == 2
    messages.append(user(SCRIPT[2]))
    reply = replica(tiny_engine, other).chat(messages, "conv", max_new_tokens=6)
    assert reply.token_ids == uninterrupted[2]


def test_open_store_reads_the_urls_and_refuses_a_blob_store_without_redis(redis, tmp_path):
    from sirllm_agents import open_store

    store = open_store(redis.url, owner="a", blob_store="s3://sessions/prod", large_blob_bytes=1024)
    assert (store.large_blobs.bucket, store.large_blobs.prefix, store.large_blob_bytes) == ("sessions", "prod/", 1024)
    with pytest.raises(ValueError, match=r"a blob store goes with a Redis session store"):
        open_store(str(tmp_path), blob_store="s3://sessions/prod")
    with pytest.raises(ValueError, match=r"an s3://bucket/prefix URL"):
        open_store(redis.url, blob_store="https://example.com/sessions")
