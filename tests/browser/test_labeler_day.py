"""Issue 17 in a real browser: the labeler's day without waiting, and the admin's confirmations.

Where the model writes (drafts, chat), the test drives the worker's own code (models_service.sampling.run_request
on a claimed request, with the tiny policy) from the test thread, and writes a partial text through the same service
the worker streams with, so the page is seen mid-stream; the pages, the polling and the database are all real.
"""

import time

import pytest
from django.utils import timezone

from labeling import services as labeling_services
from labeling.models import Assignment, Message, Role, Task, TaskKind
from labeling.services import display_order
from models_service import sampling
from models_service import services as model_services
from models_service.models import SamplingRequest
from tests.support.browser import log_in, screenshot
from tests.support.factories import ConversationFactory, TrainingRunFactory, UserFactory
from tests.support.labeling import make_rank_task, make_reply_task

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def labeler():
    return UserFactory(username="lena")


def wait_for_request(purpose: str, timeout_s: float = 10.0) -> SamplingRequest:
    deadline = timezone.now() + timezone.timedelta(seconds=timeout_s)
    while timezone.now() < deadline:
        request = SamplingRequest.objects.filter(purpose=purpose).first()
        if request is not None:
            return request
        time.sleep(0.05)
    raise AssertionError(f"no {purpose} request was made")


def test_a_model_draft_streams_into_the_editor_and_is_recorded(page, labeler, tiny_policy, settings):
    """Item 1 (and 2 for drafts): the button asks the policy, the text grows in the editor, the labeler edits it,
    and the submission records the version and how much was changed."""
    settings.CHAT_MAX_NEW_TOKENS = 16
    make_reply_task()
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=draft-button]")
    page.keyboard.press("Alt+m")  # the shortcut
    request = wait_for_request("draft")
    claimed = model_services.sampling_request_claim(request_id=request.pk)
    model_services.sampling_request_progress(request_id=request.pk, text="A first few words")
    page.wait_for_function("document.querySelector('[data-testid=editor]').value === 'A first few words'")
    assert page.locator("[data-testid=editor]").evaluate("e => e.readOnly"), "no typing into a draft being written"
    assert "writing" in page.locator("[data-testid=draft-status]").inner_text()
    screenshot(page, "draft-streaming")
    sampling.run_request(claimed)
    page.wait_for_function("document.querySelector('[data-testid=draft-status]').textContent.startsWith('Draft by')")
    editor = page.locator("[data-testid=editor]")
    assert not editor.evaluate("e => e.readOnly")
    drafted = SamplingRequest.objects.get(pk=request.pk).partial_text
    assert editor.input_value() == drafted
    editor.fill(drafted + " My own closing sentence, which makes it better.")
    screenshot(page, "draft-edited")
    page.click("[data-testid=submit]")
    page.wait_for_selector(".flash-success")
    message = Message.objects.get(author=labeler)
    assert message.draft_model_version == tiny_policy and 0 < message.draft_edit_ratio <= 1


def test_a_chat_reply_shows_its_text_as_it_is_written(page, labeler, tiny_policy, settings):
    """Item 2: the page shows the reply's text so far, then the whole reply, with no reload by the labeler."""
    settings.CHAT_MAX_NEW_TOKENS = 8
    log_in(page, "lena")
    page.goto("/chat/")
    page.fill("[data-testid=chat-input]", "Tell me about eggs.")
    page.click("[data-testid=chat-send]")
    page.wait_for_selector("[data-testid=typing]")
    request = wait_for_request("chat")
    claimed = model_services.sampling_request_claim(request_id=request.pk)
    model_services.sampling_request_progress(request_id=request.pk, text="Eggs are")
    page.wait_for_selector("[data-testid=streaming-reply]:has-text('Eggs are')")
    screenshot(page, "chat-streaming")
    sampling.run_request(claimed)
    page.wait_for_selector(".turn-assistant[data-message-id]")
    assert page.locator("[data-testid=typing]").count() == 0


def test_the_next_task_arrives_with_the_submission(page, labeler):
    """Item 3: one document request per submission (no redirect, no second round trip), and the address bar shows
    the new task's own address."""
    make_reply_task()
    make_reply_task()
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=editor]")
    first_url = page.url
    documents = []
    page.on("request", lambda r: documents.append((r.method, r.url)) if r.resource_type == "document" else None)
    page.fill("[data-testid=editor]", "The first answer.")
    page.click("[data-testid=submit]")
    page.wait_for_selector(".flash-success")
    page.wait_for_function(f"window.location.href !== {first_url!r}")
    second = Assignment.objects.get(labeler=labeler, status=Assignment.Status.LEASED)
    assert page.url.endswith(f"/work/{second.pk}/")
    assert documents == [("POST", first_url)], documents
    page.reload()  # the address is the task's own: a reload shows it, it does not post the last one again
    assert page.locator("[data-testid=editor]").input_value() == ""
    assert Message.objects.filter(author=labeler).count() == 1


