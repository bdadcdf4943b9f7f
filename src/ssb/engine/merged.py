"""Sampling from a model that is being trained with LoRA, through a copy with the adapter merged in.

Unmerged, every linear layer of a peft model runs the base product plus the adapter's two small ones; at the few
rows of an on-policy step (or a GRPO step's 32) those extra operations cost a fifth to a third of a decode step on
a CPU (``benchmarks/merged_sampling.py``). A merged copy runs one product per layer. The model being trained is
never merged in place: in bf16, merging and unmerging again would change its base weights (the frozen teacher).
What a merged copy samples is the adapter rounded to the weights' dtype, as in TRL's weight sync to vLLM: in bf16
a weight moves only once its delta reaches half a bf16 step of it (~0.4% of its size); unmerged, the delta is
applied in fp32. Measured on the testbed after 8 on-policy steps (``benchmarks/merged_precision.py``): 43% of the
delta's entries round back to the base weight, yet on the outputs the merged copy is 0.0008 nats per position
(KL) from the adapter, which moves them 0.135 from the base model: the rounding is noise, not a lost update.

- :func:`merged_copy`: a fresh copy (``merge_and_unload`` on a deep copy), for one use;
- :class:`MergedCopy`: one copy kept across steps, its merged weights rewritten in place from the adapter's current
  values at every :meth:`~MergedCopy.refresh` (no model copy per step). The values are those of
  :func:`merged_copy` bit for bit: the same base weight plus the same delta (peft's ``get_delta_weight``), added
  in the same dtype.
"""

from __future__ import annotations

import copy

import torch


def merged_copy(model):
    """A plain model equal to peft ``model`` with its LoRA deltas added to copies of the base weights (in their
    dtype): ``merge_and_unload`` on a deep copy, so ``model`` is untouched. A model without an adapter is returned
    as it is."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    with torch.no_grad():
        return copy.deepcopy(model).merge_and_unload()


class MergedCopy:
    """A merged copy of peft ``model`` kept across training steps; :meth:`refresh` returns it with the adapter's
    current weights merged. A model without an adapter is returned as it is; where a layer is not plain LoRA
    (DoRA and peft's other variants, a LoRA bias, an embedding), every refresh is a fresh :func:`merged_copy`."""

    def __init__(self, model):
        self.model = model
        self.copy = None
        self._layers: list[tuple[object, torch.nn.Module]] = []  # (peft LoRA layer, its merged twin in the copy)

    def refresh(self):
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        if not isinstance(self.model, PeftModel):
            return self.model
        lora = [(name, m) for name, m in self.model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
        if self.copy is None or not all(_plain(m) for _, m in lora):
            self.copy = merged_copy(self.model)
            self._layers = [(m, self.copy.get_submodule(name)) for name, m in lora]
            return self.copy
        with torch.no_grad():
            for layer, twin in self._layers:  # as peft's merge: base weight += delta, in the weight's dtype
                twin.weight.copy_(layer.get_base_layer().weight)
                for adapter in layer.active_adapters:
                    twin.weight += layer.get_delta_weight(adapter)
        return self.copy


def _plain(layer) -> bool:
    """Whether peft merges ``layer``'s active adapters by adding ``get_delta_weight`` to the weight alone."""
    return all(a in layer.lora_A and a not in getattr(layer, "lora_variant", {})  # peft >= 0.15: DoRA and others
               and not getattr(layer, "use_dora", {}).get(a, False)  # older peft: DoRA
               and not getattr(layer, "lora_bias", {}).get(a, False) for a in layer.active_adapters)
