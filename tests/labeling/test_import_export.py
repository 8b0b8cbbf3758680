"""Import and export in the formats the field uses: round trips, malformed lines, filters and the dataset card."""

import datetime as dt
import gzip
import io
import json
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command

from labeling import services
from labeling.exporting import ExportFilters, dataset_card, preference_rows, ranking_rows, sft_rows, write_export
from labeling.importing import hh_pair_record
from labeling.models import Conversation, ImportJob, Message, Ranking
from labeling.services.records import import_jsonl
from tests.support.labeling import make_rank_task

pytestmark = pytest.mark.django_db
HH = Path(settings.SHARED_DATA_DIR) / "hh_rlhf_harmless_base_sample.jsonl.gz"


def lines_of(rows) -> list[bytes]:
    return [row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n" for row in rows]


def import_rows(rows, **kwargs):
    data = lines_of(rows)
    return import_jsonl(lambda: iter(data), **kwargs)


def test_hh_round_trip_gives_back_the_same_pairs():
    with gzip.open(HH, "rb") as source:
        raw = source.readlines()
    report = import_jsonl(lambda: iter(raw), format="hh", dataset="hh-rlhf-harmless-base")
    assert (report.added, report.existing, report.skipped) == (1000, 0, 0)
    exported = {
        (json.dumps(row["prompt"]), row["chosen"][0]["content"], row["rejected"][0]["content"])
        for row in preference_rows(ExportFilters(include_heldout=True))
    }
    original = set()
    for line in raw:
        record = hh_pair_record(json.loads(line))
        prompt = [{"role": t.role, "content": t.content} for t in record.context]
        original.add((json.dumps(prompt), record.chosen, record.rejected))
    assert exported == original
    again = import_jsonl(lambda: iter(raw), format="hh")
    assert (again.added, again.existing) == (0, 1000), "a re-import adds nothing"


def test_exports_carry_the_split_and_leave_out_held_out_and_a_b_data():
    """Issue 15, item 16."""
    from labeling.exporting import ranking_rows, sft_rows
    from labeling.models import Conversation, Ranking, Task

    with gzip.open(HH, "rb") as source:
        raw = source.readlines()[:200]
    import_jsonl(lambda: iter(raw), format="hh", dataset="hh")
    by_split = {s: Conversation.objects.filter(split=s).count() for s in ("train", "validation", "holdout")}
    assert by_split["holdout"] > 0 and by_split["train"] > 0
    everything = list(ranking_rows(ExportFilters(include_heldout=True)))
    assert {row["split"] for row in everything} == {"train", "validation", "holdout"}
    default = list(ranking_rows(ExportFilters()))
    assert len(default) == len(everything) - by_split["holdout"]
    assert "holdout" not in {row["split"] for row in default}
    assert all(row["split"] in ("train", "validation") for row in preference_rows(ExportFilters()))

    ab = Ranking.objects.filter(task__parent_message__conversation__split="train").first()
    Task.objects.filter(pk=ab.task_id).update(payload={"evaluation": 1, "arms": {}})
    assert ab.pk not in {row["ranking_id"] for row in ranking_rows(ExportFilters())}
    assert ab.pk in {row["ranking_id"] for row in ranking_rows(ExportFilters(include_ab=True))}

    demos = [
        json.dumps(
            {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
        ).encode()
        for i in range(60)
    ]
    import_jsonl(lambda: iter(demos), format="demonstrations")
    rows = list(sft_rows(ExportFilters(include_heldout=True)))
    assert {row["split"] for row in rows} == {"train", "validation", "holdout"}
    assert "holdout" not in {row["split"] for row in sft_rows(ExportFilters())}


def test_malformed_lines_are_reported_with_their_line_numbers():
    rows = [
        {"prompt": "A fine prompt"},
        b"{not json}\n",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "robot", "content": "beep"}]},
        b'{"prompt": "bad \xff byte"}\n',
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {
            "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "x"}],
            "prompt": "q",
        },
        {"something": "else"},
        ["a", "list"],
    ]
    report = import_rows(rows)
    assert report.added == 3
    assert [n for n, _ in report.errors] == [2, 4, 5, 7, 8, 9]
    reasons = dict(report.errors)
    assert "not valid JSON" in reasons[2]
    assert "role 'robot'" in reasons[4]
    assert "not valid UTF-8" in reasons[5]
    assert "identical" in reasons[7]
    assert "unknown row" in reasons[8]
    assert "JSON object" in reasons[9]


