"""The scale benchmark's synthetic data: deterministic ShareGPT-like chats of 1 to 3 exchanges."""

from eagle3_cache.data import conversation_from_row
from tools.scale_benchmark import synthetic_conversations


def test_synthetic_conversations_are_deterministic_valid_chats():
    chats = synthetic_conversations(200, seed=3)
    assert chats == synthetic_conversations(200, seed=3) != synthetic_conversations(200, seed=4)
    assert {len(chat["messages"]) for chat in chats} == {2, 4, 6}
    for index, chat in enumerate(chats):
        conversation_from_row(chat, index, f"chat {index}")
    words = sum(len(message["content"].split()) for chat in chats for message in chat["messages"])
    assert 250 < words / len(chats) < 450
