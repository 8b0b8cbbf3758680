"""The labeler's pages. Views parse, call one service or selector, and render; logic lives in services."""

from contextlib import contextmanager

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from config.ratelimit import per_user_per_minute
from labeling import forms, services
from labeling.markdown import render_markdown
from labeling.models import Assignment, CandidateFlag, LabelerProfile, Message, Ranking, TaskKind
from labeling.selectors import (
    candidate_handles,
    current_assignment,
    improved_ranking,
    labeler_counts,
    message_thread,
    my_work,
)

WRITE_KINDS = {TaskKind.WRITE_PROMPT, TaskKind.WRITE_ASSISTANT_REPLY, TaskKind.WRITE_USER_REPLY}


class Refusal:
    """What `refusals_onto` caught, if anything: the service's ValidationError (None for other refusals)."""

    error: ValidationError | None = None

    def has_code(self, field: str, code: str) -> bool:
        return self.error is not None and any(
            e.code == code for e in getattr(self.error, "error_dict", {}).get(field, [])
        )


@contextmanager
def refusals_onto(form):
    """Run a service call and show its refusal on `form`: a ValidationError's messages on their fields (or the
    form's top), a SubmissionRefused (the lease ran out, the task filled) at the top. The page then answers 422."""
    caught = Refusal()
    try:
        yield caught
    except ValidationError as error:
        caught.error = error
        if hasattr(error, "error_dict"):
            for field, field_errors in error.message_dict.items():
                form.add_error(field if field in form.fields else None, field_errors)
        else:
            form.add_error(None, error.messages)
    except services.SubmissionRefused as error:
        form.add_error(None, str(error))


@login_required
def home(request):
    return render(
        request,
        "labeling/home.html",
        {"counts": labeler_counts(request.user), "current": current_assignment(request.user, now=timezone.now())},
    )


@login_required
def guidelines(request):
    return render(request, "labeling/guidelines.html")


@login_required
def next_task(request):
    assignment_id = services.task_lease_next_id(user=request.user)
    if assignment_id is None:
        return _empty(request)
    return redirect("labeling:work", assignment_id=assignment_id)


def _empty(request):
    return render(request, "labeling/empty.html", {"page_url": reverse("labeling:next")})


@login_required
@require_POST
def write_prompt(request):
    """'Write a prompt' on the empty queue page: a prompt task of the labeler's own, leased at once."""
    services.prompt_task_for_labeler(user=request.user)
    return redirect("labeling:next")


def _own_assignment(request, assignment_id: int) -> Assignment:
    return get_object_or_404(
        Assignment.objects.select_related(
            "task__parent_message", "task__target_message", "task__conversation", "model_draft_version"
        ),
        pk=assignment_id,
        labeler=request.user,
    )


@login_required
def work(request, assignment_id: int):
    assignment = _own_assignment(request, assignment_id)
    if request.method == "GET" and assignment.status == Assignment.Status.SUBMITTED:
        messages.info(request, "You already submitted this task.")
        return redirect("labeling:next")
    if request.method == "GET" and assignment.status in (Assignment.Status.SKIPPED, Assignment.Status.REPORTED):
        return redirect("labeling:next")
    return _task_page(request, assignment, request.POST if request.method == "POST" else None)


def _task_page(request, assignment, data):
    """The page of `assignment`'s task; `data`: the labeler's submission (a POST), None to show the task."""
    kind = assignment.task.kind
    if kind in WRITE_KINDS:
        return _work_write(request, assignment, data)
    if kind == TaskKind.RANK_REPLIES:
        return _work_rank(request, assignment, data)
    if kind == TaskKind.REVIEW_DEMONSTRATION:
        return _work_review(request, assignment, data)
    raise Http404(f"Unknown task kind {kind}")


def _submitted(request, result: services.SubmitResult):
    """The response to a submission is the next task's page itself: leased and rendered here, so the labeler waits
    for no redirect (the page puts its own address in the address bar, see base.html's data-page-url)."""
    assignment_id = services.task_lease_next_id(user=request.user)
    if assignment_id is None:
        if result.created:
            messages.success(request, "Saved.")
        return _empty(request)
    if result.created:
        messages.success(request, "Saved. Here is your next task.")
    return _task_page(request, _own_assignment(request, assignment_id), None)


