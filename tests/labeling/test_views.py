"""Every labeler page for each persona: a labeler (alice), a reviewer (bob), an admin, and an anonymous visitor."""

import json

import pytest
from django.urls import reverse

from labeling import services
from labeling.models import Assignment, Message, Ranking, Task, TaskKind
from labeling.selectors import candidate_handles
from labeling.services import display_order
from tests.support.labeling import expire_lease, handle_order, make_rank_task, make_reply_task

pytestmark = pytest.mark.django_db

PAGES = ["labeling:home", "labeling:guidelines", "labeling:next", "labeling:mine", "labeling:profile"]


@pytest.mark.parametrize("page", PAGES)
def test_anonymous_visitors_are_sent_to_log_in(client, page):
    response = client.get(reverse(page))
    assert response.status_code == 302 and response.url.startswith(reverse("login"))


@pytest.mark.parametrize("persona", ["alice", "bob", "admin_user"])
@pytest.mark.parametrize("page", PAGES)
def test_every_persona_can_open_every_page(client, request, persona, page):
    client.force_login(request.getfixturevalue(persona))
    response = client.get(reverse(page))
    assert response.status_code == 200


def test_home_shows_counts_and_a_start_button(client, alice):
    make_reply_task()
    services.reply_submit(assignment=services.task_lease_next(user=alice), text="A reply.")
    client.force_login(alice)
    page = client.get(reverse("labeling:home")).content.decode()
    assert 'data-testid="count-today">1<' in page and 'data-testid="count-total">1<' in page
    assert "Start labeling" in page and "Guidelines in brief" in page


def test_next_leases_a_task_and_redirects_to_it(client, alice):
    make_reply_task()
    client.force_login(alice)
    response = client.get(reverse("labeling:next"))
    assignment = Assignment.objects.get(labeler=alice)
    assert response.status_code == 302 and response.url == reverse("labeling:work", args=[assignment.pk])
    page = client.get(response.url).content.decode()
    assert "Write the assistant&#x27;s reply" in page or "Write the assistant's reply" in page


def test_an_empty_queue_says_so_and_offers_what_can_be_done(client, alice):
    """Issue 17, item 5: the empty page says why, shows what is on its way, and offers a prompt to write."""
    client.force_login(alice)
    page = client.get(reverse("labeling:next")).content.decode()
    assert "No task is waiting for you right now" in page
    assert reverse("chat:coming_work") in page and 'data-testid="write-prompt"' in page
    response = client.post(reverse("labeling:write_prompt"))
    assert response.status_code == 302 and response.url == reverse("labeling:next")
    work = client.get(response.url)
    assignment = Assignment.objects.get(labeler=alice)
    assert work.url == reverse("labeling:work", args=[assignment.pk])
    assert assignment.task.kind == TaskKind.WRITE_PROMPT and assignment.task.reserved_for == alice
    client.post(reverse("labeling:write_prompt"))
    assert Task.objects.filter(kind=TaskKind.WRITE_PROMPT, reserved_for=alice).count() == 1, "one at a time"


def test_the_coming_work_panel_says_what_is_being_sampled(client, alice, tiny_policy, settings):
    from models_service.models import SamplingRequest

    client.force_login(alice)
    assert "ranking task" in client.get(reverse("chat:coming_work")).content.decode()
    task = make_reply_task()
    SamplingRequest.objects.create(purpose=SamplingRequest.Purpose.POOL, context=task.parent_message, k=4)
    page = client.get(reverse("chat:coming_work")).content.decode()
    assert "1 ranking task is being sampled" in page


def test_a_labeler_cannot_open_someone_elses_assignment(client, alice, bob):
    make_reply_task()
    bobs = services.task_lease_next(user=bob)
    client.force_login(alice)
    assert client.get(reverse("labeling:work", args=[bobs.pk])).status_code == 404
    assert client.post(reverse("labeling:work", args=[bobs.pk]), {"text": "hijack"}).status_code == 404
    assert client.post(reverse("labeling:skip", args=[bobs.pk]), {"reason": "x"}).status_code == 404
    assert client.post(reverse("labeling:draft", args=[bobs.pk]), {"text": "x"}).status_code == 404


