"""The AWS Lambda render backend: invokes the render function (renderer.lambda_handler) with aioboto3.

Rendering happens in Lambda and the output lands in S3; this node only sends JSON events and never holds
video bytes. An mp4 longer than `chunk_seconds` fans out: its frames are split into chunks rendered by
parallel invocations (h264, video only, identical settings), the audio is rendered once by another, and a
final "join" invocation concatenates the chunks without re-encoding, muxes the audio and uploads the result.
webm and gif render in one invocation.

Invocations are synchronous (RequestResponse) with botocore's retries OFF: a synchronous invoke retried after
a read timeout would render, and be counted, twice. The read timeout sits above the function's own timeout so
Lambda always answers first. Throttling (429 TooManyRequestsException: Lambda did not run the function) is the
one thing retried, here, with capped exponential backoff and full jitter. A function error (a handler
exception, or Lambda's "Task timed out") raises `RenderError`, which the job runner records as FAILED.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from renderer.domain import (
    Composition,
    OutputFormat,
    Progress,
    ProgressCallback,
    RenderAssignment,
    RenderError,
    RenderMode,
    RenderOutput,
)
from renderer.errors import SourceRefused
from renderer.lambda_handler import (
    ACTION_AUDIO,
    ACTION_CHUNK,
    ACTION_JOIN,
    ACTION_RENDER,
    ATTEMPT_METADATA,
    DEFAULT_KEY_PREFIX,
    RenderKeys,
    composition_to_json,
)
from renderer.s3 import CONTENT_TYPES
from renderer.validation import FileSource, S3Source, parse_source

log = logging.getLogger(__name__)

THROTTLE_ERROR_CODES = frozenset({"TooManyRequestsException"})


class LambdaSettingsLike(Protocol):
    """What renderer.config.LambdaSettings provides (duck-typed, to keep this module free of config)."""

    function_name: str
    bucket: str
    chunk_seconds: float
    max_concurrency: int
    timeout_seconds: float
    endpoint_url: str | None
    s3_endpoint_url: str | None
    region: str
    key_prefix: str
    source_buckets: frozenset[str]
    source_prefix: str


@dataclass(frozen=True, slots=True)
class LambdaBackendConfig:
    function_name: str  # LAMBDA_FUNCTION_NAME
    bucket: str  # RENDER_BUCKET
    chunk_seconds: float = 10.0  # RENDER_LAMBDA_CHUNK_SECONDS
    max_concurrency: int = 8  # RENDER_LAMBDA_MAX_CONCURRENCY: invocations in flight for one render
    timeout_seconds: float = 900.0  # RENDER_LAMBDA_TIMEOUT_SECONDS: the function's configured timeout
    endpoint_url: str | None = None  # AWS_ENDPOINT_URL_LAMBDA
    s3_endpoint_url: str | None = None  # AWS_ENDPOINT_URL_S3
    region: str | None = None  # AWS_REGION / AWS_DEFAULT_REGION (None: botocore's own lookup)
    key_prefix: str = DEFAULT_KEY_PREFIX  # RENDER_KEY_PREFIX, the template's RendersPrefix
    # Buckets s3:// sources may come from (RENDER_LAMBDA_SOURCE_BUCKETS, else RENDER_SOURCE_BUCKETS); empty:
    # any the function's role can read. And the prefix their keys must have (RENDER_LAMBDA_SOURCE_PREFIX).
    source_buckets: frozenset[str] = frozenset()
    source_prefix: str = ""
    throttle_retries: int = 8
    throttle_base_delay_seconds: float = 0.25
    throttle_max_delay_seconds: float = 20.0
    # Added to the function's timeout for the HTTP read timeout, so Lambda's own timeout answer arrives first.
    read_timeout_margin_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not self.function_name:
            raise ValueError("function_name is required")
        if not self.bucket:
            raise ValueError("bucket is required")
        if not self.chunk_seconds > 0:
            raise ValueError("chunk_seconds must be positive")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not self.timeout_seconds > 0:
            raise ValueError("timeout_seconds must be positive")
        if self.throttle_retries < 0:
            raise ValueError("throttle_retries must not be negative")

    @property
    def read_timeout_seconds(self) -> float:
        return self.timeout_seconds + self.read_timeout_margin_seconds

    @classmethod
    def from_settings(cls, settings: LambdaSettingsLike) -> LambdaBackendConfig:
        return cls(
            function_name=settings.function_name,
            bucket=settings.bucket,
            chunk_seconds=settings.chunk_seconds,
            max_concurrency=settings.max_concurrency,
            timeout_seconds=settings.timeout_seconds,
            endpoint_url=settings.endpoint_url,
            s3_endpoint_url=settings.s3_endpoint_url,
            region=settings.region or None,
            key_prefix=settings.key_prefix,
            source_buckets=settings.source_buckets,
            source_prefix=settings.source_prefix,
        )


# S3's largest CopyObject; above it, a copy goes in parts.
COPY_IN_ONE_REQUEST_BYTES = 5 * 1024**3


class LambdaFunctionError(RenderError):
    """The function ran and failed: a handler exception or Lambda's timeout."""

    def __init__(self, message: str, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class LambdaThrottled(RenderError):
    """Lambda kept answering 429 after every retry."""


def backoff_delay(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt))."""
    return rng() * min(cap, base * (2**attempt))


def lambda_client_config(config: LambdaBackendConfig) -> Any:
    from aiobotocore.config import AioConfig

    return AioConfig(
        read_timeout=config.read_timeout_seconds,
        connect_timeout=10,
        # One attempt: botocore would retry a read timeout or a 5xx, running the render twice.
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=config.max_concurrency + 4,
    )


class LambdaInvoker:
    """Synchronous invokes of one function over an open aiobotocore Lambda client."""

    def __init__(
        self,
        client: Any,
        config: LambdaBackendConfig,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._config = config
        self._sleep = sleep
        self._rng = rng
        self.throttled = 0  # 429s seen, for logs and tests

    async def invoke(self, event: dict[str, Any]) -> Any:
        from botocore.exceptions import ClientError, ConnectionError, ReadTimeoutError

        payload = json.dumps(event).encode()
        config = self._config
        attempt = 0
        while True:
            try:
                response = await self._client.invoke(
                    FunctionName=config.function_name, InvocationType="RequestResponse", Payload=payload
                )
                body = await response["Payload"].read()
                break
            except ClientError as exc:
                error = exc.response.get("Error", {})
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if error.get("Code") in THROTTLE_ERROR_CODES or status == 429:
                    self.throttled += 1
                    if attempt >= config.throttle_retries:
                        raise LambdaThrottled(
                            f"Lambda throttled {config.function_name} {attempt + 1} times in a row; giving up"
                        ) from None
                    delay = backoff_delay(
                        attempt, config.throttle_base_delay_seconds, config.throttle_max_delay_seconds, self._rng
                    )
                    log.info("Lambda throttled %s; retrying in %.2fs", config.function_name, delay)
                    attempt += 1
                    await self._sleep(delay)
                    continue
                raise RenderError(
                    f"Lambda invoke of {config.function_name} failed: {error.get('Code')}: {error.get('Message')}"
                ) from None
            except ReadTimeoutError:
                raise RenderError(
                    f"no answer from Lambda function {config.function_name} within "
                    f"{config.read_timeout_seconds:.0f}s"
                ) from None
            except ConnectionError as exc:
                raise RenderError(f"cannot reach Lambda ({config.function_name}): {exc}") from None
        if response.get("FunctionError"):
            raise _function_error(config.function_name, body)
        try:
            return json.loads(body) if body else None
        except ValueError:
            raise RenderError(f"Lambda function {config.function_name} answered with invalid JSON") from None


def _function_error(function_name: str, body: bytes) -> LambdaFunctionError:
    try:
        details = json.loads(body)
    except ValueError:
        details = None
    if isinstance(details, dict):
        error_type = str(details.get("errorType") or "")
        message = str(details.get("errorMessage") or "")
    else:
        error_type, message = "", body.decode(errors="replace")
    if "Task timed out" in message:
        # "RequestId: ... Error: Task timed out after 900.00 seconds" -> the useful part.
        return LambdaFunctionError(f"Lambda function {function_name} timed out: {message}", error_type)
    shown = f"{error_type}: {message}" if error_type and error_type != "RenderError" else message
    return LambdaFunctionError(f"Lambda render failed: {shown or 'unknown function error'}", error_type)


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    first_frame: int
    frame_count: int


def plan_chunks(frames_total: int, fps: float, chunk_seconds: float) -> list[Chunk]:
    """Split `frames_total` frames into chunks of `chunk_seconds` (rounded to whole frames, at least one);
    the last chunk takes the remainder."""
    per_chunk = max(1, round(chunk_seconds * fps))
    return [
        Chunk(index, first, min(per_chunk, frames_total - first))
        for index, first in enumerate(range(0, frames_total, per_chunk))
    ]


def _first_render_error(failures: BaseExceptionGroup[Any]) -> BaseException:
    """The error to report from a failed fan-out: the first RenderError, else the first error."""
    leaves: list[BaseException] = []

    def walk(group: BaseExceptionGroup[Any]) -> None:
        for exc in group.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                walk(exc)
            else:
                leaves.append(exc)

    walk(failures)
    return next((exc for exc in leaves if isinstance(exc, RenderError)), leaves[0])


async def _emit(on_progress: ProgressCallback, progress: Progress) -> None:
    result = on_progress(progress)
    if inspect.isawaitable(result):
        await result


class LambdaBackend:
    """RenderBackend that renders in AWS Lambda and writes to s3://bucket/renders/<export id>.<format>."""

    mode = RenderMode.LAMBDA

    def __init__(self, config: LambdaBackendConfig, *, session: Any = None) -> None:
        import aioboto3

        self.config = config
        self._session = session or aioboto3.Session()

    @classmethod
    def from_settings(cls, settings: LambdaSettingsLike) -> LambdaBackend:
        return cls(LambdaBackendConfig.from_settings(settings))

    def check(self, composition: Composition) -> None:
        """Raise InvalidArgument for sources Lambda cannot read: files on this node (only s3:// objects and
        generated sources reach the function) and buckets off the allow-list. Call it before reserving."""
        layers = [(f"composition.clips[{i}].source", clip.source, False) for i, clip in enumerate(composition.clips)]
        layers += [(f"composition.audio[{i}].source", a.source, True) for i, a in enumerate(composition.audio)]
        for field, source, audio in layers:
            spec = parse_source(source, field, audio=audio)
            if isinstance(spec, FileSource):
                raise SourceRefused(field, "Lambda renders read s3:// sources, not files on the renderer")
            if isinstance(spec, S3Source) and self.config.source_buckets and (
                spec.bucket not in self.config.source_buckets
            ):
                raise SourceRefused(field, f"bucket {spec.bucket!r} is not allowed")
            if isinstance(spec, S3Source) and not spec.key.startswith(self.config.source_prefix):
                raise SourceRefused(field, f"Lambda renders read only keys under {self.config.source_prefix!r}")

    def keys_for(self, export_id: str, output_format: OutputFormat, attempt: str) -> RenderKeys:
        try:
            return RenderKeys(self.config.key_prefix, export_id, output_format.value, attempt)
        except ValueError as exc:
            raise RenderError(str(exc)) from None

    def should_fan_out(self, assignment: RenderAssignment) -> bool:
        composition = assignment.composition
        return (
            assignment.format is OutputFormat.MP4
            and composition.duration_seconds > self.config.chunk_seconds
            and len(plan_chunks(composition.frames_total, composition.fps, self.config.chunk_seconds)) > 1
        )

    async def render(self, assignment: RenderAssignment, on_progress: ProgressCallback) -> RenderOutput:
        if not isinstance(assignment, RenderAssignment):
            raise PermissionError("LambdaBackend renders only a RenderAssignment (a metering reservation)")
        from botocore.exceptions import BotoCoreError

        # Its own attempt: another renderer may render the same export now (a retried start that metering
        # replayed there), and each cleans up only what it wrote.
        keys = self.keys_for(assignment.export_id, assignment.format, uuid.uuid4().hex[:16])
        try:
            async with self._session.client(
                "lambda",
                endpoint_url=self.config.endpoint_url,
                region_name=self.config.region,
                config=lambda_client_config(self.config),
            ) as client:
                invoker = LambdaInvoker(client, self.config)
                try:
                    if self.should_fan_out(assignment):
                        answer = await self._render_chunked(invoker, assignment, keys, on_progress)
                    else:
                        answer = await self._render_whole(invoker, assignment, keys, on_progress)
                    return await self._accept(answer, assignment, keys)
                except BaseException:
                    # Failed or cancelled: whatever invocations still run must not leave objects behind.
                    await asyncio.shield(self._abandon(keys))
                    raise
        except BotoCoreError as error:
            # No credentials, no region, an endpoint that cannot be reached: the render fails saying so,
            # not as an internal error with a traceback.
            raise RenderError(f"AWS: {error}") from None

    def _base_event(self, action: str, assignment: RenderAssignment, keys: RenderKeys) -> dict[str, Any]:
        return {
            "action": action,
            "export_id": assignment.export_id,
            "attempt": keys.attempt,
            "bucket": self.config.bucket,
            "key_prefix": self.config.key_prefix,
            "format": assignment.format.value,
            "composition": composition_to_json(assignment.composition),
        }

    async def _render_whole(
        self, invoker: LambdaInvoker, assignment: RenderAssignment, keys: RenderKeys, on_progress: ProgressCallback
    ) -> dict[str, Any]:
        frames_total = assignment.composition.frames_total
        await _emit(on_progress, Progress(0, frames_total))
        answer = await invoker.invoke(self._base_event(ACTION_RENDER, assignment, keys))
        await _emit(on_progress, Progress(frames_total, frames_total))
        return answer

    async def _render_chunked(
        self, invoker: LambdaInvoker, assignment: RenderAssignment, keys: RenderKeys, on_progress: ProgressCallback
    ) -> dict[str, Any]:
        composition = assignment.composition
        chunks = plan_chunks(composition.frames_total, composition.fps, self.config.chunk_seconds)
        with_audio = bool(composition.sounding_audio)
        slots = asyncio.Semaphore(self.config.max_concurrency)
        done = 0
        frames_done = 0
        await _emit(on_progress, Progress(0, composition.frames_total, 0, len(chunks)))

        async def limited(event: dict[str, Any]) -> Any:
            async with slots:
                return await invoker.invoke(event)

        async def render_chunk(chunk: Chunk) -> None:
            nonlocal done, frames_done
            event = self._base_event(ACTION_CHUNK, assignment, keys)
            event.update(index=chunk.index, first_frame=chunk.first_frame, frame_count=chunk.frame_count)
            answer = await limited(event)
            frames = int(answer.get("frames", -1))
            if frames != chunk.frame_count:
                raise RenderError(f"chunk {chunk.index} came back with {frames} frames, not {chunk.frame_count}")
            done += 1
            frames_done += chunk.frame_count
            await _emit(on_progress, Progress(frames_done, composition.frames_total, done, len(chunks)))

        # A TaskGroup cancels the siblings of the first failure. Audio first: it is one long invocation.
        try:
            async with asyncio.TaskGroup() as group:
                if with_audio:
                    group.create_task(limited(self._base_event(ACTION_AUDIO, assignment, keys)))
                for chunk in chunks:
                    group.create_task(render_chunk(chunk))
        except ExceptionGroup as failures:
            raise _first_render_error(failures) from None
        join = self._base_event(ACTION_JOIN, assignment, keys)
        join.update(chunk_count=len(chunks), with_audio=with_audio)
        return await limited(join)

    async def _accept(self, answer: Any, assignment: RenderAssignment, keys: RenderKeys) -> RenderOutput:
        try:
            bucket, key = str(answer["bucket"]), str(answer["key"])
            size, duration = int(answer["size"]), float(answer["duration"])
            frames = int(answer.get("frames", 0))
        except (TypeError, KeyError, ValueError):
            raise RenderError(f"Lambda answered without bucket/key/size/duration: {answer!r}"[:500]) from None
        if assignment.format is not OutputFormat.GIF and frames and frames != assignment.composition.frames_total:
            raise RenderError(
                f"the render has {frames} frames, not the composition's {assignment.composition.frames_total}"
            )
        if bucket != self.config.bucket or key not in (keys.output, keys.final):
            raise RenderError(f"Lambda answered with s3://{bucket}/{key}, not this render's {keys.output}")
        if key == keys.output != keys.final:
            await self._promote(keys)
        return RenderOutput(uri=f"s3://{bucket}/{keys.final}", file_size_bytes=size, duration_seconds=duration,
                            frames=frames)

    async def _promote(self, keys: RenderKeys) -> None:
        """Moves this attempt's finished render to the export's final key (a server-side copy; in parts above
        5 GiB), marked as this attempt's, so that only this attempt's clean-up removes it."""
        from boto3.s3.transfer import S3TransferConfig
        from botocore.exceptions import ClientError

        bucket = self.config.bucket
        extra = {
            "ContentType": CONTENT_TYPES.get(f".{keys.extension}", "application/octet-stream"),
            "Metadata": {ATTEMPT_METADATA: keys.attempt},
            "MetadataDirective": "REPLACE",
        }
        try:
            async with self._session.client(
                "s3", endpoint_url=self.config.s3_endpoint_url, region_name=self.config.region
            ) as s3:
                await s3.copy(
                    {"Bucket": bucket, "Key": keys.output}, bucket, keys.final, ExtraArgs=extra,
                    Config=S3TransferConfig(multipart_threshold=COPY_IN_ONE_REQUEST_BYTES),
                )
                with contextlib.suppress(ClientError):  # else the lifecycle rule on the parts removes it
                    await s3.delete_object(Bucket=bucket, Key=keys.output)
        except ClientError as exc:
            raise RenderError(f"could not move s3://{bucket}/{keys.output} to {keys.final}: {exc}") from None

    async def _abandon(self, keys: RenderKeys) -> None:
        """Best effort: mark this attempt abandoned (its handlers check the marker before uploading) and
        delete what it uploaded: its parts, and the final object if this attempt wrote it (another attempt's
        is a finished render of the same export). Parts left by a handler that passed the check expire by the
        bucket's lifecycle rule on the parts prefix."""
        try:
            async with self._session.client(
                "s3", endpoint_url=self.config.s3_endpoint_url, region_name=self.config.region
            ) as s3:
                await s3.put_object(Bucket=self.config.bucket, Key=keys.abandoned_marker, Body=b"")
                paginator = s3.get_paginator("list_objects_v2")
                doomed = [keys.final] if await self._wrote_final(s3, keys) else []
                async for page in paginator.paginate(Bucket=self.config.bucket, Prefix=keys.parts_prefix):
                    doomed += [item["Key"] for item in page.get("Contents", [])
                               if item["Key"] != keys.abandoned_marker]
                for start in range(0, len(doomed), 1000):
                    await s3.delete_objects(
                        Bucket=self.config.bucket,
                        Delete={"Objects": [{"Key": key} for key in doomed[start : start + 1000]], "Quiet": True},
                    )
        except Exception:
            log.warning("could not clean up %s after a failed render", keys.final, exc_info=True)

    async def _wrote_final(self, s3: Any, keys: RenderKeys) -> bool:
        from botocore.exceptions import ClientError

        try:
            head = await s3.head_object(Bucket=self.config.bucket, Key=keys.final)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise
        return bool(head.get("Metadata", {}).get(ATTEMPT_METADATA) == keys.attempt)