def test_abort_mode_imports_nothing_when_a_line_is_malformed():
    report = import_rows([{"prompt": "ok"}, {"prompt": 3}], on_error="abort")
    assert report.aborted and report.errors[0][0] == 2
    assert not Conversation.objects.exists()


def test_every_format_imports():
    report = import_rows(
        [
            {"prompt": "Just a prompt", "language": "de", "tags": ["Cooking"]},
            {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
            {
                "prompt": [{"role": "user", "content": "Capital of France?"}],
                "chosen": [{"role": "assistant", "content": "Paris"}],
                "rejected": [{"role": "assistant", "content": "Lyon"}],
            },
            {
                "chosen": [{"role": "user", "content": "Best pet?"}, {"role": "assistant", "content": "A cat"}],
                "rejected": [{"role": "user", "content": "Best pet?"}, {"role": "assistant", "content": "A rock"}],
            },
        ]
    )
    assert (report.added, report.errors) == (5, [])
    german = Conversation.objects.get(language="de")
    assert german.tags == ["cooking"]
    assert Message.objects.get(text="4").review_status == Message.ReviewStatus.ACCEPTED
    assert Ranking.objects.count() == 2


def test_the_import_command(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": 2}\n{"prompt": "three"}\n')
    out, err = io.StringIO(), io.StringIO()
    call_command("import_data", str(path), stdout=out, stderr=err)
    assert "2 added" in out.getvalue() and "line 2:" in err.getvalue()
    with pytest.raises(CommandError, match="Aborted: 1 malformed line"):
        call_command("import_data", str(path), "--on-error", "abort", stdout=io.StringIO(), stderr=io.StringIO())


def test_an_uploaded_import_job_records_its_progress(admin_user):
    upload = SimpleUploadedFile("prompts.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\nnot json\n')
    job = services.import_job_create(upload=upload, format="auto", on_error="skip", dataset="upload", user=admin_user)
    assert job.status == ImportJob.Status.QUEUED
    job = services.import_job_run(job_id=job.pk)
    assert (job.status, job.lines_total, job.added, job.error_count) == ("done", 3, 2, 1)
    assert job.errors[0][0] == 3
    assert services.import_job_run(job_id=job.pk) is None, "a job runs once"


def test_exports_and_their_filters(alice, bob):
    task = make_rank_task(k=3, overlap=2)
    a, b, c = (m.pk for m in task.candidates.order_by("pk"))
    for labeler, order in ((alice, [[a], [b, c]]), (bob, [[b], [a], [c]])):
        services.ranking_submit(
            assignment=services.task_lease_next(user=labeler),
            ranking=services.RankingInput(order=order, flags={}, confirm_untouched=True),
        )
    preferences = list(preference_rows(ExportFilters()))
    assert len(preferences) == 2 + 3, "ties give no pair"
    assert {p["labeler"] for p in preferences} == {alice.labeler_profile.pseudonym, bob.labeler_profile.pseudonym}
    assert all("alice" not in json.dumps(p) for p in preferences)
    rankings = list(ranking_rows(ExportFilters()))
    assert sorted(r["ranks"] for r in rankings) == [[1, 2, 2], [1, 2, 3]]
    version = task.model_version.name
    assert len(list(preference_rows(ExportFilters(model_version=version)))) == 5
    assert list(preference_rows(ExportFilters(model_version="nope"))) == []
    assert list(preference_rows(ExportFilters(since=dt.date.today() + dt.timedelta(days=1)))) == []
    # They order a-b differently and a-c alike: each agrees with the other on half of their strict pairs.
    assert len(list(ranking_rows(ExportFilters(min_agreement=0.5)))) == 2
    assert list(ranking_rows(ExportFilters(min_agreement=0.9))) == []


def test_accepted_demonstrations_only_by_default():
    import_rows([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    assert [r["messages"][-1]["content"] for r in sft_rows(ExportFilters())] == ["a"]
    Message.objects.filter(text="a").update(review_status=Message.ReviewStatus.PENDING)
    assert list(sft_rows(ExportFilters())) == []
    assert len(list(sft_rows(ExportFilters(accepted_only=False)))) == 1


def test_write_export_and_the_dataset_card(tmp_path):
    import_rows([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    filters = ExportFilters(since=dt.date(2020, 1, 1))
    counts = write_export(tmp_path, filters)
    assert counts == {"sft": 1, "preferences": 0, "rankings": 0}
    card = (tmp_path / "README.md").read_text()
    assert "| `sft.jsonl` | 1 |" in card and "created on or after 2020-01-01" in card
    assert card == dataset_card(counts, filters)


BAD_LINES = {
    "an escaped NUL": b'{"prompt": "before\\u0000after"}\n',
    "a lone surrogate": b'{"prompt": "before\\ud800after"}\n',
    "a lone surrogate in a key": b'{"prompt": "fine", "\\udfff": 1}\n',
    "JSON nested too deeply": b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
    "a line over the limit": json.dumps({"prompt": "long " * 300_000}).encode() + b"\n",
}


@pytest.mark.parametrize("bad", list(BAD_LINES), ids=list(BAD_LINES))
def test_one_bad_line_is_reported_and_skipped_not_the_whole_import(bad):
    """Issue 15, item 10."""
    lines = [b'{"prompt": "The first good prompt?"}\n', BAD_LINES[bad], b'{"prompt": "The second good prompt?"}\n']
    report = import_rows(lines, format="prompts", on_error="skip")
    assert (report.added, [number for number, _ in report.errors]) == (2, [2]), report.errors
    aborted = import_rows(lines, format="prompts", on_error="abort")
    assert aborted.aborted and aborted.errors[0][0] == 2


def test_the_api_refuses_lone_surrogates_and_nul_with_words(client, alice):
    from tests.support.api import api
    from tests.support.labeling import make_reply_task

    make_reply_task()
    labeler = api(alice)
    assignment = labeler.post("/api/v1/tasks/next/").json()["assignment"]
    for text in ("bad \ud800 text", "bad \x00 text"):
        body = json.dumps({"text": text}, ensure_ascii=True)
        response = labeler.post(
            f"/api/v1/assignments/{assignment['id']}/submit/", body, content_type="application/json"
        )
        assert response.status_code == 400 and "text" in response.json(), response.content


def test_an_upload_over_the_limit_is_refused(settings, tmp_path, admin_user):
    from django.core.exceptions import ValidationError
    from django.core.files.uploadedfile import SimpleUploadedFile

    from labeling.services import import_job_create

    settings.ARTIFACTS_DIR = tmp_path
    settings.IMPORT_MAX_FILE_BYTES = 1_000
    upload = SimpleUploadedFile("big.jsonl", b'{"prompt": "x"}\n' * 200)
    with pytest.raises(ValidationError, match="larger than 1,000 bytes"):
        import_job_create(upload=upload, format="prompts", on_error="skip", dataset="", user=admin_user)
    from labeling.models import ImportChunk, ImportJob

    assert not ImportJob.objects.exists() and not ImportChunk.objects.exists(), "nothing of it is kept"
    assert not (tmp_path / "imports").exists()


def test_an_upload_is_kept_in_the_database_read_in_bounded_lines_and_deleted_after(settings, tmp_path, admin_user):
    """Issue 28, items 6 and 10: the worker that imports may be on another host than the web process that took the
    upload, so the file is kept in the database (in chunks), never on the web host's disk; a line over the limit is
    reported without being held whole; the upload is deleted once the import ran."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    from labeling import services
    from labeling.models import Conversation, ImportChunk

    monkey_chunk = 64  # small chunks, so that lines cross them
    settings.ARTIFACTS_DIR = tmp_path
    settings.IMPORT_MAX_LINE_BYTES = 1_000
    lines = [json.dumps({"prompt": f"Question number {i} about chunked uploads?"}) for i in range(20)]
    lines.insert(7, json.dumps({"prompt": "x" * 5_000}))
    body = ("\n".join(lines) + "\n").encode()
    import labeling.services.imports as imports

    saved, imports.CHUNK_BYTES = imports.CHUNK_BYTES, monkey_chunk
    try:
        job = services.import_job_create(
            upload=SimpleUploadedFile("prompts.jsonl", body),
            format="prompts",
            on_error="skip",
            dataset="",
            user=admin_user,
        )
    finally:
        imports.CHUNK_BYTES = saved
    assert ImportChunk.objects.filter(job=job).count() == -(-len(body) // monkey_chunk)
    assert job.size_bytes == len(body) and not (tmp_path / "imports").exists(), "nothing on the web host's disk"
    done = services.import_job_run(job_id=job.pk)
    assert (done.status, done.added, done.lines_total, done.error_count) == ("done", 20, 21, 1)
    assert done.errors == [[8, "the line is 5,015 bytes long; the limit is 1,000"]]
    assert Conversation.objects.filter(messages__text__startswith="Question number").distinct().count() == 20
    assert not ImportChunk.objects.exists(), "the upload is deleted once imported"


def test_bounded_lines_never_holds_more_than_the_limit_of_a_line():
    from labeling.importing import LongLine, bounded_lines

    blocks = [b"ab\nc", b"d" * 100, b"e\n", b"fg"]
    lines = list(bounded_lines(blocks, limit=10))
    assert lines[0] == b"ab\n" and lines[2] == b"fg"
    assert isinstance(lines[1], LongLine) and len(lines[1]) == 11 and lines[1].length == 103


def test_rankings_jsonl_round_trips_with_order_ties_and_pseudonyms(alice, bob):
    """Issue 15, item 18: rankings.jsonl imports back as rankings with their order, ties and labelers, and a
    second import adds nothing."""
    from labeling import services
    from labeling.exporting import ranking_rows
    from labeling.models import Conversation, Ranking
    from tests.support.labeling import make_rank_task

    task = make_rank_task(k=4, overlap=2)
    a, b, c, d = services.display_order(task, alice.pk)
    for labeler, order in ((alice, [[c], [a, b], [d]]), (bob, [[a], [b], [c], [d]])):
        services.ranking_submit(
            assignment=services.task_lease_next(user=labeler),
            # bob's own display order may be a, b, c, d: the order is meant, confirmed as such
            ranking=services.RankingInput(order=order, flags={}, quality_rating=4, confirm_untouched=True),
        )

    def comparable(rows):
        return sorted((json.dumps(r["prompt"]), tuple(r["completions"]), tuple(r["ranks"]), r["labeler"]) for r in rows)

    filters = ExportFilters(include_heldout=True)
    exported = list(ranking_rows(filters))
    assert sorted(r["ranks"] for r in exported) == [[1, 2, 2, 3], [1, 2, 3, 4]]
    Conversation.objects.all().delete()
    assert not Ranking.objects.exists()

    report = import_rows(exported, format="auto", dataset="round-trip")
    assert (report.added, report.skipped) == (2, 0), report.errors
    assert comparable(ranking_rows(filters)) == comparable(exported)
    again = import_rows(exported)
    assert (again.added, again.existing) == (0, 2), "idempotent"
    imported = Ranking.objects.select_related("labeler")
    assert {r.labeler.username for r in imported} == {f"imported-{row['labeler']}" for row in exported}
    assert not any(r.labeler.is_active for r in imported)
    assert list(ranking_rows(ExportFilters(include_heldout=True, include_imported=False))) == []


@pytest.mark.parametrize(
    ("row", "phrase"),
    [
        ({"prompt": "Q?", "completions": ["a"], "ranks": [1]}, "2 to 9 completions"),
        ({"prompt": "Q?", "completions": ["a", "b"], "ranks": [1]}, "2 completions but 1 ranks"),
        ({"prompt": "Q?", "completions": ["a", "b"], "ranks": [1, 7]}, "ranks go from 1"),
        ({"prompt": "Q?", "completions": ["a", "a"], "ranks": [1, 2]}, "same text"),
        ({"prompt": "Q?", "completions": ["a", "b"], "ranks": [1, "2"]}, "whole numbers"),
        ({"prompt": "Q?", "completions": ["a", "b"], "ranks": [1, 2], "labeler": "a b"}, "pseudonym"),
    ],
)
def test_a_bad_ranking_row_is_reported(row, phrase):
    report = import_rows([row], format="rankings")
    assert report.added == 0 and phrase in report.errors[0][1], report.errors


def _killed_mid_import(admin_user, lines, *, done_before_kill, minutes_ago, attempts=1):
    """An upload whose worker was killed (SIGKILL: no `finally` ran) after importing its first `done_before_kill`
    lines: the job stays running with its upload kept and its last sign of life `minutes_ago`."""
    import datetime as dt

    from django.utils import timezone

    body = ("\n".join(lines) + "\n").encode()
    job = services.import_job_create(
        upload=SimpleUploadedFile("prompts.jsonl", body), format="prompts", on_error="skip", dataset="", user=admin_user
    )
    import_jsonl(lambda: lines[:done_before_kill], format="prompts", dataset="", on_error="skip")
    ImportJob.objects.filter(pk=job.pk).update(
        status=ImportJob.Status.RUNNING,
        attempts=attempts,
        heartbeat_at=timezone.now() - dt.timedelta(minutes=minutes_ago),
        lines_done=done_before_kill,
    )
    return job


def test_an_import_whose_worker_was_killed_runs_again_and_adds_only_the_rest(admin_user, monkeypatch):
    """A worker killed mid-import leaves its job running forever, and the redelivered message finds it taken: the
    reaper puts a job with no sign of life back in the queue, and the second run adds only what the first did not."""
    import labeling.services.imports as imports
    from labeling.models import ImportChunk

    queued = []
    monkeypatch.setattr(imports, "enqueue_on_commit", lambda name, *args: queued.append((name, *args)))
    lines = [json.dumps({"prompt": f"Killed import, prompt {i}?"}) for i in range(10)]
    job = _killed_mid_import(admin_user, lines, done_before_kill=4, minutes_ago=30)
    alive = _killed_mid_import(
        admin_user, [json.dumps({"prompt": "Still importing?"})], done_before_kill=0, minutes_ago=1
    )

    assert services.import_job_run(job_id=job.pk) is None, "the redelivered message finds the job taken"
    queued.clear()  # the uploads' own
    assert services.import_jobs_reap(stale_s=600, max_attempts=2) == [job.pk], "only the job with no sign of life"
    assert queued == [("labeling.tasks.run_import", job.pk)]
    assert ImportJob.objects.get(pk=alive.pk).status == ImportJob.Status.RUNNING

    done = services.import_job_run(job_id=queued[0][1])
    assert (done.status, done.attempts, done.added, done.existing) == ("done", 2, 6, 4)
    assert Conversation.objects.filter(messages__text__startswith="Killed import").distinct().count() == 10
    assert not ImportChunk.objects.filter(job=job).exists()


def test_an_import_lost_on_its_last_attempt_fails_with_what_to_do_and_drops_its_upload(admin_user, monkeypatch):
    import labeling.services.imports as imports
    from labeling.models import ImportChunk

    queued = []
    monkeypatch.setattr(imports, "enqueue_on_commit", lambda name, *args: queued.append((name, *args)))
    lines = [json.dumps({"prompt": f"Twice lost import, prompt {i}?"}) for i in range(6)]
    job = _killed_mid_import(admin_user, lines, done_before_kill=3, minutes_ago=30, attempts=2)
    queued.clear()

    assert services.import_jobs_reap(stale_s=600, max_attempts=2) == [job.pk]
    job.refresh_from_db()
    assert job.status == ImportJob.Status.FAILED and not queued
    assert "stopped 2 times" in job.failure and "upload the file again" in job.failure
    assert "Error" not in job.failure, "plain words, no exception names"
    assert not ImportChunk.objects.filter(job=job).exists(), "the upload is not kept"
    assert services.import_jobs_reap(stale_s=600, max_attempts=2) == [], "reaped once"


def test_beat_reaps_lost_imports_on_the_control_queue():
    from config.celery_app import app, beat_schedule_entries

    entry = beat_schedule_entries()["reap-lost-imports"]
    assert entry["task"] == "labeling.tasks.reap_imports"
    route = app.amqp.router.route({}, "labeling.tasks.reap_imports")
    assert route["queue"].name == "control"


def test_an_import_alive_inside_its_transaction_is_not_reaped(admin_user, monkeypatch):
    """The import is one transaction, so its row's heartbeat does not move while it runs; the sign of life in the
    shared cache keeps a long import from being taken for a lost one."""
    import labeling.services.imports as imports

    monkeypatch.setattr(imports, "enqueue_on_commit", lambda name, *args: None)
    lines = [json.dumps({"prompt": f"Long import, prompt {i}?"}) for i in range(3)]
    job = _killed_mid_import(admin_user, lines, done_before_kill=0, minutes_ago=30)
    services.import_job_alive(job.pk, lines_done=2, added=2, existing=0, error_count=0)
    assert services.import_jobs_reap(stale_s=600, max_attempts=2) == []
    from labeling.selectors import import_job_live

    live = import_job_live(ImportJob.objects.get(pk=job.pk))
    assert (live.lines_done, live.added) == (2, 2)


@pytest.mark.django_db(transaction=True)
def test_an_import_shows_its_progress_while_its_transaction_is_open(admin_user, monkeypatch):
    """Seen from another connection (the ops page's), the row says 0 lines until the import commits; the page and
    the API show the worker's progress from the cache meanwhile."""
    import functools

    from django.db import connections

    import labeling.services.imports as imports
    from labeling.selectors import import_job_live

    monkeypatch.setattr(imports, "enqueue_on_commit", lambda name, *args: None)
    monkeypatch.setattr(imports, "import_jsonl", functools.partial(import_jsonl, batch_size=5))
    lines = [json.dumps({"prompt": f"Progress import, prompt {i}?"}) for i in range(20)]
    job = services.import_job_create(
        upload=SimpleUploadedFile("p.jsonl", ("\n".join(lines) + "\n").encode()),
        format="prompts",
        on_error="skip",
        dataset="",
        user=admin_user,
    )
    seen = []
    alive = imports.import_job_alive

    def observe(job_id, **progress):
        alive(job_id, **progress)
        if not progress:
            return
        outside = connections.create_connection("default")
        try:
            with outside.cursor() as cursor:
                cursor.execute("SELECT lines_done FROM labeling_importjob WHERE id = %s", [job_id])
                row_lines = cursor.fetchone()[0]
        finally:
            outside.close()
        shown = import_job_live(ImportJob(pk=job_id, status=ImportJob.Status.RUNNING, lines_done=row_lines))
        seen.append((row_lines, shown.lines_done))

    monkeypatch.setattr(imports, "import_job_alive", observe)
    assert services.import_job_run(job_id=job.pk).status == "done"
    assert seen[:4] == [(0, 5), (0, 10), (0, 15), (0, 20)]
