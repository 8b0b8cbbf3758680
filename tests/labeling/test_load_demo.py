"""`manage.py load_demo` imports ../shared/data with the expected counts, and a second run adds nothing."""

import gzip
import json
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from labeling.importing import RecordError, hh_pair_record, parse_hh_transcript
from labeling.models import Assignment, Conversation, ImportJob, Message, Ranking, RankingEntry, Role, Task

pytestmark = pytest.mark.django_db


def table_counts():
    return {
        model.__name__: model.objects.count()
        for model in (Conversation, Message, Task, Assignment, Ranking, RankingEntry)
    }


def test_load_demo_imports_the_expected_counts_and_is_idempotent():
    call_command("load_demo", stdout=StringIO())
    prompts = Message.objects.filter(depth=0, conversation__dataset__startswith="self-instruct")
    assert prompts.filter(conversation__dataset="self-instruct-user-oriented").count() == 252
    assert prompts.filter(conversation__dataset="self-instruct-seed").count() == 175
    demonstrations = Message.objects.filter(review_status=Message.ReviewStatus.ACCEPTED, role=Role.ASSISTANT)
    assert demonstrations.count() == 252 + 175
    assert Ranking.objects.filter(task__conversation__dataset="hh-rlhf-harmless-base").count() == 1000
    assert RankingEntry.objects.count() == 2000
    first = table_counts()
    jobs = {job.dataset: (job.status, job.added) for job in ImportJob.objects.all()}
    assert jobs == {  # issue 17, item 11: listed on the imports page like an upload
        "self-instruct-user-oriented": ("done", 252),
        "self-instruct-seed": ("done", 175),
        "hh-rlhf-harmless-base": ("done", 1000),
    }

    out = StringIO()
    call_command("load_demo", stdout=out)
    assert table_counts() == first
    assert "0 added, 1000 already there" in out.getvalue()
    assert ImportJob.objects.count() == 3, "a rerun that adds nothing is not listed"


def test_an_hh_pair_becomes_a_context_and_two_ranked_candidates():
    path = settings.SHARED_DATA_DIR / "hh_rlhf_harmless_base_sample.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        row = json.loads(next(lines))
    call_command("load_demo", stdout=StringIO())
    record = hh_pair_record(row)
    conversation = Conversation.objects.get(content_hash=record.content_hash)
    ranking = Ranking.objects.get(task__conversation=conversation)
    best, worst = ranking.entries.order_by("rank")
    assert (best.rank, worst.rank) == (1, 2)
    assert best.message.text == record.chosen and worst.message.text == record.rejected
    assert best.message.parent_id == worst.message.parent_id, "the two replies are siblings"
    context = [m for m in conversation.messages.order_by("depth") if m.depth < best.message.depth]
    assert [(m.role, m.text) for m in context] == [(t.role, t.content) for t in record.context]
    assert context[-1].role == Role.USER


def test_hh_transcript_parsing():
    turns = parse_hh_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ")
    assert [(t.role, t.content) for t in turns] == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "bye"),
        ("assistant", ""),
    ]
    with pytest.raises(RecordError, match="must start with"):
        parse_hh_transcript("Human: hi")
    with pytest.raises(RecordError, match="differ before"):
        hh_pair_record({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: c"})
    with pytest.raises(RecordError, match="identical"):
        hh_pair_record({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"})


def test_load_demo_reports_a_missing_data_dir(tmp_path):
    with pytest.raises(CommandError, match="Demo data not found"):
        call_command("load_demo", data_dir=tmp_path, stdout=StringIO())
    assert Conversation.objects.count() == 0


def test_demo_accounts_only_with_debug_on(settings):
    """Issue 15, item 13: the production settings (DEBUG off) never create admin/admin."""
    from django.contrib.auth import get_user_model

    settings.DEBUG = False
    out = StringIO()
    call_command("load_demo", stdout=out)
    assert not get_user_model().objects.filter(username__in=["admin", "alice", "bob"]).exists()
    assert "demo accounts not created" in out.getvalue()
    settings.DEBUG = True
    call_command("load_demo", stdout=StringIO())
    assert get_user_model().objects.filter(username="admin", is_superuser=True).exists()
