"""The chat page: a labeler talks to the active policy; replies come from the interactive worker."""

import pytest
from django.urls import reverse

from labeling.models import Conversation, Message
from models_service import services
from models_service.models import SamplingRequest
from models_service.sampling import run_request
from sampling import services as chat_services
from tests.support.factories import MessageFactory

pytestmark = pytest.mark.django_db


def answer(request_id: int):
    run_request(services.sampling_request_claim(request_id=request_id))


def test_anonymous_visitors_log_in_first(client):
    assert client.get(reverse("chat:chat_index")).status_code == 302


def test_start_a_chat_wait_for_the_reply_and_continue(client, alice, tiny_policy, settings):
    settings.CHAT_MAX_NEW_TOKENS = 5
    client.force_login(alice)
    assert client.get(reverse("chat:chat_index")).status_code == 200
    response = client.post(reverse("chat:chat_index"), {"text": "Hello, model!"})
    conversation = Conversation.objects.get(created_by=alice, source=Conversation.Source.CHAT)
    assert response.url == reverse("chat:chat", args=[conversation.pk])
    request = SamplingRequest.objects.get(purpose="chat")
    page = client.get(response.url).content.decode()
    assert 'data-testid="typing"' in page and "Hello, model!" in page

    poll = reverse("chat:chat_poll", args=[request.pk])
    assert 'data-testid="typing"' in client.get(poll).content.decode()
    answer(request.pk)
    done = client.get(poll)
    assert done.status_code == 286 and done["HX-Refresh"] == "true"

    page = client.get(response.url).content.decode()
    reply = Message.objects.get(conversation=conversation, role="assistant")
    assert f'data-message-id="{reply.pk}"' in page and "Ask for alternatives" in page
    response = client.post(reverse("chat:chat", args=[conversation.pk]), {"text": "Tell me more.", "parent": reply.pk})
    assert response.status_code == 302
    follow_up = Message.objects.get(text="Tell me more.")
    assert follow_up.parent == reply and SamplingRequest.objects.filter(context=follow_up).exists()


def test_ask_for_alternatives_from_a_model_turn(client, alice, tiny_policy):
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Name a colour."})
    answer(SamplingRequest.objects.get(purpose="chat").pk)
    reply = Message.objects.get(role="assistant")
    response = client.post(reverse("chat:chat_alternatives", args=[reply.pk]), {"k": "3", "for_me": "on"})
    assert response.status_code == 302
    request = SamplingRequest.objects.get(purpose="alternatives")
    assert (request.k, request.keep_message, request.reserve_for_requester) == (2, reply, True)
    page = client.get(reverse("chat:chat", args=[reply.conversation_id])).content.decode()
    assert "sampling alternatives" in page


def test_asking_twice_for_alternatives_is_refused_with_a_message(client, alice, tiny_policy):
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Name a colour."})
    answer(SamplingRequest.objects.get(purpose="chat").pk)
    reply = Message.objects.get(role="assistant")
    url = reverse("chat:chat_alternatives", args=[reply.pk])
    client.post(url, {"k": "3"})
    again = client.post(url, {"k": "3"}, follow=True)  # a double click, while the first is being sampled
    assert again.status_code == 200 and "were already asked for" in again.content.decode()
    answer(SamplingRequest.objects.get(purpose="alternatives").pk)
    later = client.post(url, {"k": "4"}, follow=True)  # and once its ranking task exists
    assert later.status_code == 200 and "were already asked for" in later.content.decode()
    assert SamplingRequest.objects.filter(purpose="alternatives").count() == 1


