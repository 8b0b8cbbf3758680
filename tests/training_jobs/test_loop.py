"""The retraining policy and the promotion rules (no model training here; see test_e2e_loop)."""

import pytest
from django.utils import timezone

from labeling import services as labeling_services
from labeling.models import Conversation, Message, Ranking, Task
from labeling.quality import agreement, kendall_tau_b
from models_service.models import ModelActivation, ModelVersion
from tests.support.factories import ModelVersionFactory, TrainingRunFactory, UserFactory
from tests.support.labeling import make_rank_task
from tests.support.models import register_tiny_policy
from tests.support.training import demonstration, rank, set_loop
from training_jobs import gate, loop, services
from training_jobs.models import Evaluation, LoopSettings, TrainingRun

pytestmark = pytest.mark.django_db


def ready(name, stage, kind="policy", **extra):
    return ModelVersionFactory(name=name, stage=stage, kind=kind, **extra)


def test_sft_starts_when_enough_new_demonstrations(tiny_policy):
    set_loop(sft_threshold=3, rm_threshold=1000)
    for i in range(2):
        demonstration("train", i)
    assert loop.loop_tick(force_check=True).action == "nothing"
    demonstration("train", 99)
    decision = loop.loop_tick(force_check=True)
    assert decision.action == "sft" and "3 new accepted demonstrations" in decision.reason
    run = TrainingRun.objects.get()
    assert (run.kind, run.trigger, run.status) == ("sft", "schedule", "queued")
    assert loop.loop_tick(force_check=True).action == "wait", "one thing at a time"


def test_thresholds_wait_for_the_check_interval_unless_a_run_just_ended(tiny_policy):
    settings = set_loop(sft_threshold=1, check_every_minutes=60, last_checked_at=timezone.now())
    demonstration("train", 0)
    assert loop.loop_tick().action == "nothing"
    TrainingRunFactory(kind="rm", status="succeeded", finished_at=timezone.now())
    assert loop.loop_tick().action == "sft", "a finished run makes the loop look again at once"
    assert LoopSettings.load().last_checked_at > settings.last_checked_at


def test_the_default_path_is_dpo_at_80_rankings():
    settings = LoopSettings.load()
    assert (settings.policy_path, settings.rm_threshold) == ("dpo", 80)


def test_a_reward_model_then_ppo_on_the_newest_models(tiny_policy):
    set_loop(sft_threshold=1000, rm_threshold=2, policy_path="ppo")
    labeler = UserFactory(username="ranker")
    for _ in range(2):
        task = make_rank_task(k=2)
        a, b = labeling_services.display_order(task, labeler.pk)
        labeling_services.ranking_submit(
            assignment=labeling_services.task_lease_next(user=labeler),
            ranking=labeling_services.RankingInput(order=[[b], [a]], flags={}),
        )
    Conversation.objects.update(split="train")
    assert loop.loop_tick(force_check=True).action == "rm"
    rm_run = TrainingRun.objects.get(kind="rm")
    TrainingRun.objects.filter(pk=rm_run.pk).update(status="succeeded", finished_at=timezone.now())
    Ranking.objects.update(used_in_training_at=timezone.now())
    sft = ready("policy-sft-v0", "sft")
    rm = ready("reward-rm-v0", "rm", kind="reward", training_run=rm_run)
    decision = loop.loop_tick()
    assert decision.action == "ppo"
    ppo = TrainingRun.objects.get(kind="ppo")
    assert (ppo.base_model, ppo.reward_model, ppo.trigger) == (sft, rm, "chain")
    TrainingRun.objects.filter(pk=ppo.pk).update(status="succeeded", finished_at=timezone.now())
    assert loop.loop_tick().action == "nothing", "that pair has been through PPO"


def test_a_new_ppo_policy_is_evaluated_and_an_sft_one_only_without_ppo_to_follow(tiny_policy):
    ready("reward-rm-v0", "rm", kind="reward")
    sft = ready("policy-sft-v0", "sft")
    TrainingRunFactory(kind="ppo", status="succeeded", finished_at=timezone.now(), base_model=sft)
    assert loop._unevaluated_policy(LoopSettings.load()) is None
    ppo = ready("policy-ppo-v0", "ppo")
    decision = loop.loop_tick(force_check=True)
    assert decision.action == "evaluate" and decision.candidate == ppo
    evaluation = Evaluation.objects.get()
    assert (evaluation.candidate, evaluation.baseline, evaluation.status) == (ppo, tiny_policy, "queued")


