"""Uploads of JSONL files to import, and the worker job that imports them (labeling/importing.py parses)."""

import logging
from datetime import timedelta
from pathlib import Path

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from config.jobs import enqueue_on_commit
from labeling.importing import FORMATS, bounded_lines
from labeling.limits import (
    IMPORT_ERRORS_KEPT,
)
from labeling.models import (
    ImportChunk,
    ImportJob,
)
from labeling.selectors import import_alive_key, import_job_live
from labeling.services.records import import_jsonl

logger = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # an upload is kept in the database in pieces of this size


def import_job_create(*, upload, format: str, on_error: str, dataset: str, user) -> ImportJob:
    """Keep an uploaded JSONL file in the database (ImportChunk: a worker on another host reads it) and queue its
    import on a worker. A file over IMPORT_MAX_FILE_BYTES, or empty, is refused and nothing is kept."""
    if format != "auto" and format not in FORMATS:
        raise ValidationError({"format": f"Unknown format {format!r}; use auto, {', '.join(FORMATS)}."})
    if on_error not in ImportJob.OnError.values:
        raise ValidationError({"on_error": "Choose skip or abort."})
    if len(dataset) > 64:
        raise ValidationError({"dataset": "At most 64 characters."})
    limit = django_settings.IMPORT_MAX_FILE_BYTES
    with transaction.atomic():
        job = ImportJob.objects.create(
            original_name=getattr(upload, "name", "upload.jsonl")[:255],
            format=format,
            on_error=on_error,
            dataset=dataset,
            created_by=user,
        )
        size, index, pending = 0, 0, bytearray()
        for piece in upload.chunks():
            size += len(piece)
            if size > limit:  # the job and its chunks so far are rolled back with the transaction
                raise ValidationError(
                    {"file": f"The file is larger than {limit:,} bytes (IMPORT_MAX_FILE_BYTES); split it."}
                )
            pending += piece
            while len(pending) >= CHUNK_BYTES:
                ImportChunk.objects.create(job=job, index=index, data=bytes(pending[:CHUNK_BYTES]))
                del pending[:CHUNK_BYTES]
                index += 1
        if pending:
            ImportChunk.objects.create(job=job, index=index, data=bytes(pending))
        if size == 0:
            raise ValidationError({"file": "The file is empty."})
        ImportJob.objects.filter(pk=job.pk).update(size_bytes=size)
        enqueue_on_commit("labeling.tasks.run_import", job.pk)
    job.size_bytes = size
    return job


def _blocks(job: ImportJob):
    """The uploaded file's bytes, one chunk at a time (or, for a job that names a file, that file's blocks). Each
    chunk read is a sign of life for the reaper (import_jobs_reap)."""
    if job.file_path and not job.chunks.exists():
        with Path(job.file_path).open("rb") as stream:
            yield from iter(lambda: stream.read(CHUNK_BYTES), b"")
        return
    for chunk_id in job.chunks.order_by("index").values_list("pk", flat=True):
        import_job_alive(job.pk)
        yield bytes(ImportChunk.objects.values_list("data", flat=True).get(pk=chunk_id))


def import_job_alive(job_id: int, **progress) -> None:
    """A sign of life (and the progress so far) from the worker importing `job_id`. The import is one transaction,
    so its row's updates are invisible until it commits: the sign and the progress go to the shared cache, where
    the reaper and the pages read them (selectors.import_job_live). Outside that transaction the row is touched
    too. Best effort: a cache error is ignored."""
    from django.core.cache import cache

    now = timezone.now()
    if not transaction.get_connection().in_atomic_block:
        ImportJob.objects.filter(pk=job_id).update(heartbeat_at=now)
    try:
        cache.set(import_alive_key(job_id), {"at": now.timestamp(), **progress}, django_settings.IMPORT_STALE_S)
    except Exception:
        logger.warning("could not record import %s's progress in the cache", job_id, exc_info=True)


def import_job_record(
    *, path: Path, dataset: str, format: str, lines: int, added: int, existing: int, started_at
) -> ImportJob:
    """An import that ran outside the upload page (the demo data that `make run` loads): listed with the others
    on the imports page, finished, with what it added."""
    return ImportJob.objects.create(
        file_path=str(path),
        original_name=path.name,
        format=format,
        dataset=dataset,
        status=ImportJob.Status.DONE,
        size_bytes=path.stat().st_size if path.is_file() else 0,
        lines_done=lines,
        lines_total=lines,
        added=added,
        existing=existing,
        started_at=started_at,
        finished_at=timezone.now(),
    )


