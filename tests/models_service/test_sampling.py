"""The sampling worker's code against real Postgres and a tiny model: the pool fills to its target and no
further (also with two workers at once), parameters are recorded, failures are kept, versions switch."""

import shutil
import threading

import pytest
from django.db import connection

from labeling import splits
from labeling.models import Message, Role, Task, TaskKind
from models_service import loading, services
from models_service.models import ModelVersion, SamplingRequest
from models_service.sampling import fill_pool_once, run_request
from models_service.services import model_version_activate
from sampling import services as chat_services
from tests.support.factories import ConversationFactory, MessageFactory
from tests.support.labeling import set_queue
from tests.support.models import register_tiny_policy


@pytest.fixture
def pool_settings(settings):
    settings.SAMPLING_POOL_TARGET = 3
    settings.SAMPLING_BATCH_CONTEXTS = 2
    settings.SAMPLING_K = 3
    settings.SAMPLING_MAX_NEW_TOKENS = 8
    settings.SAMPLING_TEMPERATURE = 0.9
    settings.SAMPLING_TOP_P = 0.8
    return settings


def make_contexts(n, split=splits.TRAIN):
    return [MessageFactory(conversation=ConversationFactory(split=split), text=f"prompt {i}") for i in range(n)]


def fill(times=10):
    for _ in range(times):
        if not fill_pool_once(worker="test")["contexts"]:
            break


@pytest.mark.django_db
def test_the_pool_fills_to_its_target_and_no_further(tiny_policy, pool_settings):
    make_contexts(6)
    fill()
    tasks = Task.objects.filter(kind=TaskKind.RANK_REPLIES, status=Task.Status.OPEN)
    assert tasks.count() == 3
    fill()
    assert tasks.count() == 3
    for task in tasks:
        candidates = list(task.candidates.all())
        assert len(candidates) == 3 and task.model_version == tiny_policy
        assert {c.parent_id for c in candidates} == {task.parent_message_id}
        for candidate in candidates:
            params = candidate.sampling_params
            assert candidate.origin == Message.Origin.MODEL and candidate.model_version == tiny_policy
            assert (params["temperature"], params["top_p"], params["max_new_tokens"]) == (0.9, 0.8, 8)
            assert "seed" in params and "row" in params and params["dtype"] == "float32"
    assert SamplingRequest.objects.filter(status="done").count() == 3


@pytest.mark.django_db
def test_held_out_prompts_are_never_sampled_and_validation_ones_are(tiny_policy, pool_settings):
    make_contexts(3, split=splits.HOLDOUT)
    fill()
    assert not Task.objects.filter(kind=TaskKind.RANK_REPLIES).exists()
    make_contexts(1, split=splits.VALIDATION)
    fill()
    assert Task.objects.get(kind=TaskKind.RANK_REPLIES).conversation.split == splits.VALIDATION


@pytest.mark.django_db
def test_a_policy_does_not_sample_the_same_context_twice(tiny_policy, pool_settings):
    make_contexts(2)
    fill()
    Task.objects.filter(kind=TaskKind.RANK_REPLIES).update(status=Task.Status.CANCELLED)
    fill()
    assert Task.objects.filter(kind=TaskKind.RANK_REPLIES).count() == 2


@pytest.mark.django_db
def test_a_new_policy_fills_the_pool_although_the_old_policys_tasks_are_still_open(
    tiny_policy, tiny_model_dirs, pool_settings
):
    make_contexts(8)
    fill()
    assert Task.objects.filter(kind=TaskKind.RANK_REPLIES, status=Task.Status.OPEN).count() == 3
    second = register_tiny_policy(tiny_model_dirs[1], name="second", stage="sft", activate=True)
    fill()
    open_tasks = Task.objects.filter(kind=TaskKind.RANK_REPLIES, status=Task.Status.OPEN)
    assert open_tasks.filter(model_version=second).count() == 3, "the new policy's pool fills to the target"
    assert open_tasks.filter(model_version=tiny_policy).count() == 3, "the old tasks stay to be ranked"
    fill()
    assert open_tasks.count() == 6


@pytest.mark.django_db(transaction=True)
def test_two_workers_at_once_fill_the_pool_once(tiny_policy, pool_settings):
    make_contexts(8)
    barrier = threading.Barrier(2)
    errors = []

    def worker():
        try:
            barrier.wait()
            fill()
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    tasks = Task.objects.filter(kind=TaskKind.RANK_REPLIES)
    assert tasks.count() == 3
    contexts = list(tasks.values_list("parent_message", flat=True))
    assert len(set(contexts)) == len(contexts)


