"""Writing parsed records (labeling/importing.py) as conversation trees: one transaction per import, each
record once (its content hash), imported preferences and rankings as finished ranking tasks."""

from dataclasses import dataclass, field

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from labeling import splits
from labeling.importing import (
    IMPORT_USERNAME,
    IMPORTED_LABELER_PREFIX,
    ImportRecord,
    RecordError,
    parse_jsonl,
    validate_record,
)
from labeling.models import (
    Assignment,
    Conversation,
    Message,
    Ranking,
    RankingEntry,
    Role,
    Task,
    TaskCandidate,
    TaskKind,
)


@dataclass
class ImportReport:
    lines: int = 0
    added: int = 0
    existing: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    aborted: bool = False

    @property
    def skipped(self) -> int:
        return len(self.errors)


def import_jsonl(
    open_lines,
    *,
    format: str = "auto",
    dataset: str = "",
    on_error: str = "skip",
    batch_size: int = 1000,
    progress=None,
) -> ImportReport:
    """Import a JSONL file (`open_lines()` returns a fresh iterator of its byte lines) in one transaction.

    on_error="skip": malformed lines are reported with their line number and left out; the rest is imported.
    on_error="abort": the file is checked first; any malformed line stops the import before anything is
    written. Either way the import is one transaction: it lands whole or not at all.
    `progress(lines_done, report)` is called every batch.
    """
    if on_error not in ("skip", "abort"):
        raise ValueError('on_error must be "skip" or "abort"')
    report = ImportReport()
    if on_error == "abort":
        for number, item in parse_jsonl(open_lines(), format=format, dataset=dataset):
            report.lines = number
            if isinstance(item, RecordError):
                report.errors.append((number, str(item)))
        if report.errors:
            report.aborted = True
            return report
        report.lines = 0
    importer = import_user()
    batch: list[ImportRecord] = []

    def flush():
        added, existing = records_import(batch, importer=importer)
        report.added += added
        report.existing += existing
        batch.clear()
        if progress is not None:
            progress(report.lines, report)

    with transaction.atomic():
        for number, item in parse_jsonl(open_lines(), format=format, dataset=dataset):
            report.lines = number
            if isinstance(item, RecordError):
                report.errors.append((number, str(item)))
                continue
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        flush()
    return report


def import_user():
    """The account that imported preferences are attributed to. It cannot log in."""
    user, created = get_user_model().objects.get_or_create(
        username=IMPORT_USERNAME, defaults={"is_active": False, "first_name": "Imported data"}
    )
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user


def record_import(record: ImportRecord, *, importer=None) -> bool:
    """Import one record into its own conversation tree. Returns False when it was already there."""
    added, _ = records_import([record], importer=importer)
    return added == 1


# Serialises imports across processes: the check for existing hashes and the inserts happen under it.
_IMPORT_LOCK_KEY = 0x464C_494D  # "FLIM"


def records_import(records: list[ImportRecord], *, importer=None) -> tuple[int, int]:
    """Import records in one transaction: all of them or, on an error, none. Returns (added, already there).

    A record whose content hash is already stored is skipped, so a re-import adds nothing. The trees are written
    in bulk, one level at a time, so a batch costs a few queries per tree depth rather than per message.
    """
    for record in records:
        validate_record(record)
    importer = importer or import_user()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_IMPORT_LOCK_KEY])
        hashes = {record.content_hash: record for record in records}
        existing = set(Conversation.objects.filter(content_hash__in=hashes).values_list("content_hash", flat=True))
        new_records = [record for content_hash, record in hashes.items() if content_hash not in existing]
        _bulk_create_trees(new_records, importer)
    return len(new_records), len(records) - len(new_records)