def _long_conversation(turns: int) -> Message:
    conversation = ConversationFactory()
    parent = None
    for i in range(turns):
        role = Role.USER if i % 2 == 0 else Role.ASSISTANT
        text = f"Turn {i + 1}. " + "A long paragraph of the conversation. " * 40
        parent = labeling_services.message_create(
            conversation=conversation, parent=parent, role=role, text=text, origin=Message.Origin.IMPORT
        )
    return parent


def test_the_turn_being_answered_is_in_view(page, labeler):
    """Item 4: a long conversation opens scrolled to its last turn, marked, with older turns folded away."""
    last = _long_conversation(11)
    labeling_services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=last)
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=last-turn]")
    assert "Turn 11." in page.locator("[data-testid=last-turn]").inner_text()
    assert "7 earlier turns" in page.locator("[data-testid=folded-turns] summary").inner_text()
    in_view = page.locator("[data-testid=last-turn]").evaluate(
        """turn => {
            const panel = turn.closest('.card');
            const a = turn.getBoundingClientRect(), p = panel.getBoundingClientRect();
            return a.top >= p.top - 1 && a.top < p.bottom && panel.scrollTop > 0;
        }"""
    )
    assert in_view
    screenshot(page, "long-conversation")


def test_an_empty_queue_explains_and_offers_a_prompt(page, labeler, tiny_policy):
    """Item 5: why there is nothing, what is coming, and something to do meanwhile."""
    prompt = make_reply_task().parent_message
    Task.objects.all().delete()
    SamplingRequest.objects.create(purpose="pool", context=prompt, k=4)
    log_in(page, "lena")
    page.goto("/work/next/")
    page.wait_for_selector("[data-testid=coming-work]:has-text('1 ranking task is being sampled')")
    screenshot(page, "empty-queue")
    page.click("[data-testid=write-prompt]")
    page.wait_for_selector("[data-testid=editor]")
    assert "Write a prompt" in page.locator("h2").nth(1).inner_text()


def test_chat_alternatives_update_by_themselves(page, labeler, tiny_policy, settings):
    """Item 6: "sampling alternatives…" turns into "Rank them now" without a reload, and after the ranking the chat
    says it is done."""
    settings.CHAT_MAX_NEW_TOKENS = 6
    settings.SAMPLING_MAX_NEW_TOKENS = 6
    log_in(page, "lena")
    page.goto("/chat/")
    page.fill("[data-testid=chat-input]", "Name a colour.")
    page.click("[data-testid=chat-send]")
    sampling.run_request(model_services.sampling_request_claim(request_id=wait_for_request("chat").pk))
    page.wait_for_selector(".turn-assistant[data-message-id]")
    page.locator("details.alternatives summary").first.click()
    page.select_option("select[name=k]", "3")
    page.click("[data-testid=ask-alternatives]")
    page.wait_for_selector("[data-testid=alternatives-status]:has-text('sampling alternatives')")
    sampling.run_request(model_services.sampling_request_claim(request_id=wait_for_request("alternatives").pk))
    page.wait_for_selector("[data-testid=rank-now]", timeout=15_000)
    chat_url = page.url
    page.click("[data-testid=rank-now]")
    page.wait_for_selector("#candidates")
    page.locator("h2").first.click()
    page.keyboard.press("2")
    page.keyboard.press("ArrowUp")
    page.locator("[data-testid=rating-4] + span").click()
    page.click("[data-testid=submit]")
    page.wait_for_selector(".flash-success")
    page.goto(chat_url)
    assert "you ranked them" in page.locator("[data-testid=alternatives-status]").inner_text()


