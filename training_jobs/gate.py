"""The evaluation gate's decisions: human win rates and the promotion rules. No torch (the web process uses it).

Promotion rules (LoopSettings): the candidate must beat the serving policy's mean reward-model score by at least
`min_rm_gain` on held-out prompts (a gain that comes from reply length alone is refused while
`refuse_length_only_gain`), stay within `max_kl` of its SFT policy, and, if `require_human_win_rate`, win
the blind A/B comparisons at least `min_human_win_rate` of the time over `min_human_comparisons`. When the rules
hold and `auto_promote` is on, the loop promotes; otherwise an admin decides on the ops page.
"""

import math

from config import stages
from labeling.models import Ranking, Task, TaskKind
from training_jobs.models import Evaluation, LoopSettings


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (ties count half a win)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - margin), min(1.0, centre + margin)


def comparison_tasks(evaluation: Evaluation):
    return Task.objects.filter(kind=TaskKind.RANK_REPLIES, payload__evaluation=evaluation.pk)


def freeze_votes(evaluation: Evaluation) -> None:
    """Once the gate decided, its blind A/B votes can no longer be edited (labeling.services.ranking_edit reads
    the mark); open comparison tasks are withdrawn, since nothing reads their votes any more."""
    for task in comparison_tasks(evaluation).select_for_update():
        task.payload = {**task.payload, "decided": True}
        fields = ["payload"]
        if task.status == Task.Status.OPEN:
            task.status, task.cancelled_reason = Task.Status.CANCELLED, "The promotion gate has decided."
            fields += ["status", "cancelled_reason"]
        task.save(update_fields=fields)


def human_result(evaluation: Evaluation) -> dict:
    """The blind A/B result so far: how often labelers ranked the candidate's reply above the baseline's."""
    wins = 0.0
    comparisons = 0
    rankings = Ranking.objects.filter(task__in=comparison_tasks(evaluation)).select_related("task")
    for ranking in rankings.prefetch_related("entries"):
        arms = ranking.task.payload.get("arms", {})
        ranks = {arms.get(str(e.message_id)): e.rank for e in ranking.entries.all()}
        if "candidate" not in ranks or "baseline" not in ranks:
            continue
        comparisons += 1
        if ranks["candidate"] < ranks["baseline"]:
            wins += 1
        elif ranks["candidate"] == ranks["baseline"]:
            wins += 0.5
    low, high = wilson_interval(wins, comparisons)
    return {
        "comparisons": comparisons,
        "tasks": comparison_tasks(evaluation).count(),
        "candidate_wins": wins,
        "win_rate": wins / comparisons if comparisons else None,
        "ci_low": low,
        "ci_high": high,
        "ci_width": high - low,
    }


def decide(evaluation: Evaluation, settings: LoopSettings) -> tuple[str, str]:
    """(decision, reason) for a finished evaluation under the current rules."""
    if evaluation.status != Evaluation.Status.DONE:
        return Evaluation.Decision.PENDING, "The automatic evaluation has not finished."
    if evaluation.baseline_id is None:
        return Evaluation.Decision.PROMOTED, "No policy was serving."
    metrics = evaluation.metrics
    gain, kl = metrics.get("rm_gain"), metrics.get("candidate", {}).get("kl")
    bootstrap = _bootstrap(evaluation)
    if gain is None and bootstrap:
        if not settings.auto_promote:
            return Evaluation.Decision.WAITING_FOR_ADMIN, f"{bootstrap} Automatic promotion is off."
        return Evaluation.Decision.PROMOTED, bootstrap
    problems = []
    chance = reward_model_at_chance(evaluation.reward_model, settings)
    if chance:
        problems.append(chance)
    if gain is None:
        problems.append("there is no reward model to score the replies")
    elif gain < settings.min_rm_gain:
        problems.append(f"the reward-model score gain {gain:+.3f} is below the required {settings.min_rm_gain:+.3f}")
    length_only = gain_from_length_only(metrics)
    if length_only and settings.refuse_length_only_gain:
        problems.append(length_only)
    if kl is not None and kl > settings.max_kl:
        problems.append(f"the KL from the SFT policy, {kl:.2f}, exceeds the bound {settings.max_kl:.2f}")
    if problems:
        return Evaluation.Decision.NOT_PROMOTED, "Not promoted: " + "; ".join(problems) + "."
    facts = f"score gain {gain:+.3f}" + (f", KL {kl:.2f}" if kl is not None else "")
    if settings.require_human_win_rate:
        human = human_result(evaluation)
        if human["comparisons"] < settings.min_human_comparisons:
            return (
                Evaluation.Decision.WAITING_FOR_HUMANS,
                f"{facts}; waiting for the blind A/B result ({human['comparisons']} of "
                f"{settings.min_human_comparisons} comparisons labeled).",
            )
        if human["win_rate"] < settings.min_human_win_rate:
            return (
                Evaluation.Decision.NOT_PROMOTED,
                f"Not promoted: labelers preferred it {human['win_rate']:.0%} of the time "
                f"(95% CI {human['ci_low']:.0%}-{human['ci_high']:.0%}), below {settings.min_human_win_rate:.0%}.",
            )
        facts += f", human win rate {human['win_rate']:.0%} over {human['comparisons']} comparisons"
    if not settings.auto_promote:
        return Evaluation.Decision.WAITING_FOR_ADMIN, f"The rules hold ({facts}); automatic promotion is off."
    return Evaluation.Decision.PROMOTED, f"The rules hold: {facts}."


