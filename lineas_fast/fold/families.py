"""What fusion knows about each model family, in one table keyed by ``config.model_type``.

Every row was read off the family's modeling code in transformers (its RMSNorm forward, its
attention and MLP constructors). Nothing is guessed from class names: ``nn.LayerNorm``,
``nn.GroupNorm`` and ``torch.nn.RMSNorm`` are recognised by type anywhere (GPT-2, BERT, CLIP,
diffusers UNets); any other RMSNorm-like module (a 1-D ``weight`` and an epsilon attribute)
is folded only in a family of this table. Adding a family is one entry (and its test).

Fields of ``Family``:
  norm      "rms": y = w⊙x̂ | "rms_offset": y = (1 + w)⊙x̂ | "layernorm" (γ⊙x̂ + β)
  casting   "input": x̂ cast to the input dtype before the weight product (Llama)
            "float32": the product in float32, then cast (Gemma)
  eps       the norm's attribute holding ε
  readers   norm local name → (group, the Linears of that group that read only its output)
  bias      group → (config flag that gives its Linears a bias, or ALWAYS, and exactly which
            Linears the flag governs); a group not listed has no bias and no flag
  residual  norms whose output is added straight into the residual stream (no bias to take c)
  rotary    per-head norms (over head_dim) whose output goes through the rotary embedding
  final     the final norm, read by the bias-less LM head
  equivalent (model_type, refusal(config) → reason or None): an exactly equivalent class that
            has bias flags (same parameter names after ``fused`` Linears are split); used when
            a shift needs biases this family's own class cannot load
  fused     fused Linear (relative to the layer) → the equivalent class's Linears it splits
            into, in row order
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

ALWAYS = "always"  # the group's Linears always have a bias (no flag needed)


@dataclass(frozen=True)
class Family:
    norm: str
    casting: str
    eps: str
    readers: dict
    bias: dict = field(default_factory=dict)
    residual: tuple = ()
    rotary: tuple = ()
    final: str = "norm"
    equivalent: Optional[tuple] = None
    fused: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NormSpec:
    """How one norm computes its output: kind ("layernorm" | "rms" | "rms_offset"), casting
    ("input" | "float32", see above) and the attribute holding ε (None for LayerNorm)."""

    kind: str
    casting: str = "input"
    eps: Optional[str] = None

    @property
    def offset(self) -> bool:
        return self.kind == "rms_offset"


def _no_sliding_window(cfg) -> str | None:
    if getattr(cfg, "sliding_window", None) is not None:
        return f"sliding_window={cfg.sliding_window} (Llama attends to every earlier token)"
    return None


def _qwen2_as_llama(cfg) -> str | None:
    if getattr(cfg, "use_sliding_window", False):
        return "use_sliding_window=True (Llama attends to every earlier token)"
    return None


def _phi3_as_llama(cfg) -> str | None:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        return f"rope_type={rope['rope_type']!r} (Phi-3's long-context RoPE; Llama's differs)"
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        return f"partial_rotary_factor={partial} (Llama rotates the whole head)"
    if getattr(cfg, "resid_pdrop", 0.0):
        return f"resid_pdrop={cfg.resid_pdrop} (Llama has no residual dropout)"
    return _no_sliding_window(cfg)


_ATTN = ("self_attn", ("q_proj", "k_proj", "v_proj"))
_PRE_NORMS = {"input_layernorm": _ATTN, "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}
_GEMMA2_NORMS = {"input_layernorm": _ATTN, "pre_feedforward_layernorm": ("mlp", ("gate_proj", "up_proj"))}
_ATTN_FLAG = {"self_attn": ("attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj"))}
_LLAMA = dict(norm="rms", casting="input", eps="variance_epsilon")
_GEMMA = dict(norm="rms_offset", casting="float32", eps="eps")
_GEMMA_POST = ("post_attention_layernorm", "post_feedforward_layernorm")

FAMILIES: dict[str, Family] = {
    "llama": Family(
        **_LLAMA,
        readers=_PRE_NORMS,
        bias={**_ATTN_FLAG, "mlp": ("mlp_bias", ("gate_proj", "up_proj", "down_proj"))},
    ),
    "qwen2": Family(
        **_LLAMA,
        readers=_PRE_NORMS,
        bias={"self_attn": (ALWAYS, ("q_proj", "k_proj", "v_proj"))},
        equivalent=("llama", _qwen2_as_llama),
    ),
    "mistral": Family(**_LLAMA, readers=_PRE_NORMS, equivalent=("llama", _no_sliding_window)),
    "qwen3": Family(**_LLAMA, readers=_PRE_NORMS, bias=_ATTN_FLAG, rotary=("q_norm", "k_norm")),
    "phi3": Family(
        **_LLAMA,
        readers={
            "input_layernorm": ("self_attn", ("qkv_proj",)),
            "post_attention_layernorm": ("mlp", ("gate_up_proj",)),
        },
        equivalent=("llama", _phi3_as_llama),
        fused={
            "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        },
    ),
    "gemma": Family(**_GEMMA, readers=_PRE_NORMS, bias=_ATTN_FLAG),
    "gemma2": Family(**_GEMMA, readers=_GEMMA2_NORMS, bias=_ATTN_FLAG, residual=_GEMMA_POST),
    "gemma3_text": Family(
        **_GEMMA, readers=_GEMMA2_NORMS, bias=_ATTN_FLAG, residual=_GEMMA_POST, rotary=("q_norm", "k_norm")
    ),
}
FAMILIES["gemma3"] = FAMILIES["gemma3_text"]  # the multimodal wrapper's text stack

EPS_NAMES = ("variance_epsilon", "eps", "epsilon")  # how an RMSNorm-like module is recognised


def model_type_of(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or ""


def owner_of(name: str, named: dict[str, nn.Module]) -> tuple[str, nn.Module | None]:
    """The module whose config governs ``name``: the nearest enclosing module with a
    ``config.model_type``, then the outermost enclosing module sharing that config object (a
    causal LM for its layers; a multimodal model's text stack for its own). (name, module), or
    ("", None) when no enclosing module has a model_type."""
    parts = name.split(".")
    chain = [".".join(parts[:i]) for i in range(len(parts))]  # "", "model", ...
    cfg = next((named[p].config for p in reversed(chain) if p in named and model_type_of(named[p])), None)
    if cfg is None:
        return "", None
    owner = next(p for p in chain if p in named and getattr(named[p], "config", None) is cfg)
    return owner, named[owner]


def norm_spec(mod: nn.Module, model_type: str) -> tuple[NormSpec | None, str | None]:
    """(how ``mod`` normalizes, None) or (None, why it cannot be treated as a norm)."""
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
        if getattr(mod, "weight", None) is None:
            return None, f"{type(mod).__name__} without an affine weight: nothing to fold into"
        return NormSpec("layernorm"), None
    if isinstance(mod, getattr(nn, "RMSNorm", ())):  # torch.nn.RMSNorm: x̂ cast first
        if mod.weight is None:
            return None, "RMSNorm without an affine weight: nothing to fold into"
        return NormSpec("rms", "input", "eps"), None
    w = getattr(mod, "weight", None)
    rms_like = (
        isinstance(w, nn.Parameter)
        and w.ndim == 1
        and getattr(mod, "bias", None) is None
        and not list(mod.children())
        and any(hasattr(mod, e) for e in EPS_NAMES)
    )
    if not rms_like:
        return None, (
            f"{type(mod).__name__} is not a normalization with an affine weight "
            f"(LayerNorm, GroupNorm, RMSNorm): nothing to fold into"
        )
    fam = FAMILIES.get(model_type)
    if fam is None:
        return None, (
            f"{type(mod).__name__} looks like an RMSNorm, but model type "
            f"{model_type or '(none)'!r} is not in lineas_fast.fold.families.FAMILIES, so "
            f"its formula (offset, casting) is unknown; add the family to the table"
        )
    if not hasattr(mod, fam.eps):
        return None, (
            f"{type(mod).__name__} has no {fam.eps!r} attribute, so it is not "
            f"{model_type}'s RMSNorm (lineas_fast.fold.families.FAMILIES); its formula is "
            f"unknown"
        )
    return NormSpec(fam.norm, fam.casting, fam.eps), None


def equivalent_refusal(model_type: str, cfg) -> str | None:
    """Why no exactly equivalent class can stand in for this model (None: it can)."""
    fam = FAMILIES[model_type]
    if fam.equivalent is None:
        return f"{model_type} has no exactly equivalent class that has them"
    target, refusal = fam.equivalent
    why = refusal(cfg)
    return f"the exactly equivalent {target} class cannot be used: {why}" if why else None
