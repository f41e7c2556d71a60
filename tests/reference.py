"""The correctness oracle: PEFT's own generate, one adapter alone, on the same 4-bit base."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch


def load_base(base_path: Path, quantization: str = "nf4"):
    """The base as the server loads it (same 4-bit compute path), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramux.model.loader import honour_compute_dtype, quantization_config

    dtype = torch.float32
    base = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype=dtype, device_map={"": "cpu"},
        quantization_config=quantization_config(quantization, dtype))
    base.eval()
    honour_compute_dtype(base, dtype)
    return base, AutoTokenizer.from_pretrained(str(base_path))


@torch.inference_mode()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
    """Greedy tokens after `prompt`; `min_new_tokens` forbids EOS until then."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=min_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


class PeftReference:
    """Owns a PEFT model with every test adapter loaded; answers one request at a time."""

    def __init__(self, base_path: Path, adapters: dict[str, Path], quantization: str = "nf4") -> None:
        from peft import PeftModel

        base, self.tokenizer = load_base(base_path, quantization)
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()
        self._memo: dict[tuple, list[int]] = {}

    def generate(self, adapter_id: str, prompt: str, max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
        """Greedy tokens; `min_new_tokens` forbids EOS until then (a fixed amount of work)."""
        key = (adapter_id, prompt, max_new_tokens, min_new_tokens)
        if key not in self._memo:
            if adapter_id:
                self.model.set_adapter(adapter_id)
                self._memo[key] = greedy(self.model, self.tokenizer, prompt, max_new_tokens, min_new_tokens)
            else:
                with self.model.disable_adapter():
                    self._memo[key] = greedy(self.model, self.tokenizer, prompt, max_new_tokens, min_new_tokens)
        return self._memo[key]

    @torch.inference_mode()
    def logprobs(self, adapter_id: str, prompt: str, tokens: list[int]) -> torch.Tensor:
        """log_softmax of PEFT's logits over `prompt` followed by the answer `tokens`, one
        forward: [len(tokens), vocab], row i the distribution token i was drawn from."""
        prompt_ids = self.tokenizer(prompt).input_ids
        ids = torch.tensor([prompt_ids + tokens[:-1]])
        with self._adapter(adapter_id):
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return torch.log_softmax(logits[0, len(prompt_ids) - 1:].float(), dim=-1)

    @contextlib.contextmanager
    def _adapter(self, adapter_id: str):
        if not adapter_id:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(adapter_id)
        yield


    @torch.inference_mode()
    def score(self, adapter_id: str, prompt_ids: list[int], candidates: list[str]) -> list[float]:
        """Log-probability of each candidate's tokens after the prompt, all in one forward
        (right-padded: causal attention keeps the padding out of every real position)."""
        cands = [self.tokenizer(c, add_special_tokens=False).input_ids for c in candidates]
        width = len(prompt_ids) + max(map(len, cands))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([prompt_ids + c + [pad] * (width - len(prompt_ids) - len(c)) for c in cands])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a team of 2 on a busy 2-core machine spins: 3-16 s a forward, not 0.5
        try:
            if adapter_id:
                self.model.set_adapter(adapter_id)
                logits = self.model(input_ids=ids).logits
            else:
                with self.model.disable_adapter():
                    logits = self.model(input_ids=ids).logits
        finally:
            torch.set_num_threads(threads)
        logp = torch.log_softmax(logits.float(), -1)
        n = len(prompt_ids)
        return [float(sum(logp[i, n - 1 + j, t] for j, t in enumerate(c))) for i, c in enumerate(cands)]


class PeftLoader:
    """PEFT's verdict on an adapter folder: loaded as `PeftModel.from_pretrained(base, folder)`
    loads it, onto a fresh copy of the base, with the missing and unexpected keys that call
    only warns about (or keeps quiet about) counted as a refusal."""

    def __init__(self, base_path: Path) -> None:
        self.base, self.tokenizer = load_base(base_path)

    def load(self, folder: Path):
        """(the PeftModel, "") if PEFT loads the folder cleanly, else (None, why not)."""
        from peft import PeftConfig, PeftModel
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        base = copy.deepcopy(self.base)  # a failed injection leaves the model half-wrapped
        try:
            # The steps of PeftModel.from_pretrained, which returns no load result.
            config = PEFT_TYPE_TO_CONFIG_MAPPING[PeftConfig._get_peft_type(str(folder))].from_pretrained(str(folder))
            config.inference_mode = True
            model = PeftModel(base, config)
            result = model.load_adapter(str(folder), "default")
        except Exception as exc:
            return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if result.missing_keys or result.unexpected_keys:
            return None, f"missing keys {result.missing_keys[:2]}, unexpected keys {result.unexpected_keys[:2]}"
        model.eval()
        return model, ""