def test_a_failed_stage_pauses_the_loop_until_resumed(tiny_policy):
    set_loop(sft_threshold=1)
    demonstration("train", 0)
    TrainingRunFactory(
        kind="sft", status="failed", error="out of memory", trigger="schedule", finished_at=timezone.now()
    )
    decision = loop.loop_tick(force_check=True)
    assert decision.action == "paused" and "out of memory" in LoopSettings.load().paused_reason
    assert not TrainingRun.objects.filter(status="queued").exists()
    services.loop_resume()
    assert loop.loop_tick(force_check=True).action == "sft", "resumed: the same failure does not pause it again"


def test_wilson_interval():
    low, high = gate.wilson_interval(8, 10)
    assert 0.49 < low < 0.5 and 0.94 < high < 0.95
    assert gate.wilson_interval(0, 0) == (0.0, 1.0)


def evaluation_with(gain, kl, **extra):
    from tests.support.models import TINY_MODEL_DIRS

    return Evaluation.objects.create(
        candidate=register_tiny_policy(TINY_MODEL_DIRS[1], name=f"policy-ppo-{gain}-{kl}", stage="ppo"),
        baseline=ModelVersion.objects.get(is_active=True, kind="policy"),
        status="done",
        metrics={"rm_gain": gain, "candidate": {"kl": kl}},
        **extra,
    )


@pytest.mark.parametrize(
    ("gain", "kl", "expected", "phrase"),
    [
        (0.4, 3.0, "promoted", "The rules hold"),
        (-0.1, 3.0, "not_promoted", "below the required"),
        (0.4, 99.0, "not_promoted", "exceeds the bound"),
    ],
)
def test_promotion_rules(tiny_policy, gain, kl, expected, phrase):
    set_loop(min_rm_gain=0.0, max_kl=20.0, auto_promote=True)
    evaluation = evaluation_with(gain, kl)
    assert services.evaluation_decide(evaluation=evaluation) == expected
    evaluation.refresh_from_db()
    assert phrase in evaluation.decision_reason
    promoted = ModelVersion.objects.get(pk=evaluation.candidate_id).is_active
    assert promoted == (expected == "promoted")
    if promoted:
        activation = ModelActivation.objects.get(model_version=evaluation.candidate)
        assert activation.action == "promote" and activation.automatic


def length_round(gain, controlled, lengths):
    from tests.support.models import TINY_MODEL_DIRS

    return Evaluation.objects.create(
        candidate=register_tiny_policy(TINY_MODEL_DIRS[1], name=f"policy-dpo-{controlled}-{lengths[0]}", stage="dpo"),
        baseline=ModelVersion.objects.get(is_active=True, kind="policy"),
        status="done",
        metrics={
            "rm_gain": gain,
            "rm_gain_length_controlled": controlled,
            "candidate": {"kl": 1.1, "length": lengths[0]},
            "baseline": {"kl": 0.0, "length": lengths[1]},
        },
    )


@pytest.mark.parametrize(
    ("controlled", "lengths", "refuse", "expected"),
    [
        (-0.01, (64.0, 49.0), True, "not_promoted"),  # longer, and nothing left once length is accounted for
        (0.0, (64.0, 49.0), True, "not_promoted"),
        (0.12, (64.0, 49.0), True, "promoted"),  # longer, but the gain survives the length control
        (-0.01, (40.0, 49.0), True, "promoted"),  # shorter replies: the gain did not come from length
        (-0.01, (64.0, 49.0), False, "promoted"),  # the admin switched the rule off
    ],
)
def test_a_gain_from_length_alone_is_refused(tiny_policy, controlled, lengths, refuse, expected):
    set_loop(min_rm_gain=0.0, max_kl=20.0, auto_promote=True, refuse_length_only_gain=refuse)
    evaluation = length_round(0.186, controlled, lengths)
    assert services.evaluation_decide(evaluation=evaluation) == expected
    evaluation.refresh_from_db()
    length_sentence = "+0.186 came from reply length alone"
    assert (length_sentence in evaluation.decision_reason) == (expected == "not_promoted")
    if expected == "not_promoted":
        assert f"replies average {lengths[0]:.0f} tokens against {lengths[1]:.0f}" in evaluation.decision_reason


