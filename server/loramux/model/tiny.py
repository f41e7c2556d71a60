"""`tiny` and `bench-30m`: small Llamas with random weights and a byte-level tokenizer.

Built deterministically from a seed into a cache folder, so that the server, the tests and
the benchmarks need no network and no model hub. The same (size, seed) always gives the
same bytes on disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from loramux.model.cache import build_once, default_cache_dir

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)  # ids 0, 1, 2; byte b has id 3 + b
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a locally built Llama model."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    intermediate_size: int = 704
    max_position_embeddings: int = 1024
    seed: int = 0


SPECS = {
    "tiny": TinySpec(),
    # About 30M parameters: the benchmark model of bench/.
    "bench-30m": TinySpec(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, intermediate_size=1408, max_position_embeddings=1024,
    ),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by the ByteLevel pieces."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def build_tokenizer():
    """A byte-level fast tokenizer: one token per byte, BOS prepended, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = len(SPECIALS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = PLAIN_CHAT_TEMPLATE
    return fast


def _build_model(spec: TinySpec):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(SPECIALS) + 256,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=0.05,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Random weights give near-flat logits; widen them so that greedy choices are
        # decisive (robust to float rounding), and favour printable ASCII so that
        # outputs are readable text.
        head = model.lm_head.weight
        head.mul_(6.0)
        printable = torch.zeros(config.vocab_size, dtype=torch.bool)
        printable[len(SPECIALS) + 32 : len(SPECIALS) + 127] = True
        printable[2] = True  # EOS stays reachable
        head[~printable] *= 0.25
    return model


def ensure_tiny_model(name: str = "tiny", cache_dir: Path | None = None) -> Path:
    """Return the folder of the named local model, building it once if missing."""
    if name not in SPECS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(SPECS)}")
    spec = SPECS[name]

    def build(out: Path) -> None:
        _build_model(spec).save_pretrained(out, safe_serialization=True)
        build_tokenizer().save_pretrained(out)

    return build_once((cache_dir or default_cache_dir()) / f"{name}-s{spec.seed}", asdict(spec), build)
