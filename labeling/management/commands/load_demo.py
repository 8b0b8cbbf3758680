"""Load the demo data from ../shared/data: Self-Instruct prompts with expert answers, and HH-RLHF preferences.

Idempotent: every record is identified by its content hash, so a second run adds nothing.
"""

import gzip
import json
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from labeling.importing import RecordError, hh_pair_record, self_instruct_record
from labeling.models import LabelerProfile
from labeling.services import import_job_record
from labeling.services.records import records_import

DEMO_FILES = [
    ("self_instruct_user_oriented_instructions.jsonl.gz", "self-instruct-user-oriented"),
    ("self_instruct_seed_tasks.jsonl.gz", "self-instruct-seed"),
    ("hh_rlhf_harmless_base_sample.jsonl.gz", "hh-rlhf-harmless-base"),
]

# Demo accounts for `make run`: never created outside load_demo.
DEMO_USERS = [
    ("admin", "admin", {"is_staff": True, "is_superuser": True}, True),
    ("alice", "alice", {}, True),
    ("bob", "bob", {}, False),
]


class Command(BaseCommand):
    help = "Import the demo data set (Self-Instruct and HH-RLHF samples) and create demo accounts."

    def add_arguments(self, parser):
        parser.add_argument("--data-dir", type=Path, default=None, help="Defaults to SHARED_DATA_DIR.")
        parser.add_argument("--no-users", action="store_true", help="Do not create the demo accounts.")

    def handle(self, *args, data_dir=None, no_users=False, **options):
        data_dir = Path(data_dir or settings.SHARED_DATA_DIR)
        missing = [name for name, _ in DEMO_FILES if not (data_dir / name).is_file()]
        if missing:
            raise CommandError(f"Demo data not found in {data_dir}: missing {', '.join(missing)}.")
        for name, dataset in DEMO_FILES:
            self._load_file(data_dir / name, dataset)
        if no_users:
            return
        if not settings.DEBUG:  # a deployment: accounts whose passwords are in the README would be an open door
            self.stdout.write(
                "demo accounts not created: DEBUG is off (these are the production settings); "
                "create an admin with `manage.py createsuperuser`"
            )
            return
        self._create_users()

    def _load_file(self, path: Path, dataset: str) -> None:
        parse = hh_pair_record if dataset.startswith("hh-rlhf") else self_instruct_record
        started, started_at, records = time.monotonic(), timezone.now(), []
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                try:
                    records.append(parse(json.loads(line), dataset=dataset))
                except (json.JSONDecodeError, RecordError) as exc:
                    raise CommandError(f"{path.name}, line {line_number}: {exc}") from None
        added, existing = records_import(records)
        if added:  # listed on the imports page (a rerun that adds nothing is not)
            import_job_record(
                path=path,
                dataset=dataset,
                format="hh-rlhf" if dataset.startswith("hh-rlhf") else "self-instruct",
                lines=len(records),
                added=added,
                existing=existing,
                started_at=started_at,
            )
        elapsed = time.monotonic() - started
        self.stdout.write(f"{path.name}: {added} added, {existing} already there ({elapsed:.1f} s)")

    def _create_users(self) -> None:
        User = get_user_model()
        for username, password, flags, is_reviewer in DEMO_USERS:
            user, created = User.objects.get_or_create(username=username, defaults=flags)
            if created:
                user.set_password(password)
                user.save()
                self.stdout.write(f"created demo user {username!r} with password {password!r}")
            LabelerProfile.objects.get_or_create(user=user, defaults={"is_reviewer": is_reviewer, "languages": ["en"]})
