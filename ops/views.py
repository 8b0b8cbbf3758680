"""The ops pages, for admins: the loop, training runs, the model lineage, evaluations and labeler quality."""

from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseStopPolling

from labeling.importing import FORMATS
from labeling.models import Conversation, ImportJob
from labeling.quality import labeler_quality
from labeling.selectors import import_job_live, moderation_queue
from labeling.services import conversation_moderate, import_job_create
from models_service.models import ModelVersion
from models_service.selectors import rollback_targets
from models_service.services import model_version_activate, model_version_rollback
from ops import selectors
from training_jobs import loop, services
from training_jobs.models import OPERATE_LOOP, Evaluation, TrainingRun
from training_jobs.selectors import (
    cancel_consequence,
    cancel_consequence_sentence,
    start_notice,
    training_worker_listens,
)


def can_operate(user) -> bool:
    return bool(user.is_authenticated and user.has_perm(OPERATE_LOOP))


def staff_only(view):
    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if not can_operate(request.user):
            raise PermissionDenied(
                "The ops pages are for admins. Ask an admin to add your account to the Ops group (a superuser "
                "does it in Django admin: Users → your account → Groups)."
            )
        return view(request, *args, **kwargs)

    return wrapper


def _done(request, message: str, target: str = "ops:overview", **kwargs):
    messages.success(request, message)
    return redirect(target, **kwargs)


def _refused(request, error: ValidationError, target: str = "ops:overview", **kwargs):
    messages.error(request, " ".join(error.messages))
    return redirect(target, **kwargs)


@staff_only
def overview(request):
    return render(request, "ops/overview.html", selectors.loop_overview())


@staff_only
@require_POST
def start_run(request):
    kind = request.POST.get("kind", "")
    try:
        run = services.training_run_create(kind=kind, triggered_by=request.user)
    except ValidationError as error:
        return _refused(request, error)
    messages.add_message(request, *start_notice(run))
    return redirect("ops:run", run_id=run.pk)


@staff_only
@require_POST
def resume_loop(request):
    services.loop_resume(actor=request.user)
    return _done(request, "The loop resumes at its next tick.")


@staff_only
@require_POST
def train_on_what_there_is(request):
    try:
        run = services.loop_train_on_what_there_is(actor=request.user)
    except ValidationError as error:
        return _refused(request, error)
    messages.add_message(request, *start_notice(run))
    return redirect("ops:run", run_id=run.pk)


@staff_only
@require_POST
def set_rm_threshold(request):
    raw = request.POST.get("rm_threshold", "").strip()
    try:
        settings = services.loop_rm_threshold_set(threshold=int(raw), actor=request.user)
    except ValueError:
        return _refused(
            request, ValidationError(f"Give the threshold as a whole number of rankings, not “{raw[:20]}”.")
        )
    except ValidationError as error:
        return _refused(request, error)
    return _done(request, f"The reward-model threshold is now {settings.rm_threshold} rankings that give pairs.")


@staff_only
def runs(request):
    """Every run, newest first, 50 a page (?page=N; a page past the end shows the last one)."""
    from django.core.paginator import Paginator

    runs = TrainingRun.objects.select_related("base_model", "reward_model", "triggered_by").order_by("-created_at")
    page = Paginator(runs, 50).get_page(request.GET.get("page"))
    return render(request, "ops/runs.html", {"runs": page, "page": page})


@staff_only
def run_detail(request, run_id: int):
    run = get_object_or_404(TrainingRun.objects.select_related("base_model", "reward_model", "triggered_by"), pk=run_id)
    return render(
        request,
        "ops/run.html",
        {
            "run": run,
            "chart_data": selectors.run_chart_data(run),
            "produced": run.produced_models.all(),
            "cancel_consequence": cancel_consequence(),
            # Asked only while the run waits (the broadcast takes up to 1 s).
            "no_training_worker": run.status == TrainingRun.Status.QUEUED and not training_worker_listens(),
        },
    )


@staff_only
def run_data(request, run_id: int):
    """Progress, metric series and log tail as JSON: the run page refreshes its bar and plots from it."""
    return JsonResponse(selectors.run_chart_data(get_object_or_404(TrainingRun, pk=run_id)))


@staff_only
@require_POST
def cancel_run(request, run_id: int):
    run = get_object_or_404(TrainingRun, pk=run_id)
    try:
        run = services.training_run_cancel(run=run, actor=request.user)
    except ValidationError as error:
        return _refused(request, error, "ops:run", run_id=run_id)
    state = "cancelled" if run.status == TrainingRun.Status.CANCELLED else "stopping at its next step"
    again = cancel_consequence_sentence()
    return _done(request, f"Run #{run.pk} is {state}.{again}", "ops:run", run_id=run_id)


@staff_only
def models(request):
    return render(
        request,
        "ops/models.html",
        {
            "rows": selectors.lineage(),
            "evaluations": Evaluation.objects.select_related("candidate", "baseline")[:20],
            "rollback_targets": rollback_targets(),
        },
    )