def _context(assignment, **extra) -> dict:
    task = assignment.task
    context_message = task.parent_message or (task.target_message.parent if task.target_message else None)
    return {
        "page_url": reverse("labeling:work", args=[assignment.pk]),
        "assignment": assignment,
        "task": task,
        "thread": message_thread(context_message) if context_message else [],
        "lease_expired": assignment.status == Assignment.Status.LEASED
        and assignment.lease_expires_at <= timezone.now(),
        "skip_reasons": forms.SKIP_REASONS,
        "report_reasons": Assignment.ReportReason.choices,
        **extra,
    }


def _work_write(request, assignment, data):
    kind = assignment.task.kind
    form_class = forms.PromptForm if kind == TaskKind.WRITE_PROMPT else forms.WriteForm
    status = 200
    if data is not None:
        form = form_class(data)
        if form.is_valid():
            data = form.cleaned_data
            with refusals_onto(form):
                prompt = {"language": data["language"], "tags": data["tags"]} if kind == TaskKind.WRITE_PROMPT else {}
                result = services.assignment_submit(
                    assignment=assignment, text=data["text"], time_spent_ms=data["time_spent_ms"], **prompt
                )
                return _submitted(request, result)
        status = 422
    else:
        form = form_class(initial={"text": assignment.draft})
    role = {"write_prompt": "user", "write_assistant_reply": "assistant", "write_user_reply": "user"}[kind]
    return render(
        request,
        "labeling/work_write.html",
        _context(assignment, form=form, writing_role=role, max_chars=services.MAX_MESSAGE_CHARS),
        status=status,
    )


def _candidates_in_display_order(assignment):
    task = assignment.task
    by_id = {c.message_id: c.message for c in task.task_candidates.select_related("message")}
    return [by_id[i] for i in services.display_order(task, assignment.labeler_id)]


def _work_rank(request, assignment, data):
    candidates = _candidates_in_display_order(assignment)
    candidate_ids = [c.pk for c in candidates]
    handles = candidate_handles(assignment.task, assignment.labeler_id)  # the page never shows message ids
    status, untouched_warning = 200, False
    if data is not None:
        form = forms.RankingForm(data, handles=handles)
        if form.is_valid():
            with refusals_onto(form) as refusal:
                result = services.assignment_submit(
                    assignment=assignment,
                    ranking=form.ranking_input(),
                    time_spent_ms=form.cleaned_data["time_spent_ms"],
                )
                return _submitted(request, result)
            untouched_warning = refusal.has_code("order", "untouched")
        status = 422
    else:
        form = forms.RankingForm(handles=handles)
    posted_flags = {c.pk: data.getlist(f"flags-{handles[c.pk]}") for c in candidates} if data is not None else {}
    posted = _posted_order(form, candidate_ids)
    rows = _ranking_rows(candidates, handles, posted, posted_flags)
    return render(
        request,
        "labeling/work_rank.html",
        _context(
            assignment,
            form=form,
            rows=rows,
            display_handles=[handles[i] for i in candidate_ids],
            flag_choices=CandidateFlag.choices,
            untouched_warning=untouched_warning,
            # The page comes back after a refusal with the order the labeler had arranged: not the order shown.
            rearranged=posted is not None and posted != [[i] for i in candidate_ids],
            ratings=range(1, 8),
            max_chars=services.MAX_MESSAGE_CHARS,
        ),
        status=status,
    )


def _ranking_rows(candidates, handles: dict, order: list[list[int]] | None, flags: dict) -> list[dict]:
    """The candidates as the ranking page lists them: in `order` (groups of message ids, best first; None: as
    shown), each group's members as the labeler arranged them, a tie marked on all but a group's first."""
    by_id = {c.pk: c for c in candidates}
    letters = {c.pk: chr(ord("A") + i) for i, c in enumerate(candidates)}
    return [
        {"message": by_id[i], "handle": handles[i], "letter": letters[i], "tied": n > 0, "flags": flags.get(i, [])}
        for group in (order or [[c.pk] for c in candidates])
        for n, i in enumerate(group)
    ]


