"""Exports in the formats the field trains on, streamed row by row.

- SFT: {"messages": [{"role", "content"}, ...]}, the conversation up to an accepted demonstration.
- Preferences (TRL's explicit-prompt conversational form): {"prompt": [...], "chosen": [...], "rejected": [...]}
  plus "ranking_id", "labeler" (a pseudonym), "model_version" and "created_at": one row per ordered pair of
  each ranking, ties skipped; a labeler's accepted improvement of the best is chosen over every candidate
  ("improvement": true on those rows).
- Rankings as K-way lists: {"prompt": [...], "completions": [...], "ranks": [...], "improvement": text or null}
  (1 is best; ties share a rank; the improvement, once accepted, is better than every completion).
Every row carries its conversation's split. Filters: a date range, a model version (the policy that sampled the
candidates), a minimum agreement with the other labelers of the same task, and accepted demonstrations only (the
default). Held-out conversations (kept for evaluation) and the blind A/B comparisons behind the promotion gate
are left out unless asked for: data trained on elsewhere would no longer measure anything here.
"""

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

from django.conf import settings
from django.db.models import Q

from labeling import splits
from labeling.importing import IMPORTED_LABELER_PREFIX, imported_labeler_q
from labeling.models import LabelerProfile, Message, Ranking, RankingEntry, Role
from labeling.quality import pair_preferences
from labeling.selectors import thread_as_chat, threads_of

KINDS = ("sft", "preferences", "rankings")
UNEXPORTED = ("hidden", "removed")  # conversations reported and waiting for an admin, or removed by one


@dataclass
class ExportFilters:
    since: dt.date | None = None
    until: dt.date | None = None
    model_version: str | None = None  # a ModelVersion name
    min_agreement: float | None = None  # 0..1; only rankings on tasks other labelers also ranked
    accepted_only: bool = True
    include_imported: bool = True
    include_heldout: bool = False  # conversations held out for evaluation
    include_ab: bool = False  # rankings of the gate's blind A/B comparison tasks

    def describe(self) -> list[str]:
        lines = []
        if self.since:
            lines.append(f"created on or after {self.since}")
        if self.until:
            lines.append(f"created on or before {self.until}")
        if self.model_version:
            lines.append(f"candidates sampled from {self.model_version}")
        if self.min_agreement is not None:
            lines.append(f"rankings agreeing at least {self.min_agreement:.0%} with the other labelers of their task")
        lines.append("accepted demonstrations only" if self.accepted_only else "demonstrations in any review state")
        if not self.include_imported:
            lines.append("imported data left out")
        lines.append("held-out conversations included" if self.include_heldout else "held-out conversations left out")
        lines.append("blind A/B comparisons included" if self.include_ab else "blind A/B comparisons left out")
        return lines


def _dated(queryset, filters: ExportFilters, field: str = "created_at"):
    if filters.since:
        queryset = queryset.filter(**{f"{field}__date__gte": filters.since})
    if filters.until:
        queryset = queryset.filter(**{f"{field}__date__lte": filters.until})
    return queryset


def _pseudonyms(user_ids) -> dict[int, str]:
    """A stable pseudonym per labeler (LabelerProfile.pseudonym derives it from the id, profile or not); the
    account of an imported labeler gives back the pseudonym it was imported with."""
    from django.contrib.auth import get_user_model

    ids = set(user_ids)
    imported = dict(
        get_user_model()
        .objects.filter(pk__in=ids, username__startswith=IMPORTED_LABELER_PREFIX)
        .values_list("pk", "username")
    )
    return {
        uid: imported[uid].removeprefix(IMPORTED_LABELER_PREFIX)
        if uid in imported
        else LabelerProfile(user_id=uid).pseudonym
        for uid in ids
    }


