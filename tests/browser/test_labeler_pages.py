"""A labeler in a real browser: logs in, writes a demonstration with Ctrl+Enter, ranks by dragging and by keyboard,
sees the ranking saved in order, and keeps the typed text through a validation error."""

import pytest
from playwright.sync_api import expect

from labeling import services
from labeling.models import Assignment, Message, Ranking, TaskKind
from labeling.services import display_order
from tests.support.browser import log_in, screenshot
from tests.support.factories import UserFactory
from tests.support.labeling import expire_lease, make_rank_task, make_reply_task

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def labeler():
    return UserFactory(username="lena")


def candidate_letters(page) -> list[str]:
    return page.locator("#candidates > li").evaluate_all("items => items.map(i => i.dataset.letter)")


def drag(page, source, target):
    """Drag with real mouse moves (SortableJS runs in fallback mode, driven by mouse events)."""
    start, end = source.bounding_box(), target.bounding_box()
    page.mouse.move(start["x"] + 40, start["y"] + 12)
    page.mouse.down()
    page.mouse.move(start["x"] + 40, start["y"] + 30, steps=5)
    page.mouse.move(end["x"] + 40, end["y"] + 5, steps=20)
    page.mouse.move(end["x"] + 40, end["y"] + 3, steps=5)
    page.mouse.up()


def test_log_in_and_see_home(page, labeler):
    page.goto("/")
    page.wait_for_url("**/login/**")
    screenshot(page, "login")
    page.fill("input[name=username]", "lena")
    page.fill("input[name=password]", "wrong")
    page.click("button[type=submit]")
    assert page.locator(".error-box").is_visible()
    log_in(page, "lena")
    assert page.locator("h1").inner_text().startswith("Welcome back, lena")
    screenshot(page, "home")


def test_write_a_demonstration_with_ctrl_enter(page, labeler):
    task = make_reply_task()
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=editor]")
    editor = page.locator("[data-testid=editor]")
    editor.click()
    text = "Boil the egg for **seven minutes**, then cool it in cold water."
    page.keyboard.type(text)
    page.wait_for_function("document.querySelector('[data-testid=preview] strong')?.textContent === 'seven minutes'")
    assert f"{len(text)} / 20,000 characters" in page.locator("[data-char-count]").inner_text()
    screenshot(page, "write-assistant-reply")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector(".flash-success")
    reply = Message.objects.get(parent=task.parent_message)
    assert reply.text == "Boil the egg for **seven minutes**, then cool it in cold water."
    assert reply.author == labeler and reply.review_status == Message.ReviewStatus.PENDING
    assert reply.assignment.time_spent_ms > 0


def test_rank_four_replies_by_dragging_and_by_keyboard(page, labeler):
    task = make_rank_task(k=4, texts=["Reply one.", "Reply two.", "Reply three.", "Reply four."])
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=candidates]")
    shown = display_order(task, labeler.pk)
    assert candidate_letters(page) == ["A", "B", "C", "D"]
    screenshot(page, "rank-replies")

    # Drag D above A.
    drag(page, page.locator("[data-testid=candidate-D] .candidate-head"), page.locator("[data-testid=candidate-A]"))
    assert candidate_letters(page) == ["D", "A", "B", "C"]

    # Keyboard: pick the 4th (C) and move it up once: D A C B.
    page.locator("h2").first.click()
    page.keyboard.press("4")
    page.keyboard.press("ArrowUp")
    assert candidate_letters(page) == ["D", "A", "C", "B"]

    # Tie C with A (press = on the selected C), flag B, rate 5.
    page.keyboard.press("=")
    assert page.locator("[data-testid=candidate-C] [data-rank]").inner_text() == "2"
    page.locator("[data-testid=candidate-B] details summary").click()
    page.locator("[data-testid=candidate-B] input[value=hallucination]").check()
    page.locator("[data-testid=rating-5] + span").click()
    screenshot(page, "rank-replies-arranged")
    page.click("[data-testid=submit]")
    page.wait_for_selector(".flash-success")

    a, b, c, d = shown
    ranking = Ranking.objects.get(labeler=labeler)
    assert ranking.ordered_message_ids == [[d], sorted([a, c]), [b]]
    assert ranking.entries.get(message_id=b).flags == ["hallucination"]
    assert ranking.quality_rating == 5

    page.goto("/mine/")
    rows = page.locator(f"[data-testid=ranking-order-{ranking.pk}] li").all_inner_texts()
    text = {i: Message.objects.get(pk=i).preview for i in (a, b, c, d)}
    assert rows == [text[d], f"{text[min(a, c)]}\n=\n{text[max(a, c)]}", text[b]]
    screenshot(page, "my-work")


def test_an_untouched_ranking_asks_for_confirmation(page, labeler):
    task = make_rank_task(k=3)
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.locator("[data-testid=rating-4] + span").click()
    page.click("[data-testid=submit]")
    warning = page.locator("[data-testid=untouched-warning]")
    warning.wait_for()
    assert not Ranking.objects.exists()
    page.click("[data-testid=confirm-untouched]")
    page.wait_for_selector(".flash-success")
    ranking = Ranking.objects.get(labeler=labeler)
    assert ranking.order_untouched
    assert ranking.ordered_message_ids == [[i] for i in display_order(task, labeler.pk)]