def test_writing_a_reply_through_the_page(client, alice):
    task = make_reply_task()
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    response = client.post(work_url, {"text": "Boil it for **7 minutes**.", "time_spent_ms": "4200"})
    assert response.status_code == 200 and "Saved." in response.content.decode()
    reply = Message.objects.get(parent=task.parent_message)
    assert reply.text == "Boil it for **7 minutes**." and reply.assignment.time_spent_ms == 4200


def test_the_submit_response_is_the_next_task(client, alice):
    """Issue 17, item 3: no redirect after a submission; the next task is leased and rendered in the response,
    which carries its own address for the address bar."""
    make_reply_task()
    make_reply_task()
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    response = client.post(work_url, {"text": "First answer."})
    page = response.content.decode()
    second = Assignment.objects.filter(labeler=alice, status=Assignment.Status.LEASED).get()
    assert response.status_code == 200 and "Saved. Here is your next task." in page
    assert f'data-page-url="{reverse("labeling:work", args=[second.pk])}"' in page
    assert f'action="{reverse("labeling:skip", args=[second.pk])}"' in page
    response = client.post(reverse("labeling:work", args=[second.pk]), {"text": "Second answer."})
    page = response.content.decode()
    assert "Saved." in page and "No task is waiting for you right now" in page
    assert "Here is your next task" not in page
    assert f'data-page-url="{reverse("labeling:next")}"' in page


def test_over_long_text_is_refused_with_the_count_and_kept(client, alice):
    """Issue 17, item 8: no maxlength cuts a paste short; the server refuses with the numbers the counter shows
    (line breaks count once, as in the browser) and the text stays."""
    make_reply_task()
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    page = client.get(work_url).content.decode()
    assert "maxlength=" not in page.split('id="id_text"')[1].split(">")[0]
    fits = "line\r\n" * 4000  # 24,000 characters as posted, 20,000 as typed
    response = client.post(work_url, {"text": fits})
    assert response.status_code == 200 and Message.objects.get(author=alice).text == "line\n" * 4000
    make_reply_task()
    work_url = client.get(reverse("labeling:next")).url
    too_long = "x" * (services.MAX_MESSAGE_CHARS + 5)
    response = client.post(work_url, {"text": too_long})
    page = response.content.decode()
    assert response.status_code == 422 and "20005 characters long; the limit is 20,000" in page
    assert too_long in page


def test_an_empty_submission_keeps_the_page_and_says_why(client, alice):
    make_reply_task()
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    response = client.post(work_url, {"text": "   "})
    assert response.status_code == 422
    assert "the text is empty" in response.content.decode()


def test_a_refused_submission_keeps_the_typed_text(client, alice, bob):
    make_reply_task()
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    alices = Assignment.objects.get(labeler=alice)
    expire_lease(alices)
    services.reply_submit(assignment=services.task_lease_next(user=bob), text="Bob was faster.")
    typed = "My long careful answer that must not be lost."
    response = client.post(work_url, {"text": typed})
    page = response.content.decode()
    assert response.status_code == 422
    assert "lease on this task expired" in page
    assert typed in page


def test_ranking_through_the_page(client, alice):
    task = make_rank_task(k=4)
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    page = client.get(work_url).content.decode()
    assert page.count('data-testid="candidate-') == 4
    a, b, c, d = display_order(task, alice.pk)
    handles = candidate_handles(task, alice.pk)
    assert not any(f'data-id="{i}"' in page for i in (a, b, c, d)), "message ids never reach the page"
    order = json.dumps(handle_order(task, alice, [[d], [b, c], [a]]))
    form = {"order": order, "quality_rating": "6", f"flags-{handles[a]}": ["hallucination"]}
    response = client.post(work_url, form)
    assert response.status_code == 200 and "Saved." in response.content.decode()
    ranking = Ranking.objects.get(labeler=alice)
    assert ranking.ordered_message_ids == [[d], sorted([b, c]), [a]]
    assert ranking.entries.get(message_id=a).flags == ["hallucination"]


def test_an_untouched_ranking_warns_and_can_be_confirmed(client, alice):
    task = make_rank_task(k=3)
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    shown = json.dumps(handle_order(task, alice, [[i] for i in display_order(task, alice.pk)]))
    response = client.post(work_url, {"order": shown, "quality_rating": "4"})
    assert response.status_code == 422 and 'data-testid="untouched-warning"' in response.content.decode()
    response = client.post(work_url, {"order": shown, "quality_rating": "4", "confirm_untouched": "on"})
    assert response.status_code == 200 and Ranking.objects.get(labeler=alice).order_untouched