def _posted_order(form, candidate_ids) -> list[list[int]] | None:
    """The order the labeler had arranged, to show it again after an error (only if it is well-formed)."""
    order = form.cleaned_data.get("order") if hasattr(form, "cleaned_data") else None
    if not isinstance(order, list):
        return None
    flat = [i for group in order if isinstance(group, list) for i in group]
    if sorted(flat) != sorted(candidate_ids):
        return None
    return order


def _work_review(request, assignment, data):
    status = 200
    if data is not None:
        form = forms.ReviewForm(data)
        if form.is_valid():
            data = form.cleaned_data
            with refusals_onto(form):
                result = services.assignment_submit(
                    assignment=assignment,
                    decision=data["decision"],
                    reason=data["reason"],
                    time_spent_ms=data["time_spent_ms"],
                )
                return _submitted(request, result)
        status = 422
    else:
        form = forms.ReviewForm()
    return render(
        request,
        "labeling/work_review.html",
        _context(
            assignment,
            form=form,
            demonstration=assignment.task.target_message,
            improved=improved_ranking(assignment.task.target_message),
        ),
        status=status,
    )


@login_required
@require_POST
def skip(request, assignment_id: int):
    assignment = _own_assignment(request, assignment_id)
    form = forms.SkipForm(request.POST)
    try:
        if not form.is_valid():
            raise ValidationError([message for messages in form.errors.values() for message in messages])
        services.assignment_skip(assignment=assignment, reason=form.cleaned_data["reason"])
    except (ValidationError, services.SubmissionRefused) as error:
        messages.error(request, _first_message(error))
        return redirect("labeling:work", assignment_id=assignment.pk)
    messages.info(request, "Skipped. You won't see this task again.")
    return redirect("labeling:next")


@login_required
@require_POST
def report(request, assignment_id: int):
    assignment = _own_assignment(request, assignment_id)
    form = forms.ReportForm(request.POST)
    try:
        if not form.is_valid():
            raise ValidationError("Choose what is wrong with this task.")
        services.assignment_report(
            assignment=assignment, reason=form.cleaned_data["reason"], note=form.cleaned_data["note"]
        )
    except (ValidationError, services.SubmissionRefused) as error:
        messages.error(request, _first_message(error))
        return redirect("labeling:work", assignment_id=assignment.pk)
    messages.info(request, "Thank you for the report. The task is out of your queue and an admin will look at it.")
    return redirect("labeling:next")


def _first_message(error) -> str:
    if isinstance(error, services.SubmissionRefused):
        return str(error)
    return "; ".join(error.messages)


@login_required
@require_POST
def save_draft(request, assignment_id: int):
    assignment = _own_assignment(request, assignment_id)
    try:
        assignment = services.assignment_save_draft(assignment=assignment, draft=request.POST.get("text", ""))
    except ValidationError as error:
        return HttpResponse(_first_message(error), status=400)
    saved_at = timezone.localtime().strftime("%H:%M:%S")
    if assignment.status != assignment.Status.LEASED or assignment.lease_expires_at <= timezone.now():
        return HttpResponse(
            f'<span class="badge warn small">Draft saved at {saved_at}, but your time on this task ran out: '
            "submit now; if others have filled it meanwhile, your text stays here to copy.</span>"
        )
    return HttpResponse(f'<span class="muted small">Draft saved at {saved_at}</span>')


@login_required
@require_POST
@per_user_per_minute("preview", "PAGE_RATE_PREVIEW")
def markdown_preview(request):
    text = request.POST.get("text", "")[: services.MAX_MESSAGE_CHARS + 1]
    html = render_markdown(text) if text.strip() else '<p class="muted">The preview appears here as you type.</p>'
    return HttpResponse(html)


@login_required
def mine(request):
    return render(request, "labeling/mine.html", my_work(request.user))


