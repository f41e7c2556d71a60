"""Chat-formatted benchmark requests: a system prompt and a user turn, rendered once.

Each prompt is one string, the model's chat template applied to a system prompt and a user
turn with the generation prompt added (`apply_chat_template(..., tokenize=False,
add_generation_prompt=True)`), so that every server gets the same text verbatim and no
server applies a template of its own. The system prompts and questions come from a fixed
pool of varied length; a request whose target length the pool's pairs cannot reach asks
about a passage of `bench/data/heldout.txt` cut to the length that reaches it. Everything
is drawn from the seed: the same (count, seed, range) gives the same prompts, whatever the
adapters of the requests.

    from bench.chat_requests import load_tokenizer, make_chat_requests
    reqs = make_chat_requests(load_tokenizer(), 96, prompt_range=(30, 38), new_range=(64, 64))
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import common as c

SYSTEM_PROMPTS = (
    "Be brief.",
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one or two sentences.",
    "You are a friendly tutor who explains things simply to a curious student.",
    "You are a careful assistant. If you are not sure of something, say so instead of guessing, "
    "and keep your answers short.",
    "You are a travel guide who knows the history, food and customs of many places. Answer "
    "questions with practical advice, and mention one thing a visitor should not miss.",
    "You are an assistant for a small public library. Patrons ask about books, reading habits, "
    "history and science. Answer politely and plainly, in a few sentences, and suggest where "
    "the patron could read more about the subject if they want to go further.",
    "You are a writing assistant for a school newspaper. The students who talk to you are "
    "between twelve and sixteen years old. Use simple words, give concrete examples, avoid "
    "jargon, and when a question is about facts, state the facts first and the explanation "
    "after. Keep every answer under one hundred words unless you are asked for more.",
)

QUESTIONS = (
    "Hi!",
    "What do bees make?",
    "What is a volcano?",
    "How do birds fly?",
    "Why is the sky blue?",
    "What is the capital of France?",
    "Why do we need sleep?",
    "Give me a tip for studying.",
    "Tell me a fun fact about the Moon.",
    "Describe a forest in one sentence.",
    "What is the difference between weather and climate?",
    "How does a refrigerator keep food cold?",
    "Name three animals that live in the ocean.",
    "Why do leaves change colour in the autumn?",
    "What should I pack for a weekend hiking trip?",
    "Can you explain what gravity is to a ten-year-old?",
    "How many days are there in a leap year, and why?",
    "What are the main ingredients of a simple bread dough?",
    "Write a short poem about a rainy afternoon in the city.",
    "What is the water cycle, and why does it matter for farming?",
    "I have a cold. What can I do at home to feel better, and when should I see a doctor?",
    "My tomato plants have yellow leaves at the bottom. What could be the cause, and what "
    "should I try first?",
    "I am learning to cook and I keep burning the garlic when I fry it with onions. What am I "
    "doing wrong, and in what order should I add things to the pan?",
    "Our class is planning a trip to a museum of natural history. Suggest five exhibits we "
    "should look for and one question to ask about each of them.",
    "Explain the difference between a virus and a bacterium, how each one makes people sick, "
    "and why antibiotics work against one of them but not against the other.",
)

PASSAGE_TASKS = (
    "Summarize the following passage in two sentences.",
    "What is the main idea of this text?",
    "List three facts stated in the passage below.",
    "Rewrite the following text for a young reader.",
)

_PASSAGE = Path(__file__).resolve().parent / "data" / "heldout.txt"


def load_tokenizer(model: str | Path | None = None):
    """The benchmarked model's tokenizer (`c.bench_model()` unless a folder is given)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model or c.bench_model()))


