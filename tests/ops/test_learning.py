"""Issue 14, part 4: did the loop keep its promise? The learning rounds, their warnings, and the pages showing them.

No model is loaded here: versions are rows and evaluations are written by hand, as the gate's worker would.
"""

import json

import pytest
from django.urls import reverse
from django.utils import timezone

from labeling import services as labeling_services
from labeling.models import Conversation, Task
from models_service.models import ModelVersion
from ops import selectors
from tests.support.factories import ModelVersionFactory, TrainingRunFactory, UserFactory
from tests.support.labeling import make_rank_task
from tests.support.training import rank, set_loop
from training_jobs.models import Evaluation, TrainingRun

pytestmark = pytest.mark.django_db

GOOD_RM = {"val_accuracy": 0.71, "val_pairs": 300, "holdout_accuracy": 0.66, "holdout_pairs": 120}


def policy(name, stage, parent=None, **extra):
    return ModelVersionFactory(name=name, stage=stage, parent=parent, **extra)


def reward_model(name="reward-rm-v0", metrics=None):
    return ModelVersionFactory(name=name, kind="reward", stage="rm", metrics=GOOD_RM if metrics is None else metrics)


def optimised(name, path, sft):
    run = TrainingRunFactory(kind=path, status="succeeded", finished_at=timezone.now(), base_model=sft)
    return policy(name, path, parent=sft, training_run=run)


def round_of(candidate, baseline, rm, *, gain, controlled, win_rate, kl=4.2, lengths=(88.0, 51.0), **extra):
    """An evaluation finished by the gate's worker, with the figures evaluate.py writes."""
    return Evaluation.objects.create(
        candidate=candidate,
        baseline=baseline,
        reward_model=rm,
        status="done",
        decision=extra.pop("decision", "promoted"),
        decision_reason=extra.pop("decision_reason", "The rules hold."),
        metrics={
            "prompts": 32,
            "rm_gain": gain,
            "rm_win_rate": win_rate,
            "rm_gain_length_controlled": controlled,
            "candidate": {"rm_score": 0.5 + (gain or 0), "kl": kl, "length": lengths[0], "finished": 0.9},
            "baseline": {"rm_score": 0.5, "kl": 0.0, "length": lengths[1], "finished": 0.9},
        },
        **extra,
    )


@pytest.fixture
def chain():
    """base -> sft -> ppo, with a reward model that is better than chance."""
    base = policy("policy-base-v0", "base", is_active=True)
    sft = policy("policy-sft-v0", "sft", parent=base)
    return {"base": base, "sft": sft, "ppo": optimised("policy-ppo-v0", "ppo", sft), "rm": reward_model()}


def keys(round_):
    return [w["key"] for w in round_["warnings"]]


def test_a_real_gain_gives_its_figures_and_no_warning(chain):
    set_loop(min_rm_accuracy=0.6)
    evaluation = round_of(chain["ppo"], chain["base"], chain["rm"], gain=0.25, controlled=0.21, win_rate=0.69)
    learning = selectors.learning_rounds()
    (round_,) = learning["rounds"]
    expected = {
        "number": 1,
        "evaluation_id": evaluation.pk,
        "candidate": "policy-ppo-v0",
        "stage": "ppo",
        "path": "ppo",
        "baseline": "policy-base-v0",
        "reward_model": "reward-rm-v0",
        "rm_val_accuracy": 0.71,
        "rm_holdout_accuracy": 0.66,
        "agreement": None,
        "rm_win_rate": 0.69,
        "rm_gain": 0.25,
        "rm_gain_length_controlled": 0.21,
        "human_win_rate": None,
        "human_comparisons": None,
        "kl": 4.2,
        "candidate_length": 88.0,
        "baseline_length": 51.0,
        "decision": "promoted",
        "decision_label": "Promoted",
        "decision_reason": "The rules hold.",
        "warnings": [],
    }
    assert {key: round_[key] for key in expected} == expected
    assert learning["warnings"] == []
    assert learning["chart"] == {
        "labels": ["1. policy-ppo-v0"],
        "series": {
            "Reward model, validation accuracy": [0.71],
            "Reward model, held-out accuracy": [0.66],
            "Labelers' agreement (ceiling)": [None],
            "Reward-model win rate": [0.69],
            "Human A/B win rate": [None],
        },
    }
    json.dumps(learning["chart"])


