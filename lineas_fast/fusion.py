"""Folding steering maps into the model's weights (SPEC §6).

With a = 1 − λ + λω and c = λb (or the inverse map's coefficients), the steered norm output is
a⊙norm(x) + c:
  * LayerNorm / GroupNorm with affine (γ, β): γ' = a⊙γ, β' = a⊙β + c.
  * RMSNorm y = w⊙x̂: w' = a⊙w; Gemma's y = (1 + w)⊙x̂: w' = a⊙(1 + w) − 1.
  * A norm without bias: c goes into the biases of the linear layers that read the norm's output
    and nothing else (W(y + c) + β = Wy + (β + Wc)), turning on the config flags that make the
    model's own class load those biases, or switching to the exactly equivalent Llama class.
  * Anything else raises FusionError naming the module and the reason, before any weight changes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import nn

from .functional import map_coefficients
from .steering import Steering


class FusionError(ValueError):
    """Some maps cannot fold into a standard checkpoint. ``problems`` maps module → reason."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        lines = "\n".join(f"  {m}: {why}" for m, why in problems.items())
        super().__init__(f"cannot fold {len(problems)} steering map(s) into the weights:\n{lines}\n"
                         f"Use steering.attach(model) (hooks with the fused kernel) or "
                         f"lf.fuse_in_memory(model, steering) for these modules.")


# Which linear layers read a bias-less norm's output and nothing else, per family and norm.
_PRE_ATTN = ("self_attn", ("q_proj", "k_proj", "v_proj"))
_PRE_MLP = ("mlp", ("gate_proj", "up_proj"))
READERS = {
    "llama": {"input_layernorm": _PRE_ATTN, "post_attention_layernorm": _PRE_MLP},
    "qwen2": {"input_layernorm": _PRE_ATTN, "post_attention_layernorm": _PRE_MLP},
    "mistral": {"input_layernorm": _PRE_ATTN, "post_attention_layernorm": _PRE_MLP},
    "gemma2": {"input_layernorm": _PRE_ATTN, "pre_feedforward_layernorm": _PRE_MLP},
    "gemma3_text": {"input_layernorm": _PRE_ATTN, "pre_feedforward_layernorm": _PRE_MLP},
}
READERS["gemma3"] = READERS["gemma3_text"]
RESIDUAL_NORMS = {"post_attention_layernorm", "post_feedforward_layernorm"}   # Gemma: added to
#                                                                               the residual
# config flag that gives each reader group a bias in the family's own class (None: no flag)
BIAS_FLAGS = {
    "llama": {"self_attn": "attention_bias", "mlp": "mlp_bias"},
    "qwen2": {"self_attn": "always", "mlp": None},
    "mistral": {"self_attn": None, "mlp": None},
    "gemma2": {"self_attn": "attention_bias", "mlp": None},
    "gemma3_text": {"self_attn": "attention_bias", "mlp": None},
    "gemma3": {"self_attn": "attention_bias", "mlp": None},
}
LLAMA_EQUIVALENT = ("qwen2", "mistral")      # same graph as Llama when no sliding window is used


@dataclass
class _Plan:
    name: str
    module: nn.Module
    a: torch.Tensor                 # (d,) float64
    c: torch.Tensor                 # (d,) float64
    kind: str                       # "affine_norm" | "rms" | "gemma_rms"
    readers: list = field(default_factory=list)      # [(name, nn.Linear)] when c goes there


def coefficients(omega, bias, strength: float, inverse: bool = False):
    """(a, c) float64 with steer(z) = a⊙z + c; a negative strength means the inverse map."""
    if strength < 0:
        inverse, strength = (not inverse), -strength
    u, b = map_coefficients(omega.detach().double().cpu(), bias.detach().double().cpu(), inverse)
    return 1 + strength * u, strength * b


def _norm_kind(mod: nn.Module) -> str | None:
    cls = type(mod).__name__
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
        return "affine_norm" if mod.weight is not None else None
    if "RMSNorm" in cls and isinstance(getattr(mod, "weight", None), torch.Tensor):
        return "gemma_rms" if cls.startswith("Gemma") else "rms"
    return None


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "")


