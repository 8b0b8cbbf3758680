"""Writes to training runs: create, claim, report, cancel, finish, reap. No torch here (the web process calls these).

A run goes queued -> running -> succeeded / failed / cancelled. Every transition is a conditional UPDATE, so a
duplicated Celery message, two workers or a cancel racing a finish can never move a run twice.
"""

import datetime as dt
import secrets
import shutil
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from config import stages
from config.jobs import enqueue_on_commit
from labeling.models import Message, Role, TaskKind
from labeling.services import lock_for_training_snapshot, message_create, release_used_in_training, task_create
from models_service.models import ModelActivation, ModelVersion
from models_service.selectors import active_version, newest_ready
from models_service.services import model_version_activate
from training_jobs import gate
from training_jobs.models import Evaluation, LoopSettings, TrainingRun

LOG_TAIL_LINES = 200
MAX_THRESHOLD = 1_000_000  # rankings; the column holds up to 2**31 - 1, no loop needs more than this


def training_run_create(
    *,
    kind: str,
    config: dict | None = None,
    trigger: str = TrainingRun.Trigger.MANUAL,
    triggered_by=None,
    base_model: ModelVersion | None = None,
    reward_model: ModelVersion | None = None,
    previous_run: TrainingRun | None = None,
    seed: int = 0,
    reason: str = "",
) -> TrainingRun:
    """Queue a run and send it to the training worker. Only one run of a kind may be queued or running: the
    database refuses a second one (a partial unique index), and the refusal says which run is in the way."""
    if kind not in stages.STAGES:
        raise ValidationError({"kind": f"Unknown run kind {kind!r}; use one of {', '.join(stages.STAGES)}."})
    if kind in stages.policy_steps() and reward_model is None:
        # The newest reward model: what PPO and RLOO optimise against, and what the gate scores a DPO policy with.
        reward_model = ModelVersion.objects.filter(
            kind=ModelVersion.Kind.REWARD, stage=stages.RM, status=ModelVersion.Status.READY
        ).first()
        if reward_model is None and stages.STAGES[kind].needs_reward_model:
            raise ValidationError({"reward_model": f"{stages.label(kind)} needs a reward model."})
    try:
        with transaction.atomic():
            run = TrainingRun.objects.create(
                kind=kind,
                config=config or {},
                trigger=trigger,
                triggered_by=triggered_by,
                base_model=base_model,
                reward_model=reward_model,
                previous_run=previous_run,
                seed=seed,
                reason=reason,
            )
            enqueue_on_commit("training_jobs.tasks.run_training", run.pk)
    except IntegrityError as exc:
        if "training_run_one_active_per_kind" not in str(exc):
            raise
        active = TrainingRun.objects.filter(kind=kind, status__in=TrainingRun.ACTIVE_STATUSES).first()
        raise ValidationError(
            f"A {stages.label(kind).lower()} run is already {active.status if active else 'active'} "
            f"(run #{active.pk if active else '?'}); wait for it to finish or cancel it."
        ) from None
    return run


def training_run_claim(*, run_id: int, worker: str = "") -> TrainingRun | None:
    """queued -> running, for exactly one worker. None if the run is not queued (a duplicated message, or it was
    cancelled while waiting)."""
    now = timezone.now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.RUNNING, started_at=now, heartbeat_at=now, worker=worker[:255]
    )
    return TrainingRun.objects.get(pk=run_id) if claimed else None


def training_run_report(
    *, run_id: int, step: int, total: int, series: dict, log: list[str], data_snapshot: dict | None = None
) -> bool:
    """Progress, metric series and the log tail of a running run; also its heartbeat. False if the run is no
    longer running (it was reaped or cancelled), which tells the trainer to stop."""
    fields = {
        "progress_step": min(step, total) if total else step,
        "progress_total": total,
        "metrics": series,
        "log_tail": "\n".join(log[-LOG_TAIL_LINES:]),
        "heartbeat_at": timezone.now(),
    }
    if data_snapshot is not None:
        fields["data_snapshot"] = data_snapshot
    return bool(TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING).update(**fields))


def training_run_heartbeat(*, run_id: int) -> bool:
    """The worker is alive: its heartbeat thread calls this between the trainer's own reports. False if the run
    is no longer running (reaped or finished)."""
    return bool(
        TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING).update(heartbeat_at=timezone.now())
    )


def training_run_cancel_requested(*, run_id: int) -> bool:
    return TrainingRun.objects.filter(pk=run_id, cancel_requested_at__isnull=False).exists()


