"""Real Celery worker processes with tiny models: the sampling worker fills the pool, the interactive worker
answers chat, and a live worker picks up a newly activated policy without a restart."""

import time

import pytest

from labeling.models import Task, TaskKind
from models_service.models import SamplingRequest
from models_service.tasks import fill_ranking_pool
from sampling import services as chat_services
from tests.support.factories import ConversationFactory, MessageFactory
from tests.support.models import register_tiny_policy
from tests.support.workers import running_workers

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

WORKER_ENV = {
    "SAMPLING_POOL_TARGET": "2",
    "SAMPLING_K": "2",
    "SAMPLING_BATCH_CONTEXTS": "2",
    "SAMPLING_MAX_NEW_TOKENS": "6",
    "CHAT_MAX_NEW_TOKENS": "6",
}


def wait_for(predicate, timeout=60.0, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def test_the_sampling_worker_fills_the_pool(tiny_policy):
    for i in range(4):
        MessageFactory(conversation=ConversationFactory(split="train"), text=f"prompt {i}")
    with running_workers("sampling", env=WORKER_ENV):
        fill_ranking_pool.delay()
        open_pool = Task.objects.filter(kind=TaskKind.RANK_REPLIES, status=Task.Status.OPEN)
        wait_for(lambda: open_pool.count() >= 2)
        fill_ranking_pool.delay()
        time.sleep(2)
        assert open_pool.count() == 2
    assert all(task.candidates.count() == 2 for task in open_pool)


def test_a_live_interactive_worker_answers_chat_and_follows_the_active_policy(tiny_policy, tiny_model_dirs, alice):
    prompt = MessageFactory(author=alice, text="Hello!")
    with running_workers("interactive", env=WORKER_ENV):
        first = chat_services.chat_request_create(user_message=prompt, user=alice)
        done = wait_for(lambda: SamplingRequest.objects.filter(pk=first.pk, status="done").first())
        assert done.reply.model_version == tiny_policy

        newer = register_tiny_policy(tiny_model_dirs[1], name="tiny-policy-v1", stage="sft", activate=True)
        follow_up = MessageFactory(author=alice, text="And again?", conversation=ConversationFactory())
        second = chat_services.chat_request_create(user_message=follow_up, user=alice)
        done = wait_for(lambda: SamplingRequest.objects.filter(pk=second.pk, status__in=["done", "failed"]).first())
        assert done.status == "done", done.error
        assert done.reply.model_version == newer, "the worker switched to the new policy without a restart"


def test_a_starting_sampling_worker_preloads_the_policy_and_fills_the_pool(tiny_policy, monkeypatch, settings):
    """Issue 17, item 5: no cold start. The worker loads the serving policy and asks for the first batch itself."""
    from models_service import tasks
    from models_service.loading import active_holder

    asked = []
    monkeypatch.setattr(tasks.fill_ranking_pool, "delay", lambda *a, **k: asked.append(a))
    monkeypatch.setenv("WORKER_QUEUE", "sampling")
    settings.SAMPLING_FILL_ON_START = True
    tasks._load_policy()
    assert active_holder("policy").current.version_id == tiny_policy.pk and asked == [()]
    monkeypatch.setenv("WORKER_QUEUE", "interactive")
    tasks._load_policy()
    assert asked == [()], "an interactive worker only preloads"