def comparison_tasks(evaluation, n: int) -> list:
    """n blind A/B tasks of the evaluation, as the gate's worker makes them: [(task, candidate's, baseline's)]."""
    tasks = []
    for _ in range(n):
        task = make_rank_task(k=2)
        first, second = task.candidates.all()
        Task.objects.filter(pk=task.pk).update(
            payload={"evaluation": evaluation.pk, "arms": {str(first.pk): "candidate", str(second.pk): "baseline"}}
        )
        tasks.append((task, first, second))
    return tasks


def test_a_b_votes_freeze_once_the_gate_decided(tiny_policy, alice):
    """Issue 15, item 5: a held-out vote the gate read can no longer be edited; unlabeled comparisons close."""
    set_loop(require_human_win_rate=True, min_human_comparisons=1, min_human_win_rate=0.5, auto_promote=True)
    evaluation = evaluation_with(0.5, 1.0)
    tasks = comparison_tasks(evaluation, 2)
    task, candidate, baseline = tasks[0]
    ranking = labeling_services.ranking_submit(
        assignment=labeling_services.task_lease_next(user=alice),
        ranking=labeling_services.RankingInput(order=[[candidate.pk], [baseline.pk]], flags={}, confirm_untouched=True),
    ).result
    assert services.evaluation_decide(evaluation=evaluation) == "promoted"
    flipped = labeling_services.RankingInput(order=[[baseline.pk], [candidate.pk]], flags={}, quality_rating=3)
    with pytest.raises(labeling_services.SubmissionRefused, match="already counted"):
        labeling_services.ranking_edit(ranking=ranking, user=alice, new=flipped)
    assert Task.objects.get(pk=tasks[1][0].pk).status == "cancelled", "the unlabeled comparison is withdrawn"


ARMS = ("candidate", "baseline")


def record_comparisons(evaluation, comparisons, votes_per_labeler=0):
    """The blind A/B tasks of `evaluation`, as the gate's evaluation records them."""
    services.evaluation_record(
        evaluation,
        metrics=evaluation.metrics,
        samples=[],
        prompt_ids=[prompt_id for prompt_id, _ in comparisons],
        reference=None,
        comparisons=comparisons,
        votes_per_labeler=votes_per_labeler,
    )


def test_a_b_replies_are_created_in_random_order_and_not_for_the_prompts_author(tiny_policy, alice):
    """Issue 15, item 5: message ids (creation order) say nothing about which policy wrote which reply, and the
    prompt's author never judges its comparison."""
    from types import SimpleNamespace

    from tests.support.labeling import make_prompt

    evaluation = evaluation_with(0.5, 1.0)
    comparisons = [
        (make_prompt(author=alice).pk, {arm: SimpleNamespace(text=f"{arm} reply {i}", row=i) for arm in ARMS})
        for i in range(20)
    ]
    record_comparisons(evaluation, comparisons)
    candidate_first = []
    for task in gate.comparison_tasks(evaluation):
        arms = {int(k): v for k, v in task.payload["arms"].items()}
        candidate_first.append(arms[min(arms)] == "candidate")
        assert task.payload["not_for"] == [alice.pk]
    assert len(candidate_first) == 20 and 0 < sum(candidate_first) < 20  # a secret order: all alike 1 in 2**19
    assert labeling_services.task_lease_next(user=alice) is None


