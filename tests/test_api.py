"""The REST API: a labeler's whole day through it, validation that names the field, permissions per role,
the OpenAPI schema, and no 500 on any input (property-based)."""

import json

import pytest
from django.urls import get_resolver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labeling import services
from labeling.models import Assignment, Message, QueueSettings, Ranking, Review, Task, TaskKind
from labeling.selectors import candidate_handles
from tests.support.api import api
from tests.support.factories import UserFactory
from tests.support.labeling import make_rank_task, make_reply_task

pytestmark = pytest.mark.django_db


def lease(client) -> dict:
    response = client.post("/api/v1/tasks/next/")
    assert response.status_code == 200, response.content
    return response.json()["assignment"]


def body_for(assignment: dict) -> dict:
    kind = assignment["kind"]
    if kind == "rank_replies":
        ids = [c["id"] for c in assignment["candidates"]]
        return {"order": [[i] for i in reversed(ids)], "quality_rating": 5, "flags": {str(ids[0]): ["hallucination"]}}
    if kind == "review_demonstration":
        return {"decision": "accept"}
    if kind == "write_prompt":
        return {"text": "What should I cook tonight?", "language": "en", "tags": ["cooking"]}
    return {"text": "A helpful reply."}


def test_a_labelers_whole_day_through_the_api(bob):
    """bob (a reviewer) works every task kind through the API until the queue is empty."""
    settings_row, _ = QueueSettings.objects.get_or_create(pk=1)
    settings_row.open_prompt_tasks = 2
    settings_row.save()
    make_reply_task()
    writer = UserFactory(username="writer")
    services.reply_submit(assignment=services.task_lease_next(user=writer), text="Someone else's demonstration.")
    services.prompt_tasks_replenish()
    for _ in range(2):
        make_rank_task(k=4)
        make_reply_task()
    client = api(bob)
    kinds = []
    while (assignment := lease(client)) is not None and len(kinds) < 60:
        detail = client.get(f"/api/v1/assignments/{assignment['id']}/").json()
        assert detail == assignment
        response = client.post(f"/api/v1/assignments/{assignment['id']}/submit/", body_for(assignment), format="json")
        assert response.status_code == 201, response.content
        again = client.post(f"/api/v1/assignments/{assignment['id']}/submit/", body_for(assignment), format="json")
        assert again.status_code == 200 and again.json()["created"] is False, "a retry counts once"
        kinds.append(assignment["kind"])
    assert set(kinds) == set(TaskKind.values), "every kind of task, including the review and the user turn it unlocks"
    assert Ranking.objects.filter(labeler=bob).count() == kinds.count("rank_replies") == 2
    assert Assignment.objects.filter(labeler=bob, status="submitted").count() == len(kinds)
    mine = client.get("/api/v1/assignments/?status=submitted").json()
    assert mine["count"] == len(kinds)


def test_skip_report_and_draft(alice):
    make_reply_task()
    make_reply_task()
    client = api(alice)
    first = lease(client)
    draft = client.post(f"/api/v1/assignments/{first['id']}/draft/", {"text": "half"}, format="json")
    assert draft.status_code == 200 and draft.json()["draft"] == "half"
    assert client.post(f"/api/v1/assignments/{first['id']}/skip/", {}, format="json").status_code == 400
    assert (
        client.post(f"/api/v1/assignments/{first['id']}/skip/", {"reason": "unclear"}, format="json").json()["status"]
        == "skipped"
    )
    second = lease(client)
    response = client.post(f"/api/v1/assignments/{second['id']}/report/", {"reason": "spam"}, format="json")
    assert response.json()["status"] == "reported"
    assert lease(client) is None


@pytest.fixture
def ranking_assignment(alice):
    make_rank_task(k=3)
    client = api(alice)
    return client, lease(client)


