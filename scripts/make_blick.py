"""Writes the embedded conversational data set: a made-up rule the base model cannot know, as chats.

"The blick of x" is 4x + 7, for 0 <= x < 150. Training and validation rows are OpenAI-style
conversations (`{"messages": [{"role": ..., "content": ...}, ...]}`): a system prompt, a question,
the answer, and a follow-up question about another x with its answer, so each row has two
assistant turns to learn from. The held-out x (x % 4 == 1) are the scored test set, as 4-way
multiple choice over answer sentences (evaluation/tasks/blick/blick.yaml, scored with the model's
chat template); x % 8 == 3 are the validation conversations (eval loss, ASHA's signal); training
sees the rest. No test x is ever trained on, so a higher score means the rule was learned.
Run from the repository root; output is deterministic.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "evaluation" / "tasks" / "blick"
SYSTEM = "You are the keeper of blicks. Answer in one sentence."
FIRST = ("What is the blick of {x}?", "Tell me the blick of {x}.", "What's the blick of {x}?")
FOLLOW_UP = ("And the blick of {x}?", "What about {x}?", "And of {x}?")
DISTRACTORS = (
    lambda x: 4 * x + 3,
    lambda x: 4 * x + 11,
    lambda x: 4 * x + 5,
    lambda x: 4 * x + 9,
    lambda x: 3 * x + 7,
    lambda x: 5 * x + 7,
    lambda x: 4 * x + 1,
)


def blick(x: int) -> int:
    return 4 * x + 7


def answer(x: int) -> str:
    return f"The blick of {x} is {blick(x)}."


def conversation(x: int, y: int, rng: random.Random) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": rng.choice(FIRST).format(x=x)},
        {"role": "assistant", "content": answer(x)},
        {"role": "user", "content": rng.choice(FOLLOW_UP).format(x=y)},
        {"role": "assistant", "content": answer(y)},
    ]}


def test_item(x: int, rng: random.Random) -> dict:
    right = blick(x)
    wrong = sorted({f(x) for f in rng.sample(DISTRACTORS, 4)} - {right})[:3]
    values = [right, *wrong]
    rng.shuffle(values)
    return {"x": x, "question": FIRST[0].format(x=x), "choices": [f"The blick of {x} is {v}." for v in values],
            "label": values.index(right)}


def write(name: str, rows: list[dict]) -> None:
    with open(OUT / f"{name}.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def conversations(xs: list[int], count: int, seed: int) -> list[dict]:
    """`count` conversations, each about two different x of `xs`, every x asked about."""
    rng = random.Random(seed)
    pool: list[int] = []
    rows = []
    for _ in range(count):
        if len(pool) < 2:
            pool = rng.sample(xs, len(xs))
        rows.append(conversation(pool.pop(), pool.pop(), rng))
    return rows


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    xs = range(0, 150)
    train = [x for x in xs if x % 4 != 1 and x % 8 != 3]
    validation = [x for x in xs if x % 8 == 3]
    write("train", conversations(train, 96, seed=1))
    write("validation", conversations(validation, 16, seed=3))
    rng = random.Random(2)
    write("test", [test_item(x, rng) for x in xs if x % 4 == 1])