def test_each_evaluation_draws_its_own_held_out_prompts_and_seed(tiny_policy, alice):
    """Issue 28, item 5: a baseline evaluated again in the next round is sampled on other prompts with another
    seed, so its replies are not word for word those a labeler voted on; the draw is recorded and repeatable."""
    from labeling import splits
    from tests.support.labeling import make_prompt
    from training_jobs.evaluate import draw, held_out_prompts

    for _ in range(30):
        prompt = make_prompt(author=alice)
        prompt.conversation.split = splits.HOLDOUT
        prompt.conversation.save(update_fields=["split"])
    settings = LoopSettings.load()
    settings.eval_prompts = 10
    (first, first_seed), (second, second_seed) = draw(settings), draw(settings)
    assert len(first) == len(second) == 10 and first_seed != second_seed
    assert [p.message_id for p in first] != [p.message_id for p in second]
    assert [p.message_id for p in held_out_prompts(settings, first_seed)] == [p.message_id for p in first]


def test_one_labeler_takes_at_most_votes_per_labeler_comparisons_of_an_evaluation(tiny_policy, alice, bob):
    """Issue 15, item 5: one labeler cannot decide an evaluation alone."""
    from types import SimpleNamespace

    from tests.support.labeling import make_prompt

    evaluation = evaluation_with(0.5, 1.0)
    comparisons = [
        (make_prompt().pk, {arm: SimpleNamespace(text=f"{arm} {i}", row=i) for arm in ARMS}) for i in range(5)
    ]
    record_comparisons(evaluation, comparisons, votes_per_labeler=2)
    taken = []
    while (assignment := labeling_services.task_lease_next(user=alice)) is not None:
        a, b = labeling_services.display_order(assignment.task, alice.pk)
        labeling_services.ranking_submit(
            assignment=assignment,
            ranking=labeling_services.RankingInput(order=[[b], [a]], flags={}, quality_rating=4),
        )
        taken.append(assignment.task_id)
    assert len(taken) == 2, "two comparisons, then none of this evaluation"
    assert labeling_services.task_lease_next(user=bob) is not None, "the others are there for someone else"


def test_without_auto_promotion_an_admin_decides(tiny_policy, admin_user):
    set_loop(auto_promote=False)
    evaluation = evaluation_with(0.5, 1.0)
    assert services.evaluation_decide(evaluation=evaluation) == "waiting"
    services.evaluation_promote(evaluation=evaluation, actor=admin_user, reason="looks good")
    activation = ModelActivation.objects.get(model_version=evaluation.candidate)
    assert (activation.actor, activation.reason, activation.automatic) == (admin_user, "looks good", False)


def test_the_human_a_b_result_can_be_required(tiny_policy, alice):
    set_loop(require_human_win_rate=True, min_human_comparisons=2, min_human_win_rate=0.6)
    evaluation = evaluation_with(0.5, 1.0)
    tasks = comparison_tasks(evaluation, 2)
    assert services.evaluation_decide(evaluation=evaluation) == "waiting_humans"
    labelers = [UserFactory(username=f"judge{i}") for i in range(2)]
    for labeler, (_task, candidate, baseline) in zip(labelers, tasks, strict=True):
        assignment = labeling_services.task_lease_next(user=labeler)
        labeling_services.ranking_submit(
            assignment=assignment,
            ranking=labeling_services.RankingInput(
                order=[[candidate.pk], [baseline.pk]], flags={}, confirm_untouched=True
            ),
        )
    result = gate.human_result(evaluation)
    assert (result["comparisons"], result["win_rate"]) == (2, 1.0)
    assert services.evaluation_decide(evaluation=evaluation) == "promoted"
    assert "human win rate 100%" in Evaluation.objects.get(pk=evaluation.pk).decision_reason


def test_kendall_tau_and_agreement():
    assert kendall_tau_b({1: 1, 2: 2, 3: 3}, {1: 1, 2: 2, 3: 3}) == pytest.approx(1.0)
    assert kendall_tau_b({1: 1, 2: 2, 3: 3}, {1: 3, 2: 2, 3: 1}) == pytest.approx(-1.0)
    assert kendall_tau_b({1: 1, 2: 1, 3: 2}, {1: 1, 2: 2, 3: 3}) == pytest.approx(2 / (6**0.5))