@pytest.mark.parametrize(
    ("body", "field", "phrase"),
    [
        ({"order": [["c0000000000"]]}, "order", "Not candidates of this task"),
        ({"order": [[999999]]}, "order", "Not a valid string"),  # message ids are not what the task gives
        ({"order": "first"}, "order", ""),
        ({"order": [["a"]]}, "order", ""),
        ({"order": []}, "order", ""),
        ({"quality_rating": 9}, "quality_rating", ""),
        ({"quality_rating": "good"}, "quality_rating", ""),
        ({"flags": {"x": ["harmful"]}}, "flags", "Not candidates of this task"),
        ({"flags": {"1": ["rude"]}}, "flags", ""),
        ({"all_unacceptable": "maybe"}, "all_unacceptable", ""),
    ],
)
def test_ranking_validation_names_the_field(ranking_assignment, body, field, phrase):
    client, assignment = ranking_assignment
    ids = [c["id"] for c in assignment["candidates"]]
    full = {"order": [[i] for i in reversed(ids)], **body}
    response = client.post(f"/api/v1/assignments/{assignment['id']}/submit/", full, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert phrase in json.dumps(response.json())
    assert not Ranking.objects.exists()


def test_duplicates_missing_and_foreign_candidates(ranking_assignment):
    client, assignment = ranking_assignment
    a, b, c = (c["id"] for c in assignment["candidates"])
    other = make_rank_task(k=2)
    foreign = candidate_handles(other, Assignment.objects.get(pk=assignment["id"]).labeler_id)[
        other.candidates.first().pk
    ]
    url = f"/api/v1/assignments/{assignment['id']}/submit/"
    for order, phrase in [
        ([[a], [b], [c], [a]], "appears twice"),
        ([[a], [b]], "misses candidates"),
        ([[a], [b], [c], [foreign]], "Not candidates of this task"),
    ]:
        response = client.post(url, {"order": order}, format="json")
        assert response.status_code == 400 and phrase in response.json()["order"][0], response.content


def test_write_validation(alice):
    make_reply_task()
    client = api(alice)
    assignment = lease(client)
    url = f"/api/v1/assignments/{assignment['id']}/submit/"
    assert "text" in client.post(url, {"text": "x" * 20_001}, format="json").json()
    assert client.post(url, {"text": 12}, format="json").json() == {"text": ["Not a valid string."]}
    assert client.post(url, {"text": "   "}, format="json").status_code == 400
    response = client.post(url, data=b'{"text": "\xff\xfe broken"}', content_type="application/json")
    assert response.status_code == 400 and "JSON parse error" in response.json()["detail"]
    assert client.post(url, data=b"[1, 2]", content_type="application/json").status_code == 400
    assert not Message.objects.filter(parent_id=assignment["context"][-1]["id"]).exists()


def test_a_refused_submission_is_a_409_with_the_reason(alice, bob):
    from tests.support.labeling import expire_lease

    make_reply_task()
    client = api(alice)
    assignment = lease(client)
    expire_lease(Assignment.objects.get(pk=assignment["id"]))
    services.reply_submit(assignment=services.task_lease_next(user=bob), text="Bob was faster.")
    response = client.post(f"/api/v1/assignments/{assignment['id']}/submit/", {"text": "late"}, format="json")
    assert response.status_code == 409 and "lease on this task expired" in response.json()["detail"]


# --- permissions ---

ADMIN_ONLY = [
    ("post", "/api/v1/training-runs/start/", {"kind": "sft"}),
    ("post", "/api/v1/training-runs/{run}/cancel/", None),
    ("get", "/api/v1/exports/preferences/", None),
    ("get", "/api/v1/exports/card/", None),
    ("get", "/api/v1/imports/{job}/", None),
]
SIGNED_IN = [
    ("post", "/api/v1/tasks/next/", None),
    ("get", "/api/v1/assignments/", None),
    ("get", "/api/v1/conversations/", None),
    ("get", "/api/v1/model-versions/", None),
    ("get", "/api/v1/training-runs/", None),
    ("get", "/api/v1/training-runs/{run}/", None),
]


@pytest.fixture
def objects(db, tiny_policy):
    from labeling.models import ImportJob
    from tests.support.factories import TrainingRunFactory

    return {
        "run": TrainingRunFactory(kind="rm", status="queued").pk,
        "job": ImportJob.objects.create(file_path="/x", original_name="x").pk,
    }


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ONLY + SIGNED_IN)
def test_anonymous_visitors_get_nothing(objects, method, path, body):
    response = getattr(api(), method)(path.format(**objects), body, format="json")
    assert response.status_code in (401, 403)


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ONLY)
@pytest.mark.parametrize("persona", ["alice", "bob"])
def test_admin_endpoints_refuse_labelers_and_reviewers(request, objects, persona, method, path, body):
    response = getattr(api(request.getfixturevalue(persona)), method)(path.format(**objects), body, format="json")
    assert response.status_code == 403


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ONLY + SIGNED_IN)
def test_admins_may_use_every_endpoint(admin_user, objects, method, path, body):
    response = getattr(api(admin_user), method)(path.format(**objects), body, format="json")
    assert response.status_code in (200, 201, 202), (path, response.status_code, response.content[:300])


