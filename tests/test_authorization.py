"""Issue 15: who may use which URL, for every URL of the pages and the API, generated from the URL conf so that
a new URL cannot be missed: it fails here until it is given a rule.

Personas: an anonymous visitor, a labeler who owns the objects in the URL (alice), another labeler (charlie), a
reviewer (bob) and an admin. "Denied" is a redirect to the login page, a 401, a 403 or a 404 (someone else's
object is not found, not forbidden); "allowed" is anything else below 500. No URL answers any persona with a 500.
"""

import pytest
from django.urls import URLResolver, get_resolver, reverse

from labeling import services
from labeling.models import ImportJob, Message, TaskKind
from models_service.models import ModelVersion, SamplingRequest
from sampling import services as chat_services
from tests.support.factories import TrainingRunFactory
from tests.support.labeling import make_rank_task, make_reply_task
from training_jobs.models import Evaluation

pytestmark = pytest.mark.django_db

PERSONAS = ("anonymous", "owner", "other", "reviewer", "admin")
EVERYONE = dict.fromkeys(PERSONAS, True)
SIGNED_IN = EVERYONE | {"anonymous": False}
OWNER = {"anonymous": False, "owner": True, "other": False, "reviewer": False, "admin": False}
OWNER_OR_ADMIN = OWNER | {"admin": True}
ADMIN = {p: p == "admin" for p in PERSONAS}

# name -> (method, who may). Objects in the URL belong to the owner (alice).
RULES = {
    "healthz": ("get", EVERYONE),
    "login": ("get", EVERYONE),
    "logout": ("post", None),  # anyone; it answers with the login page
    "labeling:home": ("get", SIGNED_IN),
    "labeling:guidelines": ("get", SIGNED_IN),
    "labeling:next": ("get", SIGNED_IN),
    "labeling:work": ("get", OWNER),
    "labeling:skip": ("post", OWNER),
    "labeling:report": ("post", OWNER),
    "labeling:draft": ("post", OWNER),
    "labeling:markdown_preview": ("post", SIGNED_IN),
    "labeling:mine": ("get", SIGNED_IN),
    "labeling:edit_message": ("get", OWNER),
    "labeling:edit_ranking": ("get", OWNER),
    "labeling:profile": ("get", SIGNED_IN),
    "labeling:api_token": ("post", SIGNED_IN),
    "labeling:api_token_revoke": ("post", SIGNED_IN),
    "chat:chat_index": ("get", SIGNED_IN),
    "chat:chat": ("get", OWNER),
    "chat:chat_poll": ("get", OWNER),
    "chat:chat_retry": ("post", OWNER),
    "chat:chat_alternatives": ("post", OWNER),
    "chat:chat_alternatives_status": ("get", OWNER),
    "chat:draft_start": ("post", OWNER),
    "chat:draft_poll": ("get", OWNER),
    "chat:coming_work": ("get", SIGNED_IN),
    "labeling:write_prompt": ("post", SIGNED_IN),
    "ops:overview": ("get", ADMIN),
    "ops:resume_loop": ("post", ADMIN),
    "ops:train_now": ("post", ADMIN),
    "ops:set_rm_threshold": ("post", ADMIN),
    "ops:runs": ("get", ADMIN),
    "ops:start_run": ("post", ADMIN),
    "ops:run": ("get", ADMIN),
    "ops:run_data": ("get", ADMIN),
    "ops:cancel_run": ("post", ADMIN),
    "ops:models": ("get", ADMIN),
    "ops:model": ("get", ADMIN),
    "ops:activate_model": ("post", ADMIN),
    "ops:rollback": ("post", ADMIN),
    "ops:evaluation": ("get", ADMIN),
    "ops:promote": ("post", ADMIN),
    "ops:labelers": ("get", ADMIN),
    "ops:workers": ("get", ADMIN),
    "ops:moderation": ("get", ADMIN),
    "ops:moderate": ("post", ADMIN),
    "ops:imports": ("get", ADMIN),
    "ops:import": ("get", ADMIN),
    "api-schema": ("get", SIGNED_IN),
    "api-docs": ("get", SIGNED_IN),
    "api-next-task": ("post", SIGNED_IN),
    "api-assignments": ("get", SIGNED_IN),
    "api-assignment": ("get", OWNER),
    "api-submit": ("post", OWNER),
    "api-skip": ("post", OWNER),
    "api-report": ("post", OWNER),
    "api-draft": ("post", OWNER),
    "api-conversations": ("get", SIGNED_IN),
    "api-conversation": ("get", OWNER_OR_ADMIN),
    "api-message": ("get", OWNER_OR_ADMIN),
    "api-imports": ("get", ADMIN),
    "api-import": ("get", ADMIN),
    "api-export-card": ("get", ADMIN),
    "api-export": ("get", ADMIN),
    "api-model-versions": ("get", SIGNED_IN),
    "api-model-version": ("get", SIGNED_IN),
    "api-training-runs": ("get", SIGNED_IN),
    "api-training-run-start": ("post", ADMIN),
    "api-loop-outlook": ("get", ADMIN),
    "api-loop-train-now": ("post", ADMIN),
    "api-training-run": ("get", SIGNED_IN),
    "api-training-run-cancel": ("post", ADMIN),
}