@pytest.mark.django_db
def test_a_failure_is_recorded_and_frees_the_context(tiny_policy, pool_settings):
    make_contexts(2)
    shutil.rmtree(tiny_policy.artifact_dir)
    with pytest.raises(Exception, match="not a loadable model"):
        fill_pool_once(worker="test")
    failed = SamplingRequest.objects.filter(status="failed")
    assert failed.count() == 2 and all("not a loadable model" in r.error for r in failed)
    assert "failed to load" in ModelVersion.objects.get(pk=tiny_policy.pk).load_error


@pytest.mark.django_db
def test_the_holder_switches_versions_and_keeps_serving_when_a_load_fails(tiny_policy, tiny_model_dirs):
    holder = loading.active_holder(ModelVersion.Kind.POLICY)
    assert holder.get().version_id == tiny_policy.pk
    second = register_tiny_policy(tiny_model_dirs[1], name="second", stage="sft", activate=True)
    assert holder.get().version_id == second.pk
    third = register_tiny_policy(tiny_model_dirs[0], name="third", stage="ppo")
    model_version_activate(version=third)
    (third.artifact_dir / "model.safetensors").write_bytes(b"not a model")
    assert holder.get().version_id == second.pk, "a version that fails to load leaves the previous one serving"
    assert "failed to load" in ModelVersion.objects.get(pk=third.pk).load_error


@pytest.mark.django_db
def test_a_chat_reply(tiny_policy, alice, settings):
    settings.CHAT_MAX_NEW_TOKENS = 6
    prompt = MessageFactory(author=alice, text="Hi!")
    request = SamplingRequest.objects.create(purpose="chat", context=prompt, k=1, requested_by=alice)
    run_request(services.sampling_request_claim(request_id=request.pk))
    request.refresh_from_db()
    assert request.status == "done" and request.reply.parent == prompt
    assert request.reply.role == Role.ASSISTANT and request.reply.sampling_params["max_new_tokens"] == 6
    assert services.sampling_request_claim(request_id=request.pk) is None, "a redelivery runs nothing"


@pytest.mark.django_db
def test_alternatives_make_a_ranking_task_reserved_for_the_labeler(tiny_policy, alice, settings):
    settings.SAMPLING_MAX_NEW_TOKENS = 6
    prompt = MessageFactory(author=alice, text="Tell me a joke.")
    chosen = services.message_create(
        conversation=prompt.conversation,
        parent=prompt,
        role=Role.ASSISTANT,
        text="Why did the chicken...",
        origin=Message.Origin.MODEL,
        model_version=tiny_policy,
        sampling_params={"seed": 1},
    )
    request = chat_services.alternatives_request_create(
        model_message=chosen, user=alice, k=4, reserve_for_requester=True
    )
    run_request(services.sampling_request_claim(request_id=request.pk))
    task = SamplingRequest.objects.get(pk=request.pk).task
    candidates = list(task.candidates.all())
    assert len(candidates) == 4 and chosen in candidates
    assert task.reserved_for == alice and task.parent_message == prompt


@pytest.mark.django_db
def test_stale_running_requests_are_reaped(tiny_policy):
    context = MessageFactory()
    request = SamplingRequest.objects.create(purpose="pool", context=context, status="running", k=2)
    SamplingRequest.objects.filter(pk=request.pk).update(started_at="2020-01-01T00:00:00Z")
    assert services.sampling_requests_reap(older_than_s=60) == 1
    request.refresh_from_db()
    assert request.status == "failed" and "worker was lost" in request.error


@pytest.mark.django_db
@pytest.mark.parametrize("purpose", ["chat", "alternatives"])
def test_a_late_result_after_the_reaper_failed_the_request_completes_nothing(tiny_policy, alice, settings, purpose):
    """The worker finishes after the reaper gave the request up: no reply and no ranking task appear under a
    request the labeler was told had failed, and the reaper's reason stays."""
    settings.CHAT_MAX_NEW_TOKENS = settings.SAMPLING_MAX_NEW_TOKENS = 4
    prompt = MessageFactory(author=alice, text="Hi!")
    if purpose == "chat":
        request = SamplingRequest.objects.create(purpose="chat", context=prompt, k=1, requested_by=alice)
    else:
        kept = services.message_create(
            conversation=prompt.conversation,
            parent=prompt,
            role=Role.ASSISTANT,
            text="Hello.",
            origin=Message.Origin.MODEL,
            model_version=tiny_policy,
            sampling_params={"seed": 1},
        )
        request = chat_services.alternatives_request_create(
            model_message=kept, user=alice, k=3, reserve_for_requester=True
        )
    claimed = services.sampling_request_claim(request_id=request.pk)
    SamplingRequest.objects.filter(pk=request.pk).update(started_at="2020-01-01T00:00:00Z")
    assert services.sampling_requests_reap(older_than_s=60) == 1
    replies_before, tasks_before = Message.objects.filter(parent=prompt).count(), Task.objects.count()
    run_request(claimed)
    request.refresh_from_db()
    assert request.status == "failed" and "worker was lost" in request.error
    assert request.reply_id is None and request.task_id is None
    assert (Message.objects.filter(parent=prompt).count(), Task.objects.count()) == (replies_before, tasks_before)