def test_a_refused_submission_keeps_the_typed_text(page, labeler):
    make_reply_task()
    log_in(page, "lena")
    page.click("[data-testid=start]")
    typed = "A long and careful answer that took me ten minutes to write."
    page.locator("[data-testid=editor]").fill(typed)
    # Meanwhile the lease runs out and another labeler fills the task.
    assignment = Assignment.objects.get(labeler=labeler)
    expire_lease(assignment)
    services.reply_submit(assignment=services.task_lease_next(user=UserFactory(username="quick")), text="Quick.")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("[data-testid=form-error]")
    assert "lease on this task expired" in page.locator("[data-testid=form-error]").inner_text()
    assert page.locator("[data-testid=editor]").input_value() == typed
    screenshot(page, "write-refused-keeps-text")


def test_an_empty_submission_shows_the_error_inline(page, labeler):
    make_reply_task()
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.locator("[data-testid=editor]").fill("   ")
    page.click("[data-testid=submit]")
    page.wait_for_selector("[data-testid=text-error]")
    assert "empty" in page.locator("[data-testid=text-error]").inner_text()


def test_skipping_after_typing_asks_for_confirmation(page, labeler):
    make_reply_task()
    make_reply_task()
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.locator("[data-testid=editor]").fill("Something I typed")
    page.click("[data-testid=skip]")
    dialog = page.locator("#skip-dialog")
    assert dialog.is_visible() and dialog.locator("[data-typed-warning]").is_visible()
    screenshot(page, "skip-dialog")
    dialog.locator("input[name=reason]").first.check()
    first_url = page.url
    with page.expect_navigation():
        dialog.locator("[data-testid=confirm-skip]").click()
    assert page.url != first_url
    page.wait_for_selector("[data-testid=editor]")
    assert Assignment.objects.get(labeler=labeler, status=Assignment.Status.SKIPPED)


def test_reviewer_reviews_a_demonstration(page, labeler):
    reviewer = UserFactory(username="rita", profile__is_reviewer=True)
    make_reply_task()
    services.reply_submit(assignment=services.task_lease_next(user=labeler), text="Use a **timer**.")
    log_in(page, "rita")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=demonstration]")
    assert page.locator("[data-testid=demonstration] strong").inner_text() == "timer"
    page.locator("[data-testid=reject]").check()
    page.click("[data-testid=submit]")
    page.wait_for_selector("[data-testid=reason-error]")
    screenshot(page, "review-demonstration")
    page.locator("[data-testid=accept]").check()
    page.keyboard.press("Control+Enter")
    page.wait_for_selector(".flash-success")
    assert Message.objects.get(text="Use a **timer**.").review_status == Message.ReviewStatus.ACCEPTED
    assert reviewer.reviews.count() == 1


def test_write_a_prompt_and_other_pages(page, labeler):
    services.task_create(kind=TaskKind.WRITE_PROMPT)
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.locator("[data-testid=editor]").fill("Suggest three names for a bakery.")
    page.fill("input[name=tags]", "naming, food")
    screenshot(page, "write-prompt")
    page.click("[data-testid=submit]")
    page.wait_for_selector("text=No task is waiting for you right now")
    screenshot(page, "queue-empty")
    assert Message.objects.get(text="Suggest three names for a bakery.").conversation.tags == ["food", "naming"]
    for path, name in [("/guidelines/", "guidelines"), ("/profile/", "profile")]:
        page.goto(path)
        screenshot(page, name)


def test_improve_the_best_starts_from_the_reply_ranked_first(page, labeler):
    task = make_rank_task(k=3, texts=["Reply one.", "Reply two.", "Reply three."])
    log_in(page, "lena")
    page.click("[data-testid=start]")
    page.wait_for_selector("[data-testid=candidates]")
    first = candidate_letters(page)[0]
    drag(
        page,
        page.locator("[data-testid=candidate-C] .candidate-head"),
        page.locator(f"[data-testid=candidate-{first}]"),
    )
    assert candidate_letters(page)[0] == "C"
    best = page.locator("[data-testid=candidate-C]").get_attribute("data-text")
    page.get_by_test_id("improve").locator("summary").click()
    box = page.get_by_test_id("improvement")
    # The details element's toggle event, which fills the box, is dispatched as a task after the click returns.
    expect(box).to_have_value(best)
    expect(page.get_by_test_id("improve-source")).to_have_text("Started from reply C, ranked first.")
    # Not edited yet: it follows the ranking. Edited: it keeps the labeler's text and says where it started.
    drag(page, page.locator("[data-testid=candidate-A] .candidate-head"), page.locator("[data-testid=candidate-C]"))
    assert candidate_letters(page)[0] == "A"
    expect(box).to_have_value(page.locator("[data-testid=candidate-A]").get_attribute("data-text"))
    drag(page, page.locator("[data-testid=candidate-C] .candidate-head"), page.locator("[data-testid=candidate-A]"))
    assert candidate_letters(page)[0] == "C"
    expect(box).to_have_value(best)
    box.fill(best + " And here is what it left out.")
    drag(page, page.locator("[data-testid=candidate-B] .candidate-head"), page.locator("[data-testid=candidate-C]"))
    expect(box).to_have_value(best + " And here is what it left out.")
    expect(page.get_by_test_id("improve-source")).to_contain_text("no longer ranked first")
    drag(page, page.locator("[data-testid=candidate-C] .candidate-head"), page.locator("[data-testid=candidate-B]"))
    page.locator("[data-testid=rating-3] + span").click()
    screenshot(page, "rank-improve-the-best")
    page.click("[data-testid=submit]")
    page.wait_for_selector(".flash-success")
    ranking = Ranking.objects.get(labeler=labeler)
    assert ranking.improvement.text == best + " And here is what it left out."
    assert ranking.improvement.review_status == Message.ReviewStatus.PENDING
    assert ranking.ordered_message_ids[0] == [display_order(task, labeler.pk)[2]]