def test_agreement_on_overlapping_rankings(alice, bob):
    task = make_rank_task(k=3, overlap=2)
    a, b, c = (m.pk for m in task.candidates.order_by("pk"))
    for labeler, order in ((alice, [[a], [b], [c]]), (bob, [[a], [c], [b]])):
        labeling_services.ranking_submit(
            assignment=labeling_services.task_lease_next(user=labeler),
            ranking=labeling_services.RankingInput(order=order, flags={}, confirm_untouched=True),
        )
    result = agreement()
    assert result["overall"]["pairs"] == 3 and result["overall"]["agreement"] == pytest.approx(2 / 3)
    assert result["per_labeler"][alice.pk]["kendall_tau"] == pytest.approx(1 / 3)


def test_a_demonstration_count_excludes_held_out_and_trained_ones(tiny_policy):
    demonstration("train", 1)
    demonstration("holdout", 2)
    used = demonstration("validation", 3)
    Message.objects.filter(pk=used.pk).update(used_in_training_at=timezone.now())
    assert loop.new_demonstrations() == 1


def test_before_any_reward_model_a_better_sft_policy_replaces_the_base(tiny_policy, tiny_model_dirs):
    sft = register_tiny_policy(tiny_model_dirs[1], name="policy-sft-v0", stage="sft")
    ModelVersion.objects.filter(pk=sft.pk).update(metrics={"val_loss_initial": 5.0, "val_loss": 3.2})
    evaluation = Evaluation.objects.create(
        candidate=sft, baseline=tiny_policy, status="done", metrics={"rm_gain": None}
    )
    assert services.evaluation_decide(evaluation=evaluation) == "promoted"
    assert "5.000 -> 3.200" in Evaluation.objects.get(pk=evaluation.pk).decision_reason
    worse = register_tiny_policy(tiny_model_dirs[1], name="policy-sft-v1", stage="sft")
    ModelVersion.objects.filter(pk=worse.pk).update(metrics={"val_loss_initial": 5.0, "val_loss": 5.5})
    sft.refresh_from_db()
    evaluation = Evaluation.objects.create(candidate=worse, baseline=sft, status="done", metrics={"rm_gain": None})
    assert services.evaluation_decide(evaluation=evaluation) == "not_promoted"


def test_rankings_whose_candidates_all_tie_never_count_as_new_data(tiny_policy):
    set_loop(sft_threshold=1000, rm_threshold=2)
    labeler = UserFactory(username="ranker")
    for _ in range(3):
        rank(labeler, make_rank_task(k=3), lambda ids: [ids])  # one group: every candidate tied
    rank(labeler, make_rank_task(k=3), lambda ids: [[ids[0]], ids[1:]])
    Conversation.objects.update(split="train")
    assert loop.new_rankings() == 1
    assert loop.loop_tick(force_check=True).action == "nothing", "three all-tied rankings train nothing"
    assert loop.tied_rankings() == {"rankings": 4, "all_tied": 3, "share": 0.75}
    rank(labeler, make_rank_task(k=3), lambda ids: [ids[:2], [ids[2]]])
    Conversation.objects.update(split="train")
    assert loop.loop_tick(force_check=True).action == "rm"


def test_the_chain_finishes_before_the_reward_model_threshold_is_checked_again(tiny_policy):
    """Seen in issue 14: rankings that kept counting as new started a second reward model right after the first,
    and PPO never ran. The chain's policy step now comes first."""
    set_loop(sft_threshold=1000, rm_threshold=1, policy_path="ppo")
    labeler = UserFactory(username="ranker")
    rank(labeler, make_rank_task(k=2), lambda ids: [[ids[0]], [ids[1]]])
    Conversation.objects.update(split="train")
    sft = ready("policy-sft-v0", "sft")
    rm = ready("reward-rm-v0", "rm", kind="reward")
    assert loop.new_rankings() >= 1, "a new ranking is waiting"
    decision = loop.loop_tick(force_check=True)
    assert decision.action == "ppo", decision.reason
    run = TrainingRun.objects.get(kind="ppo")
    assert (run.base_model, run.reward_model) == (sft, rm)