@staff_only
def model_detail(request, version_id: int):
    version = get_object_or_404(ModelVersion.objects.select_related("parent", "training_run"), pk=version_id)
    return render(request, "ops/model.html", selectors.model_detail(version))


@staff_only
@require_POST
def activate_model(request, version_id: int):
    version = get_object_or_404(ModelVersion, pk=version_id)
    reason = request.POST.get("reason", "").strip() or f"activated by {request.user} on the ops page"
    try:
        model_version_activate(version=version, actor=request.user, reason=reason)
    except ValidationError as error:
        return _refused(request, error, "ops:models")
    return _done(request, f"{version.name} is now the active {version.get_kind_display().lower()}.", "ops:models")


@staff_only
@require_POST
def rollback(request, kind: str):
    if kind not in ModelVersion.Kind.values:
        raise PermissionDenied("Unknown model kind.")
    try:
        activation = model_version_rollback(kind=kind, actor=request.user, reason=request.POST.get("reason", ""))
    except ValidationError as error:
        return _refused(request, error, "ops:models")
    return _done(request, f"Rolled back: {activation.model_version.name} serves again.", "ops:models")


@staff_only
def evaluation_detail(request, evaluation_id: int):
    evaluation = get_object_or_404(
        Evaluation.objects.select_related("candidate", "baseline", "reward_model", "reference"), pk=evaluation_id
    )
    return render(request, "ops/evaluation.html", selectors.evaluation_detail(evaluation))


@staff_only
@require_POST
def promote(request, evaluation_id: int):
    evaluation = get_object_or_404(Evaluation, pk=evaluation_id)
    try:
        services.evaluation_promote(evaluation=evaluation, actor=request.user, reason=request.POST.get("reason", ""))
    except ValidationError as error:
        return _refused(request, error, "ops:evaluation", evaluation_id=evaluation_id)
    return _done(request, f"{evaluation.candidate.name} is now serving.", "ops:evaluation", evaluation_id=evaluation_id)


@staff_only
def labelers(request):
    return render(request, "ops/labelers.html", labeler_quality())


@staff_only
def imports(request):
    """Upload a JSONL file to import; the job runs on a worker and its page shows the progress."""
    if request.method == "POST":
        upload = request.FILES.get("file")
        try:
            if upload is None:
                raise ValidationError({"file": "Choose a JSONL file."})
            job = import_job_create(
                upload=upload,
                format=request.POST.get("format", "auto"),
                on_error=request.POST.get("on_error", "skip"),
                dataset=request.POST.get("dataset", "").strip(),
                user=request.user,
            )
        except ValidationError as error:
            messages.error(request, " ".join(error.messages))
        else:
            return redirect("ops:import", job_id=job.pk)
    return render(
        request,
        "ops/imports.html",
        {"jobs": ImportJob.objects.select_related("created_by")[:30], "formats": ["auto", *FORMATS]},
    )


@staff_only
def import_detail(request, job_id: int):
    job = import_job_live(get_object_or_404(ImportJob, pk=job_id))
    waited = (timezone.now() - job.created_at).total_seconds()
    context = {"job": job, "waiting_long": int(waited) if job.status == ImportJob.Status.QUEUED and waited > 30 else 0}
    if request.htmx:
        response = render(request, "ops/import.html#progress", context)
        if job.status not in (ImportJob.Status.QUEUED, ImportJob.Status.RUNNING):
            response.status_code = HttpResponseStopPolling.status_code
        return response
    return render(request, "ops/import.html", context)


@staff_only
def moderation(request):
    return render(request, "ops/moderation.html", {"queue": moderation_queue()})


@staff_only
@require_POST
def moderate(request, conversation_id: int):
    conversation = get_object_or_404(Conversation, pk=conversation_id)
    decision = request.POST.get("decision", "")
    try:
        conversation_moderate(conversation=conversation, decision=decision, actor=request.user)
    except ValidationError as error:
        return _refused(request, error, "ops:moderation")
    done = "kept: its tasks are back in the queue" if decision == "kept" else "removed: it never trains"
    return _done(request, f"Conversation #{conversation.pk} {done}.", "ops:moderation")


@staff_only
def workers(request):
    """Which host serves which queue (the overview loads it after the page, as the workers take up to 1 s)."""
    rows = selectors.queue_health(timeout=1.0)
    last_beat = loop.last_beat_tick()
    control = next(row for row in rows if row["queue"] == "control")
    return render(
        request,
        "ops/_workers.html",
        {
            "rows": rows,
            "missing": [row["queue"] for row in rows if not row["names"]],
            "control": control,
            "checked_at": timezone.now(),
            "last_beat_tick": last_beat,
            "beat_late": loop.beat_is_late(last_beat, timezone.now()),
        },
    )
