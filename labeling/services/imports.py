"""Uploads of JSONL files to import, and the worker job that imports them (labeling/importing.py parses)."""

import uuid
from pathlib import Path

from django.conf import settings as django_settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from config.jobs import enqueue_on_commit
from labeling.importing import FORMATS, import_jsonl
from labeling.limits import (
    IMPORT_ERRORS_KEPT,
)
from labeling.models import (
    ImportJob,
)


def import_job_create(*, upload, format: str, on_error: str, dataset: str, user) -> ImportJob:
    """Save an uploaded JSONL file and queue its import on a worker."""
    if format != "auto" and format not in FORMATS:
        raise ValidationError({"format": f"Unknown format {format!r}; use auto, {', '.join(FORMATS)}."})
    if on_error not in ImportJob.OnError.values:
        raise ValidationError({"on_error": "Choose skip or abort."})
    if len(dataset) > 64:
        raise ValidationError({"dataset": "At most 64 characters."})
    folder = Path(django_settings.ARTIFACTS_DIR) / "imports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.jsonl"
    size, limit = 0, django_settings.IMPORT_MAX_FILE_BYTES
    with path.open("wb") as out:
        for chunk in upload.chunks():
            out.write(chunk)
            size += len(chunk)
            if size > limit:
                break
    if size > limit:
        path.unlink()
        raise ValidationError({"file": f"The file is larger than {limit:,} bytes (IMPORT_MAX_FILE_BYTES); split it."})
    if size == 0:
        path.unlink()
        raise ValidationError({"file": "The file is empty."})
    with transaction.atomic():
        job = ImportJob.objects.create(
            file_path=str(path),
            original_name=getattr(upload, "name", "upload.jsonl")[:255],
            format=format,
            on_error=on_error,
            dataset=dataset,
            size_bytes=size,
            created_by=user,
        )
        enqueue_on_commit("labeling.tasks.run_import", job.pk)
    return job


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
    path = Path(job.file_path)
    with path.open("rb") as lines:
        total = sum(1 for _ in lines)
    ImportJob.objects.filter(pk=job.pk).update(lines_total=total)

    def progress(lines_done, report):
        ImportJob.objects.filter(pk=job.pk).update(
            lines_done=lines_done, added=report.added, existing=report.existing, error_count=len(report.errors)
        )

    def open_lines():
        return path.open("rb")

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