def _bulk_create_trees(records: list[ImportRecord], importer) -> None:
    if not records:
        return
    conversations = Conversation.objects.bulk_create(
        Conversation(
            source=Conversation.Source.IMPORT,
            dataset=record.dataset,
            language=record.language,
            tags=record.tags,
            content_hash=record.content_hash,
            metadata=record.metadata,
            split=splits.split_for_key(record.content_hash),
        )
        for record in records
    )
    # Context turns, one tree level per query; `tips[i]` is the newest message of record i.
    tips: list[Message | None] = [None] * len(records)
    for depth in range(max(len(record.context) for record in records)):
        level = [i for i, record in enumerate(records) if depth < len(record.context)]
        created = Message.objects.bulk_create(
            Message(
                conversation=conversations[i],
                parent=tips[i],
                depth=depth,
                role=records[i].context[depth].role,
                text=records[i].context[depth].content,
                origin=Message.Origin.IMPORT,
            )
            for i in level
        )
        for i, message in zip(level, created, strict=True):
            tips[i] = message

    def reply(i, text, review_status=Message.ReviewStatus.NOT_REVIEWED):
        return Message(
            conversation=conversations[i],
            parent=tips[i],
            depth=len(records[i].context),
            role=Role.ASSISTANT,
            text=text,
            origin=Message.Origin.IMPORT,
            review_status=review_status,
        )

    Message.objects.bulk_create(
        reply(i, record.reply, Message.ReviewStatus.ACCEPTED)
        for i, record in enumerate(records)
        if record.kind == "demonstration"
    )
    ranked = [i for i, record in enumerate(records) if record.kind in ("preference", "ranking")]
    if ranked:
        _bulk_create_imported_rankings(ranked, records, conversations, tips, reply, importer)


def _candidates(record: ImportRecord) -> tuple[list[str], list[int]]:
    if record.kind == "preference":
        return [record.chosen, record.rejected], [1, 2]
    return record.completions, record.ranks


def imported_labelers(pseudonyms) -> dict[str, object]:
    """{pseudonym: the inactive account its imported rankings belong to}, created as needed. The account is named
    after the pseudonym, so that an export of the imported rankings gives the same pseudonym back."""
    User = get_user_model()
    accounts = {}
    for pseudonym in sorted(set(pseudonyms)):
        accounts[pseudonym], _ = User.objects.get_or_create(
            username=f"{IMPORTED_LABELER_PREFIX}{pseudonym}",
            defaults={"is_active": False, "first_name": "Imported labeler"},
        )
    return accounts


def _bulk_create_imported_rankings(indices, records, conversations, tips, reply, importer) -> None:
    """An imported preference or ranking becomes a finished ranking task with one ranking: the chosen reply first
    and the rejected one second, or the completions with their ranks (ties kept), by the import account or, for
    an exported ranking, by an inactive account per labeler pseudonym."""
    labelers = imported_labelers(records[i].labeler for i in indices if records[i].labeler)
    candidates = {i: _candidates(records[i]) for i in indices}
    replies = Message.objects.bulk_create(reply(i, text) for i in indices for text in candidates[i][0])
    now = timezone.now()
    tasks = Task.objects.bulk_create(
        Task(
            kind=TaskKind.RANK_REPLIES,
            status=Task.Status.DONE,
            overlap=1,
            submitted_count=1,
            conversation=conversations[i],
            parent_message=tips[i],
            language=records[i].language,
            tags=records[i].tags,
            payload={"imported": True},
            completed_at=now,
        )
        for i in indices
    )
    replies_of, start = [], 0
    for i in indices:
        replies_of.append(replies[start : start + len(candidates[i][0])])
        start += len(candidates[i][0])
    labeler_of = [labelers.get(records[i].labeler, importer) for i in indices]
    TaskCandidate.objects.bulk_create(
        TaskCandidate(task=task, message=message, position=position)
        for task, replies in zip(tasks, replies_of, strict=True)
        for position, message in enumerate(replies)
    )
    assignments = Assignment.objects.bulk_create(
        Assignment(
            task=task, labeler=labeler, status=Assignment.Status.SUBMITTED, lease_expires_at=now, submitted_at=now
        )
        for task, labeler in zip(tasks, labeler_of, strict=True)
    )
    rankings = Ranking.objects.bulk_create(
        Ranking(assignment=assignment, task=task, labeler=labeler)
        for assignment, task, labeler in zip(assignments, tasks, labeler_of, strict=True)
    )
    RankingEntry.objects.bulk_create(
        RankingEntry(ranking=ranking, message=message, rank=rank)
        for ranking, i, messages in zip(rankings, indices, replies_of, strict=True)
        for message, rank in zip(messages, candidates[i][1], strict=True)
    )
