"""Export the labeled data for training: sft.jsonl, preferences.jsonl, rankings.jsonl and a README.md card.

manage.py export_data OUT_DIR [--kind sft|preferences|rankings ...] [--since DATE] [--until DATE]
    [--model-version NAME] [--min-agreement 0.7] [--include-unreviewed] [--no-imported] [--include-heldout]
    [--include-ab]
"""

import datetime as dt
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from labeling.exporting import FILES, KINDS, ExportFilters, write_export


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"{value!r} is not a date (YYYY-MM-DD).") from None


class Command(BaseCommand):
    help = "Export training data in the formats TRL and `datasets` load as they are, with a dataset card."

    def add_arguments(self, parser):
        parser.add_argument("out", type=Path)
        parser.add_argument("--kind", action="append", choices=KINDS, help="Repeatable; default: all.")
        parser.add_argument("--since", type=_date)
        parser.add_argument("--until", type=_date)
        parser.add_argument("--model-version")
        parser.add_argument("--min-agreement", type=float)
        parser.add_argument("--include-unreviewed", action="store_true", help="Demonstrations not yet accepted too.")
        parser.add_argument("--no-imported", action="store_true", help="Leave out imported data.")
        parser.add_argument("--include-heldout", action="store_true", help="Held-out (evaluation) conversations too.")
        parser.add_argument("--include-ab", action="store_true", help="The gate's blind A/B comparisons too.")

    def handle(self, *args, out: Path, kind=None, **options):
        if options["min_agreement"] is not None and not 0 <= options["min_agreement"] <= 1:
            raise CommandError("--min-agreement is between 0 and 1.")
        filters = ExportFilters(
            since=options["since"],
            until=options["until"],
            model_version=options["model_version"],
            min_agreement=options["min_agreement"],
            accepted_only=not options["include_unreviewed"],
            include_imported=not options["no_imported"],
            include_heldout=options["include_heldout"],
            include_ab=options["include_ab"],
        )
        started = time.monotonic()
        counts = write_export(out, filters, kinds=kind or KINDS)
        for name, count in counts.items():
            self.stdout.write(f"{out / FILES[name]}: {count} rows")
        self.stdout.write(f"{out / 'README.md'}: dataset card ({time.monotonic() - started:.1f} s)")
