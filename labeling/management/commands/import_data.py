"""Import JSONL into conversation trees: prompts, demonstrations, HH-RLHF pairs or TRL preferences.

manage.py import_data FILE [--format auto|prompts|demonstrations|hh|trl_preference] [--on-error skip|abort]
"""

import sys
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from labeling.importing import FORMATS
from labeling.services.records import import_jsonl


class Command(BaseCommand):
    help = "Import a JSONL file (idempotent: content hashing means a re-import adds nothing)."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--format", default="auto", choices=["auto", *FORMATS])
        parser.add_argument("--on-error", default="skip", choices=["skip", "abort"])
        parser.add_argument("--dataset", default="", help="A label stored on the imported conversations.")

    def handle(self, *args, file: Path, format: str, on_error: str, dataset: str, **options):
        if not file.is_file():
            raise CommandError(f"{file} does not exist.")
        with file.open("rb") as lines:
            total = sum(1 for _ in lines)
        started = time.monotonic()

        def progress(done, report):
            rate = done / max(time.monotonic() - started, 1e-6)
            sys.stderr.write(
                f"\r{done}/{total} lines ({done / max(total, 1):.0%}), {report.added} added, {rate:.0f} lines/s"
            )
            sys.stderr.flush()

        report = import_jsonl(
            lambda: file.open("rb"), format=format, dataset=dataset or file.stem, on_error=on_error, progress=progress
        )
        elapsed = time.monotonic() - started
        sys.stderr.write("\n")
        for number, reason in report.errors[:50]:
            self.stderr.write(f"line {number}: {reason}")
        if len(report.errors) > 50:
            self.stderr.write(f"... and {len(report.errors) - 50} more malformed lines")
        if report.aborted:
            raise CommandError(f"Aborted: {len(report.errors)} malformed line(s); nothing was imported.")
        self.stdout.write(
            f"{report.added} added, {report.existing} already there, {report.skipped} malformed lines skipped; "
            f"{total} lines in {elapsed:.1f} s ({total / max(elapsed, 1e-6):.0f} lines/s)"
        )