def plan_fusion(model: nn.Module, steering: Steering, strength: float = 1.0,
                inverse: bool = False) -> list[_Plan]:
    """Check every map can fold; returns the plan or raises FusionError listing all problems."""
    named = dict(model.named_modules())
    steering.validate(model, strict=False)
    mtype = _model_type(model)
    plans, problems = [], {}
    for name in steering.modules:
        mod = named[name]
        a, c = coefficients(*steering[name], strength, inverse)
        if strength == 0:
            continue
        kind = _norm_kind(mod)
        if kind is None:
            problems[name] = (f"{type(mod).__name__} is not a normalization with an affine weight "
                              f"(LayerNorm, GroupNorm, RMSNorm): nothing to fold into")
            continue
        plan = _Plan(name, mod, a, c, kind)
        has_bias = kind == "affine_norm" and getattr(mod, "bias", None) is not None
        if not has_bias and bool((c != 0).any()):
            why = _attach_readers(plan, named, mtype)
            if why:
                problems[name] = why
                continue
        plans.append(plan)
    if problems:
        raise FusionError(problems)
    return plans


def _attach_readers(plan: _Plan, named: dict, mtype: str) -> str | None:
    parent, _, local = plan.name.rpartition(".")
    table = READERS.get(mtype, {})
    if local in RESIDUAL_NORMS and local not in table:
        return (f"its output is added straight into the residual stream ({mtype}), so the shift "
                f"c = λb has no bias to go into")
    if local not in table:
        return (f"norm without bias and no known linear layers that read only its output "
                f"(model type {mtype!r}, module {local!r})")
    group, names = table[local]
    flag = BIAS_FLAGS.get(mtype, {}).get(group)
    if flag is None and mtype not in LLAMA_EQUIVALENT:
        return (f"the shift must go into the biases of {group}.{{{','.join(names)}}}, but "
                f"{mtype}'s {group} has no bias parameters and no config flag that adds them")
    readers = []
    for r in names:
        full = f"{parent}.{group}.{r}"
        lin = named.get(full)
        if not isinstance(lin, nn.Linear):
            return f"expected a Linear reader at {full!r}, found {type(lin).__name__}"
        readers.append((full, lin))
    plan.readers = readers
    return None


def fuse(model: nn.Module, steering: Union[Steering, Sequence[Steering]], strength: float = 1.0,
         inverse: bool = False) -> nn.Module:
    """Fold steering maps into the weights; returns the steered model (the same object, or for
    Qwen2/Mistral needing MLP or attention biases their own class lacks, an exactly equivalent
    ``LlamaForCausalLM``: always use the return value).

    A list of steerings is composed first (the first applied first, each at ``strength``), then
    folded once: the result equals hooking them all in order. (Calling ``fuse`` again on an
    already fused model steers that model: the new map acts on the norm's output, which no
    longer contains shifts folded into the next layer's biases.) A negative strength (or
    ``inverse=True``) folds the inverse map. Raises FusionError, leaving the model untouched,
    when any map cannot fold.
    """
    from .diffusion import as_module, is_pipeline
    if is_pipeline(model):
        fuse(as_module(model), steering, strength, inverse)     # folds into the shared modules
        return model
    steerings = [steering] if isinstance(steering, Steering) else list(steering)
    if not steerings:
        raise ValueError("fuse needs at least one steering")
    steerings = [_for_component(model, st) for st in steerings]
    refuse_gates(steerings)
    if strength == 0:
        for st in steerings:
            st.validate(model, strict=False)
        return model
    effective = effective_map(steerings[0], strength, inverse)
    for st in steerings[1:]:
        effective = effective_map(st, strength, inverse).compose(effective)
    plans = plan_fusion(model, effective)
    if any(p.readers for p in plans):
        model = _ensure_reader_biases(model, plans)
        plans = plan_fusion(model, effective)            # modules may be new objects
    with torch.no_grad():
        for p in plans:
            _fold(p)
    return model


def _for_component(model: nn.Module, steering: Steering) -> Steering:
    """A pipeline's steering (``unet.…`` names) applied to the component itself (``pipeline.unet``)
    loses the prefix."""
    names = {n for n, _ in model.named_modules()}
    if any(n in names for n in steering.modules):
        return steering
    prefix = steering.modules[0].split(".", 1)[0] + "."
    if all(n.startswith(prefix) and n[len(prefix):] in names for n in steering.modules):
        return steering.strip_prefix(prefix)
    return steering


