"""Data sets built from the database: demonstrations for SFT, rankings for the reward model, prompts for PPO.

Each conversation belongs to one split, fixed when it was created (labeling/splits.py), so a conversation is
never in both train and validation, and held-out conversations (kept for the evaluation gate) are in none.
Every builder returns plain Python data plus the ids it used, for the run's data snapshot.
"""

from collections import defaultdict
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Count, Q

from labeling import splits
from labeling.limits import UNEDITED_DRAFT_MAX_EDIT_RATIO
from labeling.models import Message, Ranking, RankingEntry, Role
from labeling.selectors import thread_as_chat, threads_of

UNTRAINABLE = ("hidden", "removed")  # Conversation.moderation: reported and waiting for an admin, or removed


class NotEnoughData(Exception):
    """Too little data to train: the message gives the counts and what is needed."""


@dataclass
class SFTExample:
    conversation_id: int
    message_id: int  # the demonstration
    chat: list[dict]  # the conversation up to and including the demonstration (the last, assistant, turn)
    revision: int = 1  # of the demonstration's text


@dataclass
class RankingExample:
    ranking_id: int
    conversation_id: int
    context: list[dict]  # the conversation up to the user turn the candidates reply to
    candidates: list[str]
    ranks: list[int]  # 1 is best; equal ranks are ties
    candidate_ids: list[int] = field(default_factory=list)
    dataset: str = ""

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) candidate indices for every ordered pair; ties give no pair."""
        return [(i, j) for i in range(len(self.ranks)) for j in range(len(self.ranks)) if self.ranks[i] < self.ranks[j]]


@dataclass
class PromptExample:
    conversation_id: int
    message_id: int  # the user turn the policy replies to
    chat: list[dict]
    revision: int = 1  # of the user turn's text


@dataclass
class DataSplit:
    train: list
    validation: list

    def snapshot(self, id_attribute: str) -> dict:
        result = {
            "train_count": len(self.train),
            "validation_count": len(self.validation),
            "train_ids": [getattr(e, id_attribute) for e in self.train],
            "validation_ids": [getattr(e, id_attribute) for e in self.validation],
            "conversations": len({e.conversation_id for e in self.train + self.validation}),
        }
        if all(hasattr(e, "revision") for e in self.train + self.validation):  # texts that can be edited in place
            result["revisions"] = {str(getattr(e, id_attribute)): e.revision for e in self.train + self.validation}
        return result


def demonstrations(*, split: str):
    """Accepted demonstrations (written in the product and reviewed, or imported) in conversations of `split`;
    without the replies submitted as the model drafted them when TRAINING_SFT_UNEDITED_DRAFTS is "drop"."""
    messages = (
        Message.objects.filter(
            role=Role.ASSISTANT,
            review_status=Message.ReviewStatus.ACCEPTED,
            conversation__split=split,
        )
        .exclude(conversation__moderation__in=UNTRAINABLE)
        .order_by("pk")
    )
    if settings.TRAINING_SFT_UNEDITED_DRAFTS == "drop":
        messages = messages.exclude(draft_edit_ratio__lte=UNEDITED_DRAFT_MAX_EDIT_RATIO)
    return messages


def build_sft(*, minimum_train: int = 1, minimum_validation: int = 1, limit: int | None = None) -> DataSplit:
    """Chats ending with an accepted demonstration. The SFT loss is on that last assistant turn only."""
    data = {}
    for name in (splits.TRAIN, splits.VALIDATION):
        messages = list(demonstrations(split=name)[:limit] if limit else demonstrations(split=name))
        threads = threads_of(messages)
        data[name] = [SFTExample(m.conversation_id, m.pk, thread_as_chat(threads[m.pk]), m.revision) for m in messages]
    result = DataSplit(data[splits.TRAIN], data[splits.VALIDATION])
    _require("SFT", "accepted demonstrations", result, minimum_train, minimum_validation)
    return result


def build_rankings(
    *,
    minimum_train: int = 1,
    minimum_validation: int = 1,
    dataset_prefix: str | None = None,
    exclude_dataset: str = "",
    sampled_by: list[int] | None = None,
    exclude_ids: set[int] | frozenset = frozenset(),
    stage: str = "reward model",
) -> DataSplit:
    """One element per (context, labeler) ranking with its K candidates and their ranks; ties stay ties. A
    labeler's accepted improvement of the best is one more candidate, ranked first.

    Rankings whose candidates are all tied carry no preference and are left out, unless improved. `sampled_by` keeps the
    rankings of candidates sampled by those policy versions only (imports have none); `exclude_ids` leaves out
    rankings by id (e.g. those an earlier round already trained on).
    """
    rankings = (
        Ranking.objects.select_related("task__parent_message", "task__conversation", "improvement")
        .annotate(distinct_ranks=Count("entries__rank", distinct=True))
        .filter(Q(distinct_ranks__gte=2) | Q(improvement__review_status=Message.ReviewStatus.ACCEPTED))
        .exclude(task__conversation__moderation__in=UNTRAINABLE)
    )
    if dataset_prefix:
        rankings = rankings.filter(task__conversation__dataset__startswith=dataset_prefix)
    if exclude_dataset:
        rankings = rankings.exclude(task__conversation__dataset__startswith=exclude_dataset)
    if sampled_by is not None:
        rankings = rankings.filter(task__model_version__in=sampled_by)
    if exclude_ids:
        rankings = rankings.exclude(pk__in=exclude_ids)
    data = {}
    for name in (splits.TRAIN, splits.VALIDATION):
        chosen = list(rankings.filter(task__conversation__split=name).order_by("pk"))
        entries = defaultdict(list)
        for entry in (
            RankingEntry.objects.filter(ranking__in=chosen).select_related("message").order_by("ranking_id", "pk")
        ):
            entries[entry.ranking_id].append(entry)
        threads = threads_of([r.task.parent_message for r in chosen])
        data[name] = [
            _ranking_example(r, entries[r.pk], thread_as_chat(threads[r.task.parent_message_id])) for r in chosen
        ]
    result = DataSplit(data[splits.TRAIN], data[splits.VALIDATION])
    _require(stage, "rankings", result, minimum_train, minimum_validation)
    return result


def _ranking_example(ranking: Ranking, entries: list[RankingEntry], context: list[dict]) -> RankingExample:
    """A ranking as training reads it; an accepted improvement is one more candidate, ranked above all the others."""
    candidates = [(e.message_id, e.message.text, e.rank) for e in entries]
    if ranking.improvement_counts:
        candidates = [(ranking.improvement_id, ranking.improvement.text, 1)] + [(i, t, r + 1) for i, t, r in candidates]
    return RankingExample(
        ranking_id=ranking.pk,
        conversation_id=ranking.task.conversation_id,
        context=context,
        candidates=[text for _, text, _ in candidates],
        ranks=[rank for _, _, rank in candidates],
        candidate_ids=[i for i, _, _ in candidates],
        dataset=ranking.task.conversation.dataset,
    )


def build_prompts(*, minimum: int = 1, limit: int | None = None, split: str = splits.TRAIN) -> list[PromptExample]:
    """User turns of conversations in `split` (by default train), as chats for the policy to answer.

    Held-out conversations are never used: the evaluation gate needs prompts no stage trained on.
    """
    messages = (
        Message.objects.filter(role=Role.USER, conversation__split=split)
        .exclude(conversation__moderation__in=UNTRAINABLE)
        .order_by("pk")
    )
    if limit:
        messages = messages[:limit]
    messages = list(messages)
    threads = threads_of(messages)
    prompts = [PromptExample(m.conversation_id, m.pk, thread_as_chat(threads[m.pk]), m.revision) for m in messages]
    if len(prompts) < minimum:
        raise NotEnoughData(f"PPO needs at least {minimum} prompts in the training split; there are {len(prompts)}.")
    return prompts


def _require(stage: str, what: str, data: DataSplit, minimum_train: int, minimum_validation: int) -> None:
    if len(data.train) < minimum_train or len(data.validation) < minimum_validation:
        raise NotEnoughData(
            f"Not enough data for {stage}: {len(data.train)} {what} in the training split (at least {minimum_train} "
            f"needed) and {len(data.validation)} in the validation split (at least {minimum_validation} needed)."
        )
