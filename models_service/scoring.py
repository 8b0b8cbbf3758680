"""Reward-model scores for database rows, from the active reward model (ml/scoring.py computes them).

Worker processes only (the reward model needs torch).
"""

from collections.abc import Sequence

from ml.scoring import score_pairs


def score_with_active_reward_model(pairs: Sequence[tuple[list[dict], str]]) -> tuple[list[float], int]:
    """Scores from the active reward model, and that model's version id."""
    from models_service.loading import active_holder
    from models_service.models import ModelVersion

    loaded = active_holder(ModelVersion.Kind.REWARD).get()
    return score_pairs(loaded.model, loaded.tokenizer, pairs), loaded.version_id


def score_rankings_with_active_model(*, limit: int) -> int:
    """Fill RankingEntry.rm_score for replies not yet scored by the active reward model. Returns how many.
    Nothing while a run trains (selectors.training_busy) where sampling shares its cores (a smaller pool while
    training), nor while the pool lacks tasks: these scores are for a figure on the ops page, and scoring 400
    replies took half the cores from a run, or the sampling worker from the pool (labelers waited), for minutes."""
    from django.conf import settings
    from django.db.models import Q

    from labeling.models import RankingEntry
    from labeling.selectors import message_thread, thread_as_chat
    from labeling.services import ranking_entries_scored
    from models_service.loading import NoActiveModel, active_holder
    from models_service.models import ModelVersion
    from models_service.selectors import pool_short, training_busy

    shares_cores = settings.SAMPLING_POOL_WHILE_TRAINING < settings.SAMPLING_POOL_TARGET
    if shares_cores and training_busy():
        return 0
    if pool_short():  # the sampling worker's first job is the labelers' next tasks
        return 0

    try:
        loaded = active_holder(ModelVersion.Kind.REWARD).get()
    except NoActiveModel:
        return 0
    entries = list(
        RankingEntry.objects.filter(Q(rm_version__isnull=True) | ~Q(rm_version_id=loaded.version_id))
        .select_related("message", "ranking__task__parent_message")
        .order_by("-ranking__created_at")[:limit]
    )
    chats: dict[int, list[dict]] = {}
    for entry in entries:
        context = entry.ranking.task.parent_message
        if context.pk not in chats:
            chats[context.pk] = thread_as_chat(message_thread(context))
    scores = score_pairs(
        loaded.model, loaded.tokenizer, [(chats[e.ranking.task.parent_message_id], e.message.text) for e in entries]
    )
    ranking_entries_scored(entries=entries, scores=scores, version_id=loaded.version_id)
    return len(entries)