def training_run_cancel(*, run: TrainingRun, actor=None) -> TrainingRun:
    """Cancel a run. A queued run is cancelled at once; a running one stops at its next step."""
    now = timezone.now()
    who = f" by {actor}" if actor else ""
    if TrainingRun.objects.filter(pk=run.pk, status=TrainingRun.Status.QUEUED).update(
        status=TrainingRun.Status.CANCELLED, cancel_requested_at=now, finished_at=now, error=f"Cancelled{who}."
    ):
        return TrainingRun.objects.get(pk=run.pk)
    updated = TrainingRun.objects.filter(
        pk=run.pk, status=TrainingRun.Status.RUNNING, cancel_requested_at__isnull=True
    ).update(cancel_requested_at=now)
    run.refresh_from_db()
    if not updated and run.status in TrainingRun.FINISHED_STATUSES:
        raise ValidationError(f"Run #{run.pk} has already ended ({run.get_status_display().lower()}).")
    return run


def training_run_finish(*, run_id: int, status: str, summary: dict | None = None, error: str = "") -> bool:
    """running -> a final status. False if the run had already finished (e.g. reaped as lost meanwhile)."""
    if status not in TrainingRun.FINISHED_STATUSES:
        raise ValueError(f"{status} is not a final status")
    if status == TrainingRun.Status.FAILED and not error:
        error = "failed without an error message"
    with transaction.atomic():
        finished = TrainingRun.objects.filter(pk=run_id, status=TrainingRun.Status.RUNNING).update(
            status=status, summary=summary or {}, error=error[:20000], finished_at=timezone.now()
        )
        if finished and status != TrainingRun.Status.SUCCEEDED:
            _release_data(TrainingRun.objects.get(pk=run_id))
    return bool(finished)


def _snapshot_ids(snapshot: dict, key: str) -> set[int]:
    part = (snapshot or {}).get(key) or {}
    return set(part.get("train_ids") or []) | set(part.get("validation_ids") or [])


def _release_data(run: TrainingRun) -> None:
    """A run that ended without a model gives back the demonstrations and rankings it first marked used, so the
    thresholds count them again (an SFT cancelled after reading 408 demonstrations left "1 of 50" and never
    retried). Rows another live or successful run read are kept."""
    if run.started_at is None:
        return
    messages = _snapshot_ids(run.data_snapshot, "demonstrations")
    rankings = _snapshot_ids(run.data_snapshot, "rankings")
    if not (messages or rankings):
        return
    others = (
        TrainingRun.objects.exclude(pk=run.pk)
        .filter(status__in=[*TrainingRun.ACTIVE_STATUSES, TrainingRun.Status.SUCCEEDED])
        .filter(Q(finished_at__isnull=True) | Q(finished_at__gte=run.started_at))
        .values_list("data_snapshot", flat=True)
    )
    for snapshot in others:
        messages -= _snapshot_ids(snapshot, "demonstrations")
        rankings -= _snapshot_ids(snapshot, "rankings")
    lock_for_training_snapshot()
    release_used_in_training(message_ids=sorted(messages), ranking_ids=sorted(rankings), since=run.started_at)


def staging_dir(run: TrainingRun) -> Path:
    """Where a run writes its checkpoint before it is complete and registered."""
    return Path(settings.ARTIFACTS_DIR) / "staging" / f"run-{run.pk}"


def training_runs_reap(*, now: dt.datetime | None = None) -> list[int]:
    """Runs whose worker died: still 'running' with no heartbeat for TRAINING_HEARTBEAT_TIMEOUT_S. Mark them
    failed with the reason and delete their half-written checkpoint. Returns the reaped run ids."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=settings.TRAINING_HEARTBEAT_TIMEOUT_S)
    reaped = []
    for run in TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING, heartbeat_at__lt=cutoff):
        message = (
            f"The worker {run.worker or '(unknown)'} stopped reporting at {run.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC "
            "(its heartbeat thread beats while the process lives, whatever the trainer is doing): it was killed or "
            "crashed. Nothing it was writing was registered."
        )
        if training_run_finish(run_id=run.pk, status=TrainingRun.Status.FAILED, error=message):
            shutil.rmtree(staging_dir(run), ignore_errors=True)
            reaped.append(run.pk)
    return reaped


# --- the loop and its gate ---


def evaluation_create(*, candidate: ModelVersion) -> Evaluation:
    """Queue the gate's evaluation of a candidate against the serving policy, scored by the newest reward model."""
    with transaction.atomic():
        evaluation = Evaluation.objects.create(
            candidate=candidate,
            baseline=active_version(ModelVersion.Kind.POLICY),
            reward_model=active_version(ModelVersion.Kind.REWARD) or newest_ready(ModelVersion.Kind.REWARD, stages.RM),
            training_run=candidate.training_run,
        )
        enqueue_on_commit("training_jobs.tasks.evaluate_candidate", evaluation.pk)
    return evaluation


