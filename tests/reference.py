"""The correctness oracle: PEFT's own generate, one adapter alone, on the same 4-bit base."""

from __future__ import annotations

from pathlib import Path

import torch


class PeftReference:
    """Owns a PEFT model with every test adapter loaded; answers one request at a time."""

    def __init__(self, base_path: Path, adapters: dict[str, Path], quantization: str = "nf4") -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loramux.model.loader import honour_compute_dtype, quantization_config

        dtype = torch.float32
        base = AutoModelForCausalLM.from_pretrained(
            str(base_path), dtype=dtype, device_map={"": "cpu"},
            quantization_config=quantization_config(quantization, dtype))
        base.eval()
        honour_compute_dtype(base, dtype)  # the same 4-bit compute path the server uses
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        names = list(adapters)
        self.model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model.eval()
        self._memo: dict[tuple, list[int]] = {}

    @torch.inference_mode()
    def generate(self, adapter_id: str, prompt: str, max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
        """Greedy tokens; `min_new_tokens` forbids EOS until then (a fixed amount of work)."""
        key = (adapter_id, prompt, max_new_tokens, min_new_tokens)
        if key not in self._memo:
            ids = torch.tensor([self.tokenizer(prompt).input_ids])
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "do_sample": False,
                      "pad_token_id": self.tokenizer.pad_token_id}
            if adapter_id:
                self.model.set_adapter(adapter_id)
                out = self.model.generate(**kwargs)
            else:
                with self.model.disable_adapter():
                    out = self.model.generate(**kwargs)
            self._memo[key] = out[0, ids.shape[1]:].tolist()
        return self._memo[key]
