"""Uploads of JSONL files to import, and the worker job that imports them (labeling/importing.py parses)."""

from pathlib import Path

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from config.jobs import enqueue_on_commit
from labeling.importing import FORMATS, bounded_lines, import_jsonl
from labeling.limits import (
    IMPORT_ERRORS_KEPT,
)
from labeling.models import (
    ImportChunk,
    ImportJob,
)

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
    """The uploaded file's bytes, one chunk at a time (or, for a job that names a file, that file's blocks)."""
    if job.file_path and not job.chunks.exists():
        with Path(job.file_path).open("rb") as stream:
            yield from iter(lambda: stream.read(CHUNK_BYTES), b"")
        return
    for chunk_id in job.chunks.order_by("index").values_list("pk", flat=True):
        yield bytes(ImportChunk.objects.values_list("data", flat=True).get(pk=chunk_id))


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
    """Import a queued job's file, recording progress as it goes. None if another worker has it."""
    if not ImportJob.objects.filter(pk=job_id, status=ImportJob.Status.QUEUED).update(
        status=ImportJob.Status.RUNNING, started_at=timezone.now()
    ):
        return None
    job = ImportJob.objects.get(pk=job_id)
    try:
        return _run(job)
    finally:  # the upload is not kept once its import ran, however it ended
        job.chunks.all().delete()


def _run(job: ImportJob) -> ImportJob:
    limit = django_settings.IMPORT_MAX_LINE_BYTES
    total = sum(1 for _ in bounded_lines(_blocks(job), limit))
    ImportJob.objects.filter(pk=job.pk).update(lines_total=total)

    def progress(lines_done, report):
        ImportJob.objects.filter(pk=job.pk).update(
            lines_done=lines_done, added=report.added, existing=report.existing, error_count=len(report.errors)
        )

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
