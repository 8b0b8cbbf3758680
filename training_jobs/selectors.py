"""Reads for the ops pages: the loop's state, the data over time, runs, the model lineage."""

import datetime as dt

from django.db.models import Count
from django.db.models.functions import TruncDate
from django.utils import timezone

from labeling.models import Message, Ranking, Review, Role
from models_service.models import ModelActivation, ModelVersion, SamplingRequest
from models_service.selectors import open_pool_size
from training_jobs import gate, loop
from training_jobs.models import Evaluation, LoopSettings, TrainingRun


def data_over_time(days: int = 30) -> dict:
    """Cumulative counts per day of prompts, demonstrations, rankings and reviews (for a line chart)."""
    today = timezone.localdate()
    start = today - dt.timedelta(days=days - 1)
    sources = {
        "prompts": Message.objects.filter(role=Role.USER, depth=0),
        "demonstrations": Message.objects.filter(role=Role.ASSISTANT).exclude(origin=Message.Origin.MODEL),
        "rankings": Ranking.objects.all(),
        "reviews": Review.objects.all(),
    }
    labels = [(start + dt.timedelta(days=i)).isoformat() for i in range(days)]
    series = {}
    for name, queryset in sources.items():
        before = queryset.filter(created_at__date__lt=start).count()
        per_day = dict(
            queryset.filter(created_at__date__gte=start)
            .annotate(day=TruncDate("created_at"))
            .values_list("day")
            .annotate(n=Count("pk"))
            .values_list("day", "n")
        )
        running, values = before, []
        for label in labels:
            running += per_day.get(dt.date.fromisoformat(label), 0)
            values.append(running)
        series[name] = values
    return {"labels": labels, "series": series}


def loop_overview() -> dict:
    settings = LoopSettings.load()
    now = timezone.now()
    next_check = (
        settings.last_checked_at + dt.timedelta(minutes=settings.check_every_minutes)
        if settings.last_checked_at
        else now
    )
    demonstrations, rankings = loop.new_demonstrations(), loop.new_rankings()
    return {
        "settings": settings,
        "plan": loop.plan(settings, now=now, check_thresholds=True),
        "next_check": next_check,
        "thresholds": [
            {
                "stage": "SFT",
                "what": "new accepted demonstrations",
                "count": demonstrations,
                "threshold": settings.sft_threshold,
                "fraction": min(demonstrations / max(settings.sft_threshold, 1), 1.0),
            },
            {
                "stage": "Reward model",
                "what": "new rankings",
                "count": rankings,
                "threshold": settings.rm_threshold,
                "fraction": min(rankings / max(settings.rm_threshold, 1), 1.0),
            },
        ],
        "active_policy": ModelVersion.objects.filter(kind=ModelVersion.Kind.POLICY, is_active=True).first(),
        "active_reward": ModelVersion.objects.filter(kind=ModelVersion.Kind.REWARD, is_active=True).first(),
        "running": TrainingRun.objects.filter(status__in=TrainingRun.ACTIVE_STATUSES).first(),
        "recent_runs": TrainingRun.objects.select_related("base_model", "reward_model")[:8],
        "recent_evaluations": Evaluation.objects.select_related("candidate", "baseline")[:5],
        "activations": ModelActivation.objects.select_related("model_version", "previous", "actor")[:8],
        "pool": open_pool_size(),
        "sampling_failures": SamplingRequest.objects.filter(status=SamplingRequest.Status.FAILED).order_by(
            "-created_at"
        )[:3],
        "over_time": data_over_time(),
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
        "log": run.log_tail,
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