def render(tokenizer, system: str, user: str) -> str:
    """One prompt string: the chat template over a system and a user turn, generation prompt added."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count_tokens(tokenizer, prompt: str) -> int:
    """Token ids of the prompt as the loramux server tokenizes it (`tokenizer(prompt)`)."""
    return len(tokenizer(prompt).input_ids)


class PromptPool:
    """Prompts of a wanted token length out of the fixed pool; lengths measured once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pairs = [(s, q) for s in SYSTEM_PROMPTS for q in QUESTIONS]
        self.lengths = [count_tokens(tokenizer, render(tokenizer, s, q)) for s, q in self.pairs]
        self.words = _PASSAGE.read_text().split()

    def pick(self, rng: random.Random, target: int, lo: int, hi: int,
             uses: Counter | None = None) -> tuple[str, int]:
        """A prompt of about `target` tokens, within [lo, hi]: a pool pair within a tolerance of
        the target (the least used so far in `uses`, ties in a shuffled order), else a passage
        task cut to the target."""
        uses = Counter() if uses is None else uses
        tol = max(2, (hi - lo) // 10)
        order = list(range(len(self.pairs)))
        rng.shuffle(order)
        near = [i for i in order if abs(self.lengths[i] - target) <= tol and lo <= self.lengths[i] <= hi]
        if near:
            best = min(near, key=lambda i: uses[i])
            uses[best] += 1
            s, q = self.pairs[best]
            return render(self.tokenizer, s, q), self.lengths[best]
        found = self._passage(rng, target)
        if found is None or not lo <= found[1] <= hi:
            closest = min(range(len(self.pairs)), key=lambda i: abs(self.lengths[i] - target))
            raise ValueError(f"no chat prompt of {lo}-{hi} tokens for a target of {target}: the pool's "
                             f"closest has {self.lengths[closest]} tokens"
                             + (f", a passage task {found[1]}" if found else ""))
        return found

    def _passage(self, rng: random.Random, target: int) -> tuple[str, int] | None:
        """A system prompt and a passage task whose passage has the most words that keep the
        prompt at or under `target` tokens (bisection over the word count)."""
        system, task = rng.choice(SYSTEM_PROMPTS), rng.choice(PASSAGE_TASKS)
        start = rng.randrange(len(self.words))
        words = self.words[start:] + self.words[:start]  # a window that wraps around the text

        def build(n: int) -> tuple[str, int]:
            text = render(self.tokenizer, system, f"{task}\n\n{' '.join(words[:n])}" if n else task)
            return text, count_tokens(self.tokenizer, text)

        best = build(0)
        if best[1] > target:
            return None
        lo, hi = 0, len(words)
        while lo < hi:  # the largest n with build(n) <= target
            mid = (lo + hi + 1) // 2
            cand = build(mid)
            if cand[1] <= target:
                lo, best = mid, cand
            else:
                hi = mid - 1
        return best


def make_chat_requests(tokenizer, count: int, adapter_ids: Sequence[str] = (), seed: int = c.SEED,
                       prompt_range: tuple[int, int] = (40, 400), new_range: tuple[int, int] = (64, 64),
                       ignore_eos: bool = True, pool: PromptPool | None = None) -> list[c.BenchRequest]:
    """`count` chat requests; request i uses adapter_ids[i % len(adapter_ids)] (none: the bare
    base). Prompt lengths are drawn uniformly from `prompt_range` (tokens as the tokenizer
    counts them), new tokens from `new_range`; greedy, EOS ignored unless `ignore_eos` is off.
    Prompts and lengths come from one random stream, so the adapter mix never changes them."""
    lo, hi = prompt_range
    pool = pool or PromptPool(tokenizer)
    rng = random.Random(f"{seed}-chat-prompts")
    uses: Counter = Counter()
    out = []
    for i in range(count):
        prompt, n_tokens = pool.pick(rng, rng.randint(lo, hi), lo, hi, uses)
        adapter = adapter_ids[i % len(adapter_ids)] if adapter_ids else ""
        out.append(c.BenchRequest(i, adapter, prompt, n_tokens, rng.randint(*new_range), ignore_eos))
    return out
