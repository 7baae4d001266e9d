"""Large session blobs in S3-compatible object storage, for :class:`~sirllm_agents.redis_store.RedisStore`: a blob
over its size limit is written here under a key of its own (never overwritten), and the fenced commit in Redis
stores a pointer to it, so Redis holds leases and small values only. Uses boto3 (the ``s3`` extra); the endpoint and
credentials come from boto3's own configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... or a profile),
so any S3-compatible service works (AWS, MinIO, Ceph)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from .store import SessionStoreUnavailable


class S3Blobs:
    """Objects under ``prefix`` in ``bucket``; ``client`` replaces the boto3 S3 client made from its configuration."""

    def __init__(self, bucket: str, prefix: str = "sirllm-sessions/", *, client: Any = None):
        if not bucket:
            raise ValueError("S3Blobs needs a bucket name")
        self.bucket, self.prefix = bucket, prefix
        self._s3 = client or boto3.client("s3")

    @classmethod
    def from_url(cls, url: str) -> S3Blobs:
        """``s3://bucket/prefix/``."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"a blob store is an s3://bucket/prefix URL, got {url!r}")
        prefix = parts.path.lstrip("/")
        return cls(parts.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/")

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes) -> None:
        with self._reaching("write", key):
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        with self._reaching("read", key):
            try:
                return self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

    def delete(self, key: str) -> None:
        with self._reaching("delete", key):
            self._s3.delete_object(Bucket=self.bucket, Key=key)

    def keys(self, under: str = "") -> list[str]:
        """The keys of the objects under ``prefix + under`` (for tests and operators)."""
        with self._reaching("list", self.prefix + under):
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + under)
            return [item["Key"] for page in pages for item in page.get("Contents", [])]

    @contextmanager
    def _reaching(self, what: str, key: str) -> Iterator[None]:
        """S3 errors as :class:`SessionStoreUnavailable`, saying what could not be done and where."""
        try:
            yield
        except (BotoCoreError, ClientError) as error:
            raise SessionStoreUnavailable(
                f"could not {what} {self.url(key)} ({error}); the turn was not acknowledged: retry once the object "
                "store answers"
            ) from error