def test_a_second_request_racing_the_first_gets_the_same_message(alice, tiny_policy, client):
    """Two clicks that both pass the check: the partial unique index refuses the second, with words, not a 500."""
    from unittest import mock

    from django.core.exceptions import ValidationError

    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Name a colour."})
    answer(SamplingRequest.objects.get(purpose="chat").pk)
    reply = Message.objects.get(role="assistant")
    chat_services.alternatives_request_create(model_message=reply, user=alice, k=3, reserve_for_requester=False)
    lookup = services.SamplingRequest.objects.filter
    with (
        mock.patch.object(
            services.SamplingRequest.objects,
            "filter",
            side_effect=lambda *a, **k: lookup(*a, **k).none() if "keep_message" in k else lookup(*a, **k),
        ),
        pytest.raises(ValidationError, match="already asked for"),
    ):
        chat_services.alternatives_request_create(model_message=reply, user=alice, k=3, reserve_for_requester=False)


def test_an_empty_message_is_refused_and_kept_out(client, alice):
    client.force_login(alice)
    response = client.post(reverse("chat:chat_index"), {"text": "   "})
    assert response.status_code == 422 and "Write a message." in response.content.decode()
    assert not Conversation.objects.exists()


def test_another_labelers_chat_is_private(client, alice, bob, tiny_policy):
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Secret question"})
    request = SamplingRequest.objects.get()
    answer(request.pk)
    reply = Message.objects.get(role="assistant")
    client.force_login(bob)
    assert client.get(reverse("chat:chat", args=[reply.conversation_id])).status_code == 404
    assert client.get(reverse("chat:chat_poll", args=[request.pk])).status_code == 404
    assert client.post(reverse("chat:chat_alternatives", args=[reply.pk]), {"k": "3"}).status_code == 404
    response = client.post(reverse("chat:chat_index"), {"text": "x"})
    bobs = Conversation.objects.get(created_by=bob)
    response = client.post(reverse("chat:chat", args=[bobs.pk]), {"text": "hijack", "parent": reply.pk})
    assert response.status_code == 422
    assert not Message.objects.filter(text="hijack").exists()


@pytest.mark.parametrize(
    ("error", "said"),
    [
        ("NoActiveModel: No active policy model.", "No model is serving right now."),
        ("SoftTimeLimitExceeded: SoftTimeLimitExceeded()", "The model took too long to answer."),
        ("No result after 1020 s: the worker was lost or timed out.", "The model took too long to answer."),
        ('RuntimeError: CUDA out of memory at File "/app/ml/generation.py", line 88', "a problem on the server"),
    ],
)
def test_a_failed_reply_is_shown_in_plain_words(client, alice, tiny_policy, error, said):
    """Issue 28, item 15: labelers read what happened, never an exception's name or a traceback's tail."""
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Hi"})
    request = SamplingRequest.objects.get()
    services.sampling_request_fail(request=request, error=error)
    page = client.get(reverse("chat:chat", args=[request.context.conversation_id])).content.decode()
    failed = page.split('data-testid="chat-failed">')[1].split("</div>")[0]
    assert said in failed and "Try again" in failed
    for leak in ("Exceeded", "NoActiveModel", "RuntimeError", "File ", "/app/"):
        assert leak not in failed, leak


def test_chats_stay_with_their_labeler_unless_shared_and_are_never_held_out(client, alice, tiny_policy, settings):
    """Issue 15, item 7: the ranking pool never samples chat turns (only alternatives the labeler chose to share
    become tasks for others), and a chat is train data, never silently held out."""
    from models_service.selectors import contexts_needing_candidates

    settings.DATA_HOLDOUT_FRACTION = 1.0  # any conversation drawn at random would be held out
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Name a colour."})
    conversation = Conversation.objects.get(created_by=alice)
    assert conversation.split == "train"
    question = Message.objects.get(conversation=conversation, role="user")
    assert question not in contexts_needing_candidates(tiny_policy)