def url_names() -> list[str]:
    """Every named URL outside Django admin (whose own permission checks are Django's)."""

    def walk(patterns, namespace=None):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                if pattern.namespace == "admin":
                    continue
                yield from walk(pattern.url_patterns, pattern.namespace or namespace)
            elif pattern.name:
                yield f"{namespace}:{pattern.name}" if namespace else pattern.name

    return sorted(set(walk(get_resolver().url_patterns)))


def test_every_url_has_a_rule():
    assert set(url_names()) == set(RULES), {
        "without a rule": sorted(set(url_names()) - set(RULES)),
        "rules for no URL": sorted(set(RULES) - set(url_names())),
    }


@pytest.fixture
def owned(alice, tiny_policy):
    """One object of each kind in the URLs, belonging to alice (the owner)."""
    make_reply_task()
    reply_assignment = services.task_lease_next(user=alice)
    written = services.reply_submit(assignment=reply_assignment, text="My reply.").result
    make_rank_task(k=2)
    ranking_assignment = services.task_lease_next(user=alice)
    assert ranking_assignment.task.kind == TaskKind.RANK_REPLIES
    a, b = services.display_order(ranking_assignment.task, alice.pk)
    ranking = services.ranking_submit(
        assignment=ranking_assignment,
        ranking=services.RankingInput(order=[[b], [a]], flags={}, quality_rating=4),
    ).result
    make_reply_task()
    open_assignment = services.task_lease_next(user=alice)
    _, chat_request = chat_services.chat_start(user=alice, text="Hello?")
    chat_reply = Message.objects.create(
        conversation=chat_request.context.conversation,
        parent=chat_request.context,
        depth=1,
        role="assistant",
        text="Hi.",
        origin="model",
        model_version=tiny_policy,
        sampling_params={"seed": 0},
    )
    draft_request = SamplingRequest.objects.create(
        purpose="draft", context=open_assignment.task.parent_message, assignment=open_assignment, requested_by=alice
    )
    run = TrainingRunFactory(kind="rm", status="queued")
    evaluation = Evaluation.objects.create(candidate=tiny_policy, status="done")
    job = ImportJob.objects.create(file_path="/nonexistent", original_name="x.jsonl")
    return {
        "assignment_id": open_assignment.pk,
        "message_id": written.pk,
        "ranking_id": ranking.pk,
        "conversation_id": chat_request.context.conversation_id,
        "request_id": chat_request.pk,
        "draft_request_id": draft_request.pk,
        "chat_message_id": chat_reply.pk,
        "run_id": run.pk,
        "version_id": tiny_policy.pk,
        "evaluation_id": evaluation.pk,
        "job_id": job.pk,
        "kind": "sft",
        "rollback_kind": ModelVersion.Kind.POLICY,
        "written_conversation_id": written.conversation_id,
    }


URL_ARGUMENTS = ("assignment_id", "ranking_id", "conversation_id", "request_id", "run_id", "version_id")
URL_ARGUMENTS += ("evaluation_id", "job_id", "message_id", "kind")
SPECIAL = {
    "chat:chat_alternatives": {"message_id": "chat_message_id"},
    "chat:chat_alternatives_status": {"message_id": "chat_message_id"},
    "chat:draft_poll": {"request_id": "draft_request_id"},
    "api-conversation": {"conversation_id": "written_conversation_id"},
    "ops:rollback": {"kind": "rollback_kind"},
}


def url_for(name: str, owned: dict) -> str:
    """The URL with the owner's object of the kind each argument names."""
    from django.urls import NoReverseMatch

    if name in SPECIAL:
        return reverse(name, kwargs={k: owned[v] for k, v in SPECIAL[name].items()})
    for kwargs in [{}, *({argument: owned[argument]} for argument in URL_ARGUMENTS)]:
        try:
            return reverse(name, kwargs=kwargs)
        except NoReverseMatch:
            continue
    raise AssertionError(f"no URL for {name}")


def client_for(persona: str, request, client):
    users = {"owner": "alice", "other": "charlie", "reviewer": "bob", "admin": "admin_user"}
    if persona != "anonymous":
        client.force_login(request.getfixturevalue(users[persona]))
    return client


def denied(response) -> bool:
    if response.status_code in (401, 403, 404):
        return True
    return response.status_code == 302 and response.url.startswith(reverse("login"))


@pytest.mark.parametrize("persona", PERSONAS)
@pytest.mark.parametrize("name", sorted(RULES))
def test_who_may_use_each_url(client, request, owned, name, persona):
    method, who = RULES[name]
    client = client_for(persona, request, client)
    url = url_for(name, owned)
    response = getattr(client, method)(url, {}, HTTP_ACCEPT="text/html,application/json")
    assert response.status_code < 500, (name, persona, response.status_code)
    if who is None:
        return
    assert denied(response) != who[persona], (name, persona, response.status_code, getattr(response, "url", ""))