def import_job_run(*, job_id: int) -> ImportJob | None:
    """Import a queued job's file, recording progress as it goes. None if another worker has it (or it ended).

    A run may repeat one that a lost worker left half done: importing is idempotent (records already there count
    as `existing`), so the second run adds only what the first did not."""
    now = timezone.now()
    if not ImportJob.objects.filter(pk=job_id, status=ImportJob.Status.QUEUED).update(
        status=ImportJob.Status.RUNNING, started_at=now, heartbeat_at=now, attempts=F("attempts") + 1
    ):
        return None
    job = ImportJob.objects.get(pk=job_id)
    try:
        return _run(job)
    finally:  # the upload is not kept once its import ran, however it ended
        job.chunks.all().delete()


LOST_IMPORT = (
    "The import stopped {attempts} times without finishing (its worker was lost). What it imported is kept; "
    "upload the file again to import the rest: lines already imported count as existing."
)


def import_jobs_reap(*, stale_s: int | None = None, max_attempts: int | None = None) -> list[int]:
    """Imports whose worker stopped without a word (killed, host lost): no sign of life for `stale_s`. Each goes
    back to the queue while it has attempts left and its upload is still kept, else it fails with what to do, and
    its upload is dropped. Returns the ids it requeued or failed."""
    stale_s = django_settings.IMPORT_STALE_S if stale_s is None else stale_s
    max_attempts = django_settings.IMPORT_MAX_ATTEMPTS if max_attempts is None else max_attempts
    cutoff = timezone.now() - timedelta(seconds=stale_s)
    reaped = []
    for job in ImportJob.objects.filter(status=ImportJob.Status.RUNNING, heartbeat_at__lt=cutoff):
        if import_job_live(job).heartbeat_at >= cutoff:  # alive inside its transaction
            continue
        with transaction.atomic():
            stale = ImportJob.objects.filter(
                pk=job.pk, status=ImportJob.Status.RUNNING, heartbeat_at__lt=cutoff
            ).select_for_update()
            if not stale.exists():
                continue
            if job.attempts < max_attempts and (job.chunks.exists() or job.file_path):
                stale.update(status=ImportJob.Status.QUEUED, heartbeat_at=None)
                enqueue_on_commit("labeling.tasks.run_import", job.pk)
            else:
                stale.update(
                    status=ImportJob.Status.FAILED,
                    failure=LOST_IMPORT.format(attempts=job.attempts),
                    finished_at=timezone.now(),
                )
                job.chunks.all().delete()
        reaped.append(job.pk)
    return reaped


def _run(job: ImportJob) -> ImportJob:
    limit = django_settings.IMPORT_MAX_LINE_BYTES
    total = sum(1 for _ in bounded_lines(_blocks(job), limit))
    ImportJob.objects.filter(pk=job.pk).update(lines_total=total)

    def progress(lines_done, report):
        counts = {
            "lines_done": lines_done,
            "added": report.added,
            "existing": report.existing,
            "error_count": len(report.errors),
        }
        ImportJob.objects.filter(pk=job.pk).update(**counts)
        import_job_alive(job.pk, **counts)

    def open_lines():
        return bounded_lines(_blocks(job), limit)

    try:
        report = import_jsonl(
            open_lines, format=job.format, dataset=job.dataset, on_error=job.on_error, progress=progress
        )
    except Exception as exc:
        ImportJob.objects.filter(pk=job.pk).update(
            status=ImportJob.Status.FAILED, failure=f"{type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        raise
    ImportJob.objects.filter(pk=job.pk).update(
        status=ImportJob.Status.ABORTED if report.aborted else ImportJob.Status.DONE,
        lines_done=total if not report.aborted else report.lines,
        added=report.added,
        existing=report.existing,
        errors=report.errors[:IMPORT_ERRORS_KEPT],
        error_count=len(report.errors),
        finished_at=timezone.now(),
    )
    return ImportJob.objects.get(pk=job.pk)