def test_a_gain_from_length_alone_warns(chain):
    round_of(chain["ppo"], chain["base"], chain["rm"], gain=0.3, controlled=-0.02, win_rate=0.62)
    (round_,) = selectors.learning_rounds()["rounds"]
    assert keys(round_) == ["length_only"]
    sentence = round_["warnings"][0]["sentence"]
    assert (
        "+0.300 came from reply length alone" in sentence
        and "-0.020" in sentence
        and "88 tokens against 51" in sentence
    )


def test_a_gain_that_vanishes_to_exactly_zero_is_length_only_too(chain):
    round_of(chain["ppo"], chain["base"], chain["rm"], gain=0.1, controlled=0.0, win_rate=0.55)
    assert keys(selectors.learning_rounds()["rounds"][0]) == ["length_only"]


def test_a_reward_model_at_chance_warns(chain):
    set_loop(min_rm_accuracy=0.6)
    chance = reward_model("reward-rm-chance", {"val_accuracy": 0.52, "val_pairs": 300})
    round_of(chain["ppo"], chain["base"], chance, gain=0.4, controlled=0.3, win_rate=0.7, decision="not_promoted")
    (round_,) = selectors.learning_rounds()["rounds"]
    assert keys(round_) == ["at_chance"]
    assert round_["warnings"][0]["sentence"].startswith(
        "The reward model reward-rm-chance is at chance (52% pairwise accuracy on 300 validation pairs,"
    )
    assert (round_["rm_val_accuracy"], round_["rm_holdout_accuracy"]) == (0.52, None)


def test_a_coin_toss_win_rate_is_no_gain(chain):
    round_of(chain["ppo"], chain["base"], chain["rm"], gain=-0.05, controlled=-0.04, win_rate=0.5)
    (round_,) = selectors.learning_rounds()["rounds"]
    assert keys(round_) == ["no_gain"], "a negative gain is not a length-only gain"
    assert "50% of the held-out prompts" in round_["warnings"][0]["sentence"]


def test_rounds_are_policy_evaluations_oldest_first_with_the_human_result(chain, alice, bob):
    first = round_of(chain["sft"], chain["base"], None, gain=None, controlled=None, win_rate=None)
    second = round_of(chain["ppo"], chain["sft"], chain["rm"], gain=0.2, controlled=0.1, win_rate=0.6)
    # The blind A/B of the second round: both labelers prefer the candidate's reply.
    for labeler in (alice, bob):
        task = make_rank_task(k=2)
        ours, theirs = task.candidates.order_by("pk")
        Task.objects.filter(pk=task.pk).update(
            payload={"evaluation": second.pk, "arms": {str(ours.pk): "candidate", str(theirs.pk): "baseline"}}
        )
        labeling_services.ranking_submit(
            assignment=labeling_services.task_lease_next(user=labeler),
            ranking=labeling_services.RankingInput(order=[[ours.pk], [theirs.pk]], flags={}, confirm_untouched=True),
        )
    rounds = selectors.learning_rounds()["rounds"]
    assert [(r["number"], r["evaluation_id"], r["stage"]) for r in rounds] == [
        (1, first.pk, "sft"),
        (2, second.pk, "ppo"),
    ]
    assert (rounds[0]["reward_model"], rounds[0]["rm_val_accuracy"], rounds[0]["warnings"]) == (None, None, [])
    assert (rounds[1]["human_win_rate"], rounds[1]["human_comparisons"]) == (1.0, 2)


def test_the_ceiling_is_the_labelers_agreement_when_the_round_ran(chain, alice, bob):
    before = round_of(chain["sft"], chain["base"], chain["rm"], gain=0.1, controlled=0.1, win_rate=0.6)
    task = make_rank_task(k=3, overlap=2)
    a, b, c = (m.pk for m in task.candidates.order_by("pk"))
    for labeler, order in ((alice, [[a], [b], [c]]), (bob, [[a], [c], [b]])):
        labeling_services.ranking_submit(
            assignment=labeling_services.task_lease_next(user=labeler),
            ranking=labeling_services.RankingInput(order=order, flags={}, confirm_untouched=True),
        )
    after = round_of(chain["ppo"], chain["sft"], chain["rm"], gain=0.1, controlled=0.1, win_rate=0.6)
    learning = selectors.learning_rounds()
    ceilings = {r["evaluation_id"]: (r["agreement"], r["agreement_pairs"]) for r in learning["rounds"]}
    assert ceilings == {before.pk: (None, 0), after.pk: (pytest.approx(2 / 3), 3)}
    assert learning["agreement"] == pytest.approx(2 / 3) and learning["chart"]["series"][
        "Labelers' agreement (ceiling)"
    ] == [None, pytest.approx(2 / 3)]