def rank_all_tied(task, labeler, *, pair=False):
    """`labeler` ranks the task: every candidate tied, or (pair) the first better than the rest."""
    from labeling import services as labeling_services
    from labeling.services import RankingInput

    assignment = labeling_services.task_lease_next(user=labeler)
    assert assignment.task_id == task.pk
    ids = list(task.candidates.values_list("pk", flat=True))
    order = [ids[:1], ids[1:]] if pair else [ids]
    labeling_services.ranking_submit(assignment=assignment, ranking=RankingInput(order=order, flags={}))


@pytest.mark.django_db
def test_a_context_whose_ranking_all_tied_is_sampled_again_more_diversely_until_spent(
    tiny_policy, pool_settings, alice
):
    from models_service.selectors import contexts_needing_candidates

    set_queue(rank_overlap_fraction=0)
    pool_settings.SAMPLING_POOL_TARGET = 1
    pool_settings.SAMPLING_RESAMPLE_TIED = 2
    pool_settings.SAMPLING_RESAMPLE_K = 5
    pool_settings.SAMPLING_RESAMPLE_TEMPERATURE = 1.4
    (context,) = make_contexts(1)
    for attempt in (1, 2, 3):
        fill()
        task = Task.objects.get(kind=TaskKind.RANK_REPLIES, status=Task.Status.OPEN)
        request = SamplingRequest.objects.get(task=task)
        assert task.parent_message == context and request.attempt == attempt
        expected = (3, 0.9) if attempt == 1 else (5, 1.4)
        assert (task.candidates.count(), task.candidates.first().sampling_params["temperature"]) == expected
        rank_all_tied(task, alice)
        task.refresh_from_db()
        assert task.status == Task.Status.DONE
        alice.labeler_profile.last_conversation = None  # the queue would hold the same conversation back
        alice.labeler_profile.save()
    assert not contexts_needing_candidates(tiny_policy).exists(), "spent after two re-samples"
    fill()
    assert Task.objects.filter(kind=TaskKind.RANK_REPLIES).count() == 3


@pytest.mark.django_db
def test_fresh_contexts_come_before_re_samples_and_a_pair_ends_the_context(tiny_policy, pool_settings, alice, bob):
    from models_service.selectors import contexts_needing_candidates

    set_queue(rank_overlap_fraction=0)
    pool_settings.SAMPLING_POOL_TARGET = 2
    tied, paired = make_contexts(2)
    fill()
    tasks = {t.parent_message_id: t for t in Task.objects.filter(kind=TaskKind.RANK_REPLIES)}
    assert set(tasks) == {tied.pk, paired.pk}
    for task in tasks.values():
        rank_all_tied(task, bob, pair=task.parent_message_id == paired.pk)
    fresh = make_contexts(1)[0]
    assert [m.pk for m in contexts_needing_candidates(tiny_policy)] == [fresh.pk, tied.pk]


