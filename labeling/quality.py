"""Labeler quality: throughput, agreement between labelers on overlapping rankings, agreement with the reward
model, and skip and report rates. Reads only; no torch (the reward model's scores are stored on the ranking
entries by a worker task, models_service.tasks.score_rankings)."""

import datetime as dt
import math
from bisect import bisect_left
from collections import defaultdict
from itertools import combinations

from django.contrib.auth import get_user_model
from django.db.models import Avg, Count, Q
from django.utils import timezone

from labeling.importing import imported_labeler_q
from labeling.limits import UNEDITED_DRAFT_MAX_EDIT_RATIO
from labeling.models import Assignment, Message, Ranking, RankingEntry


def pair_preferences(ranks: dict[int, int]) -> dict[tuple[int, int], int]:
    """For each unordered candidate pair (a < b): +1 if a ranked above b, -1 if below, 0 if tied."""
    out = {}
    for a, b in combinations(sorted(ranks), 2):
        out[(a, b)] = (ranks[a] < ranks[b]) - (ranks[a] > ranks[b])
    return out


def kendall_tau_b(first: dict[int, int], second: dict[int, int]) -> float | None:
    """Kendall's tau-b between two rankings of the same candidates (ties allowed). None if undefined."""
    common = sorted(set(first) & set(second))
    concordant = discordant = ties_first = ties_second = 0
    for a, b in combinations(common, 2):
        x = (first[a] > first[b]) - (first[a] < first[b])
        y = (second[a] > second[b]) - (second[a] < second[b])
        if x == 0 and y == 0:
            continue
        if x == 0:
            ties_first += 1
        elif y == 0:
            ties_second += 1
        elif x == y:
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_first) * (concordant + discordant + ties_second))
    return (concordant - discordant) / denominator if denominator else None