def test_most_rankings_tied_is_a_loop_warning():
    labeler = UserFactory(username="ranker")
    for _ in range(3):
        rank(labeler, make_rank_task(k=3), lambda ids: [ids])  # every candidate tied
    rank(labeler, make_rank_task(k=3), lambda ids: [[ids[0]], ids[1:]])
    Conversation.objects.update(split="train")
    learning = selectors.learning_rounds()
    assert [w["key"] for w in learning["warnings"]] == ["ties"]
    assert learning["tie_warning"]["sentence"].startswith(
        "3 of the newest 4 rankings tied every candidate, so they train nothing; that is 75%"
    )
    rank(labeler, make_rank_task(k=3), lambda ids: [[ids[0]], ids[1:]])
    rank(labeler, make_rank_task(k=3), lambda ids: [[ids[0]], ids[1:]])
    Conversation.objects.update(split="train")
    learning = selectors.learning_rounds()
    assert learning["warnings"] == [], "half or fewer tied: no loop warning"
    assert learning["tie_warning"]["sentence"].startswith("3 of the newest 6 rankings")


def test_a_versions_rounds_are_its_lineage_and_a_reward_models_are_those_it_scored(chain):
    other_sft = policy("policy-sft-v1", "sft", parent=chain["base"])
    other = optimised("policy-rloo-v0", "rloo", other_sft)
    other_rm = reward_model("reward-rm-v1")
    ModelVersion.objects.filter(pk=other_rm.pk).update(parent=chain["sft"])  # a reward model trained from an SFT
    other_rm.refresh_from_db()
    sft_round = round_of(chain["sft"], chain["base"], None, gain=None, controlled=None, win_rate=None)
    ppo_round = round_of(chain["ppo"], chain["sft"], chain["rm"], gain=0.2, controlled=0.1, win_rate=0.6)
    other_round = round_of(other, chain["sft"], other_rm, gain=0.2, controlled=0.1, win_rate=0.6)

    def rounds(version):
        return [(r["number"], r["evaluation_id"]) for r in selectors.learning_rounds(version)["rounds"]]

    assert rounds(chain["ppo"]) == [(1, sft_round.pk), (2, ppo_round.pk)]
    assert rounds(other) == [(3, other_round.pk)], "round numbers are the loop's, not the page's"
    assert rounds(chain["sft"]) == [(1, sft_round.pk)]
    assert rounds(other_rm) == [(3, other_round.pk)], "the rounds it scored, not its parent's"
    assert rounds(chain["rm"]) == [(2, ppo_round.pk)]
    assert selectors.learning_rounds(other)["chart"]["labels"] == ["3. policy-rloo-v0"]
    assert len(selectors.learning_rounds()["rounds"]) == 3
    round_of(chain["rm"], None, None, gain=None, controlled=None, win_rate=None)  # not a policy: not a round
    assert len(selectors.learning_rounds()["rounds"]) == 3


# --- pages ---


@pytest.mark.parametrize("name", ["ops:overview", "ops:model"])
def test_the_pages_are_for_admins_only(client, alice, admin_user, chain, name):
    url = reverse(name, args=[chain["ppo"].pk] if name == "ops:model" else [])
    assert client.get(url).status_code == 302, "anonymous visitors log in first"
    client.force_login(alice)
    assert client.get(url).status_code == 403
    client.force_login(admin_user)
    assert client.get(url).status_code == 200


def test_an_unknown_model_is_404(client, admin_user):
    client.force_login(admin_user)
    assert client.get(reverse("ops:model", args=[999_999])).status_code == 404


def test_the_overview_says_what_will_appear_before_the_first_round(client, admin_user):
    client.force_login(admin_user)
    page = client.get(reverse("ops:overview")).content.decode()
    assert 'data-testid="learning"' in page and 'data-testid="learning-empty"' in page
    assert "After the first evaluation of a new SFT, PPO, DPO or RLOO policy" in page
    assert 'id="learning-data"' not in page, "no chart without a round"


def test_the_overview_shows_the_rounds_their_warnings_and_the_chart(client, admin_user, chain):
    set_loop(policy_path="rloo", min_rm_accuracy=0.6)
    round_of(chain["ppo"], chain["base"], chain["rm"], gain=0.3, controlled=-0.02, win_rate=0.62)
    client.force_login(admin_user)
    response = client.get(reverse("ops:overview"))
    page = response.content.decode()
    assert 'data-testid="learning-empty"' not in page
    assert page.count('data-testid="learning-round"') == 1
    row = page.split('data-testid="learning-round"')[1].split("</tr>")[0]
    for figure in ("71%", "66%", "62%", "+0.300", "−0.020", "4.20", "88 / 51", "Promoted"):
        assert figure in row, figure
    assert 'data-warning="length_only"' in row and "came from reply length alone" in page
    assert 'data-testid="loop-path">RLOO<' in page
    assert (
        json.loads(page.split('id="learning-data" type="application/json">')[1].split("</script>")[0])
        == (response.context["learning"]["chart"])
    )
    assert 'data-chart="learning"' in page


