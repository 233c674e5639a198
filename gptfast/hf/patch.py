"""`gptfast.hf.patch(model)`: a transformers model's attention and LM loss on gptfast's ops.

    model = AutoModelForCausalLM.from_pretrained(...)
    print(gptfast.hf.patch(model))     # what was patched, and what was not and why
    loss = model(input_ids, attention_mask=mask, labels=labels).loss   # fused, no logits
    gptfast.hf.unpatch(model)          # back to the model's own attention and loss

In place and reversible: the model keeps its parameters, state_dict and config values; only
`config._attn_implementation`, the forward of the LM model (and of BLOOM's attention modules) and
a forward hook on the base model change, and `unpatch` restores them.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from ._attention import (NAME, attention_forward, attention_takes_softcap,
                         bloom_attention_forward, padding_mask)
from ._loss import fused_loss_forward

BACKENDS = ("auto", "cuda", "triton", "torch")

# model_type -> how its attention reaches gptfast: through transformers' AttentionInterface, or
# (BLOOM, which computes attention itself) by replacing its attention modules' forward.
ARCHITECTURES = {
    "gpt2": ("GPT-2", "interface"),
    "llama": ("Llama", "interface"),
    "bloom": ("BLOOM", "module"),
    "gemma2": ("Gemma-2", "interface"),
}


@dataclass
class PatchReport:
    """What `patch` changed. attention: "gptfast" or why not; cross_entropy: whether the loss
    is fused (only *ForCausalLM models have one)."""
    architecture: str
    backend: str
    attention: str
    cross_entropy: str

    def __str__(self) -> str:
        return (f"gptfast.hf.patch: {self.architecture}, backend={self.backend!r}\n"
                f"  attention:     {self.attention}\n  cross-entropy: {self.cross_entropy}")


@dataclass
class _State:  # kept on the model as `_gptfast_patch` until unpatch
    report: PatchReport
    previous_attn: Optional[str] = None       # config._attn_implementation before patch
    loss_hook: object = None                  # the base model's forward hook handle
    modules: List[object] = field(default_factory=list)  # modules given _gptfast_* attributes
    # (module, the instance `forward` it had before patch, or None): a wrapper another library
    # set (accelerate's hooks) comes back on unpatch
    forwards: List[tuple] = field(default_factory=list)


def _replace_forward(state: _State, module, forward) -> None:
    state.forwards.append((module, module.__dict__.get("forward")))
    module.forward = forward


def register() -> None:
    """Register "gptfast" in transformers' AttentionInterface and AttentionMaskInterface
    (`patch` does it; models can then also be loaded with attn_implementation="gptfast")."""
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


def _architecture(model) -> str:
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - the hf extra is missing
        raise ImportError("gptfast.hf needs transformers: pip install 'gptfast[hf]'") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"gptfast.hf.patch: expected a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = ", ".join(f"{name} ({key})" for key, (name, _) in ARCHITECTURES.items())
        raise ValueError(f"gptfast.hf.patch: {type(model).__name__} (model_type "
                         f"{model_type!r}) is not supported; supported architectures: {names}")
    return model_type


def _refusals(model_type: str, config) -> Optional[str]:
    """Configurations of a supported architecture whose attention gptfast cannot run."""
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention",
                                                         False):
        return "bidirectional attention (gptfast runs causal self-attention)"
    if model_type == "gpt2" and getattr(config, "add_cross_attention", False):
        return "cross-attention layers (add_cross_attention=True)"
    if model_type == "bloom" and config.pretraining_tp > 1 and config.slow_but_exact:
        return "slow_but_exact=True (BLOOM's emulation of tensor-parallel rounding)"
    return None


def _attention_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def patch(model, *, attention: bool = True, cross_entropy: bool = True,
          backend: str = "auto") -> PatchReport:
    """Run `model`'s attention and LM loss on gptfast's fused ops, in place.

    model: a transformers GPT-2, Llama, BLOOM or Gemma-2 model (the *ForCausalLM class for the
    loss; the bare model for attention only).
    attention: route attention through `gptfast.attention` (HF's 2-D attention_mask becomes the
        key padding mask; dropout, grouped-query heads and sliding windows as the model has them;
        BLOOM's ALiBi as slopes). Gemma-2's score softcap needs a gptfast.attention with
        `softcap`: until then Gemma-2 keeps its attention (a warning says so).
    cross_entropy: with labels, the loss comes from `gptfast.linear_cross_entropy` on the final
        hidden states and the output embedding; logits are then not computed and are None in the
        output. False keeps the model's logits and loss.
    backend: the ops' backend ("auto" | "cuda" | "triton" | "torch").
    Patching again replaces the previous patch. Returns a PatchReport.
    """
    model_type = _architecture(model)
    if backend not in BACKENDS:
        raise ValueError(f"gptfast.hf.patch: backend must be one of {BACKENDS}, got {backend!r}")
    if getattr(model, "_gptfast_patch", None) is not None:
        unpatch(model)
    arch_name, route = ARCHITECTURES[model_type]
    state = _State(PatchReport(arch_name, backend, "unchanged (attention=False)",
                               "unchanged (cross_entropy=False)"))
    model._gptfast_patch = state  # recorded as it goes: a failure below is undone whole
    try:
        _apply(model, state, model_type, route, attention, cross_entropy, backend)
    except BaseException:
        unpatch(model)
        raise
    return state.report


def _apply(model, state: _State, model_type: str, route: str, attention: bool,
           cross_entropy: bool, backend: str) -> None:
    config, arch_name = model.config, state.report.architecture
    if attention:
        refused = _refusals(model_type, config)
        softcap = getattr(config, "attn_logit_softcapping", None)
        if refused is not None:
            raise ValueError(f"gptfast.hf.patch: this {arch_name} model has {refused}; "
                             f"patch(model, attention=False) still fuses the loss")
        if softcap is not None and not attention_takes_softcap():
            state.report.attention = (
                f"{config._attn_implementation} (unchanged): {arch_name} soft-caps attention "
                f"scores (attn_logit_softcapping={softcap}), which gptfast.attention cannot do yet")
            warnings.warn(f"gptfast.hf.patch: {state.report.attention}; the loss is still "
                          f"patched", stacklevel=2)
        else:
            register()
            state.previous_attn = config._attn_implementation
            for module in _attention_modules(model):
                module._gptfast_backend = backend
                state.modules.append(module)
            if route == "interface":
                model.set_attn_implementation(NAME)
                if config._attn_implementation != NAME:  # transformers refused, and only warned
                    raise RuntimeError(f"gptfast.hf.patch: transformers did not switch "
                                       f"{type(model).__name__} to attn_implementation={NAME!r}")
            else:  # BLOOM: the config key only selects gptfast's mask; the modules run gptfast
                config._attn_implementation = NAME
                for module in _attention_modules(model):
                    _replace_forward(state, module,
                                     types.MethodType(bloom_attention_forward, module))
            state.report.attention = "gptfast" + (" (ALiBi as slopes)" if route == "module"
                                                  else "")

    if cross_entropy:
        head = model.get_output_embeddings()
        if head is None or not hasattr(model, "base_model") or model.base_model is model:
            state.report.cross_entropy = (f"unchanged: {type(model).__name__} has no language "
                                          f"model head (patch the *ForCausalLM model)")
        else:
            softcap = getattr(config, "final_logit_softcapping", None)
            forward, state.loss_hook = fused_loss_forward(model, softcap=softcap, backend=backend)
            _replace_forward(state, model, forward)
            state.report.cross_entropy = "gptfast.linear_cross_entropy" + (
                f" (final logit softcap {softcap})" if softcap is not None else "") + \
                "; logits are not returned with labels"


def unpatch(model) -> bool:
    """Undo `patch`: the model's own attention implementation, forward and loss again.
    Returns False when the model was not patched."""
    state = model.__dict__.pop("_gptfast_patch", None)
    if state is None:
        return False
    if state.loss_hook is not None:
        state.loss_hook.remove()
    for module, previous in reversed(state.forwards):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    for module in state.modules:
        module.__dict__.pop("_gptfast_backend", None)
        module.__dict__.pop("_gptfast_slopes", None)
    if state.previous_attn is not None:
        if ARCHITECTURES[model.config.model_type][1] == "interface":
            model.set_attn_implementation(state.previous_attn)
        else:
            model.config._attn_implementation = state.previous_attn
    return True


def is_patched(model) -> bool:
    return getattr(model, "_gptfast_patch", None) is not None


__all__ = ["patch", "unpatch", "is_patched", "register", "PatchReport", "ARCHITECTURES"]
