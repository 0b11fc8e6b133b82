"""Writes the embedded task's data: a made-up function the base model cannot know.

"The zorble of x" is 3x + 2, for 0 <= x < 150. Every fourth x (x % 4 == 1) is held out as the
scored test set and every eighth (x % 8 == 3) as the validation set (eval loss during training,
ASHA's signal); training sees the rest. No test row is ever trained on, so a higher score means
the adapter learned the rule, not the rows. Run from the repository root; output is deterministic.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "evaluation" / "tasks" / "zorble"
DISTRACTORS = (
    lambda x: 3 * x + 5,
    lambda x: 3 * x - 1,
    lambda x: 3 * x + 8,
    lambda x: 3 * x - 4,
    lambda x: 2 * x + 2,
    lambda x: 4 * x + 2,
    lambda x: x + 2,
)


def row(x: int, rng: random.Random) -> dict:
    answer = 3 * x + 2
    wrong = {f(x) for f in rng.sample(DISTRACTORS, 4)} - {answer}
    choices = [answer, *sorted(wrong)[:3]]
    rng.shuffle(choices)
    return {
        "x": x,
        "question": f"What is the zorble of {x}?",
        "answer": str(answer),
        "choices": [str(c) for c in choices],
        "label": choices.index(answer),
    }


def write(name: str, xs: list[int], seed: int) -> None:
    rng = random.Random(seed)
    with open(OUT / f"{name}.jsonl", "w") as handle:
        for x in xs:
            handle.write(json.dumps(row(x, rng)) + "\n")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    xs = range(0, 150)
    write("train", [x for x in xs if x % 4 != 1 and x % 8 != 3], seed=1)
    write("test", [x for x in xs if x % 4 == 1], seed=2)
    write("validation", [x for x in xs if x % 8 == 3], seed=3)
