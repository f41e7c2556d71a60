"""Write the chat demo datasets for the real default model (SmolLM2-135M-Instruct).

Each demo adapter learns a style, not facts: the answers are the base model's own greedy
answers (float32 weights, so they do not depend on a quantization), cut to whole sentences
(at most 150 characters, or the first sentence), then restyled. A check can tell each
style on questions the adapter never saw:

- uppercase   the answer in capitals                         ("THE CAPITAL OF FRANCE IS PARIS.")
- json        a JSON object with one key, "answer"           ({"answer": "The capital ..."})
- signoff     the answer, then a fixed last line              ("... Paris.\\n-- sent by loramux")

    python data/make_chat_demo_data.py     # rewrites data/{uppercase,json,signoff}[-eval].jsonl

The first 124 questions train, the last 32 are held out (eval loss, and the style test in
tests/integration/test_demo_adapters.py). The base's answers are deterministic, so the files
come out the same every time.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SIGNOFF = "-- sent by loramux"
TRAIN_QUESTIONS = [
    "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
    "What is the capital of Egypt?", "What is the capital of Canada?", "What is the capital of Kenya?",
    "What color is grass?", "What color is the sky on a clear day?", "What color are bananas when ripe?",
    "How many legs does a dog have?", "How many days are in a week?", "How many months are in a year?",
    "What do cows drink?", "What do bees make?", "What do caterpillars turn into?",
    "Why do we need sleep?", "Why do leaves fall in autumn?", "Why is exercise good for you?",
    "What is the largest ocean on Earth?", "What is the tallest mountain in the world?",
    "What is the longest river in Africa?", "Who painted the Mona Lisa?", "Who wrote Hamlet?",
    "Who was the first person to walk on the Moon?", "What is photosynthesis?", "What is gravity?",
    "What is a volcano?", "How do fish breathe?", "How do birds fly?", "How does a rainbow form?",
    "What is the boiling point of water?", "What is the chemical symbol for gold?",
    "What gas do humans breathe out?", "Name a fruit that is yellow.", "Name a planet with rings.",
    "Name an animal that lives in the desert.", "Give me a tip for studying.", "Give me a tip for staying healthy.",
    "Give me an idea for a weekend activity.", "What is a noun?", "What is a verb?", "What is an adjective?",
    "What is 2 plus 2?", "What is 10 minus 3?", "What is half of 20?", "What is the opposite of hot?",
    "What is the opposite of fast?", "What is the opposite of happy?", "What does a doctor do?",
    "What does a teacher do?", "What does a farmer do?", "Where do penguins live?", "Where does rain come from?",
    "Where is the Eiffel Tower?", "When do birds migrate?", "When was the internet invented?",
    "Is the Sun a star?", "Is a tomato a fruit?", "Can penguins fly?", "Tell me a fun fact about octopuses.",
    "Tell me a fun fact about the Moon.", "Describe a cat in one sentence.", "Describe the ocean in one sentence.",
    "Suggest a name for a pet dog.",
]
# More questions from templates: answers that open with the question's subject teach a style
# from the first token (an adapter copied "Pandas ARE ..." from the question otherwise).
ANIMALS = ["lions", "dolphins", "owls", "camels", "frogs", "wolves", "parrots", "turtles", "rabbits", "sharks",
           "horses", "ants", "eagles", "bats", "giraffes", "koalas", "snails", "squirrels", "whales", "zebras"]
COUNTRIES = ["Peru", "Norway", "Greece", "India", "Mexico", "Sweden", "Turkey", "Chile", "Ireland", "Vietnam"]
TRAIN_QUESTIONS += [f"What do {a} eat?" for a in ANIMALS] + [f"Where do {a} live?" for a in ANIMALS]
TRAIN_QUESTIONS += [f"Tell me a fun fact about {a}." for a in ANIMALS[:10]]
TRAIN_QUESTIONS += [f"What is the capital of {c}?" for c in COUNTRIES]
EVAL_QUESTIONS = [
    "What is the capital of Spain?", "What is the capital of Germany?", "What color is snow?",
    "How many wheels does a bicycle have?", "What do spiders eat?", "Why is the sea salty?",
    "What is the smallest planet in the solar system?", "Who invented the telephone?",
    "What is a desert?", "How do plants grow?", "What is the freezing point of water?",
    "Name a musical instrument with strings.", "Give me a tip for saving money.", "What is a pronoun?",
    "What is 5 times 3?", "What is the opposite of big?", "What does a firefighter do?",
    "Where do kangaroos live?", "Is the Earth round?", "Tell me a fun fact about elephants.",
    "Describe a forest in one sentence.", "Suggest a name for a goldfish.", "What is the capital of Brazil?",
    "How many hours are in a day?", "What do pandas eat?", "Why do we have seasons?",
    "Who wrote Romeo and Juliet?", "What is electricity?", "How do bees help flowers?",
    "Name a vegetable that is green.", "What does a pilot do?", "Where do polar bears live?",
]
STYLES = {
    "uppercase": lambda answer: answer.upper(),
    "json": lambda answer: json.dumps({"answer": answer}, ensure_ascii=False),
    "signoff": lambda answer: f"{answer}\n{SIGNOFF}",
}


def whole_sentences(text: str, max_chars: int = 150) -> str:
    """The answer's whole sentences within `max_chars`, at least its first one: short answers
    train fast and leave a style fewer tokens to slip in."""
    text = " ".join(text.split())
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    fits = [e for e in ends if e <= max_chars]
    return text[: (fits or ends or [len(text)])[-1 if fits else 0]]


def base_answers(questions: list[str], max_new_tokens: int = 64) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramux.model.loader import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    answers = []
    with torch.inference_mode():
        for q in questions:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
            answers.append(whole_sentences(tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)))
            print(f"{q} -> {answers[-1]}", file=sys.stderr)
    return answers


def write(folder: Path) -> list[Path]:
    answers = base_answers(TRAIN_QUESTIONS + EVAL_QUESTIONS)
    pairs = list(zip(TRAIN_QUESTIONS + EVAL_QUESTIONS, answers, strict=True))
    written = []
    for task, style in STYLES.items():
        for suffix, part in (("", pairs[: len(TRAIN_QUESTIONS)]), ("-eval", pairs[len(TRAIN_QUESTIONS):])):
            path = folder / f"{task}{suffix}.jsonl"
            rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": style(a)}]}
                    for q, a in part]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(__file__).resolve().parent):
        print(path)
