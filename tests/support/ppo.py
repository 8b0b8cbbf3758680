"""Helpers shared by the tests."""

PROMPTS = [
    [{"role": "user", "content": text}]
    for text in (
        "Hello, how are you?",
        "Paris is the capital of",
        "Tell me a joke.",
        "What is 2 + 2?",
        "Name a colour.",
        "Yes or no?",
        "The quick brown fox",
        "Count to five.",
    )
]


def low_byte_fraction(chats, texts, token_ids):
    """A synthetic reward a tiny random model can learn: the fraction of response tokens with an id below 128."""
    assert len(chats) == len(texts) == len(token_ids)
    return [sum(token < 128 for token in ids) / len(ids) for ids in token_ids]