@pytest.mark.parametrize(("method", "path", "body"), SIGNED_IN)
def test_labelers_may_use_the_signed_in_endpoints(alice, objects, method, path, body):
    assert getattr(api(alice), method)(path.format(**objects), body, format="json").status_code == 200


def test_another_labelers_objects_are_invisible(alice, charlie):
    make_reply_task()
    alices = lease(api(alice))
    reply = api(alice).post(f"/api/v1/assignments/{alices['id']}/submit/", {"text": "mine"}, format="json").json()
    message = Message.objects.get(pk=reply["result_id"])
    other = api(charlie)
    for method, path in [
        ("get", f"/api/v1/assignments/{alices['id']}/"),
        ("post", f"/api/v1/assignments/{alices['id']}/submit/"),
        ("post", f"/api/v1/assignments/{alices['id']}/skip/"),
        ("post", f"/api/v1/assignments/{alices['id']}/draft/"),
        ("get", f"/api/v1/conversations/{message.conversation_id}/"),
        ("get", f"/api/v1/messages/{message.pk}/"),
    ]:
        assert getattr(other, method)(path, {"text": "x", "reason": "x"}, format="json").status_code == 404, path
    assert api(alice).get(f"/api/v1/messages/{message.pk}/").json()["content"] == "mine"
    assert other.get("/api/v1/conversations/").json()["count"] == 0


def test_only_reviewers_get_review_tasks_through_the_api(alice, bob):
    make_reply_task()
    services.reply_submit(assignment=services.task_lease_next(user=UserFactory(username="writer")), text="Demo.")
    assert lease(api(alice)) is None
    assert lease(api(bob))["kind"] == TaskKind.REVIEW_DEMONSTRATION
    assert Review.objects.count() == 0 and Task.objects.filter(kind="review_demonstration").count() == 1


def test_labelers_see_a_runs_progress_not_its_data_or_settings(alice, admin_user, objects):
    """Issue 15, item 14."""
    from training_jobs.models import TrainingRun

    TrainingRun.objects.filter(pk=objects["run"]).update(
        data_snapshot={"rankings": [1, 2, 3]}, config={"epochs": 3}, summary={"val_accuracy": 0.7}
    )
    secret = {"config", "data_snapshot", "summary", "error"}
    for path in ("/api/v1/training-runs/", f"/api/v1/training-runs/{objects['run']}/"):
        mine = api(alice).get(path).json()
        row = mine["results"][0] if "results" in mine else mine
        assert row["id"] == objects["run"] and "status" in row and not secret & set(row), path
        full = api(admin_user).get(path).json()
        row = full["results"][0] if "results" in full else full
        assert row["data_snapshot"] == {"rankings": [1, 2, 3]} and row["config"] == {"epochs": 3}, path


def test_the_schema_and_docs_need_a_login(client, alice):
    assert api().get("/api/schema/?format=json").status_code in (401, 403)
    docs = client.get("/api/docs/")
    assert docs.status_code == 302 and docs.url.startswith("/login/")
    assert api(alice).get("/api/schema/?format=json").status_code == 200
    client.force_login(alice)
    assert client.get("/api/docs/").status_code == 200