def test_a_ranking_without_a_rating_keeps_the_arranged_order(client, alice):
    task = make_rank_task(k=3)
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    a, b, c = display_order(task, alice.pk)
    response = client.post(work_url, {"order": json.dumps(handle_order(task, alice, [[c], [a], [b]]))})
    page = response.content.decode()
    assert response.status_code == 422 and "Rate the overall quality" in page
    handles = candidate_handles(task, alice.pk)
    positions = [page.index(f'data-id="{handles[i]}"') for i in (c, a, b)]
    assert positions == sorted(positions), "the labeler's order is shown again"


def test_a_failed_ranking_keeps_the_labelers_ties_too(client, alice):
    """Issue 15, item 4: the page comes back with the order and the ties the labeler had made, so adding the
    missing rating saves the ranking they meant."""
    import re

    task = make_rank_task(k=3)
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    a, b, c = display_order(task, alice.pk)
    order = json.dumps(handle_order(task, alice, [[c], [a, b]]))
    page = client.post(work_url, {"order": order}).content.decode()
    ids = {h: i for i, h in candidate_handles(task, alice.pk).items()}
    rows = {
        ids[m.group(2)]: "tied" in m.group(1)
        for m in re.finditer(r'<li class="candidate([^"]*)" data-id="([^"]+)"', page)
    }
    assert list(rows) == [c, a, b] and rows == {c: False, a: False, b: True}
    response = client.post(work_url, {"order": order, "quality_rating": "5"})
    assert response.status_code == 200
    assert Ranking.objects.get(labeler=alice).ordered_message_ids == [[c], sorted([a, b])]


def test_a_failed_ranking_keeps_a_tie_arranged_against_the_shown_order(client, alice):
    """Found in a new user's walk: B moved above A and tied to it came back as A, B with the tie on A."""
    import re

    task = make_rank_task(k=3)
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    a, b, c = display_order(task, alice.pk)
    page = client.post(work_url, {"order": json.dumps(handle_order(task, alice, [[b, a], [c]]))}).content.decode()
    ids = {h: i for i, h in candidate_handles(task, alice.pk).items()}
    rows = {
        ids[m.group(2)]: "tied" in m.group(1)
        for m in re.finditer(r'<li class="candidate([^"]*)" data-id="([^"]+)"', page)
    }
    assert list(rows) == [b, a, c] and rows == {b: False, a: True, c: False}


def test_review_page_for_reviewers(client, alice, bob):
    make_reply_task()
    services.reply_submit(assignment=services.task_lease_next(user=alice), text="A demonstration.")
    client.force_login(bob)
    work_url = client.get(reverse("labeling:next")).url
    assert "A demonstration." in client.get(work_url).content.decode()
    response = client.post(work_url, {"decision": "reject", "reason": ""})
    assert response.status_code == 422 and "Say why you reject it" in response.content.decode()
    assert "Saved." in client.post(work_url, {"decision": "accept"}).content.decode()
    assert Message.objects.get(text="A demonstration.").review_status == Message.ReviewStatus.ACCEPTED


def test_skip_and_report_through_the_page(client, alice):
    make_reply_task()
    make_reply_task()
    client.force_login(alice)
    first = client.get(reverse("labeling:next")).url
    response = client.post(first.rstrip("/") + "/skip/", {"reason": "The task is unclear"})
    assert response.status_code == 302
    second = client.get(reverse("labeling:next")).url
    assert second != first
    client.post(second.rstrip("/") + "/report/", {"reason": "spam", "note": "ads"})
    statuses = sorted(Assignment.objects.filter(labeler=alice).values_list("status", flat=True))
    assert statuses == ["reported", "skipped"]


def test_skip_without_a_reason_is_refused(client, alice):
    make_reply_task()
    client.force_login(alice)
    url = client.get(reverse("labeling:next")).url
    response = client.post(url.rstrip("/") + "/skip/", {"reason": ""}, follow=True)
    assert "reason" in response.content.decode().lower()
    assert Assignment.objects.get(labeler=alice).status == Assignment.Status.LEASED


def test_draft_autosave(client, alice):
    make_reply_task()
    client.force_login(alice)
    url = client.get(reverse("labeling:next")).url
    response = client.post(url.rstrip("/") + "/draft/", {"text": "half-written"})
    assert response.status_code == 200 and "Draft saved" in response.content.decode()
    assert Assignment.objects.get(labeler=alice).draft == "half-written"
    assert "half-written" in client.get(url).content.decode()


