"""Reads for the ops pages: the loop's state, the data over time, runs, the model lineage, the learning rounds,
and which workers serve which queue."""

import datetime as dt

from django.conf import settings as django_settings
from django.db.models import Count, Min
from django.db.models.functions import TruncDate, TruncHour
from django.utils import timezone

from config import stages
from labeling.models import Conversation, Message, Ranking, Review, Role
from labeling.quality import agreement, agreement_at
from models_service.models import ModelActivation, ModelVersion, SamplingRequest
from models_service.selectors import open_pool_size
from training_jobs import gate, loop
from training_jobs.models import Evaluation, LoopSettings, TrainingRun
from training_jobs.selectors import MOST_TIED, pool_outlook

QUEUE_EFFECTS = {
    "interactive": "chat replies and drafts wait",
    "sampling": "no ranking tasks are sampled",
    "training": "no run or evaluation starts",
    "control": "the loop does not tick; leases are not expired",
}


def data_over_time(days: int = 30) -> dict:
    """Cumulative counts of the data the loop trains on, for a line chart: prompts, accepted demonstrations and
    rankings that give a pair (counted as the threshold cards count them, used or not), and reviews.

    The range starts at the first row (at most `days` back): hourly when everything is from the last two days
    (a fresh deployment's demo data would otherwise be one spike at the right end of 30 empty days), else daily.
    """
    sources = {
        "prompts": Message.objects.filter(role=Role.USER, depth=0).exclude(
            conversation__source=Conversation.Source.CHAT
        ),
        "accepted demonstrations": Message.objects.filter(
            role=Role.ASSISTANT,
            review_status=Message.ReviewStatus.ACCEPTED,
            conversation__split__in=loop.TRAINING_SPLITS,
        ),
        "rankings that give pairs": Ranking.objects.filter(
            pk__in=loop.trainable_rankings().filter(task__conversation__split__in=loop.TRAINING_SPLITS).values("pk")
        ),
        "reviews": Review.objects.all(),
    }
    now = timezone.localtime()
    firsts = [q.aggregate(first=Min("created_at"))["first"] for q in sources.values()]
    first = min((timezone.localtime(f) for f in firsts if f is not None), default=now)
    hourly = now - first <= dt.timedelta(days=2)
    if hourly:
        start = first.replace(minute=0, second=0, microsecond=0)
        steps = int((now - start) // dt.timedelta(hours=1)) + 1
        buckets = [start + dt.timedelta(hours=i) for i in range(steps)]
        labels = [b.strftime("%b %-d %H:00") for b in buckets]
        trunc = TruncHour("created_at")
    else:
        start_day = max(first.date(), now.date() - dt.timedelta(days=days - 1))
        buckets = [start_day + dt.timedelta(days=i) for i in range((now.date() - start_day).days + 1)]
        labels = [b.isoformat() for b in buckets]
        trunc = TruncDate("created_at")
        start = timezone.make_aware(dt.datetime.combine(start_day, dt.time()))
    series = {}
    for name, queryset in sources.items():
        before = queryset.filter(created_at__lt=start).count()
        per_bucket = dict(
            queryset.filter(created_at__gte=start)
            .annotate(bucket=trunc)
            .values_list("bucket")
            .annotate(n=Count("pk", distinct=True))
            .values_list("bucket", "n")
        )
        if hourly:
            per_bucket = {timezone.localtime(k).replace(tzinfo=None): v for k, v in per_bucket.items()}
            keys = [b.replace(tzinfo=None) for b in buckets]
        else:
            keys = buckets
        running, values = before, []
        for key in keys:
            running += per_bucket.get(key, 0)
            values.append(running)
        series[name] = values
    return {"labels": labels, "series": series, "unit": "hour" if hourly else "day"}


def loop_overview() -> dict:
    settings = LoopSettings.load()
    now = timezone.now()
    # Beat ticks every LOOP_TICK_S: a check that is due happens at the next tick, not in the past.
    next_tick = now + dt.timedelta(seconds=django_settings.LOOP_TICK_S)
    next_check = (
        max(settings.last_checked_at + dt.timedelta(minutes=settings.check_every_minutes), next_tick)
        if settings.last_checked_at
        else next_tick
    )
    demonstrations, rankings = loop.new_demonstrations(), loop.new_rankings()
    last_beat = loop.last_beat_tick()
    return {
        "settings": settings,
        "last_beat_tick": last_beat,
        "beat_late": loop.beat_is_late(last_beat, now),
        "plan": loop.plan(settings, now=now, check_thresholds=True),
        "next_check": next_check,
        "thresholds": [
            {
                "stage": "SFT",
                "what": "new accepted demonstrations",
                "count": demonstrations,
                "total": Message.objects.filter(
                    role=Role.ASSISTANT,
                    review_status=Message.ReviewStatus.ACCEPTED,
                    conversation__split__in=loop.TRAINING_SPLITS,
                ).count(),
                "threshold": settings.sft_threshold,
                "fraction": min(demonstrations / max(settings.sft_threshold, 1), 1.0),
            },
            {
                "stage": "Reward model",
                "what": "new rankings that give pairs",
                "count": rankings,
                "total": loop.trainable_rankings().filter(task__conversation__split__in=loop.TRAINING_SPLITS).count(),
                "threshold": settings.rm_threshold,
                "fraction": min(rankings / max(settings.rm_threshold, 1), 1.0),
            },
        ],
        "active_policy": ModelVersion.objects.filter(kind=ModelVersion.Kind.POLICY, is_active=True).first(),
        "active_reward": ModelVersion.objects.filter(kind=ModelVersion.Kind.REWARD, is_active=True).first(),
        "running": TrainingRun.objects.filter(status__in=TrainingRun.ACTIVE_STATUSES).first(),
        "recent_runs": TrainingRun.objects.select_related("base_model", "reward_model", "triggered_by")[:8],
        "recent_evaluations": Evaluation.objects.select_related("candidate", "baseline")[:5],
        "activations": ModelActivation.objects.select_related("model_version", "previous", "actor")[:8],
        "pool": open_pool_size(),
        "sampling_failures": SamplingRequest.objects.filter(status=SamplingRequest.Status.FAILED).order_by(
            "-created_at"
        )[:3],
        "over_time": data_over_time(),
        "learning": learning_rounds(),
        "policy_paths": [(kind, stages.label(kind)) for kind in stages.policy_steps()],
        "need_reward_model": " and ".join(
            stages.label(kind) for kind in stages.policy_steps() if stages.STAGES[kind].needs_reward_model
        ),
        "outlook": pool_outlook(settings),
    }


def run_chart_data(run: TrainingRun) -> dict:
    """The run's metric series grouped into charts (loss, accuracy, PPO reward, KL, clip fraction, ...)."""
    groups = [
        (
            "Loss",
            ["sft/train_loss", "sft/val_loss", "rm/train_loss", "ppo/policy_loss", "ppo/value_loss", "ppo/ptx_loss"],
        ),
        ("Reward-model accuracy", ["rm/val_accuracy"]),
        ("PPO reward", ["ppo/mean_reward"]),
        ("KL from the SFT policy", ["ppo/kl", "ppo/approx_kl"]),
        ("Clip fraction and entropy", ["ppo/clip_fraction", "ppo/entropy"]),
        ("Response length", ["ppo/response_length"]),
        ("Learning rate", ["sft/learning_rate"]),
    ]
    charts = []
    for title, names in groups:
        present = {name: run.metrics[name] for name in names if run.metrics.get(name)}
        if present:
            charts.append({"title": title, "series": present})
    return {
        "status": run.status,
        "step": run.progress_step,
        "total": run.progress_total,
        "fraction": run.progress_fraction,
        "charts": charts,
        "log": run.log_tail
        or (
            "Queued: waiting for a training worker to take this run. If it stays here, the Workers card on the "
            "overview says whether one is listening."
            if run.status == TrainingRun.Status.QUEUED
            else ""
        ),
        "error": run.error,
        "finished": run.status in TrainingRun.FINISHED_STATUSES,
    }


def lineage() -> list[dict]:
    """Every model version with its parent, metrics, evaluations and activations, oldest first, as a tree."""
    versions = list(ModelVersion.objects.select_related("parent", "training_run").order_by("created_at", "pk"))
    evaluations = {}
    for evaluation in Evaluation.objects.select_related("baseline").order_by("-created_at"):
        evaluations.setdefault(evaluation.candidate_id, evaluation)
    children: dict[int | None, list[ModelVersion]] = {}
    for version in versions:
        children.setdefault(version.parent_id, []).append(version)
    rows = []

    def walk(parent_id, depth):
        for version in children.get(parent_id, []):
            rows.append({"version": version, "depth": depth, "evaluation": evaluations.get(version.pk)})
            walk(version.pk, depth + 1)

    walk(None, 0)
    return rows


def evaluation_detail(evaluation: Evaluation) -> dict:
    return {"evaluation": evaluation, "human": gate.human_result(evaluation)}


def _tie_warning(ties: dict) -> dict | None:
    if not ties["all_tied"]:
        return None
    sentence = (
        f"{ties['all_tied']} of the newest {ties['rankings']} rankings tied every candidate, so they train nothing; "
        f"that is {ties['share']:.0%} of the labelers' recent rankings giving the reward model no pair to learn from."
    )
    if ties["share"] > MOST_TIED:
        sentence += " Ask the labelers to put the better reply first whenever one is better, even slightly."
    return {"key": "ties", "label": "most rankings are ties", "sentence": sentence, "warn": ties["share"] > MOST_TIED}


def _round_warnings(round_: dict, chance: str, length_only: str) -> list[dict]:
    warnings = []
    if length_only:
        sentence = f"{length_only[0].upper()}{length_only[1:]}: the reward model pays for length, not quality."
        warnings.append(
            {
                "key": "length_only",
                "label": "gain from length only",
                "sentence": sentence,
                "in_reason": length_only in round_["decision_reason"],
            }
        )
    if chance:
        warnings.append(
            {
                "key": "at_chance",
                "label": "reward model at chance",
                "sentence": chance[0].upper() + chance[1:] + ".",
                "in_reason": chance in round_["decision_reason"],  # the gate said so already: not said twice
            }
        )
    if round_["rm_win_rate"] is not None and round_["rm_win_rate"] <= 0.5:
        warnings.append(
            {
                "key": "no_gain",
                "label": "no gain",
                "sentence": f"The reward model preferred the candidate's reply on {round_['rm_win_rate']:.0%} of the "
                "held-out prompts, no better than a coin toss: this round did not improve on the serving policy.",
            }
        )
    return warnings


def _tokens(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def learning_rounds(version: ModelVersion | None = None) -> dict:
    """Whether the loop kept its promise, round by round: one round is one evaluation of an SFT or optimised
    (PPO, DPO, RLOO) policy, oldest first. Per round, the reward model's accuracy against the labelers' own
    agreement (its ceiling), how often the candidate beat the serving policy by the reward model's score and by
    the labelers' blind A/B, whether the score gain survives a length control, KL and the decision. With a policy
    `version`, only the rounds of that version and its ancestors; with a reward model, the rounds it scored.
    Rounds keep their loop-wide numbers."""
    settings = LoopSettings.load()
    trained = [*stages.policy_steps(), stages.SFT]
    evaluations = (
        Evaluation.objects.filter(candidate__kind=ModelVersion.Kind.POLICY, candidate__stage__in=trained)
        .select_related("candidate__training_run", "baseline", "reward_model")
        .order_by("created_at", "pk")
    )
    numbered = list(enumerate(evaluations, start=1))
    if version is not None and version.kind == ModelVersion.Kind.REWARD:
        numbered = [(number, e) for number, e in numbered if e.reward_model_id == version.pk]
    elif version is not None:
        lineage_ids = {v.pk for v in version.lineage}
        numbered = [(number, e) for number, e in numbered if e.candidate_id in lineage_ids]
    ceilings = agreement_at([e.created_at for _, e in numbered])
    rounds = [
        _round(number, evaluation, ceiling, settings)
        for (number, evaluation), ceiling in zip(numbered, ceilings, strict=True)
    ]
    ties = loop.tied_rankings()
    tie_warning = _tie_warning(ties)
    current = agreement()["overall"]
    return {
        "rounds": rounds,
        "warnings": [tie_warning] if tie_warning and tie_warning["warn"] else [],
        "ties": ties,
        "tie_warning": tie_warning,
        "agreement": current["agreement"],
        "agreement_pairs": current["pairs"],
        "path": settings.policy_path,
        "path_label": stages.label(settings.policy_path),
        "chart": {
            "labels": [f"{r['number']}. {r['candidate']}" for r in rounds],
            "series": {
                "Reward model, validation accuracy": [r["rm_val_accuracy"] for r in rounds],
                "Reward model, held-out accuracy": [r["rm_holdout_accuracy"] for r in rounds],
                "Labelers' agreement (ceiling)": [r["agreement"] for r in rounds],
                "Reward-model win rate": [r["rm_win_rate"] for r in rounds],
                "Human A/B win rate": [r["human_win_rate"] for r in rounds],
            },
        },
    }


def _round(number: int, evaluation: Evaluation, ceiling: dict, settings: LoopSettings) -> dict:
    candidate, baseline, rm = evaluation.candidate, evaluation.baseline, evaluation.reward_model
    metrics = evaluation.metrics or {}
    rm_metrics = (rm.metrics or {}) if rm is not None else {}
    ours, theirs = metrics.get("candidate") or {}, metrics.get("baseline") or {}
    human = gate.human_result(evaluation)
    run = candidate.training_run
    round_ = {
        "number": number,
        "evaluation_id": evaluation.pk,
        "created_at": evaluation.created_at,
        "status": evaluation.status,
        "candidate": candidate.name,
        "candidate_id": candidate.pk,
        "stage": candidate.stage,
        "path": run.kind if run is not None else candidate.stage,
        "baseline": baseline.name if baseline is not None else None,
        "baseline_id": baseline.pk if baseline is not None else None,
        "reward_model": rm.name if rm is not None else None,
        "reward_model_id": rm.pk if rm is not None else None,
        "rm_val_accuracy": rm_metrics.get("val_accuracy"),
        "rm_val_pairs": rm_metrics.get("val_pairs"),
        "rm_holdout_accuracy": rm_metrics.get("holdout_accuracy"),
        "rm_holdout_pairs": rm_metrics.get("holdout_pairs"),
        "agreement": ceiling["agreement"],
        "agreement_pairs": ceiling["pairs"],
        "rm_win_rate": metrics.get("rm_win_rate"),
        "rm_gain": metrics.get("rm_gain"),
        "rm_gain_length_controlled": metrics.get("rm_gain_length_controlled"),
        "human_win_rate": human["win_rate"] if human["comparisons"] else None,
        "human_comparisons": human["comparisons"] or None,
        "human_ci_low": human["ci_low"] if human["comparisons"] else None,
        "human_ci_high": human["ci_high"] if human["comparisons"] else None,
        "kl": ours.get("kl"),
        "candidate_length": ours.get("length"),
        "baseline_length": theirs.get("length"),
        "decision": evaluation.decision,
        "decision_label": evaluation.get_decision_display(),
        "decision_reason": evaluation.decision_reason,
    }
    chance = gate.reward_model_at_chance(rm, settings) if rm else ""
    round_["warnings"] = _round_warnings(round_, chance, gate.gain_from_length_only(metrics))
    return round_


def model_detail(version: ModelVersion) -> dict:
    """One model version: its facts, its place in the lineage, its evaluations and its learning rounds."""
    return {
        "version": version,
        "lineage": version.lineage,
        "children": list(version.children.order_by("created_at", "pk")),
        "metrics": sorted((version.metrics or {}).items()),
        "evaluations": Evaluation.objects.filter(
            **({"reward_model": version} if version.kind == ModelVersion.Kind.REWARD else {"candidate": version})
        ).select_related("candidate", "baseline"),
        "activations": version.activations.select_related("actor", "previous")[:10],
        "learning": learning_rounds(version),
    }


def queue_health(timeout: float = 1.0) -> list[dict]:
    """One row per queue: the workers serving it now, or else the last ones seen serving it (and when), the
    messages waiting for it, and what stops without them. "Seen" is remembered in the cache by earlier calls, so a
    worker that died reads differently from one that never started."""
    import datetime as dt

    from django.core.cache import cache

    from config.celery_app import waiting_by_queue, workers_by_queue

    queues = workers_by_queue(timeout=timeout)
    now = dt.datetime.now(dt.UTC)
    seen: dict = cache.get("ops:queue-last-seen") or {}
    for queue, names in queues.items():
        if names:
            seen[queue] = {"names": names, "at": now}
    cache.set("ops:queue-last-seen", seen, timeout=None)
    waiting = waiting_by_queue(queues)
    return [
        {
            "queue": queue,
            "names": names,
            "waiting": waiting[queue],
            "last_seen": None if names or queue not in seen else seen[queue],
            "effect": QUEUE_EFFECTS.get(queue, ""),
        }
        for queue, names in queues.items()
    ]