@pytest.fixture
def tiny_reward(tiny_model_dirs):
    """A tiny reward model (a scalar head on the second tiny policy), serving."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    staging = tiny_model_dirs[1].parent / "selection-reward"
    if not staging.exists():
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dirs[1], num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[1])
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return register_tiny_policy(staging, name="reward-rm-v0", stage="rm", kind="reward", activate=True)


@pytest.mark.django_db
def test_active_selection_offers_the_contexts_the_reward_model_tells_apart_most(
    tiny_policy, tiny_reward, pool_settings
):
    from ml.scoring import score_pairs
    from models_service.sampling import informativeness
    from models_service.selectors import contexts_needing_candidates

    pool_settings.SAMPLING_POOL_TARGET = 2
    pool_settings.SAMPLING_BATCH_CONTEXTS = 2
    pool_settings.SAMPLING_SELECT_FROM = 3
    make_contexts(8)
    done = fill_pool_once(worker="test")
    assert (done["contexts"], done["passed_over"]) == (2, 4), "six sampled for the two tasks the pool lacks"
    passed = SamplingRequest.objects.filter(status=SamplingRequest.Status.PASSED_OVER)
    assert passed.count() == 4 and all("spread" in r.sampling_params["passed_over"] for r in passed)
    reward = loading.load_version(tiny_reward, for_inference=True)
    spreads = {}
    for task in Task.objects.filter(kind=TaskKind.RANK_REPLIES):
        chat = [{"role": "user", "content": task.parent_message.text}]
        scores = score_pairs(reward.model, reward.tokenizer, [(chat, c.text) for c in task.candidates.all()])
        assert task.payload["selection"]["reward_model"] == "reward-rm-v0"
        assert task.payload["selection"]["spread"] == pytest.approx(informativeness(scores), abs=1e-3)
        spreads[task.pk] = task.payload["selection"]["spread"]
    noted = [float(r.sampling_params["passed_over"].split("spread ")[1].split(",")[0]) for r in passed]
    assert min(spreads.values()) >= max(noted) - 1e-4, "the offered contexts are the most informative"
    # Passed-over contexts go back to the pool, after those never tried.
    order = list(contexts_needing_candidates(tiny_policy).values_list("passed_over", flat=True))
    assert order == [0, 0, 1, 1, 1, 1]


@pytest.mark.django_db
def test_with_active_selection_off_every_context_sampled_is_offered(tiny_policy, tiny_reward, pool_settings):
    pool_settings.SAMPLING_POOL_TARGET = 2
    pool_settings.SAMPLING_BATCH_CONTEXTS = 2
    pool_settings.SAMPLING_ACTIVE_SELECTION = False
    make_contexts(6)
    assert fill_pool_once(worker="test")["passed_over"] == 0
    assert Task.objects.filter(kind=TaskKind.RANK_REPLIES).count() == 2


@pytest.mark.django_db
def test_while_a_run_trains_the_pool_fills_only_to_its_smaller_target(tiny_policy, pool_settings):
    """Sampling and training share the cores of one host: while a run trains (its heartbeat marks it), the pool is
    filled to SAMPLING_POOL_WHILE_TRAINING, and to SAMPLING_POOL_TARGET once the run ends."""
    from models_service.selectors import pool_target

    pool_settings.SAMPLING_POOL_TARGET, pool_settings.SAMPLING_POOL_WHILE_TRAINING = 4, 1
    make_contexts(6)
    services.training_busy_mark(owner="run-7", seconds=60)
    assert pool_target() == 1
    fill()
    tasks = Task.objects.filter(kind=TaskKind.RANK_REPLIES, status=Task.Status.OPEN)
    assert tasks.count() == 1
    services.training_busy_clear(owner="run-8")
    assert tasks.count() == 1 and pool_target() == 1, "only the run that marked clears its mark"
    services.training_busy_clear(owner="run-7")
    assert pool_target() == 4
    fill()
    assert tasks.count() == 4


@pytest.mark.django_db
def test_ranked_replies_are_scored_for_the_ops_page_but_not_while_a_run_trains(
    tiny_policy, tiny_reward, alice, pool_settings
):
    """The scores behind the labeler-agreement figure wait while a run trains on the shared cores, and while the
    pool lacks tasks (the sampling worker's first job); where sampling has a host of its own, training does not
    hold them up."""
    from labeling.models import RankingEntry
    from models_service.scoring import score_rankings_with_active_model
    from tests.support.training import ranked_task

    def rescore():
        RankingEntry.objects.update(rm_score=None, rm_version=None)
        return score_rankings_with_active_model(limit=50)

    pool_settings.SAMPLING_POOL_TARGET, pool_settings.SAMPLING_POOL_WHILE_TRAINING = 2, 1
    ranked_task("train", 1, alice)
    make_contexts(2)
    fill()  # the pool is full
    services.training_busy_mark(owner="run-3", seconds=60)
    assert score_rankings_with_active_model(limit=50) == 0
    assert not RankingEntry.objects.filter(rm_score__isnull=False).exists()
    services.training_busy_clear(owner="run-3")
    assert score_rankings_with_active_model(limit=50) == 3
    assert RankingEntry.objects.filter(rm_score__isnull=False, rm_version=tiny_reward).count() == 3
    services.training_busy_mark(owner="run-4", seconds=60)
    pool_settings.SAMPLING_POOL_WHILE_TRAINING = 2  # sampling on a host of its own
    assert rescore() == 3, "there, scoring takes nothing from the run"
    services.training_busy_clear(owner="run-4")
    pool_settings.SAMPLING_POOL_TARGET = pool_settings.SAMPLING_POOL_WHILE_TRAINING = 4
    assert rescore() == 0, "the pool lacks two tasks: sampling them comes first"
    make_contexts(2)
    fill()
    assert rescore() == 3