def test_markdown_preview_is_sanitised(client, alice):
    client.force_login(alice)
    response = client.post(reverse("labeling:markdown_preview"), {"text": "**bold** <script>alert(1)</script>"})
    html = response.content.decode()
    assert "<strong>bold</strong>" in html and "<script>" not in html and "&lt;script&gt;" in html


def test_my_work_lists_and_edits_my_submissions(client, alice, bob):
    make_reply_task()
    reply = services.reply_submit(assignment=services.task_lease_next(user=alice), text="Original.").result
    client.force_login(alice)
    assert "Original." in client.get(reverse("labeling:mine")).content.decode()
    edit_url = reverse("labeling:edit_message", args=[reply.pk])
    assert client.post(edit_url, {"text": "Improved."}).status_code == 302
    reply.refresh_from_db()
    assert reply.text == "Improved."
    client.force_login(bob)
    assert client.get(edit_url).status_code == 404


def test_editing_a_ranking_through_the_page(client, alice):
    task = make_rank_task(k=3)
    a, b, c = display_order(task, alice.pk)
    ranking = services.ranking_submit(
        assignment=services.task_lease_next(user=alice),
        ranking=services.RankingInput(order=[[b], [a], [c]], flags={}, quality_rating=3),
    ).result
    client.force_login(alice)
    url = reverse("labeling:edit_ranking", args=[ranking.pk])
    assert client.get(url).status_code == 200
    order = json.dumps(handle_order(task, alice, [[c], [a, b]]))
    response = client.post(url, {"order": order, "quality_rating": "2"})
    assert response.status_code == 302
    ranking.refresh_from_db()
    assert ranking.ordered_message_ids == [[c], sorted([a, b])] and ranking.quality_rating == 2


def test_profile_languages_and_topics(client, alice):
    client.force_login(alice)
    response = client.post(reverse("labeling:profile"), {"languages": ["de", "en"], "topics": "Cooking, law"})
    assert response.status_code == 302
    alice.labeler_profile.refresh_from_db()
    assert alice.labeler_profile.languages == ["de", "en"] and alice.labeler_profile.topics == ["cooking", "law"]


def test_prompt_page_creates_a_conversation(client, alice):
    services.task_create(kind=TaskKind.WRITE_PROMPT)
    client.force_login(alice)
    url = client.get(reverse("labeling:next")).url
    response = client.post(url, {"text": "Plan a 3-day trip to Rome.", "language": "en", "tags": "travel"})
    assert response.status_code == 200
    prompt = Message.objects.get(text="Plan a 3-day trip to Rome.")
    assert prompt.conversation.tags == ["travel"]
    assert Task.objects.filter(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt).exists()


def test_admin_pages_open_for_admins_only(client, alice, admin_user):
    client.force_login(alice)
    assert client.get("/admin/labeling/task/").status_code == 302
    client.force_login(admin_user)
    for path in ["/admin/labeling/task/", "/admin/labeling/ranking/", "/admin/labeling/queuesettings/add/"]:
        assert client.get(path).status_code == 200, path


MALFORMED_ORDERS = [
    "not json",
    "null",
    "7",
    '"text"',
    '{"a": 1}',
    "[1, 2, 3]",
    '[["x"], ["y"]]',
    "[[true], [false]]",
    "[[1.5], [2.5]]",
    "[[1e400]]",
    "[[]]",
    "[[-1], [99999999999999999999999]]",
    "[[[1]], [[2]]]",
    "[" * 5000 + "]" * 5000,
]


@pytest.mark.parametrize("order", MALFORMED_ORDERS, ids=range(len(MALFORMED_ORDERS)))
def test_a_malformed_ranking_form_gets_a_clear_error_and_no_500(client, alice, order):
    make_rank_task(k=3)
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    response = client.post(work_url, {"order": order, "quality_rating": "4", "time_spent_ms": "12"})
    assert response.status_code == 422, response.content.decode()[:400]
    assert 'data-testid="order-error"' in response.content.decode()
    assert not Ranking.objects.exists()
    assert response.content.decode().count('data-testid="candidate-') == 3, "the candidates are shown again"


