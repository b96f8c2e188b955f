"""PEFT LoRA wrappers in saved InternVL checkpoints (spec §7.3).

When the official code trains with `use_backbone_lora` / `use_llm_lora`, `vision_model` and
`language_model` are PEFT models: their tensor names gain `base_model.model.` after the top
module, a wrapped Linear's weight moves to `<module>.base_layer.weight` (PEFT ≥ 0.7; older
versions keep `<module>.weight`), and each adapter adds `<module>.lora_A.<name>.weight` [r, in]
and `<module>.lora_B.<name>.weight` [out, r]. The official wrappers always pass
lora_alpha = 2r, so ΔW = (alpha / r)·B·A = 2·B·A.
"""
from __future__ import annotations

import re

import numpy as np

from internvl_jax.convert.checkpoint import CheckpointError

PEFT_INFIX = "base_model.model."
OFFICIAL_ALPHA_PER_RANK = 2.0
_STORED_ADAPTER = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<name>[^.]+)\.weight$")
_CANONICAL_ADAPTER = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class StoredNames:
    """Canonical tensor names (as `layouts` spells them) -> the names stored in a checkpoint.

    Canonical adapter names are `<module>.lora_A.weight` / `<module>.lora_B.weight`.
    """

    def __init__(self, stored: set[str], where: str):
        self._stored = stored
        self.wrapped = {key.split(".", 1)[0] for key in stored
                        if "." in key and key.split(".", 1)[1].startswith(PEFT_INFIX)}
        adapters: dict[str, dict[str, str]] = {}
        names = set()
        for key in stored:
            match = _STORED_ADAPTER.match(key)
            if match:
                names.add(match["name"])
                adapters.setdefault(self._canonical(match["module"]), {})[match["which"]] = key
        if len(names) > 1:
            raise CheckpointError(f"{where}: tensors of several LoRA adapters {sorted(names)}; keep one")
        for module, pair in adapters.items():
            if len(pair) != 2:
                raise CheckpointError(f"{where}: LoRA adapter of '{module}' has only lora_{next(iter(pair))}")
        self.adapters: dict[str, tuple[str, str]] = {m: (p["A"], p["B"]) for m, p in adapters.items()}

    def _canonical(self, stored_name: str) -> str:
        top, _, rest = stored_name.partition(".")
        return f"{top}.{rest.removeprefix(PEFT_INFIX)}" if top in self.wrapped else stored_name

    def stored(self, canonical: str) -> str:
        """The stored name of a canonical tensor name (the canonical name when nothing matches)."""
        adapter = _CANONICAL_ADAPTER.match(canonical)
        if adapter and adapter["module"] in self.adapters:
            return self.adapters[adapter["module"]][adapter["which"] == "B"]
        top, _, rest = canonical.partition(".")
        name = f"{top}.{PEFT_INFIX}{rest}" if top in self.wrapped else canonical
        module, _, param = name.rpartition(".")
        base_layer = f"{module}.base_layer.{param}"
        return base_layer if base_layer in self._stored else name

    def adapter_of(self, canonical_weight: str) -> tuple[str, str] | None:
        """Stored names (A, B) of the adapter on the Linear whose weight is `canonical_weight`."""
        return self.adapters.get(canonical_weight.removesuffix(".weight"))


def merge_rows(base_rows: np.ndarray, b_rows: np.ndarray, a: np.ndarray) -> np.ndarray:
    """W[rows] + 2·B[rows]·A in float32: base_rows [n, in], b_rows [n, r], a [r, in]."""
    delta = b_rows.astype(np.float32) @ a.astype(np.float32)
    return base_rows.astype(np.float32) + OFFICIAL_ALPHA_PER_RANK * delta
