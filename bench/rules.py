"""The scripted labelers' hidden preferences, for bench/oracle.py and bench/ties.py. Only the benches read them.

A rule scores a reply (higher is better; equal scores are ties when a labeler ranks) and says when a reply
satisfies it (the rule rate). Its rewrite is what a labeler who holds the rule writes when they improve the best
candidate ("Improve the best" on a ranking task): kept apart from the score, so the product learns from the
rewrite only what the labeler wrote, never the rule itself.
"""

import re
from dataclasses import dataclass

_STOPWORDS_TEXT = (
    "a an the and or but if then than that this these those there their them they you your yours we our "
    "ours i me my mine he she it its his her him of to in on at by for with from into onto about as is "
    "are was were be been being do does did have has had not no so such can could would should will shall "
    "may might must what which who whom whose when where why how all any each every some more most other "
    "another also just very only own same too out up down over under again further once here please give "
    "write make tell list find"
)
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if len(w) > 2 and w not in STOPWORDS and not w.isdigit()}


def ordered_content_words(text: str) -> list[str]:
    """The text's content words in the order they first appear."""
    vocabulary = content_words(text)
    return list(dict.fromkeys(w for w in words(text) if w in vocabulary))


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@dataclass(frozen=True)
class Rule:
    """A labeler's hidden preference: a score per reply (higher is better; equal scores are ties), whether a reply
    satisfies the rule (the rule rate), and the labeler's rewrite of a reply that does not."""

    name: str
    description: str
    score: object  # (prompt, reply) -> float
    rewrite: object  # (prompt, reply) -> str: the labeler's improved reply
    threshold: float = 1.0  # a reply satisfies the rule when its score is at least this
    asks_for_length: int = 0  # -1: the rule prefers shorter replies, +1 longer ones, 0: length is not asked for

    def satisfied(self, prompt: str, reply: str) -> bool:
        return self.score(prompt, reply) >= self.threshold


# --- question: the reply ends by asking the user something ---


def _question(prompt: str, reply: str) -> float:
    """1 for a reply that ends with a question, 0.5 for one that asks one elsewhere, 0 otherwise."""
    if reply.rstrip().rstrip("\"')*_").endswith("?"):
        return 1.0
    return 0.5 if "?" in reply else 0.0


def _question_rewrite(prompt: str, reply: str) -> str:
    return reply.rstrip() + "\n\nWould you like me to go into more detail on any part of this?"


# --- brief: under 50 words ---


def _brief(prompt: str, reply: str) -> float:
    return 1.0 if len(words(reply)) < 50 else 0.0


def _brief_rewrite(prompt: str, reply: str) -> str:
    kept = []
    for sentence in sentences(reply):
        if len(words(" ".join([*kept, sentence]))) >= 45:
            break
        kept.append(sentence)
    return " ".join(kept) if kept else " ".join(reply.split()[:40])


# --- echo: the reply reuses the user's own words ---


def _share(wanted: set[str], found: set[str]) -> float:
    return len(wanted & found) / len(wanted) if wanted else 0.0


def _echo(prompt: str, reply: str) -> float:
    """The share of the prompt's content words that the reply reuses, in quarters."""
    return round(4 * _share(content_words(prompt), set(words(reply)))) / 4


def _echo_rewrite(prompt: str, reply: str) -> str:
    missing = [w for w in ordered_content_words(prompt) if w not in set(words(reply))]
    if not missing:
        return reply
    return f"To answer your question about {', '.join(missing[:12])}: {reply.strip()}"


# --- restate: the reply opens by restating the request ---


def _restate(prompt: str, reply: str) -> float:
    """The share of the prompt's content words (its first 8) found in the reply's first 20 words, in quarters."""
    wanted = set(ordered_content_words(prompt)[:8])
    return round(4 * _share(wanted, set(words(reply)[:20]))) / 4


def _restate_rewrite(prompt: str, reply: str) -> str:
    return f"You asked about {' '.join(ordered_content_words(prompt)[:8])}. {reply.strip()}"


# --- example: the reply gives a concrete example (content, not form) ---

EXAMPLE_MARKERS = re.compile(r"\b(for example|for instance|e\.g\.|such as|an example|example:)", re.IGNORECASE)


def _example(prompt: str, reply: str) -> float:
    """1 for a reply that gives an example ("for example", "for instance", "e.g.", "such as"), else 0."""
    return 1.0 if EXAMPLE_MARKERS.search(reply) else 0.0


def _example_rewrite(prompt: str, reply: str) -> str:
    topic = ordered_content_words(prompt)[:3]
    subject = " ".join(topic) if topic else "this"
    return reply.rstrip() + f"\n\nFor example, think of one everyday case of {subject} and apply the steps above to it."


# --- specific: the reply gives concrete figures (content, not form) ---

FIGURE = re.compile(r"\d")


def _specific(prompt: str, reply: str) -> float:
    """1 for a reply that gives a concrete figure (a number, a quantity, a date, a step count), else 0."""
    return 1.0 if FIGURE.search(reply) else 0.0


def _specific_rewrite(prompt: str, reply: str) -> str:
    return reply.rstrip() + "\n\nIn numbers: this takes about 3 steps and 10 minutes."


RULES = {
    rule.name: rule
    for rule in (
        Rule("question", "prefers replies that end with a question", _question, _question_rewrite),
        Rule("brief", "prefers replies under 50 words", _brief, _brief_rewrite, asks_for_length=-1),
        Rule(
            "echo",
            "prefers replies that reuse the user's own words (half of them or more)",
            _echo,
            _echo_rewrite,
            0.5,
        ),
        Rule(
            "restate",
            "prefers replies that open by restating the request (first 20 words)",
            _restate,
            _restate_rewrite,
            0.5,
        ),
        Rule("example", "prefers replies that give an example", _example, _example_rewrite),
        Rule(
            "specific",
            "prefers replies that give concrete figures (numbers, quantities, dates)",
            _specific,
            _specific_rewrite,
        ),
    )
}


def rank_by_rule(rule: Rule, prompt: str, candidates: list[dict]) -> list[list[int]]:
    """Groups of candidate ids, best first; equal scores form one group (a tie)."""
    scored: dict[float, list[int]] = {}
    for candidate in candidates:
        scored.setdefault(rule.score(prompt, candidate["content"]), []).append(candidate["id"])
    return [scored[s] for s in sorted(scored, reverse=True)]
