"""S3 object helpers for the Lambda handler, on synchronous boto3 (the Lambda Python runtime ships it).

botocore honours AWS_ENDPOINT_URL_S3 itself, so tests point these at moto. The async wrappers run boto3 in a
thread so the handler's event loop (ffmpeg's progress pipes) keeps going.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".gif": "image/gif",
    ".m4a": "audio/mp4",
}
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
# What S3 answers for a key this role may not read, and for a missing key when the role may not list there.
_FORBIDDEN = frozenset({"403", "AccessDenied", "Forbidden"})


def s3_client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 5}))


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class Boto3Fetcher:
    """renderer.sources.S3Fetcher over a boto3 client: a missing object is FileNotFoundError."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def fetch(self, bucket: str, key: str, destination: Path) -> None:
        await download(self._client, bucket, key, destination)


async def download(client: Any, bucket: str, key: str, destination: Path) -> None:
    from botocore.exceptions import ClientError

    try:
        await asyncio.to_thread(client.download_file, bucket, key, str(destination))
    except ClientError as exc:
        if _error_code(exc) in _MISSING:
            raise FileNotFoundError(f"s3://{bucket}/{key}") from None
        if _error_code(exc) in _FORBIDDEN:
            raise PermissionError(f"s3://{bucket}/{key}") from None
        raise


async def upload(client: Any, path: Path, bucket: str, key: str) -> int:
    """Uploads `path` to s3://bucket/key; returns its size."""
    extra = {"ContentType": CONTENT_TYPES.get(path.suffix, "application/octet-stream")}

    def send() -> int:
        client.upload_file(str(path), bucket, key, ExtraArgs=extra)
        return path.stat().st_size

    return await asyncio.to_thread(send)


async def exists(client: Any, bucket: str, key: str) -> bool:
    """By listing, which needs only s3:ListBucket on the prefix (a HEAD of a missing key without it is a 403)."""
    listed = await asyncio.to_thread(client.list_objects_v2, Bucket=bucket, Prefix=key, MaxKeys=1)
    return any(item["Key"] == key for item in listed.get("Contents", []))


async def delete(client: Any, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
        await asyncio.to_thread(client.delete_objects, Bucket=bucket, Delete=batch)