@pytest.mark.parametrize("path", ["dpo", "rloo"])
def test_the_loop_takes_the_path_the_admin_picked(tiny_policy, path):
    set_loop(sft_threshold=1000, rm_threshold=1000, policy_path=path)
    sft = ready("policy-sft-v0", "sft", parent=tiny_policy)
    rm = ready("reward-rm-v0", "rm", kind="reward")
    decision = loop.loop_tick(force_check=True)
    assert decision.action == path and "have not been through" in decision.reason
    run = TrainingRun.objects.get(kind=path)
    assert (run.base_model, run.reward_model, run.trigger) == (sft, rm, "chain")
    TrainingRun.objects.filter(pk=run.pk).update(status="succeeded", finished_at=timezone.now())
    assert loop.loop_tick(force_check=True).action == "nothing", "that pair has been through the path"
    candidate = ready(f"policy-{path}-v0", path, parent=sft)
    decision = loop.loop_tick(force_check=True)
    assert decision.action == "evaluate" and decision.candidate == candidate, "every path's policy meets the gate"


def test_iterative_dpo_continues_from_the_serving_policy_with_each_new_reward_model(tiny_policy):
    from models_service.services import model_version_activate

    set_loop(sft_threshold=1000, rm_threshold=1000, policy_path="dpo")
    sft = ready("policy-sft-v0", "sft", parent=tiny_policy)
    first_rm = ready("reward-rm-v0", "rm", kind="reward")
    from tests.support.models import TINY_MODEL_DIRS

    dpo = register_tiny_policy(TINY_MODEL_DIRS[1], name="policy-dpo-v0", stage="dpo")
    ModelVersion.objects.filter(pk=dpo.pk).update(parent=sft)
    dpo.refresh_from_db()
    TrainingRunFactory(
        kind="dpo", status="succeeded", finished_at=timezone.now(), base_model=sft, reward_model=first_rm
    )
    model_version_activate(version=dpo, reason="promoted")
    Evaluation.objects.create(candidate=dpo, status="done", decision="promoted")
    assert loop.loop_tick(force_check=True).action == "nothing"
    second_rm = ready("reward-rm-v1", "rm", kind="reward")
    assert loop.loop_tick(force_check=True).action == "dpo"
    run = TrainingRun.objects.filter(kind="dpo").order_by("-created_at").first()
    assert (run.base_model, run.reward_model) == (dpo, second_rm), "the next round starts from the serving policy"


def test_the_gate_says_when_the_reward_model_is_at_chance(tiny_policy):
    set_loop(min_rm_gain=0.0, max_kl=20.0, auto_promote=True, min_rm_accuracy=0.6)
    evaluation = evaluation_with(0.4, 3.0)
    evaluation.reward_model = ready(
        "reward-rm-chance",
        "rm",
        kind="reward",
        metrics={"val_accuracy": 0.52, "val_pairs": 300, "validation_rankings": 12},
    )
    evaluation.save()
    assert services.evaluation_decide(evaluation=evaluation) == "not_promoted"
    evaluation.refresh_from_db()
    assert "is at chance (52% pairwise accuracy on 300 pairs of 12 validation rankings," in evaluation.decision_reason
    assert not ModelVersion.objects.get(pk=evaluation.candidate_id).is_active


def test_paired_figures_by_hand():
    from training_jobs.evaluate import paired_figures

    # The candidate wins two prompts of three, ties none; its replies are longer, and score rises with length.
    figures = paired_figures([2.0, 1.0, 0.0], [1.0, 0.0, 1.0], [20, 20, 10], [10, 10, 10])
    assert figures["rm_win_rate"] == pytest.approx(2 / 3)
    lengths, scores = [20, 20, 10, 10, 10, 10], [2.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    mean_x, mean_y = sum(lengths) / 6, sum(scores) / 6
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(lengths, scores)) / sum((x - mean_x) ** 2 for x in lengths)
    residuals = [y - slope * (x - mean_x) for x, y in zip(lengths, scores)]
    assert figures["rm_score_per_token"] == pytest.approx(slope)
    assert figures["rm_gain_length_controlled"] == pytest.approx((sum(residuals[:3]) - sum(residuals[3:])) / 3)
    assert figures["rm_gain_length_controlled"] < (3.0 - 2.0) / 3, "part of the gain was length"
    same_length = paired_figures([1.0, 1.0], [0.0, 1.0], [5, 5], [5, 5])
    assert same_length["rm_win_rate"] == pytest.approx(0.75) and same_length["rm_gain_length_controlled"] == 0.5