def evaluation_claim(*, evaluation_id: int) -> Evaluation | None:
    """Move a queued evaluation to running; None if another worker has it."""
    claimed = Evaluation.objects.filter(pk=evaluation_id, status=Evaluation.Status.QUEUED).update(
        status=Evaluation.Status.RUNNING
    )
    if not claimed:
        return None
    return Evaluation.objects.select_related("candidate", "baseline", "reward_model").get(pk=evaluation_id)


def evaluation_fail(*, evaluation_id: int, error: str) -> None:
    Evaluation.objects.filter(pk=evaluation_id).update(
        status=Evaluation.Status.FAILED, error=error[:4000], finished_at=timezone.now()
    )


def evaluation_record(
    evaluation: Evaluation,
    *,
    metrics: dict,
    samples: list,
    prompt_ids: list[int],
    reference,
    comparisons: list,
    votes_per_labeler: int = 0,
    params_seed=None,
) -> None:
    """An evaluation's figures, and its blind A/B tasks (`comparisons`: (prompt message id, {"candidate": reply,
    "baseline": reply}) with each reply's `text` and `row`), in one transaction."""
    with transaction.atomic():
        Evaluation.objects.filter(pk=evaluation.pk).update(
            status=Evaluation.Status.DONE,
            metrics=metrics,
            samples=samples,
            prompt_ids=prompt_ids,
            reference=reference,
            finished_at=timezone.now(),
        )
        for prompt_id, replies in comparisons:
            _comparison_task(evaluation, prompt_id, replies, votes_per_labeler, params_seed)


def _comparison_task(evaluation: Evaluation, prompt_id: int, sampled: dict, votes_per_labeler: int, params_seed):
    """Blind A/B: a ranking task over one reply from each policy. Labelers see the two in their own random order;
    the payload says which is which. The order comes from the system's secret source, not from anything a labeler
    could know (such as the evaluation's id)."""
    rng = secrets.SystemRandom()
    context = Message.objects.get(pk=prompt_id)
    replies = {}
    arms = ["candidate", "baseline"]
    rng.shuffle(arms)  # created in random order: message ids say nothing about which policy wrote which
    for arm in arms:
        completion = sampled[arm]
        version = evaluation.candidate if arm == "candidate" else evaluation.baseline
        replies[arm] = message_create(
            conversation=context.conversation,
            parent=context,
            role=Role.ASSISTANT,
            text=completion.text,
            origin=Message.Origin.MODEL,
            model_version=version,
            sampling_params={"seed": params_seed, "row": completion.row, "evaluation": evaluation.pk},
        )
    order = list(replies.values())
    rng.shuffle(order)
    task_create(
        kind=TaskKind.RANK_REPLIES,
        parent_message=context,
        candidates=order,
        priority=settings.EVAL_COMPARISON_PRIORITY,
        payload={
            "evaluation": evaluation.pk,
            "arms": {str(m.pk): arm for arm, m in replies.items()},
            "not_for": [context.author_id] if context.author_id else [],  # not judged by the prompt's author
            **({"votes_per_labeler": votes_per_labeler} if votes_per_labeler else {}),
        },
    )


def training_run_set_inputs(*, run_id: int, base_model, reward_model) -> None:
    """The models a run queued without them starts from (runner.resolve_inputs found them)."""
    TrainingRun.objects.filter(pk=run_id).update(base_model=base_model, reward_model=reward_model)


def training_run_record_versions(*, run_id: int, versions: dict) -> None:
    """The library versions a run trains with, for its record."""
    TrainingRun.objects.filter(pk=run_id).update(library_versions=versions)


def loop_resume(*, actor=None) -> None:
    """Clear a pause after a failed stage; the loop plans again at its next tick."""
    settings = LoopSettings.load()
    settings.paused_reason = ""
    settings.save(update_fields=["paused_reason"])


