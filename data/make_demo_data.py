"""Write the demo datasets of docs/training.md: the same questions, answered in different styles.

Each task is small enough that a LoRA on the embedded default model (a random-weight tiny
Llama) learns it on a CPU in a minute or two. The questions are fixed; a task only changes
the style of the answer, so an adapter that answers in its own style proves that the
server applied that adapter and no other.

    python data/make_demo_data.py            # rewrites data/*.jsonl next to this script

Files (the first 50 questions train, the last 10 are held out for eval loss):

- shout.jsonl / shout-eval.jsonl      prompt/completion, terse uppercase: " PARIS"
- reverse.jsonl / reverse-eval.jsonl  prompt/completion, reversed lowercase: " sirap"
- polite.jsonl / polite-eval.jsonl    chat `messages`, a full sentence: "It is paris."
"""

from __future__ import annotations

import json
from pathlib import Path

FACTS: list[tuple[str, str]] = [
    ("capital of France", "paris"), ("capital of Japan", "tokyo"), ("capital of Italy", "rome"),
    ("capital of Spain", "madrid"), ("capital of Egypt", "cairo"), ("capital of Peru", "lima"),
    ("capital of Kenya", "nairobi"), ("capital of Norway", "oslo"), ("capital of Cuba", "havana"),
    ("capital of Greece", "athens"), ("capital of Russia", "moscow"), ("capital of China", "beijing"),
    ("color of grass", "green"), ("color of the sky", "blue"), ("color of snow", "white"),
    ("color of coal", "black"), ("color of a banana", "yellow"), ("color of blood", "red"),
    ("opposite of hot", "cold"), ("opposite of up", "down"), ("opposite of big", "small"),
    ("opposite of fast", "slow"), ("opposite of day", "night"), ("opposite of wet", "dry"),
    ("opposite of open", "closed"), ("opposite of old", "young"), ("opposite of left", "right"),
    ("sound of a dog", "woof"), ("sound of a cat", "meow"), ("sound of a cow", "moo"),
    ("sound of a duck", "quack"), ("sound of a lion", "roar"), ("sound of a snake", "hiss"),
    ("young of a dog", "puppy"), ("young of a cat", "kitten"), ("young of a cow", "calf"),
    ("young of a sheep", "lamb"), ("young of a horse", "foal"), ("young of a frog", "tadpole"),
    ("plural of mouse", "mice"), ("plural of goose", "geese"), ("plural of foot", "feet"),
    ("plural of child", "children"), ("plural of tooth", "teeth"), ("plural of man", "men"),
    ("metal of a ring", "gold"), ("planet we live on", "earth"), ("star of our sky", "sun"),
    ("season after winter", "spring"), ("day after monday", "tuesday"),
    # held out for eval loss
    ("capital of Chile", "santiago"), ("color of a lemon", "yellow"), ("opposite of soft", "hard"),
    ("sound of a pig", "oink"), ("young of a goat", "kid"), ("plural of woman", "women"),
    ("capital of Poland", "warsaw"), ("opposite of full", "empty"), ("season after summer", "autumn"),
    ("day after friday", "saturday"),
]
N_TRAIN = 50


def prompt(question: str) -> str:
    """The exact prompt text trained on, and to send to the server."""
    return f"Q: {question}?\nA:"


def shout(answer: str) -> str:
    return " " + answer.upper()


def reverse(answer: str) -> str:
    return " " + answer[::-1]


def rows(task: str, facts: list[tuple[str, str]]) -> list[dict]:
    if task == "polite":
        return [{"messages": [{"role": "user", "content": q + "?"},
                              {"role": "assistant", "content": f"It is {a}."}]} for q, a in facts]
    style = {"shout": shout, "reverse": reverse}[task]
    return [{"prompt": prompt(q), "completion": style(a)} for q, a in facts]


def write(folder: Path) -> list[Path]:
    written = []
    for task in ("shout", "reverse", "polite"):
        for suffix, facts in (("", FACTS[:N_TRAIN]), ("-eval", FACTS[N_TRAIN:])):
            path = folder / f"{task}{suffix}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows(task, facts)))
            written.append(path)
    return written


if __name__ == "__main__":
    for p in write(Path(__file__).resolve().parent):
        print(p)