# --- schema ---


def test_every_endpoint_is_in_the_openapi_schema(admin_user):
    schema = api(admin_user).get("/api/schema/?format=json").json()
    paths = set(schema["paths"])
    routes = {
        "/api/" + str(p.pattern).replace("<int:", "{").replace("<str:", "{").replace(">", "}")
        for p in get_resolver("config.api_urls").url_patterns
        if not str(p.pattern).startswith(("schema", "docs"))
    }
    assert routes <= paths, routes - paths
    assert "tokenAuth" in schema["components"]["securitySchemes"]


def test_swagger_ui_is_served_from_our_own_static_files(client, admin_user):
    client.force_login(admin_user)
    page = client.get("/api/docs/").content.decode()
    assert "swagger-ui" in page and "cdn" not in page.lower()


# --- no input reaches a 500 ---

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["text", "order", "flags", "quality_rating", "decision", "reason", "all_unacceptable", "language", "tags"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5))
def test_no_submission_body_causes_a_server_error(ranking_assignment, body):
    client, assignment = ranking_assignment
    response = client.post(f"/api/v1/assignments/{assignment['id']}/submit/", body, format="json")
    assert response.status_code in (200, 201, 400, 409), (body, response.status_code, response.content[:300])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/api/v1/assignments/", "/api/v1/training-runs/", "/api/v1/exports/preferences/"]),
    params=st.dictionaries(
        st.sampled_from(["status", "page", "since", "until", "min_agreement", "model_version", "include_unreviewed"]),
        st.text(max_size=12),
        max_size=3,
    ),
)
def test_no_query_causes_a_server_error(admin_user, path, params):
    response = api(admin_user).get(path, params)
    assert response.status_code in (200, 400, 404), (path, params, response.status_code, response.content[:300])


# --- bounded bodies (issue 15, item 8) ---


def test_json_nested_too_deeply_is_a_400(ranking_assignment):
    client, assignment = ranking_assignment
    body = '{"order": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = client.post(f"/api/v1/assignments/{assignment['id']}/submit/", body, content_type="application/json")
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]


def test_a_json_body_over_the_limit_is_a_413(ranking_assignment, settings):
    settings.API_MAX_JSON_BYTES = 10_000
    client, assignment = ranking_assignment
    body = json.dumps({"order": [[1]], "reason": "x" * 20_000})
    response = client.post(f"/api/v1/assignments/{assignment['id']}/submit/", body, content_type="application/json")
    assert response.status_code == 413 and "larger than 10000 bytes" in response.json()["detail"]
    assert Ranking.objects.count() == 0