def test_error_pages_are_the_products_own(client, alice, rf):
    """Issue 15, item 13: no Django debug page listing every URL; the product's styled pages instead."""
    from django.views.defaults import server_error

    missing = client.get("/no/such/page/")
    assert missing.status_code == 404 and 'data-testid="error-page"' in missing.content.decode()
    assert "URLconf" not in missing.content.decode()
    client.force_login(alice)
    forbidden = client.get(reverse("ops:overview"))
    assert forbidden.status_code in (302, 403)
    crashed = server_error(rf.get("/"))
    assert crashed.status_code == 500 and 'data-testid="error-page"' in crashed.content.decode()


def test_expensive_pages_are_throttled_per_user(client, alice, bob, settings):
    """Issue 15, item 9: the Markdown preview (and chat, alternatives) have a per-user, per-minute limit."""
    from django.core.cache import cache

    cache.clear()
    settings.PAGE_RATE_PREVIEW = 3
    client.force_login(alice)
    url = reverse("labeling:markdown_preview")
    statuses = [client.post(url, {"text": "**hi**"}, HTTP_HX_REQUEST="true").status_code for _ in range(4)]
    if statuses[-1] == 200:  # the minute turned between the calls: one more window
        statuses = [client.post(url, {"text": "**hi**"}, HTTP_HX_REQUEST="true").status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    refused = client.post(url, {"text": "x"}, HTTP_HX_REQUEST="true")
    assert "Try again in" in refused.content.decode() and int(refused["Retry-After"]) <= 60
    client.force_login(bob)
    assert client.post(url, {"text": "**hi**"}, HTTP_HX_REQUEST="true").status_code == 200, "per user"


def test_a_throttled_chat_says_so_and_creates_nothing(client, alice, settings):
    from django.core.cache import cache

    from labeling.models import Conversation

    cache.clear()
    settings.PAGE_RATE_CHAT = 1
    client.force_login(alice)
    client.post(reverse("chat:chat_index"), {"text": "first"})
    second = client.post(reverse("chat:chat_index"), {"text": "second"})
    if second.status_code != 429:  # the minute turned
        second = client.post(reverse("chat:chat_index"), {"text": "third"})
    assert second.status_code == 429 and 'data-testid="error-page"' in second.content.decode()
    assert Conversation.objects.filter(created_by=alice).count() <= 2
    assert client.get(reverse("chat:chat_index")).status_code == 200, "reading is not limited"


def test_skip_with_an_other_reason_needs_and_keeps_the_text(client, alice):
    """Issue 17, item 9: the skip dialog's "Other" takes a free-text reason."""
    make_reply_task()
    client.force_login(alice)
    work_url = client.get(reverse("labeling:next")).url
    page = client.get(work_url).content.decode()
    assert 'data-testid="skip-other"' in page and 'data-testid="skip-other-text"' in page
    response = client.post(work_url + "skip/", {"reason": "Other", "other": ""}, follow=True)
    assert "you chose Other" in response.content.decode()
    assert Assignment.objects.get(labeler=alice).status == Assignment.Status.LEASED
    client.post(work_url + "skip/", {"reason": "Other", "other": "It asks for medical advice"})
    assignment = Assignment.objects.get(labeler=alice)
    assert assignment.status == Assignment.Status.SKIPPED
    assert assignment.skip_reason == "Other: It asks for medical advice"


def test_a_ranking_that_only_added_ties_is_not_untouched(client, alice):
    """Issue 17, item 9: [[a], [b, c, d]] with a shown first is a ranking, in the API as in the page."""
    task = make_rank_task(k=4)
    client.force_login(alice)
    assignment = services.task_lease_next(user=alice)
    a, b, c, d = display_order(task, alice.pk)
    order = handle_order(task, alice, [[a], [b, c, d]])
    response = client.post(
        f"/api/v1/assignments/{assignment.pk}/submit/",
        {"order": order, "quality_rating": 3},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    ranking = Ranking.objects.get(labeler=alice)
    assert ranking.ordered_message_ids == [[a], sorted([b, c, d])] and not ranking.order_untouched


def test_my_work_shows_ranked_texts_in_order_with_ties_and_no_stray_banners(client, alice):
    """Issue 17, item 7: the rankings list shows the replies' texts in the submitted order, ties marked, and the
    page shows no "user message #N" banner per row (its rows were passed under the flash messages' name)."""
    make_reply_task()
    services.reply_submit(assignment=services.task_lease_next(user=alice), text="My demonstration.")
    task = make_rank_task(k=3)
    assignment = services.task_lease_next(user=alice)
    a, b, c = display_order(task, alice.pk)
    services.ranking_submit(
        assignment=assignment, ranking=services.RankingInput(order=[[c], [a, b]], flags={}, quality_rating=5)
    )
    client.force_login(alice)
    page = client.get(reverse("labeling:mine")).content.decode()
    assert "message #" not in page and 'class="flash' not in page
    ranking = Ranking.objects.get(labeler=alice)
    cell = page.split(f'data-testid="ranking-order-{ranking.pk}"')[1].split("</td>")[0]
    texts = {i: Message.objects.get(pk=i).preview for i in (a, b, c)}
    first, second = sorted([a, b])
    positions = [cell.index(texts[i]) for i in (c, first, second)]
    assert positions == sorted(positions) and cell.count('class="tie-mark"') == 1
    assert f"#{a}" not in cell


def test_a_profile_needs_a_language_and_gives_an_api_token(client, alice):
    """Walk findings: a profile with no language was accepted; labelers had no way to get an API token."""
    client.force_login(alice)
    response = client.post(reverse("labeling:profile"), {"topics": "cooking"})
    assert response.status_code == 422 and "Choose at least one language" in response.content.decode()
    response = client.post(reverse("labeling:api_token"))
    assert response.status_code == 302, "after the POST, a redirect: a reload never makes a second token"
    response = client.get(response.url)
    page = response.content.decode()
    import re

    from labeling.models import ApiToken

    key = re.search(r'data-testid="new-token".*?<code>([0-9a-f]{40})</code>', page, re.S).group(1)
    assert "no-store" in response["Cache-Control"], "no cache keeps the page that shows the token"
    token = ApiToken.objects.get(user=alice)
    assert token.digest == ApiToken.digest_of(key) and key not in str(vars(token)), "only its SHA-256 is kept"
    profile = client.get(reverse("labeling:profile"))
    assert profile.content.decode().count(key) == 0 and "no-store" in profile["Cache-Control"], "shown once"
    assert "new-api-token" not in client.session, "and forgotten"
    assert client.get(reverse("labeling:api_token")).url.startswith(reverse("labeling:profile")), "a GET: no 405"
    assert ApiToken.objects.get(user=alice).pk == token.pk, "and no new token"
    api = client.__class__()
    assert api.get("/api/v1/assignments/", HTTP_AUTHORIZATION=f"Token {key}").status_code == 200
    client.post(reverse("labeling:api_token"))
    assert api.get("/api/v1/assignments/", HTTP_AUTHORIZATION=f"Token {key}").status_code in (401, 403)
    newer = re.search(r"<code>([0-9a-f]{40})</code>", client.get(reverse("labeling:profile")).content.decode())[1]
    assert api.get("/api/v1/assignments/", HTTP_AUTHORIZATION=f"Token {newer}").status_code == 200
    revoked = client.post(reverse("labeling:api_token_revoke"), follow=True).content.decode()
    assert "Your API token is revoked" in revoked and "You have no token." in revoked
    assert api.get("/api/v1/assignments/", HTTP_AUTHORIZATION=f"Token {newer}").status_code in (401, 403)


def test_a_rejected_reply_shows_the_reviewers_reason_in_my_work(client, alice, bob):
    make_reply_task()
    services.reply_submit(assignment=services.task_lease_next(user=alice), text="A weak demonstration.")
    services.review_submit(
        assignment=services.task_lease_next(user=bob), decision="reject", reason="It does not answer the question."
    )
    client.force_login(alice)
    page = client.get(reverse("labeling:mine")).content.decode()
    assert 'data-testid="rejection-reason"' in page and "It does not answer the question." in page


def test_plain_tokens_from_before_are_hashed_and_keep_working(alice):
    """The migration to hashed tokens keeps every existing script working and leaves no plain key behind."""
    from importlib import import_module

    from django.apps import apps
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    Token.objects.create(user=alice, key="0123456789abcdef0123456789abcdef01234567")
    import_module("labeling.migrations.0022_api_token_hashed").hash_existing_tokens(apps, None)
    assert not Token.objects.exists()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234567")
    assert client.get("/api/v1/assignments/").status_code == 200
    client.credentials(HTTP_AUTHORIZATION="Token 0123456789abcdef0123456789abcdef01234568")
    assert client.get("/api/v1/assignments/").status_code in (401, 403)