def gain_from_length_only(metrics: dict) -> str:
    """A sentence when a positive score gain vanishes once length is accounted for and the candidate's replies
    are longer: the gain then came from length alone (a reward model that pays for length)."""
    gain, controlled = metrics.get("rm_gain"), metrics.get("rm_gain_length_controlled")
    candidate, baseline = metrics.get("candidate", {}).get("length"), metrics.get("baseline", {}).get("length")
    if None in (gain, controlled, candidate, baseline) or gain <= 0 or controlled > 0 or candidate <= baseline:
        return ""
    return (
        f"the score gain {gain:+.3f} came from reply length alone ({controlled:+.3f} once scores are regressed on "
        f"length; replies average {candidate:.0f} tokens against {baseline:.0f})"
    )


def reward_model_accuracy(reward_model) -> tuple[float | None, int, str]:
    """(pairwise accuracy, pairs, on what) of a reward model: its labelers' validation rankings when it had 20
    pairs or more, else the held-out imported pairs."""
    if reward_model is None:
        return None, 0, ""
    metrics = reward_model.metrics or {}
    rankings = metrics.get("validation_rankings")
    source = f"pairs of {rankings} validation rankings" if rankings else "validation pairs"
    if metrics.get("val_accuracy") is not None and (metrics.get("val_pairs") or 0) >= 20:
        return metrics["val_accuracy"], metrics["val_pairs"], source
    if metrics.get("holdout_accuracy") is not None:
        return metrics["holdout_accuracy"], metrics.get("holdout_pairs") or 0, "held-out pairs"
    return metrics.get("val_accuracy"), metrics.get("val_pairs") or 0, source


def reward_model_at_chance(reward_model, settings: LoopSettings) -> str:
    """A sentence when the reward model's accuracy is below `min_rm_accuracy` (its scores then mean nothing)."""
    accuracy, pairs, source = reward_model_accuracy(reward_model)
    if accuracy is None or accuracy >= settings.min_rm_accuracy:
        return ""
    return (
        f"the reward model {reward_model.name} is at chance ({accuracy:.0%} pairwise accuracy on {pairs} {source}, "
        f"below {settings.min_rm_accuracy:.0%}), so its score gain cannot tell whether the candidate is better"
    )


def _bootstrap(evaluation: Evaluation) -> str:
    """Before any reward model exists, an SFT policy that lowered its validation loss replaces the base policy
    it was trained from: it is what samples the replies the first reward model learns from (InstructGPT)."""
    candidate, baseline = evaluation.candidate, evaluation.baseline
    if candidate.stage != stages.SFT or baseline is None or baseline.stage != stages.BASE:
        return ""
    before, after = candidate.metrics.get("val_loss_initial"), candidate.metrics.get("val_loss")
    if before is None or after is None or after >= before:
        return ""
    return (
        f"No reward model yet: the SFT policy replaces the base policy (validation loss {before:.3f} -> {after:.3f}) "
        "so that the ranking tasks sample from it."
    )