def sft_rows(filters: ExportFilters, *, chunk: int = 500) -> Iterator[dict]:
    demonstrations = Message.objects.filter(role=Role.ASSISTANT).exclude(origin=Message.Origin.MODEL)
    if filters.accepted_only:
        demonstrations = demonstrations.filter(review_status=Message.ReviewStatus.ACCEPTED)
    else:
        demonstrations = demonstrations.exclude(review_status=Message.ReviewStatus.REJECTED)
    if not filters.include_imported:
        demonstrations = demonstrations.exclude(origin=Message.Origin.IMPORT)
    if not filters.include_heldout:
        demonstrations = demonstrations.exclude(conversation__split=splits.HOLDOUT)
    demonstrations = demonstrations.exclude(conversation__moderation__in=UNEXPORTED)
    ids = list(_dated(demonstrations, filters).order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(ids), chunk):
        messages = list(
            Message.objects.filter(pk__in=ids[start : start + chunk])
            .select_related("conversation", "draft_model_version")
            .order_by("pk")
        )
        threads = threads_of(messages)
        for message in messages:
            yield {
                "messages": thread_as_chat(threads[message.pk]),
                "split": message.conversation.split,
                # A reply that started from a model draft: the version that drafted it and how much was changed
                # (0 = submitted as drafted, 1 = rewritten); "" and null for replies written from scratch.
                "drafted_by": message.draft_model_version.name if message.draft_model_version_id else "",
                "draft_edit_ratio": message.draft_edit_ratio,
            }


def _rankings(filters: ExportFilters):
    rankings = _dated(Ranking.objects.all(), filters).select_related(
        "task__parent_message__conversation", "labeler", "improvement"
    )
    if not filters.include_heldout:
        rankings = rankings.exclude(task__parent_message__conversation__split=splits.HOLDOUT)
    if not filters.include_ab:
        rankings = rankings.exclude(task__payload__has_key="evaluation")
    rankings = rankings.exclude(task__parent_message__conversation__moderation__in=UNEXPORTED)
    if filters.model_version:
        rankings = rankings.filter(
            Q(task__model_version__name=filters.model_version)
            | Q(entries__message__model_version__name=filters.model_version)
        ).distinct()
    if not filters.include_imported:
        rankings = rankings.exclude(imported_labeler_q("labeler__"))
    rankings = list(rankings.order_by("pk"))
    if filters.min_agreement is not None:
        agreement = ranking_agreement([r.task_id for r in rankings])
        rankings = [r for r in rankings if (agreement.get(r.pk) or 0) >= filters.min_agreement and r.pk in agreement]
    return rankings