def test_a_reply_whose_worker_was_lost_fails_within_minutes_and_can_be_asked_again(client, alice, bob, tiny_policy):
    """The worker writing a chat reply is killed: the page stops saying "writing…" once the interactive limit has
    passed (not the ranking pool's 17 minutes), says so in plain words, and "Try again" asks for the reply anew."""
    import datetime as dt

    from django.utils import timezone

    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Write a long story."})
    lost = SamplingRequest.objects.get()
    services.sampling_request_claim(request_id=lost.pk)  # the worker that was killed mid-reply
    a_while_ago = timezone.now() - dt.timedelta(seconds=240)
    SamplingRequest.objects.filter(pk=lost.pk).update(started_at=a_while_ago)
    pool = SamplingRequest.objects.create(purpose="pool", context=MessageFactory(), status="running", k=2)
    SamplingRequest.objects.filter(pk=pool.pk).update(started_at=a_while_ago)

    assert services.sampling_requests_reap(older_than_s=1020, interactive_older_than_s=180) == 1
    assert SamplingRequest.objects.get(pk=pool.pk).status == "running", "the pool's requests keep their limit"
    chat_url = reverse("chat:chat", args=[lost.context.conversation_id])
    page = client.get(chat_url).content.decode()
    assert 'data-testid="typing"' not in page and "took too long" in page and 'data-testid="chat-retry"' in page

    client.force_login(bob)
    assert client.post(reverse("chat:chat_retry", args=[lost.pk])).status_code == 404, "only the chat's labeler"
    client.force_login(alice)
    assert client.post(reverse("chat:chat_retry", args=[lost.pk])).url == chat_url
    again = SamplingRequest.objects.filter(purpose="chat").latest("pk")
    assert again.pk != lost.pk and again.context_id == lost.context_id and again.status == "pending"
    refused = client.post(reverse("chat:chat_retry", args=[lost.pk]), follow=True).content.decode()
    assert "already asked for again" in refused
    assert SamplingRequest.objects.filter(purpose="chat").count() == 2
    answer(again.pk)
    page = client.get(chat_url).content.decode()
    assert 'data-testid="chat-failed"' not in page and 'data-testid="chat-input"' in page


def test_a_message_longer_than_the_model_reads_says_so_under_the_reply(client, alice, tiny_policy, settings):
    """A walk sent a 19,989-character message and got "(empty reply)" with no word why."""
    settings.CHAT_MAX_NEW_TOKENS = 4
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Please read all of this. " * 800})
    request = SamplingRequest.objects.get()
    answer(request.pk)
    reply = Message.objects.get(conversation=request.context.conversation, role="assistant")
    assert reply.sampling_params["truncated_context"] is True
    page = client.get(reverse("chat:chat", args=[request.context.conversation_id])).content.decode()
    assert 'data-testid="truncated-context"' in page and "saw only the latest part" in page
    short = client.post(reverse("chat:chat_index"), {"text": "Hi"})
    answer(SamplingRequest.objects.latest("pk").pk)
    assert 'data-testid="truncated-context"' not in client.get(short.url).content.decode()


def test_the_page_waiting_on_a_lost_reply_gives_up_by_itself_without_beat(client, alice, tiny_policy, settings):
    """A walk killed the interactive worker with beat and its reaper not running: the page said "writing…" for 12
    minutes. The poll itself gives up on a reply past the interactive hard limit, and offers Try again."""
    import datetime as dt

    from django.utils import timezone

    settings.INTERACTIVE_SOFT_TIME_LIMIT_S = 120
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "Write a poem."})
    lost = SamplingRequest.objects.get()
    services.sampling_request_claim(request_id=lost.pk)
    poll = reverse("chat:chat_poll", args=[lost.pk])
    SamplingRequest.objects.filter(pk=lost.pk).update(started_at=timezone.now() - dt.timedelta(seconds=170))
    assert 'data-testid="typing"' in client.get(poll).content.decode(), "still within the limit: still writing"
    SamplingRequest.objects.filter(pk=lost.pk).update(started_at=timezone.now() - dt.timedelta(seconds=190))
    done = client.get(poll)
    assert done.status_code == 286 and done["HX-Refresh"] == "true"
    page = client.get(reverse("chat:chat", args=[lost.context.conversation_id])).content.decode()
    assert "took too long" in page and 'data-testid="chat-retry"' in page