def loop_train_on_what_there_is(*, actor) -> TrainingRun:
    """An admin's decision to train the reward model below its threshold, because the pool cannot reach it (the ops
    overview's outlook): a run whose reason records the decision with the numbers it was taken on. The loop's chain
    then takes the new reward model through the policy step as usual."""
    from training_jobs.selectors import pool_outlook

    outlook = pool_outlook()
    if not outlook["can_train_now"]:
        raise ValidationError(
            f"Only {outlook['have']} new rankings give pairs; a reward model needs at least "
            f"{outlook['min_rankings']} (TRAINING_MIN_RANKINGS)."
        )
    why = outlook["sentence"] or f"{outlook['have']} of {outlook['threshold']} new rankings give pairs."
    return training_run_create(
        kind=stages.RM,
        triggered_by=actor,
        reason=f"{actor} chose to train the reward model on what there was, below its threshold. At the time: {why}",
    )


def loop_rm_threshold_set(*, threshold: int, actor) -> LoopSettings:
    """Change the reward-model threshold from the ops overview; admin's history of the loop settings keeps who changed
    it, from what, to what."""
    from django.contrib.admin.models import CHANGE, LogEntry

    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= MAX_THRESHOLD:
        raise ValidationError(
            {"rm_threshold": f"Give the threshold as a whole number of rankings from 1 to {MAX_THRESHOLD:,}."}
        )
    with transaction.atomic():
        current = LoopSettings.objects.select_for_update().get_or_create(pk=1)[0]
        before = current.rm_threshold
        current.rm_threshold = threshold
        current.save(update_fields=["rm_threshold", "updated_at"])
        LogEntry.objects.log_actions(
            user_id=actor.pk,
            queryset=LoopSettings.objects.filter(pk=current.pk),
            action_flag=CHANGE,
            change_message=f"Reward-model threshold {before} -> {threshold} (from the ops overview).",
            single_object=True,
        )
    return current


def evaluation_decide(*, evaluation: Evaluation, settings: LoopSettings | None = None) -> str:
    """Apply the rules to an evaluation still open for a decision; promote when they say so."""
    settings = settings or LoopSettings.load()
    open_decisions = [
        Evaluation.Decision.PENDING,
        Evaluation.Decision.WAITING_FOR_HUMANS,
        Evaluation.Decision.WAITING_FOR_ADMIN,
    ]
    with transaction.atomic():
        current = Evaluation.objects.select_for_update().get(pk=evaluation.pk)
        if current.decision not in open_decisions:
            return current.decision
        decision, reason = gate.decide(current, settings)
        if decision == Evaluation.Decision.PROMOTED:
            _promote(current, actor=None, reason=reason, automatic=True)
        if decision in (Evaluation.Decision.PROMOTED, Evaluation.Decision.NOT_PROMOTED):
            gate.freeze_votes(current)
        Evaluation.objects.filter(pk=current.pk).update(
            decision=decision,
            decision_reason=reason,
            decided_at=timezone.now() if decision in (Evaluation.Decision.PROMOTED,) else None,
        )
    return decision


def _promote(evaluation: Evaluation, *, actor, reason: str, automatic: bool) -> ModelActivation | None:
    """Serve the candidate, and the reward model it was optimised against, so the active pair stays consistent."""
    activation = model_version_activate(
        version=evaluation.candidate,
        actor=actor,
        reason=reason,
        action=ModelActivation.Action.PROMOTE,
        automatic=automatic,
    )
    run = evaluation.candidate.training_run
    if run is not None and run.reward_model is not None:
        model_version_activate(
            version=run.reward_model,
            actor=actor,
            reason=f"the reward model behind {evaluation.candidate.name}",
            action=ModelActivation.Action.PROMOTE,
            automatic=automatic,
        )
    return activation


def evaluation_promote(*, evaluation: Evaluation, actor, reason: str = "") -> ModelActivation:
    """An admin's one-click promotion of an evaluated candidate, recorded with who, when and why."""
    if evaluation.status != Evaluation.Status.DONE:
        raise ValidationError("The evaluation has not finished.")
    reason = reason.strip() or f"promoted by {actor} after evaluation #{evaluation.pk}"
    with transaction.atomic():
        activation = _promote(evaluation, actor=actor, reason=reason, automatic=False)
        gate.freeze_votes(evaluation)
        Evaluation.objects.filter(pk=evaluation.pk).update(
            decision=Evaluation.Decision.PROMOTED, decision_reason=reason, decided_by=actor, decided_at=timezone.now()
        )
    if activation is None:
        raise ValidationError(f"{evaluation.candidate} is already serving.")
    return activation