@login_required
def edit_message(request, message_id: int):
    message = get_object_or_404(Message, pk=message_id, author=request.user, assignment__isnull=False)
    form = forms.WriteForm(request.POST or None, initial={"text": message.text})
    status = 200
    if request.method == "POST":
        if form.is_valid():
            with refusals_onto(form):
                saved = services.message_edit(message=message, user=request.user, text=form.cleaned_data["text"])
                if saved.pk == message.pk:
                    messages.success(request, "Your change is saved.")
                else:
                    messages.success(
                        request,
                        "Your change is saved as a new version: the replies and rankings others built on your "
                        "earlier text keep that text.",
                    )
                return redirect("labeling:mine")
        status = 422
    return render(
        request,
        "labeling/edit_message.html",
        {
            "message": message,
            "form": form,
            "thread": message_thread(message)[:-1],
            "max_chars": services.MAX_MESSAGE_CHARS,
        },
        status=status,
    )


@login_required
def edit_ranking(request, ranking_id: int):
    ranking = get_object_or_404(
        Ranking.objects.select_related("task", "assignment"), pk=ranking_id, labeler=request.user
    )
    assignment = ranking.assignment
    candidates = _candidates_in_display_order(assignment)
    candidate_ids = [c.pk for c in candidates]
    handles = candidate_handles(assignment.task, assignment.labeler_id)
    status = 200
    if request.method == "POST":
        form = forms.RankingForm(request.POST, handles=handles)
        if form.is_valid():
            with refusals_onto(form):
                services.ranking_edit(ranking=ranking, user=request.user, new=form.ranking_input())
                messages.success(request, "Your ranking is updated.")
                return redirect("labeling:mine")
        status = 422
        posted = _posted_order(form, candidate_ids)
    else:
        form = forms.RankingForm(handles=handles)
        posted = ranking.ordered_message_ids
    rows = _ranking_rows(candidates, handles, posted, {e.message_id: e.flags for e in ranking.entries.all()})
    if request.method == "GET":
        form.initial.update(
            {"quality_rating": str(ranking.quality_rating or ""), "all_unacceptable": ranking.all_unacceptable}
        )
    return render(
        request,
        "labeling/work_rank.html",
        {
            "assignment": assignment,
            "task": ranking.task,
            "thread": message_thread(ranking.task.parent_message),
            "form": form,
            "rows": rows,
            "display_handles": [handles[i] for i in candidate_ids],
            "flag_choices": CandidateFlag.choices,
            "ratings": range(1, 8),
            "editing": ranking,
        },
        status=status,
    )


@never_cache  # the page shows a new API token once: no cache may keep it
@login_required
def profile(request):
    instance, _ = LabelerProfile.objects.get_or_create(user=request.user)
    form = forms.ProfileForm(request.POST or None, instance=instance)
    if request.method == "POST" and form.is_valid():
        services.labeler_profile_update(
            user=request.user, languages=form.cleaned_data["languages"], topics=form.cleaned_data["topics"]
        )
        messages.success(request, "Your profile is saved. The queue now prefers tasks that match it.")
        return redirect(reverse("labeling:profile"))
    return _profile_page(request, form, status=422 if form.errors else 200)


NEW_TOKEN_SESSION_KEY = "new-api-token"


def _profile_page(request, form, *, status=200):
    from labeling.models import ApiToken

    token = ApiToken.objects.filter(user=request.user).first()
    new_token = request.session.pop(NEW_TOKEN_SESSION_KEY, "") if token else ""  # shown once, then forgotten
    if new_token and token.digest != ApiToken.digest_of(new_token):
        new_token = ""  # replaced since (another tab)
    context = {"form": form, "new_token": new_token, "token_created": token.created if token else None}
    return render(request, "labeling/profile.html", context, status=status)


@never_cache
@login_required
def api_token(request):
    """A new API token for the labeler's scripts (it replaces the old one), then back to the profile page, which
    shows it once: a reload there shows nothing again and makes no second token. A GET (a bookmark, the back
    button) just goes to the profile page."""
    if request.method == "POST":
        request.session[NEW_TOKEN_SESSION_KEY] = services.api_token_rotate(user=request.user)
    return redirect(reverse("labeling:profile") + "#api-token")


@never_cache
@login_required
@require_POST
def api_token_revoke(request):
    """The labeler's API token stops working now; they may create a new one later."""
    if services.api_token_revoke(user=request.user):
        messages.success(request, "Your API token is revoked: scripts that use it are refused from now on.")
    request.session.pop(NEW_TOKEN_SESSION_KEY, None)
    return redirect(reverse("labeling:profile") + "#api-token")