def ranking_agreement(task_ids) -> dict[int, float]:
    """Each ranking's share of strictly ordered candidate pairs on which the other labelers of its task agree."""
    by_task: dict[int, dict[int, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for task_id, ranking_id, message_id, rank in RankingEntry.objects.filter(
        ranking__task_id__in=set(task_ids)
    ).values_list("ranking__task_id", "ranking_id", "message_id", "rank"):
        by_task[task_id][ranking_id][message_id] = rank
    result = {}
    for rankings in by_task.values():
        if len(rankings) < 2:
            continue
        agree, pairs = defaultdict(int), defaultdict(int)
        for (first_id, first), (second_id, second) in combinations(rankings.items(), 2):
            a, b = pair_preferences(first), pair_preferences(second)
            for pair in a:
                if pair in b and a[pair] and b[pair]:
                    for rid in (first_id, second_id):
                        pairs[rid] += 1
                        agree[rid] += a[pair] == b[pair]
        result.update({rid: agree[rid] / pairs[rid] for rid in pairs})
    return result


def _ranking_parts(rankings, chunk: int = 500):
    """(ranking, context chat, [(message, rank)] best first) for each ranking, reading in chunks."""
    for start in range(0, len(rankings), chunk):
        part = rankings[start : start + chunk]
        entries = defaultdict(list)
        for entry in RankingEntry.objects.filter(ranking__in=part).select_related("message__model_version"):
            entries[entry.ranking_id].append(entry)
        threads = threads_of([r.task.parent_message for r in part])
        for ranking in part:
            ordered = sorted(entries[ranking.pk], key=lambda e: (e.rank, e.message_id))
            yield ranking, thread_as_chat(threads[ranking.task.parent_message_id]), ordered


def preference_rows(filters: ExportFilters) -> Iterator[dict]:
    rankings = _rankings(filters)
    names = _pseudonyms(r.labeler_id for r in rankings)
    for ranking, prompt, entries in _ranking_parts(rankings):
        for better, worse in combinations(entries, 2):
            if better.rank == worse.rank:
                continue  # a tie says nothing about which is better
            version = better.message.model_version or worse.message.model_version
            yield {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": better.message.text}],
                "rejected": [{"role": "assistant", "content": worse.message.text}],
                "ranking_id": ranking.pk,
                "labeler": names[ranking.labeler_id],
                "model_version": version.name if version else None,
                "created_at": ranking.created_at.isoformat(),
                "split": ranking.task.parent_message.conversation.split,
            }
        if ranking.improvement_counts:  # the labeler's accepted improvement beats every candidate
            for entry in entries:
                yield {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": ranking.improvement.text}],
                    "rejected": [{"role": "assistant", "content": entry.message.text}],
                    "ranking_id": ranking.pk,
                    "labeler": names[ranking.labeler_id],
                    "model_version": entry.message.model_version.name if entry.message.model_version_id else None,
                    "created_at": ranking.created_at.isoformat(),
                    "split": ranking.task.parent_message.conversation.split,
                    "improvement": True,
                }


def ranking_rows(filters: ExportFilters) -> Iterator[dict]:
    rankings = _rankings(filters)
    names = _pseudonyms(r.labeler_id for r in rankings)
    for ranking, prompt, entries in _ranking_parts(rankings):
        yield {
            "prompt": prompt,
            "completions": [e.message.text for e in entries],
            "ranks": [e.rank for e in entries],
            # The labeler's own better reply, once review accepted it (better than every completion); else null.
            "improvement": ranking.improvement.text if ranking.improvement_counts else None,
            "ranking_id": ranking.pk,
            "labeler": names[ranking.labeler_id],
            "created_at": ranking.created_at.isoformat(),
            "split": ranking.task.parent_message.conversation.split,
        }


ROWS = {"sft": sft_rows, "preferences": preference_rows, "rankings": ranking_rows}
FILES = {"sft": "sft.jsonl", "preferences": "preferences.jsonl", "rankings": "rankings.jsonl"}


def jsonl_lines(kind: str, filters: ExportFilters) -> Iterator[str]:
    for row in ROWS[kind](filters):
        yield json.dumps(row, ensure_ascii=False) + "\n"


def dataset_card(counts: dict[str, int], filters: ExportFilters) -> str:
    today = dt.date.today().isoformat()
    rows = "\n".join(f"| `{FILES[k]}` | {counts.get(k, 0)} |" for k in KINDS if k in counts)
    conditions = "\n".join(f"- {line}" for line in filters.describe())
    return f"""# Feedback Loop export ({today})

Human-feedback data collected with Feedback Loop, in the formats TRL and `datasets` load as they are.

| file | rows |
|---|---|
{rows}

## Files
- `sft.jsonl`: `{{"messages": [{{"role", "content"}}, ...]}}`, a conversation ending with a demonstration, with
  `drafted_by` (the policy version whose draft the labeler started from, or "") and `draft_edit_ratio` (how much
  of that draft they changed: 0 as drafted, 1 rewritten; null without a draft).
  Train on the last assistant turn (TRL `SFTTrainer` with `assistant_only_loss`, or a completion-only loss).
- `preferences.jsonl`: TRL's explicit-prompt conversational preference form, one row per ordered pair of a
  ranking (ties skipped), with `ranking_id`, `labeler` (a pseudonym, stable across exports), `model_version` (the
  policy that sampled the replies) and `created_at`. Rows of one ranking belong together: InstructGPT trains on
  all pairs of a ranking as one batch element. Where a labeler improved the best reply and review accepted it,
  the improvement is chosen over every candidate (those rows have `"improvement": true`).
- `rankings.jsonl`: K-way rankings, `{{"prompt", "completions", "ranks", "improvement"}}`; rank 1 is best, equal
  ranks are ties; `improvement` is the labeler's accepted better reply (better than every completion) or null.

## Filters
{conditions}

## Use
```python
from datasets import load_dataset
preferences = load_dataset("json", data_files="preferences.jsonl", split="train")
```
Labelers are pseudonymous; texts may include content the labelers flagged as harmful.
Settings at export: {settings.DATA_VALIDATION_FRACTION:.0%} of conversations are in the validation split and
{settings.DATA_HOLDOUT_FRACTION:.0%} held out for evaluation. Every row has its `split` (train, validation or
holdout); held-out conversations and blind A/B comparisons are exported only when asked for (see Filters).
"""


def write_export(directory: Path, filters: ExportFilters, kinds=KINDS) -> dict[str, int]:
    """Write the chosen files and a README.md dataset card to `directory`. Returns row counts per kind."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for kind in kinds:
        count = 0
        with (directory / FILES[kind]).open("w", encoding="utf-8") as out:
            for line in jsonl_lines(kind, filters):
                out.write(line)
                count += 1
        counts[kind] = count
    (directory / "README.md").write_text(dataset_card(counts, filters), encoding="utf-8")
    return counts


def as_dict(filters: ExportFilters) -> dict:
    return {k: (v.isoformat() if isinstance(v, dt.date) else v) for k, v in asdict(filters).items()}
