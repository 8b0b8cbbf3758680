"""Chat with the active policy. Replies come from the interactive Celery queue; the page polls until they arrive.

Nothing here imports torch: the web process only creates requests and reads their results.
"""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseStopPolling

from config.ratelimit import per_user_per_minute
from labeling.forms import MessageTextField
from labeling.models import Assignment, Conversation, Message
from models_service.models import SamplingRequest
from models_service.selectors import pool_sampling_estimate
from models_service.services import interactive_request_give_up_if_lost
from sampling import services
from sampling.selectors import alternatives_of, chat_conversations, chat_view


class ChatForm(forms.Form):
    text = MessageTextField(error_messages={"required": "Write a message."})
    parent = forms.IntegerField(required=False, widget=forms.HiddenInput)

    def clean_text(self):
        if not self.cleaned_data["text"].strip():
            raise forms.ValidationError("Write a message.")
        return self.cleaned_data["text"]


class AlternativesForm(forms.Form):
    k = forms.TypedChoiceField(choices=[(str(i), str(i)) for i in range(2, 10)], coerce=int, initial=4)
    for_me = forms.BooleanField(required=False)


def _own_chat(request, conversation_id: int) -> Conversation:
    return get_object_or_404(Conversation, pk=conversation_id, created_by=request.user, source=Conversation.Source.CHAT)


@login_required
@per_user_per_minute("chat", "PAGE_RATE_CHAT")
def chat_index(request):
    form = ChatForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            message, _ = services.chat_start(user=request.user, text=form.cleaned_data["text"])
            return redirect("chat:chat", conversation_id=message.conversation_id)
        except ValidationError as error:
            form.add_error("text", error.messages)
    status = 422 if form.errors else 200
    return render(
        request, "chat/chat_index.html", {"form": form, "chats": chat_conversations(request.user)}, status=status
    )


@login_required
@per_user_per_minute("chat", "PAGE_RATE_CHAT")
def chat(request, conversation_id: int):
    conversation = _own_chat(request, conversation_id)
    view = chat_view(conversation)
    form = ChatForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            parent = Message.objects.filter(pk=form.cleaned_data["parent"], conversation=conversation).first()
            try:
                if parent is None:
                    raise ValidationError("Wait for the assistant's reply before writing again.")
                services.chat_continue(user=request.user, parent=parent, text=form.cleaned_data["text"])
                return redirect("chat:chat", conversation_id=conversation.pk)
            except ValidationError as error:
                form.add_error("text", error.messages)
        status = 422
    tip = view["thread"][-1] if view["thread"] else None
    return render(
        request,
        "chat/chat.html",
        {
            "conversation": conversation,
            "form": form,
            "tip": tip,
            "can_reply": tip is not None and tip.role == "assistant",
            "alternatives_form": AlternativesForm(),
            "k_choices": range(2, 10),
            **view,
        },
        status=status,
    )


@login_required
def chat_poll(request, request_id: int):
    """The reply being written asks here twice a second and shows the text so far; when the reply is in, the page
    reloads to show it."""
    sampling = get_object_or_404(SamplingRequest, pk=request_id, requested_by=request.user)
    sampling = interactive_request_give_up_if_lost(sampling)
    if sampling.status in (SamplingRequest.Status.PENDING, SamplingRequest.Status.RUNNING):
        return render(request, "chat/chat.html#typing", {"pending": sampling})
    response = HttpResponseStopPolling()
    response["HX-Refresh"] = "true"
    return response


@login_required
@require_POST
@per_user_per_minute("chat", "PAGE_RATE_CHAT")
def chat_retry(request, request_id: int):
    """ "Try again" under a reply that failed: the same message, asked again."""
    failed = get_object_or_404(SamplingRequest, pk=request_id, requested_by=request.user)
    try:
        services.chat_retry(user=request.user, failed=failed)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    return redirect("chat:chat", conversation_id=failed.context.conversation_id)


@login_required
@require_POST
@per_user_per_minute("alternatives", "PAGE_RATE_ALTERNATIVES")
def chat_alternatives(request, message_id: int):
    message = get_object_or_404(
        Message, pk=message_id, conversation__created_by=request.user, conversation__source=Conversation.Source.CHAT
    )
    form = AlternativesForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose how many replies to rank, from 2 to 9.")
        return redirect("chat:chat", conversation_id=message.conversation_id)
    try:
        services.alternatives_request_create(
            model_message=message,
            user=request.user,
            k=form.cleaned_data["k"],
            reserve_for_requester=form.cleaned_data["for_me"],
        )
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        who = "you" if form.cleaned_data["for_me"] else "the labelers"
        messages.success(request, f"Sampling alternatives. A ranking task for {who} will be ready in a moment.")
    return redirect("chat:chat", conversation_id=message.conversation_id)


@login_required
@require_GET
def chat_alternatives_status(request, message_id: int):
    """The alternatives line under a model turn, polled while its alternatives are sampled (chat.html#alternatives)."""
    message = get_object_or_404(
        Message, pk=message_id, conversation__created_by=request.user, conversation__source=Conversation.Source.CHAT
    )
    # Only this turn's line: the rest of the chat (its thread, its reply request) is not read again at each poll.
    lines = alternatives_of([message.pk], labeler_id=request.user.pk)
    return render(request, "chat/chat.html#alternatives", {"m": message, "k_choices": range(2, 10), **lines})


@login_required
@require_POST
@per_user_per_minute("draft", "PAGE_RATE_DRAFT")
def draft_start(request, assignment_id: int):
    """'Draft from the model' on a write task: ask the serving policy for a draft. JSON: where to poll for it."""
    assignment = get_object_or_404(Assignment.objects.select_related("task"), pk=assignment_id, labeler=request.user)
    try:
        sampling = services.draft_request_create(assignment=assignment, user=request.user)
    except ValidationError as error:
        return JsonResponse({"error": " ".join(error.messages)}, status=400)
    return JsonResponse(
        {"request": sampling.pk, "poll": reverse("chat:draft_poll", args=[sampling.pk]), "status": sampling.status},
        status=202,
    )


@login_required
@require_GET
def draft_poll(request, request_id: int):
    """A draft as it is written: status, the text so far, and the version writing it (JSON, polled by the editor)."""
    sampling = get_object_or_404(
        SamplingRequest.objects.select_related("model_version"),
        pk=request_id,
        requested_by=request.user,
        purpose=SamplingRequest.Purpose.DRAFT,
    )
    sampling = interactive_request_give_up_if_lost(sampling)
    return JsonResponse(
        {
            "status": sampling.status,
            "text": sampling.partial_text,
            "done": sampling.status == SamplingRequest.Status.DONE,
            "error": sampling.plain_error if sampling.status == SamplingRequest.Status.FAILED else "",
            "model_version": sampling.model_version.name if sampling.model_version else "",
        }
    )


@login_required
@require_GET
def coming_work(request):
    """The empty queue page's panel: which ranking tasks the sampling workers are preparing, and how long that takes."""
    return render(request, "chat/coming_work.html", pool_sampling_estimate())