@pytest.mark.parametrize("content_type", ["multipart", "form"])
def test_a_multipart_or_form_body_over_the_limit_is_a_413(ranking_assignment, settings, content_type):
    """Django bounds a form's fields, not its files: a 3 MB file posted to the submit endpoint must not be read."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.API_MAX_JSON_BYTES = 1_000_000
    client, assignment = ranking_assignment
    url = f"/api/v1/assignments/{assignment['id']}/submit/"
    if content_type == "multipart":
        big = SimpleUploadedFile("big.bin", b"x" * 3_000_000)
        response = client.post(url, {"order": "[[1]]", "file": big}, format="multipart")
    else:
        from urllib.parse import urlencode

        body = urlencode({"order": "[[1]]", "reason": "x" * 1_500_000})  # under Django's own 2.5 MB
        response = client.post(url, body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 413 and "larger than 1000000 bytes" in response.json()["detail"]
    assert Ranking.objects.count() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"order": [[i] for i in range(10)]}, "order"),
        ({"order": [list(range(10))]}, "order"),
        ({"order": [[1]], "flags": {str(i): ["hallucination"] for i in range(10)}}, "flags"),
        ({"order": [[1]], "flags": {"1": ["hallucination"] * 50}}, "flags"),
        ({"order": [[1]], "quality_rating": float("nan")}, None),
    ],
)
def test_order_and_flags_are_bounded(ranking_assignment, body, field):
    client, assignment = ranking_assignment
    text = json.dumps(body)  # NaN is written as the bare word NaN, which is not JSON
    response = client.post(f"/api/v1/assignments/{assignment['id']}/submit/", text, content_type="application/json")
    assert response.status_code == 400, response.content
    if field:
        assert field in response.json()


def test_ownership_is_checked_before_the_body_is_read(ranking_assignment, charlie):
    _, assignment = ranking_assignment
    response = api(charlie).post(
        f"/api/v1/assignments/{assignment['id']}/submit/", "[" * 100_000, content_type="application/json"
    )
    assert response.status_code == 404


def test_labelers_never_see_model_versions_or_splits(alice, admin_user):
    """Issue 15, item 5: model versions would unblind the A/B gate, splits would say which prompts are held out."""
    from tests.support.labeling import make_rank_task

    task = make_rank_task(k=2)
    prompt = task.parent_message
    prompt.author = alice
    prompt.save(update_fields=["author"])
    from labeling.models import Conversation

    Conversation.objects.filter(pk=prompt.conversation_id).update(created_by=alice)
    candidate = task.candidates.first()
    for client, staff in ((api(alice), False), (api(admin_user), True)):
        conversation = client.get(f"/api/v1/conversations/{prompt.conversation_id}/").json()
        listed = client.get("/api/v1/conversations/").json()["results"][0]
        message = client.get(f"/api/v1/messages/{candidate.pk}/").json()
        for row in (conversation, listed):
            assert ("split" in row) == staff
            assert all(("model_version" in m) == staff for m in row["messages"])
        assert ("model_version" in message) == staff
        if staff:
            assert message["model_version"] == candidate.model_version.name


@pytest.mark.parametrize("error", ["database", "redis"])
def test_an_outage_is_a_503_with_retry_after_not_a_500(alice, client, error):
    """Issue 15: while PostgreSQL or Redis restarts, a request fails with a clear 503 that says to retry."""
    from unittest import mock

    import redis
    from django.db import OperationalError

    raised = OperationalError("server closed the connection") if error == "database" else redis.ConnectionError()
    with (
        mock.patch("labeling.services.task_lease_next", side_effect=raised),
        mock.patch("labeling.services.task_lease_next_id", side_effect=raised),
    ):
        response = api(alice).post("/api/v1/tasks/next/")
        assert response.status_code == 503 and int(response["Retry-After"]) > 0
        assert response.json()["code"] == "unavailable"
        client.force_login(alice)
        page = client.get("/work/next/")
        assert page.status_code == 503 and "Try again" in page.content.decode()


def test_no_labelers_api_shows_the_blind_a_b_replies(alice, admin_user, tiny_policy):
    """Issue 28, item 5: a labeler who wrote in a held-out conversation saw every earlier A/B reply under it through
    /api/v1/conversations/, and could then tell the policies apart in the next comparison."""
    from labeling.models import Role
    from tests.support.labeling import make_prompt

    prompt = make_prompt(author=alice)
    prompt.conversation.split = "holdout"
    prompt.conversation.save(update_fields=["split"])
    a_b = services.message_create(
        conversation=prompt.conversation,
        parent=prompt,
        role=Role.ASSISTANT,
        text="A reply for the blind comparison.",
        origin=Message.Origin.MODEL,
        model_version=tiny_policy,
        sampling_params={"seed": 1, "row": 0, "evaluation": 7},
    )
    for path in (f"/api/v1/conversations/{prompt.conversation_id}/", "/api/v1/conversations/"):
        body = json.dumps(api(alice).get(path).json())
        assert prompt.text in body and a_b.text not in body, path
    assert api(alice).get(f"/api/v1/messages/{a_b.pk}/").status_code == 404
    assert a_b.text in json.dumps(api(admin_user).get(f"/api/v1/conversations/{prompt.conversation_id}/").json())