def test_the_tie_warning_sits_with_the_thresholds(client, admin_user):
    labeler = UserFactory(username="ranker")
    for _ in range(2):
        rank(labeler, make_rank_task(k=2), lambda ids: [ids])
    Conversation.objects.update(split="train")
    client.force_login(admin_user)
    page = client.get(reverse("ops:overview")).content.decode()
    thresholds = page.split("How far each threshold is from firing")[1].split("</section>")[0]
    assert 'data-testid="tie-warning"' in thresholds and "warn-box" in thresholds
    assert "2 of the newest 2 rankings tied every candidate, so they train nothing; that is 100%" in thresholds
    assert 'data-testid="learning-loop-warning"' in page


def test_the_model_page_shows_its_facts_and_its_lineages_rounds(client, admin_user, chain):
    ModelVersion.objects.filter(pk=chain["ppo"].pk).update(metrics={"kl_last": 3.14159, "parameters": 134515008})
    other = optimised("policy-dpo-v0", "dpo", policy("policy-sft-v1", "sft", parent=chain["base"]))
    round_of(chain["ppo"], chain["base"], chain["rm"], gain=0.25, controlled=0.2, win_rate=0.7)
    round_of(other, chain["base"], chain["rm"], gain=0.25, controlled=0.2, win_rate=0.7, decision="not_promoted")
    client.force_login(admin_user)
    page = client.get(reverse("ops:model", args=[chain["ppo"].pk])).content.decode()
    assert 'data-testid="model-name">policy-ppo-v0<' in page
    assert reverse("ops:model", args=[chain["sft"].pk]) in page, "the parent links to its page"
    assert reverse("ops:run", args=[chain["ppo"].training_run_id]) in page
    assert "3.142" in page and "kl_last" in page and "134,515,008" in page
    assert page.count('data-testid="learning-round"') == 1 and 'data-round="1"' in page
    assert "policy-dpo-v0" not in page, "another lineage's round is not shown"
    empty = client.get(reverse("ops:model", args=[chain["base"].pk])).content.decode()
    assert "No round in policy-base-v0's lineage yet" in empty
    scorer = client.get(reverse("ops:model", args=[chain["rm"].pk])).content.decode()
    assert "Learning: the rounds reward-rm-v0 scored" in scorer and scorer.count('data-testid="learning-round"') == 2


def test_each_version_on_the_models_page_links_to_its_page(client, admin_user, chain):
    client.force_login(admin_user)
    page = client.get(reverse("ops:models")).content.decode()
    for version in chain.values():
        assert f'href="{reverse("ops:model", args=[version.pk])}" data-testid="model-link">{version.name}<' in page


def test_retrain_now_offers_dpo_and_rloo_and_shows_a_refusal(client, admin_user):
    client.force_login(admin_user)
    page = client.get(reverse("ops:overview")).content.decode()
    for kind in ("ppo", "dpo", "rloo"):
        assert f'name="kind" value="{kind}" data-testid="retrain-{kind}"' in page
    response = client.post(reverse("ops:start_run"), {"kind": "dpo"})
    run = TrainingRun.objects.get()
    assert (run.kind, run.triggered_by) == ("dpo", admin_user) and response.url == reverse("ops:run", args=[run.pk])
    refused = client.post(reverse("ops:start_run"), {"kind": "rloo"}, follow=True)
    assert "RLOO needs a reward model." in refused.content.decode(), "the refusal shows as a message"
    assert not TrainingRun.objects.filter(kind="rloo").exists()
    reward_model()
    client.post(reverse("ops:start_run"), {"kind": "rloo"})
    assert TrainingRun.objects.get(kind="rloo").reward_model.name == "reward-rm-v0"


def test_the_admin_edits_the_policy_path_and_the_reward_models_least_accuracy(client, admin_user):
    from django.urls import reverse

    from training_jobs.models import LoopSettings

    LoopSettings.load()
    client.force_login(admin_user)
    url = reverse("admin:training_jobs_loopsettings_change", args=[1])
    page = client.get(url).content.decode()
    assert 'name="policy_path"' in page and 'name="min_rm_accuracy"' in page
    assert '<option value="dpo"' in page and '<option value="rloo"' in page