def test_over_long_text_is_refused_with_a_message_and_kept(page, labeler):
    """Item 8: a 20,005-character paste is not cut short: the counter says it is over, the server refuses with the
    same count, the text stays, and the preview's height leaves Submit in view."""
    make_reply_task()
    log_in(page, "lena")
    page.click("[data-testid=start]")
    text = "word " * 4001  # 20,005 characters
    page.fill("[data-testid=editor]", text)
    counter = page.locator("[data-char-count]")
    assert "20,005 / 20,000 characters: 5 over the limit" in counter.inner_text()
    assert page.locator("[data-testid=editor]").input_value() == text
    page.wait_for_function("document.querySelector('[data-testid=preview]').textContent.includes('word')")
    page.click("[data-testid=submit]")
    page.wait_for_selector("[data-testid=text-error]")
    assert "20005 characters long; the limit is 20,000" in page.locator("[data-testid=text-error]").inner_text()
    assert page.locator("[data-testid=editor]").input_value() == text
    preview = page.locator("[data-testid=preview]").bounding_box()
    assert preview["height"] < 0.45 * 900, "the preview scrolls inside itself instead of pushing Submit away"
    screenshot(page, "over-long-text")


def test_ties_alone_are_a_ranking_and_skip_takes_an_other_reason(page, labeler):
    """Item 9: tying the last three of the shown order needs no confirmation; "Other" asks for a reason."""
    task = make_rank_task(k=4)
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.wait_for_selector("#candidates")
    page.locator("h2").first.click()
    for key in ("3", "4"):
        page.keyboard.press(key)
        page.keyboard.press("=")
    page.locator("[data-testid=rating-3] + span").click()
    page.click("[data-testid=submit]")
    page.wait_for_selector(".flash-success")
    assert page.locator("[data-testid=untouched-warning]").count() == 0
    a, b, c, d = display_order(task, labeler.pk)
    ranking = labeler.rankings.get()
    assert ranking.ordered_message_ids == [[a], sorted([b, c, d])] and not ranking.order_untouched

    make_reply_task()
    page.goto("/work/next/")
    page.click("[data-testid=skip]")
    page.click("[data-testid=skip-other]")
    page.click("[data-testid=confirm-skip]")
    assert page.locator("[data-testid=skip-other-text]").evaluate("e => !e.validity.valid"), "a reason is required"
    page.fill("[data-testid=skip-other-text]", "It asks for medical advice")
    page.click("[data-testid=confirm-skip]")
    page.wait_for_selector(".flash-info")
    skipped = Assignment.objects.get(labeler=labeler, status=Assignment.Status.SKIPPED)
    assert skipped.skip_reason == "Other: It asks for medical advice"


def test_cancel_asks_for_confirmation(page, admin_user, tiny_policy):
    """Item 10: cancelling a run asks first; saying no leaves it running."""
    run = TrainingRunFactory(kind="sft", status="running", started_at=timezone.now(), heartbeat_at=timezone.now())
    log_in(page, admin_user.username)
    page.goto(f"/ops/runs/{run.pk}/")
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.click("[data-testid=cancel-run]")
    page.wait_for_timeout(300)
    run.refresh_from_db()
    assert asked and "Cancel Supervised fine-tuning run" in asked[0] and run.cancel_requested_at is None
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-testid=cancel-run]")
    page.wait_for_selector(".flash-success, .flash-info")
    run.refresh_from_db()
    assert run.cancel_requested_at is not None


def test_a_reload_keeps_the_arranged_order(page, labeler):
    """Walk finding: moving a reply and reloading the page put the replies back in the shown order."""
    make_rank_task(k=3)
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.wait_for_selector("#candidates")
    page.locator("h2").first.click()
    page.keyboard.press("3")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    arranged = page.locator("#candidates > li").evaluate_all("items => items.map(i => i.dataset.letter)")
    assert arranged == ["C", "A", "B"]
    page.reload()
    page.wait_for_selector("[data-testid=order-restored]")
    assert page.locator("#candidates > li").evaluate_all("items => items.map(i => i.dataset.letter)") == arranged


def test_roll_back_names_its_target_and_asks_first(page, admin_user, tiny_policy, tiny_model_dirs):
    """Item 10: the rollback button says which version serves again, and asks before doing it."""
    from models_service.models import ModelVersion
    from tests.support.models import register_tiny_policy

    newer = register_tiny_policy(tiny_model_dirs[1], name="tiny-policy-v1", stage="sft", activate=True)
    log_in(page, admin_user.username)
    page.goto("/ops/models/")
    button = page.locator("[data-testid=rollback-policy]")
    assert button.inner_text() == f"Roll back the policy to {tiny_policy.name}"
    asked = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    button.click()
    page.wait_for_timeout(300)
    assert asked and f"from {newer.name} to {tiny_policy.name}" in asked[0]
    assert ModelVersion.objects.get(is_active=True, kind="policy") == newer
    page.once("dialog", lambda dialog: dialog.accept())
    button.click()
    page.wait_for_selector(".flash-success")
    assert ModelVersion.objects.get(is_active=True, kind="policy") == tiny_policy
    screenshot(page, "models-after-rollback")
