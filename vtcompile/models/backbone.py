"""The decoder LM inside a family (Llama, Mistral, Qwen2, Gemma, ...): accepted by what the protocol can express,
not by a list of model types.

What vtcompile relies on, and checks here before any capture:
- every decoder layer is the Llama layout: ``self_attn`` with separate q/k/v/o projections, an ``mlp``, a norm
  before each (``input_layernorm``, ``post_attention_layernorm``), residual adds - the annotation of the captured
  graph (compiler/graph.py) places cuts by that layout; sandwich norms (Gemma2/3) or fused projections are refused;
- attention is one SDPA call per layer whose mask comes from the config's attention rule: causal, or a sliding
  window (``sliding_window``, per layer from ``layer_types``; Qwen2's ``use_sliding_window`` /
  ``max_window_layers`` are folded into ``layer_types`` by its config) - what ``attention_windows`` returns and
  the decode step and masked-key reference apply (compiler/attention.py). A softcap of the attention scores
  cannot be expressed with SDPA, chunked attention has no rule here yet: refused with the field named;
- the logits are ``lm_head(last hidden state)``: a final logit softcap would be lost, so it is refused.
"""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError

_LAYER_MODULES = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _refuse(text_config, field: str, why: str) -> None:
    kind = getattr(text_config, "model_type", "?")
    raise UnsupportedModelError(f"the language model ({kind}) sets text_config.{field}: {why}")


def attention_windows(text_config) -> tuple[int | None, ...]:
    """Per decoder layer, its sliding window (None: causal attention over every earlier key), as transformers
    applies it: ``layer_types`` when the config has them, else ``sliding_window`` for every layer."""
    n = text_config.num_hidden_layers
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    if types is None:
        return (int(window),) * n if window else (None,) * n
    out = []
    for i, kind in enumerate(list(types)[:n]):
        if kind == "full_attention":
            out.append(None)
        elif kind == "sliding_attention":
            if not window:
                _refuse(text_config, f"layer_types[{i}]", "'sliding_attention' but sliding_window is not set")
            out.append(int(window))
        else:
            _refuse(text_config, f"layer_types[{i}]", f"{kind!r}; vtcompile expresses full_attention and "
                                                      "sliding_attention layers only")
    if len(out) != n:
        _refuse(text_config, "layer_types", f"{len(out)} entries for {n} layers")
    return tuple(out)


def check_backbone(language_model: nn.Module, text_config) -> None:
    """Refuse a decoder LM that the compiler cannot capture, rewrite or decode exactly (see the module docstring)."""
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        _refuse(text_config, "attn_logit_softcapping", f"{text_config.attn_logit_softcapping} (a tanh softcap of "
                "the attention scores, Gemma2); SDPA, which vtcompile keeps, has no softcap - the model would run "
                "without it and answer differently")
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        _refuse(text_config, "final_logit_softcapping", f"{text_config.final_logit_softcapping}; the decoder "
                "seam ends at lm_head, so the softcap would be lost")
    if getattr(text_config, "attention_chunk_size", None) is not None:
        _refuse(text_config, "attention_chunk_size", "chunked attention has no attention rule in vtcompile yet")
    if getattr(text_config, "use_bidirectional_attention", False):
        _refuse(text_config, "use_bidirectional_attention", "vtcompile's caches and cuts assume causal attention")
    attention_windows(text_config)  # refuses layer types it cannot express
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise UnsupportedModelError(f"{type(language_model).__name__} has no decoder layers under `.layers`; "
                                    "vtcompile captures decoders laid out like Llama's")
    layer = layers[0]
    missing = [m for m in _LAYER_MODULES if not hasattr(layer, m)]
    missing += [f"self_attn.{m}" for m in _ATTENTION_MODULES if hasattr(layer, "self_attn")
                and not hasattr(layer.self_attn, m)]
    extra = [m for m in _SANDWICH_NORMS if hasattr(layer, m)]
    if missing or extra:
        found = (f"lacks {', '.join(missing)}" if missing else "") + ("; " if missing and extra else "") + \
            (f"has {', '.join(extra)} (norms around the attention and MLP outputs)" if extra else "")
        raise UnsupportedModelError(
            f"the decoder layer {type(layer).__name__} {found}; vtcompile cuts layers laid out like Llama's "
            f"({', '.join(_LAYER_MODULES)}; self_attn.{'/'.join(_ATTENTION_MODULES)})")
    if not getattr(type(language_model), "_supports_sdpa", False):
        raise UnsupportedModelError(f"{type(language_model).__name__} has no SDPA attention in transformers; "
                                    "vtcompile keeps SDPA (it never materialises attention maps)")