def refuse_gates(steerings: Sequence[Steering]) -> None:
    gated = {n: "per-token DSAS gate: the strength differs per token, so no fixed weight holds "
                "it; use steering.attach(model), which runs the gate inside the fused kernel"
             for st in steerings for n in st.gates}
    if gated:
        raise FusionError(gated)


def effective_map(steering: Steering, strength: float, inverse: bool = False) -> Steering:
    """The map z ↦ a⊙z + c that ``steering`` applies at ``strength``, as a float64 Steering."""
    return Steering({n: coefficients(*steering[n], strength, inverse) for n in steering.modules},
                    steering.metadata)


def _fold(p: _Plan) -> None:
    mod = p.module
    w = mod.weight
    a, c = p.a.to(w.device), p.c.to(w.device)
    if p.kind == "gemma_rms":
        w.copy_((a * (1 + w.double()) - 1).to(w.dtype))
    else:
        w.copy_((a * w.double()).to(w.dtype))
    if p.kind == "affine_norm" and mod.bias is not None:
        mod.bias.copy_((a * mod.bias.double() + c).to(mod.bias.dtype))
        return
    for _, lin in p.readers:
        lin.bias.copy_((lin.bias.double() + lin.weight.double() @ c.to(lin.weight.device))
                       .to(lin.bias.dtype))


def _ensure_reader_biases(model: nn.Module, plans: list[_Plan]) -> nn.Module:
    """Make every reader Linear have a bias the saved checkpoint will load: switch the config
    flag on (creating zero biases on every Linear the flag governs), or move Qwen2/Mistral to
    the equivalent Llama class."""
    mtype = _model_type(model)
    groups = {p.readers[0][0].split(".")[-2] for p in plans if p.readers}
    flags = {g: BIAS_FLAGS.get(mtype, {}).get(g) for g in groups}
    if any(f is None for f in flags.values()):
        model = to_llama(model)
        mtype, flags = "llama", {g: BIAS_FLAGS["llama"][g] for g in groups}
    cfg = model.config
    for group, flag in flags.items():
        if flag == "always" or getattr(cfg, flag, False):
            continue
        setattr(cfg, flag, True)
        governed = (r"self_attn\.(q|k|v|o)_proj" if group == "self_attn"
                    else r"mlp\.(gate|up|down)_proj")
        for name, lin in model.named_modules():
            if isinstance(lin, nn.Linear) and re.search(governed + "$", name) and lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=lin.weight.device),
                                        requires_grad=lin.weight.requires_grad)
    return model


_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
               "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta",
               "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id",
               "pad_token_id", "attention_dropout", "initializer_range")


def to_llama(model: nn.Module) -> nn.Module:
    """The exactly equivalent LlamaForCausalLM of a Qwen2 or Mistral model without sliding
    window (same parameter names; Qwen2's q/k/v biases kept, new biases zero)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg, mtype = model.config, _model_type(model)
    if mtype not in LLAMA_EQUIVALENT:
        raise FusionError({"<model>": f"{mtype} has no exactly equivalent Llama class"})
    if mtype == "mistral" and getattr(cfg, "sliding_window", None):
        raise FusionError({"<model>": f"Mistral with sliding_window={cfg.sliding_window} differs "
                                      f"from Llama; no equivalent class with biases"})
    if mtype == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise FusionError({"<model>": "Qwen2 with use_sliding_window=True differs from Llama"})
    kw = {k: getattr(cfg, k) for k in _LLAMA_KEYS if getattr(cfg, k, None) is not None}
    llama_cfg = LlamaConfig(**kw, attention_bias=mtype == "qwen2", mlp_bias=False)
    llama_cfg.architectures = ["LlamaForCausalLM"]
    param = next(model.parameters())
    with torch.device(param.device):
        new = LlamaForCausalLM(llama_cfg).to(param.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise FusionError({"<model>": f"{mtype} → Llama: parameter names differ "
                                      f"(missing {missing[:3]}, unexpected {unexpected[:3]})"})
    with torch.no_grad():
        for k in missing:
            new.get_parameter(k).zero_()
    new.generation_config = model.generation_config
    new.train(model.training)
    return new