def _rankings_by_task(since=None) -> dict[int, list[tuple[int, dict[int, int]]]]:
    entries = RankingEntry.objects.filter(ranking__task__overlap__gte=2).values_list(
        "ranking__task_id", "ranking__labeler_id", "ranking_id", "message_id", "rank"
    )
    if since is not None:
        entries = entries.filter(ranking__created_at__gte=since)
    rankings: dict[int, dict[int, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for task_id, labeler_id, _ranking_id, message_id, rank in entries:
        rankings[task_id][labeler_id][message_id] = rank
    return {task: list(by_labeler.items()) for task, by_labeler in rankings.items() if len(by_labeler) >= 2}


def agreement() -> dict:
    """Pairwise agreement rate (over candidate pairs both labelers ordered strictly) and mean Kendall's tau,
    overall and per labeler, on tasks that several labelers ranked."""
    per_labeler = defaultdict(lambda: {"agree": 0, "pairs": 0, "taus": []})
    overall = {"agree": 0, "pairs": 0, "taus": []}
    for rankings in _rankings_by_task().values():
        for (first_labeler, first), (second_labeler, second) in combinations(rankings, 2):
            a, b = pair_preferences(first), pair_preferences(second)
            strict = [pair for pair in a if pair in b and a[pair] != 0 and b[pair] != 0]
            agree = sum(a[pair] == b[pair] for pair in strict)
            tau = kendall_tau_b(first, second)
            for bucket in (per_labeler[first_labeler], per_labeler[second_labeler], overall):
                bucket["agree"] += agree
                bucket["pairs"] += len(strict)
                if tau is not None:
                    bucket["taus"].append(tau)

    def summary(bucket):
        return {
            "agreement": bucket["agree"] / bucket["pairs"] if bucket["pairs"] else None,
            "pairs": bucket["pairs"],
            "kendall_tau": sum(bucket["taus"]) / len(bucket["taus"]) if bucket["taus"] else None,
            "compared_rankings": len(bucket["taus"]),
        }

    return {"overall": summary(overall), "per_labeler": {k: summary(v) for k, v in per_labeler.items()}}


def agreement_at(times: list) -> list[dict]:
    """The overall pairwise agreement as it stood at each of `times` (on the rankings made before it), from one
    read of the rankings: a pair of rankings of a task counts from the moment the later of the two was made."""
    entries = RankingEntry.objects.filter(ranking__task__overlap__gte=2).values_list(
        "ranking__task_id", "ranking__labeler_id", "ranking__created_at", "message_id", "rank"
    )
    by_task: dict[int, dict[int, tuple]] = defaultdict(dict)
    for task_id, labeler_id, created_at, message_id, rank in entries:
        made, ranks = by_task[task_id].get(labeler_id, (created_at, {}))
        ranks[message_id] = rank
        by_task[task_id][labeler_id] = (max(made, created_at), ranks)
    events = []
    for by_labeler in by_task.values():
        for (first_made, first), (second_made, second) in combinations(by_labeler.values(), 2):
            a, b = pair_preferences(first), pair_preferences(second)
            strict = [pair for pair in a if pair in b and a[pair] != 0 and b[pair] != 0]
            events.append((max(first_made, second_made), sum(a[pair] == b[pair] for pair in strict), len(strict)))
    events.sort(key=lambda event: event[0])
    moments, agree, pairs = [e[0] for e in events], [0], [0]
    for _, agreed, compared in events:
        agree.append(agree[-1] + agreed)
        pairs.append(pairs[-1] + compared)
    out = []
    for moment in times:
        i = bisect_left(moments, moment)  # the events strictly before `moment`
        out.append({"agreement": agree[i] / pairs[i] if pairs[i] else None, "pairs": pairs[i]})
    return out


def reward_model_agreement() -> dict[int, dict]:
    """Per labeler: the share of their strictly ordered pairs that the reward model orders the same way."""
    entries = RankingEntry.objects.filter(rm_score__isnull=False).values_list(
        "ranking__labeler_id", "ranking_id", "rank", "rm_score"
    )
    by_ranking = defaultdict(list)
    for labeler_id, ranking_id, rank, score in entries:
        by_ranking[(labeler_id, ranking_id)].append((rank, score))
    result = defaultdict(lambda: {"agree": 0, "pairs": 0})
    for (labeler_id, _), items in by_ranking.items():
        for (rank_a, score_a), (rank_b, score_b) in combinations(items, 2):
            if rank_a == rank_b or score_a == score_b:
                continue
            result[labeler_id]["pairs"] += 1
            result[labeler_id]["agree"] += (rank_a < rank_b) == (score_a > score_b)
    return {k: {**v, "agreement": v["agree"] / v["pairs"] if v["pairs"] else None} for k, v in result.items()}


def labeler_quality(days: int = 7) -> dict:
    """One row per labeler with throughput, agreement, reward-model agreement, skip and report rates."""
    since = timezone.now() - dt.timedelta(days=days)
    stats = (
        Assignment.objects.exclude(imported_labeler_q("labeler__"))
        .values("labeler_id", "labeler__username")
        .annotate(
            total=Count("pk"),
            submitted=Count("pk", filter=Q(status=Assignment.Status.SUBMITTED)),
            recent=Count("pk", filter=Q(status=Assignment.Status.SUBMITTED, submitted_at__gte=since)),
            skipped=Count("pk", filter=Q(status=Assignment.Status.SKIPPED)),
            reported=Count("pk", filter=Q(status=Assignment.Status.REPORTED)),
            seconds=Avg("time_spent_ms", filter=Q(status=Assignment.Status.SUBMITTED)),
        )
        .order_by("-recent", "-submitted")
    )
    agreements = agreement()
    with_rm = reward_model_agreement()
    rankings = dict(Ranking.objects.values_list("labeler_id").annotate(n=Count("pk")).values_list("labeler_id", "n"))
    written = {
        row["author_id"]: row
        for row in Message.objects.filter(origin=Message.Origin.HUMAN, assignment__isnull=False, depth__gt=0)
        .values("author_id")
        .annotate(
            replies=Count("pk"),
            drafted=Count("pk", filter=Q(draft_model_version__isnull=False)),
            unedited=Count("pk", filter=Q(draft_edit_ratio__lte=UNEDITED_DRAFT_MAX_EDIT_RATIO)),
        )
    }
    rows = []
    for row in stats:
        labeler = row["labeler_id"]
        rows.append(
            {
                "labeler": row["labeler__username"],
                "submitted": row["submitted"],
                "per_day": row["recent"] / days,
                "seconds_per_task": (row["seconds"] or 0) / 1000 or None,
                "rankings": rankings.get(labeler, 0),
                "skip_rate": row["skipped"] / row["total"] if row["total"] else None,
                "report_rate": row["reported"] / row["total"] if row["total"] else None,
                "agreement": agreements["per_labeler"].get(labeler, {}).get("agreement"),
                "kendall_tau": agreements["per_labeler"].get(labeler, {}).get("kendall_tau"),
                "rm_agreement": with_rm.get(labeler, {}).get("agreement"),
                **_draft_shares(written.get(labeler)),
            }
        )
    return {"rows": rows, "overall": agreements["overall"], "days": days, "labelers": get_user_model().objects.count()}


def _draft_shares(row: dict | None) -> dict:
    """Of a labeler's written replies: the share that started from a model draft, and the share submitted as the
    model drafted them (an edit ratio of at most UNEDITED_DRAFT_MAX_EDIT_RATIO)."""
    if not row or not row["replies"]:
        return {"replies": 0, "drafted_share": None, "unedited_share": None}
    return {
        "replies": row["replies"],
        "drafted_share": row["drafted"] / row["replies"],
        "unedited_share": row["unedited"] / row["replies"],
    }
