"""Issue 17, items 1, 2 and 6: model-written drafts for write tasks, streamed replies, alternatives that update."""

import pytest
from django.urls import reverse

from labeling import services as labeling_services
from labeling.models import Assignment, Message, TaskKind
from models_service import sampling, services
from models_service.models import SamplingRequest
from tests.support.labeling import make_reply_task

pytestmark = pytest.mark.django_db


def run(request_id: int):
    sampling.run_request(services.sampling_request_claim(request_id=request_id))


def _leased_write_task(user, kind=TaskKind.WRITE_ASSISTANT_REPLY):
    task = make_reply_task()
    if kind == TaskKind.WRITE_USER_REPLY:
        task.kind = kind
        task.save(update_fields=["kind"])
    return labeling_services.task_lease_next(user=user)


def test_a_draft_streams_into_the_task_and_the_submission_records_how_much_changed(
    client, alice, tiny_policy, settings, monkeypatch
):
    settings.CHAT_MAX_NEW_TOKENS = 12
    monkeypatch.setattr(sampling, "STREAM_INTERVAL_S", 0.0)  # every token is written, so the test sees the stream
    seen = []
    real_progress = services.sampling_request_progress

    def recording(*, request_id, text):
        seen.append(text)
        return real_progress(request_id=request_id, text=text)

    monkeypatch.setattr(services, "sampling_request_progress", recording)
    assignment = _leased_write_task(alice)
    client.force_login(alice)
    page = client.get(reverse("labeling:work", args=[assignment.pk])).content.decode()
    assert reverse("chat:draft_start", args=[assignment.pk]) in page and 'data-testid="draft-button"' in page

    started = client.post(reverse("chat:draft_start", args=[assignment.pk]))
    assert started.status_code == 202
    body = started.json()
    again = client.post(reverse("chat:draft_start", args=[assignment.pk])).json()
    assert again["request"] == body["request"], "a double click streams the same draft"
    assert client.get(body["poll"]).json()["status"] == "pending"

    run(body["request"])
    assert len(seen) >= 2 and seen[0] != seen[-1], "the text was written as it grew"
    polled = client.get(body["poll"]).json()
    request = SamplingRequest.objects.get(pk=body["request"])
    assert polled["done"] and polled["text"] == request.partial_text and polled["model_version"] == tiny_policy.name
    assert request.first_token_at is not None and request.first_token_at <= request.finished_at
    assignment.refresh_from_db()
    assert assignment.model_draft == request.partial_text and assignment.model_draft_version == tiny_policy

    draft_words = assignment.model_draft.split() or ["(empty)"]
    edited = " ".join(draft_words[: max(1, len(draft_words) // 2)]) + " and my own ending."
    client.post(reverse("labeling:work", args=[assignment.pk]), {"text": edited})
    message = Message.objects.get(assignment=assignment)
    assert message.draft_model_version == tiny_policy
    assert 0 < message.draft_edit_ratio < 1


def test_an_unedited_draft_scores_zero_and_a_rewrite_scores_one():
    assert labeling_services.draft_edit_ratio("Boil it  for 7 minutes.", "Boil it for 7 minutes.") == 0.0
    assert labeling_services.draft_edit_ratio("Boil it for 7 minutes.", "Steam eggs gently instead.") == 1.0
    assert 0.2 < labeling_services.draft_edit_ratio("a b c d", "a b c x") < 0.3


def test_a_reply_written_without_a_draft_records_none(alice):
    assignment = _leased_write_task(alice)
    labeling_services.reply_submit(assignment=assignment, text="All mine.")
    message = Message.objects.get(assignment=assignment)
    assert message.draft_model_version is None and message.draft_edit_ratio is None


def test_a_user_side_draft_is_written_with_the_roles_swapped(alice, tiny_policy):
    from sampling.services import draft_request_create

    assignment = _leased_write_task(alice, TaskKind.WRITE_USER_REPLY)
    request = draft_request_create(assignment=assignment, user=alice)
    claimed = services.sampling_request_claim(request_id=request.pk)
    chat = sampling._chat(claimed)
    assert chat[-1]["role"] == "assistant" and chat[-1]["content"] == assignment.task.parent_message.text


def test_drafts_are_refused_with_a_reason(client, alice, bob, tiny_policy):
    from models_service.models import ModelVersion

    assignment = _leased_write_task(alice)
    client.force_login(bob)
    assert client.post(reverse("chat:draft_start", args=[assignment.pk])).status_code == 404
    client.force_login(alice)
    labeling_services.reply_submit(assignment=assignment, text="Done already.")
    refused = client.post(reverse("chat:draft_start", args=[assignment.pk]))
    assert refused.status_code == 400 and "submitted" in refused.json()["error"]
    second = _leased_write_task(alice)
    ModelVersion.objects.update(is_active=False)
    refused = client.post(reverse("chat:draft_start", args=[second.pk]))
    assert refused.status_code == 400 and "No policy is serving" in refused.json()["error"]
    assert not SamplingRequest.objects.filter(purpose="draft").exists()


def test_a_draft_that_arrives_after_the_submission_changes_nothing(alice, tiny_policy, settings):
    from sampling.services import draft_request_create

    settings.CHAT_MAX_NEW_TOKENS = 4
    assignment = _leased_write_task(alice)
    request = draft_request_create(assignment=assignment, user=alice)
    labeling_services.reply_submit(assignment=assignment, text="Written before the draft came.")
    run(request.pk)
    assignment.refresh_from_db()
    message = Message.objects.get(assignment=assignment)
    assert assignment.status == Assignment.Status.SUBMITTED and assignment.model_draft == ""
    assert message.draft_model_version is None


def test_a_chat_reply_streams_and_the_page_shows_the_text_so_far(client, alice, tiny_policy, settings):
    settings.CHAT_MAX_NEW_TOKENS = 6
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Hello"})
    request = SamplingRequest.objects.get(purpose="chat")
    services.sampling_request_claim(request_id=request.pk)
    assert services.sampling_request_progress(request_id=request.pk, text="Hel")
    poll = client.get(reverse("chat:chat_poll", args=[request.pk])).content.decode()
    assert 'data-testid="streaming-reply"' in poll and "Hel" in poll and 'hx-trigger="every 500ms"' in poll


def test_chat_without_a_serving_policy_says_so_and_keeps_the_message(client, alice):
    client.force_login(alice)
    response = client.post(reverse("chat:chat_index"), {"text": "Anyone there?"})
    page = response.content.decode()
    assert response.status_code == 422 and "No policy is serving yet" in page and "Anyone there?" in page
    assert not Message.objects.exists()


def test_alternatives_update_by_themselves_and_say_when_ranked(client, alice, tiny_policy, settings):
    settings.CHAT_MAX_NEW_TOKENS = 4
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Name a colour."})
    run(SamplingRequest.objects.get(purpose="chat").pk)
    reply = Message.objects.get(role="assistant")
    client.post(reverse("chat:chat_alternatives", args=[reply.pk]), {"k": "2", "for_me": "on"})
    status_url = reverse("chat:chat_alternatives_status", args=[reply.pk])
    page = client.get(reverse("chat:chat", args=[reply.conversation_id])).content.decode()
    assert f'hx-get="{status_url}"' in page, "the line polls while sampling"
    run(SamplingRequest.objects.get(purpose="alternatives").pk)
    line = client.get(status_url).content.decode()
    assert 'data-testid="rank-now"' in line and "hx-get" not in line
    assignment = labeling_services.task_lease_next(user=alice)
    task = assignment.task
    order = [[c.message_id] for c in task.task_candidates.all()]
    labeling_services.ranking_submit(
        assignment=assignment,
        ranking=labeling_services.RankingInput(order=order, flags={}, quality_rating=4, confirm_untouched=True),
    )
    line = client.get(status_url).content.decode()
    assert "you ranked them" in line and "Rank them now" not in line


def _drafted_reply(user, policy, *, text: str, draft: str) -> Message:
    assignment = _leased_write_task(user)
    labeling_services.assignment_model_draft_record(assignment_id=assignment.pk, text=draft, model_version=policy)
    labeling_services.reply_submit(assignment=labeling_services.task_lease_next(user=user), text=text)
    return Message.objects.get(assignment=assignment)


def test_drafted_replies_reach_the_quality_page_the_export_and_the_sft_setting(
    client, alice, admin_user, tiny_policy, settings
):
    from labeling.exporting import ExportFilters, sft_rows
    from training_jobs import datasets

    unedited = _drafted_reply(alice, tiny_policy, text="Boil it for seven minutes.", draft="Boil it for seven minutes.")
    edited = _drafted_reply(alice, tiny_policy, text="Steam them for six minutes.", draft="Boil it for seven minutes.")
    labeling_services.reply_submit(assignment=_leased_write_task(alice), text="Written from scratch.")
    assert (unedited.draft_edit_ratio, edited.draft_edit_ratio > 0.5) == (0.0, True)

    client.force_login(admin_user)
    page = client.get(reverse("ops:labelers")).content.decode()
    row = page.split("<td>alice</td>")[1].split("</tr>")[0]
    assert "67%" in row.split('data-testid="drafted-share"')[1].split("</td>")[0]
    assert "33%" in row.split('data-testid="unedited-share"')[1].split("</td>")[0]

    Message.objects.filter(pk__in=[unedited.pk, edited.pk]).update(review_status="accepted")
    for message in (unedited, edited):
        message.conversation.split = "train"
        message.conversation.save(update_fields=["split"])
    rows = {r["messages"][-1]["content"]: r for r in sft_rows(ExportFilters(accepted_only=True))}
    assert rows["Boil it for seven minutes."]["drafted_by"] == tiny_policy.name
    assert rows["Boil it for seven minutes."]["draft_edit_ratio"] == 0.0
    kept = {m.pk for m in datasets.demonstrations(split="train")}
    assert {unedited.pk, edited.pk} <= kept
    settings.TRAINING_SFT_UNEDITED_DRAFTS = "drop"
    dropped = {m.pk for m in datasets.demonstrations(split="train")}
    assert edited.pk in dropped and unedited.pk not in dropped


def test_a_reply_submitted_as_an_earlier_draft_counts_as_unedited(alice, tiny_policy, settings):
    """Two drafts asked for, the first submitted as it was: the reply is an unedited draft (ratio 0 against the
    first), so TRAINING_SFT_UNEDITED_DRAFTS=drop leaves it out, whichever draft came last."""
    from training_jobs import datasets

    assignment = _leased_write_task(alice)
    first, second = "Boil it for seven minutes.", "Steam the eggs for six minutes, then cool them in water."
    for draft in (first, second):
        assert labeling_services.assignment_model_draft_record(
            assignment_id=assignment.pk, text=draft, model_version=tiny_policy
        )
    labeling_services.reply_submit(assignment=labeling_services.task_lease_next(user=alice), text=first)
    reply = Message.objects.get(assignment=assignment)
    assert (reply.draft_edit_ratio, reply.draft_model_version) == (0.0, tiny_policy)
    Message.objects.filter(pk=reply.pk).update(review_status="accepted")
    reply.conversation.split = "train"
    reply.conversation.save(update_fields=["split"])
    settings.TRAINING_SFT_UNEDITED_DRAFTS = "drop"
    assert reply.pk not in {m.pk for m in datasets.demonstrations(split="train")}


def test_a_failed_draft_says_so_in_plain_words(client, alice, tiny_policy):
    assignment = _leased_write_task(alice)
    client.force_login(alice)
    body = client.post(reverse("chat:draft_start", args=[assignment.pk])).json()
    request = SamplingRequest.objects.get(pk=body["request"])
    services.sampling_request_fail(request=request, error="SoftTimeLimitExceeded: SoftTimeLimitExceeded()")
    polled = client.get(body["poll"]).json()
    assert polled["status"] == "failed" and polled["error"].startswith("The model took too long to answer.")
    assert "Exceeded" not in polled["error"]
