"""Issue 15: a Markdown XSS corpus rendered in Chromium, where labelers read it (a ranking task's candidates, a
reply task's prompt, the live preview), with an `alert` hook: nothing executes, even when every link is clicked."""

import pytest

from labeling import services
from labeling.models import TaskKind
from tests.support.browser import log_in
from tests.support.factories import UserFactory
from tests.support.labeling import make_prompt, make_rank_task

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CORPUS = [
    "<script>alert('script')</script>",
    "<img src=x onerror=alert('img')>",
    "<svg onload=alert('svg')></svg>",
    "<iframe src=\"javascript:alert('iframe')\"></iframe>",
    "<a href=\"javascript:alert('a')\">a link</a>",
    "[markdown link](javascript:alert('md'))",
    "[mixed case](JaVaScRiPt:alert('case'))",
    "[entity](&#106;avascript:alert('entity'))",
    "![image](javascript:alert('image'))",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgnZGF0YScpPC9zY3JpcHQ+)",
    "<details open ontoggle=alert('details')>x</details>",
    "<input autofocus onfocus=alert('input')>",
    "<body onload=alert('body')>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert('mxss')>",
    '"><script>alert("quote")</script>',
    "<object data=\"javascript:alert('object')\"></object>",
    "<style>*{background:url('javascript:alert(1)')}</style>",
    "```\n</code><script>alert('fence')</script>\n```",
    "<form action=\"javascript:alert('form')\"><button>go</button></form>",
    "[ref]: javascript:alert('reference')\n\n[click me][ref]",
]

HOOK = """
window.__alerts = [];
for (const name of ["alert", "confirm", "prompt"]) {
  window[name] = (...args) => { window.__alerts.push([name, ...args].join(" ")); };
}
"""


def fired(page) -> list[str]:
    return page.evaluate("window.__alerts || []")


def click_every_link(page, scope: str) -> None:
    for link in page.locator(f"{scope} a").all():
        try:
            link.click(timeout=1000, modifiers=[], no_wait_after=True)
        except Exception:  # not clickable (hidden, covered): it cannot run anything for a labeler either
            continue


@pytest.fixture
def reader():
    return UserFactory(username="reader")


def test_the_corpus_never_runs_in_a_ranking_task(page, reader):
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.add_init_script(HOOK)
    make_rank_task(k=len(CORPUS[:9]), texts=CORPUS[:9])
    log_in(page, "reader")
    page.goto("/work/next/")
    page.wait_for_selector("#candidates > li")
    click_every_link(page, "#candidates")
    page.wait_for_timeout(300)
    assert fired(page) == [] and dialogs == []


def test_the_corpus_never_runs_as_a_prompt_or_in_the_preview(page, reader):
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.add_init_script(HOOK)
    prompt = make_prompt()
    prompt.text = "\n\n".join(CORPUS)
    prompt.save(update_fields=["text"])
    services.task_create(kind=TaskKind.WRITE_ASSISTANT_REPLY, parent_message=prompt)
    log_in(page, "reader")
    page.goto("/work/next/")
    page.wait_for_selector("textarea")
    click_every_link(page, "main")
    for text in CORPUS[9:]:  # the live preview renders what the labeler types
        page.fill("textarea", text)
        page.wait_for_timeout(400)
    click_every_link(page, "main")
    page.wait_for_timeout(300)
    assert fired(page) == [] and dialogs == []


def test_the_hook_would_catch_a_payload_if_the_sanitiser_let_one_through(page, reader, monkeypatch):
    """The tests above can fail: with both defences off (markdown-it's raw-HTML escaping and nh3), the same page
    runs the corpus."""
    from labeling.templatetags import labeling_tags

    monkeypatch.setattr(labeling_tags, "render_markdown", lambda text: text)
    page.on("dialog", lambda dialog: dialog.dismiss())
    page.add_init_script(HOOK)
    make_rank_task(k=2, texts=CORPUS[1:3])
    log_in(page, "reader")
    page.goto("/work/next/")
    page.wait_for_selector("#candidates > li")
    page.wait_for_timeout(300)
    assert fired(page), "an unsanitised <img onerror> or <svg onload> runs"
