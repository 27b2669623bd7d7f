"""The render job: reserve -> render -> complete. The one metered path that every backend goes through.

Nothing else in the renderer calls a backend's `render`: a backend only accepts a `RenderAssignment`, and
only this module builds one, from the `Reservation` metering returned. Whatever way a render ends (success,
failure, cancellation, shutdown), its completion goes to the durable outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from renderer.domain import (
    Composition,
    OutputFormat,
    Progress,
    RenderAssignment,
    RenderBackend,
    RenderError,
    RenderMode,
    RenderOutput,
    Reservation,
)
from renderer.errors import InvalidArgument
from renderer.metering_port import (
    ClosedExport,
    Completion,
    ExportAlreadyClosed,
    MeteringError,
    MeteringPort,
    MeteringRejected,
    Outcome,
    ReserveRequest,
)
from renderer.validation import validate_composition

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
# Terminal jobs kept for GetRender/WatchRender after they end.
RETAINED_FINISHED_JOBS = 10_000
# While metering cannot be reached, a render's heartbeat retries after 1, 2, 4 ... at most 15 seconds.
HEARTBEAT_RETRY_FIRST_SECONDS = 1.0
HEARTBEAT_RETRY_MAX_SECONDS = 15.0


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RENDERING = "rendering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobNotFound(LookupError):
    pass


class IdempotencyConflict(Exception):
    """The same idempotency key came with a different request."""


class BackendUnavailable(Exception):
    """The request asks for a backend this renderer is not configured for."""


class StartRefused(Exception):
    """A start this renderer turns away before anything is reserved; `reason` names why, for metrics."""

    reason = ""


class Draining(StartRefused):
    """The renderer is shutting down: it finishes its renders but starts no new one."""

    reason = "draining"


class Busy(StartRefused):
    """Every slot is taken and the waiting line is full: the render belongs on another renderer, or later."""

    reason = "busy"


@dataclass(frozen=True, slots=True)
class RenderRequest:
    idempotency_key: str
    user_id: str
    project_id: str
    composition: Composition
    format: OutputFormat
    mode: RenderMode | None = None  # None: the renderer's default


@dataclass(frozen=True, slots=True)
class Job:
    """An immutable snapshot; every change makes a new one."""

    job_id: str
    export_id: str
    user_id: str
    project_id: str
    format: OutputFormat
    mode: RenderMode
    state: JobState
    frames_total: int
    created_at: datetime
    updated_at: datetime
    frames_rendered: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    progress: float = 0.0
    output_uri: str = ""
    file_size_bytes: int = 0
    duration_seconds: float = 0.0
    error: str = ""
    render_seconds: float = 0.0  # wall time of the render, once it ended


_CLOSED_STATES = {
    "completed": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
    "expired": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
}


def _closed_fields(export: ClosedExport) -> dict[str, object]:
    state = _CLOSED_STATES[export.status]
    error = export.error or ("the reservation expired before the render finished" if export.status == "expired" else "")
    return {
        "state": state,
        "error": error,
        "output_uri": export.output_uri,
        "file_size_bytes": export.file_size_bytes,
        "duration_seconds": export.duration_seconds,
        "progress": 1.0 if state is JobState.SUCCEEDED else 0.0,
    }


class CompletionSink(Protocol):
    async def submit(self, completion: Completion) -> bool: ...


@dataclass
class _Entry:
    job: Job
    request: RenderRequest
    task: asyncio.Task[None] | None = None
    closing: asyncio.Task[None] | None = None  # the close of a job whose task was cancelled before it ran
    watchers: set[asyncio.Queue[Job]] = field(default_factory=set)


class JobRunner:
    def __init__(
        self,
        metering: MeteringPort,
        completions: CompletionSink,
        backends: Mapping[RenderMode, RenderBackend],
        *,
        default_mode: RenderMode = RenderMode.LOCAL,
        concurrency: int = 1,
        max_waiting: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_transition: Callable[[Job, JobState | None], None] | None = None,
    ) -> None:
        """`on_transition(job, previous_state)` sees every state change (previous None for a new job).
        At most `concurrency` renders run at once and `max_waiting` more wait for a slot (None: no limit);
        a start beyond that is refused (`Busy`) before anything is reserved."""
        self._metering = metering
        self._completions = completions
        self._backends = dict(backends)
        self._default_mode = default_mode
        self._slots = asyncio.Semaphore(concurrency)
        self._capacity = None if max_waiting is None else concurrency + max_waiting
        self._unfinished: set[asyncio.Task[None]] = set()  # renders queued or running
        self._starting: set[asyncio.Task[str]] = set()  # starts reserving with metering: renders to be
        self._clock = clock
        self._on_transition = on_transition
        self._entries: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._by_key: dict[tuple[str, str], asyncio.Task[str]] = {}  # the start of each key, done or under way
        self._closing_tasks: set[asyncio.Task[Any]] = set()  # completions on their way, awaited by shutdown
        self._draining = False

    # --- the public operations -------------------------------------------------------------------------

    async def start(self, request: RenderRequest) -> Job:
        """Reserve with metering, then queue the render. Metering's refusals propagate unchanged."""
        validate_composition(request.composition, max_duration_seconds=None)
        mode = request.mode or self._default_mode
        backend = self._backends.get(mode)
        if backend is None:
            raise BackendUnavailable(f"{mode.value} rendering is not configured on this renderer")
        key = (request.user_id, request.idempotency_key)
        pending = self._by_key.get(key)
        if pending is not None:
            job_id = await asyncio.shield(pending)
            entry = self._entries.get(job_id)
            if entry is None:
                raise JobNotFound(job_id)
            if entry.request != dataclasses.replace(request, mode=mode):
                raise IdempotencyConflict(
                    f"idempotency_key {request.idempotency_key!r} was used for a different render"
                )
            return entry.job
        if self._draining:  # after the replay above: a caller that retries a render it started gets its job
            raise Draining("this renderer is shutting down and starts no new render; start it on another renderer")
        taken = len(self._unfinished) + len(self._starting)
        if self._capacity is not None and taken >= self._capacity:
            raise Busy(
                f"this renderer is full ({taken} renders running or waiting); start it on another renderer or later"
            )
        # After the replay above: a retry of a render started here gets its job even if a source is gone since.
        backend.check(request.composition)  # unreadable sources are the caller's error, before any quota is used
        # Its own task, shielded: a caller that gives up (deadline, cancel) while metering reserves does not
        # abandon a reservation that may be committed already; it becomes a job, which a retry with the same
        # key finds (as in a drain), instead of an export held RESERVED until its lease runs out.
        starting = asyncio.create_task(
            self._reserve_and_queue(dataclasses.replace(request, mode=mode), mode), name=f"start {key}"
        )
        self._by_key[key] = starting
        self._starting.add(starting)
        starting.add_done_callback(lambda task: self._started(key, task))
        job_id = await asyncio.shield(starting)
        return self._entries[job_id].job

    def _started(self, key: tuple[str, str], task: asyncio.Task[str]) -> None:
        self._starting.discard(task)
        if task.cancelled() or task.exception() is not None:  # retrieved: its caller may have gone
            if self._by_key.get(key) is task:
                del self._by_key[key]  # a later start with this key tries again

    def get(self, job_id: str) -> Job:
        entry = self._entries.get(job_id)
        if entry is None:
            raise JobNotFound(job_id)
        return entry.job

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """Every change of the job, starting with its current state, ending with a terminal one."""
        entry = self._entries.get(job_id)
        if entry is None:
            raise JobNotFound(job_id)
        queue: asyncio.Queue[Job] = asyncio.Queue()
        entry.watchers.add(queue)
        try:
            job = entry.job
            yield job
            while not job.state.terminal:
                job = await queue.get()
                yield job
        finally:
            entry.watchers.discard(queue)

    async def cancel(self, job_id: str) -> Job:
        entry = self._entries.get(job_id)
        if entry is None:
            raise JobNotFound(job_id)
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(entry.task)
        if entry.closing is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(entry.closing)
        return entry.job

    async def shutdown(self, grace_seconds: float) -> None:
        """Start no new render; let running and queued renders finish within the grace period, cancel the
        rest, flush their completions. Jobs stay readable (get, watch, cancel) meanwhile and after."""
        self._draining = True
        deadline = asyncio.get_running_loop().time() + grace_seconds
        # Starts already reserving go on to the end, however long the grace (metering's deadlines bound them):
        # a start that reserved must become a job that this drain closes, not a reservation left to its lease.
        if self._starting:
            await asyncio.wait(list(self._starting))
        running = list(self._unfinished)
        if running:
            remaining = max(deadline - asyncio.get_running_loop().time(), 0)
            _, still_running = await asyncio.wait(running, timeout=remaining)
            for task in still_running:
                task.cancel()
            await asyncio.gather(*still_running, return_exceptions=True)
        if self._closing_tasks:
            await asyncio.gather(*self._closing_tasks, return_exceptions=True)

    # --- the metered path --------------------------------------------------------------------------------

    async def _reserve_and_queue(self, request: RenderRequest, mode: RenderMode) -> str:
        try:
            reservation = await self._metering.reserve(
                ReserveRequest(
                    idempotency_key=request.idempotency_key,
                    user_id=request.user_id,
                    project_id=request.project_id,
                    mode=mode,
                    format=request.format,
                    composition=request.composition,
                )
            )
        except ExportAlreadyClosed as closed:
            # A retry of a render that already ended (e.g. before this renderer restarted): report it, render nothing.
            entry = self._register(request, mode, closed.export.export_id, **_closed_fields(closed.export))
            return entry.job.job_id
        entry = self._register(request, mode, reservation.export_id)
        assignment = RenderAssignment(reservation, request.composition, request.format)
        job = entry.job
        entry.task = asyncio.create_task(self._run(entry, assignment, self._backends[mode]), name=job.job_id)
        entry.task.add_done_callback(lambda task: self._close_if_never_ran(entry, task))
        self._unfinished.add(entry.task)
        entry.task.add_done_callback(self._unfinished.discard)
        log.info(
            "render queued",
            extra={"job_id": job.job_id, "export_id": job.export_id, "user_id": job.user_id, "mode": mode.value},
        )
        return job.job_id

    def _register(self, request: RenderRequest, mode: RenderMode, export_id: str, **fields: object) -> _Entry:
        now = self._clock()
        job = Job(
            job_id=uuid.uuid4().hex,
            export_id=export_id,
            user_id=request.user_id,
            project_id=request.project_id,
            format=request.format,
            mode=mode,
            state=JobState.QUEUED,
            frames_total=request.composition.frames_total,
            created_at=now,
            updated_at=now,
        )
        job = dataclasses.replace(job, **fields)  # type: ignore[arg-type]
        entry = _Entry(job=job, request=request)
        self._entries[job.job_id] = entry
        if job.state.terminal:  # it ran elsewhere or earlier: nothing happens here worth a metric
            if job.state is JobState.SUCCEEDED:
                entry.job = dataclasses.replace(job, frames_rendered=job.frames_total)
            self._retire(job.job_id)
        elif self._on_transition is not None:
            self._on_transition(job, None)
        return entry

    async def _run(self, entry: _Entry, assignment: RenderAssignment, backend: RenderBackend) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(assignment.reservation))
        started = time.monotonic()
        try:
            async with self._slots:
                self._update(entry, state=JobState.RENDERING)
                started = time.monotonic()
                output = await backend.render(assignment, lambda p: self._progress(entry, p))
        except asyncio.CancelledError:
            await self._close(entry, JobState.CANCELLED, Outcome.CANCELLED, started, error="cancelled")
        except (RenderError, InvalidArgument) as error:
            # InvalidArgument here: a source checked at start that is gone or refused now (a deleted file, a
            # mistyped s3 key, which only the fetch finds): the caller's error, named by its field, not a crash.
            await self._close(entry, JobState.FAILED, Outcome.FAILED, started, error=str(error))
        except Exception as error:  # a bug must still close the export, never leave it RESERVED
            log.exception("render crashed", extra={"job_id": entry.job.job_id})
            await self._close(entry, JobState.FAILED, Outcome.FAILED, started, error=f"internal error: {error!r}")
        else:
            await self._close(entry, JobState.SUCCEEDED, Outcome.COMPLETED, started, output=output)
        finally:
            heartbeat.cancel()

    def _close_if_never_ran(self, entry: _Entry, task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never runs `_run` (start() returns without yielding, so a
        CancelRender can come first): close its export here, as `_run` would have."""
        if entry.job.state.terminal or not task.cancelled():
            return
        entry.closing = asyncio.create_task(
            self._close(entry, JobState.CANCELLED, Outcome.CANCELLED, time.monotonic(), error="cancelled")
        )
        self._closing_tasks.add(entry.closing)
        entry.closing.add_done_callback(self._closing_tasks.discard)

    async def _close(
        self,
        entry: _Entry,
        state: JobState,
        outcome: Outcome,
        started: float,
        *,
        error: str = "",
        output: RenderOutput | None = None,
    ) -> None:
        render_seconds = time.monotonic() - started
        error = error[-MAX_ERROR_CHARS:]
        completion = Completion(
            export_id=entry.job.export_id,
            outcome=outcome,
            error=error,
            file_size_bytes=output.file_size_bytes if output else 0,
            duration_seconds=output.duration_seconds if output else 0.0,
            output_uri=output.uri if output else "",
            render_seconds=render_seconds,
        )
        # Shielded: a second cancellation (CancelRender twice, shutdown) must not stop the completion.
        closing = asyncio.create_task(self._completions.submit(completion))
        self._closing_tasks.add(closing)
        closing.add_done_callback(self._closing_tasks.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(closing)
        changes: dict[str, object] = {"state": state, "error": error, "render_seconds": render_seconds}
        if output is not None:
            changes |= {
                "output_uri": output.uri,
                "file_size_bytes": output.file_size_bytes,
                "duration_seconds": output.duration_seconds,
                "frames_rendered": output.frames or entry.job.frames_total,
                "progress": 1.0,
            }
        self._update(entry, **changes)
        self._retire(entry.job.job_id)
        log.info(
            "render finished",
            extra={"job_id": entry.job.job_id, "export_id": entry.job.export_id, "state": state.value,
                   "render_seconds": round(render_seconds, 3), "error": error[:200]},
        )

    async def _heartbeat(self, reservation: Reservation) -> None:
        """Keep the reservation's lease alive while the job is queued or rendering."""
        lease_expires_at = reservation.lease_expires_at
        failures = 0
        while True:
            if failures:  # metering unreachable: back off (1, 2, 4 ... 15 s), not a retry every 0.2 s per render
                delay = min(HEARTBEAT_RETRY_MAX_SECONDS, HEARTBEAT_RETRY_FIRST_SECONDS * 2 ** (failures - 1))
            else:
                delay = max(0.2, (lease_expires_at - self._clock()).total_seconds() / 3)
            await asyncio.sleep(delay)
            try:
                lease_expires_at = await self._metering.extend(reservation.export_id)
            except MeteringRejected as error:
                # Expired or closed already: the render goes on and its completion is still recorded late.
                log.warning("lease not extended", extra={"export_id": reservation.export_id, "error": str(error)})
                if error.permanent:
                    return
            except MeteringError as error:
                failures += 1
                if failures == 1:  # one line when it starts failing, one when it recovers
                    log.warning("heartbeat failed", extra={"export_id": reservation.export_id, "error": str(error)})
            else:
                if failures:
                    log.info("heartbeat restored", extra={"export_id": reservation.export_id, "failures": failures})
                failures = 0

    def _progress(self, entry: _Entry, progress: Progress) -> None:
        if entry.job.state.terminal:
            return
        self._update(
            entry,
            frames_rendered=progress.frames_rendered,
            frames_total=progress.frames_total or entry.job.frames_total,
            chunks_done=progress.chunks_done,
            chunks_total=progress.chunks_total,
            progress=progress.fraction,
        )

    def _update(self, entry: _Entry, **changes: object) -> None:
        previous = entry.job.state
        entry.job = dataclasses.replace(entry.job, updated_at=self._clock(), **changes)  # type: ignore[arg-type]
        for queue in entry.watchers:  # first: a failing observer must not leave a watcher waiting forever
            queue.put_nowait(entry.job)
        if entry.job.state is not previous and self._on_transition is not None:
            try:
                self._on_transition(entry.job, previous)
            except Exception:
                log.exception("job observer failed", extra={"job_id": entry.job.job_id})

    def _retire(self, job_id: str) -> None:
        self._finished[job_id] = None
        while len(self._finished) > RETAINED_FINISHED_JOBS:
            old, _ = self._finished.popitem(last=False)
            entry = self._entries.pop(old, None)
            if entry is not None:
                self._by_key.pop((entry.request.user_id, entry.request.idempotency_key), None)
