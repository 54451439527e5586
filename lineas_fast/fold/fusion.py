"""Folding steering maps into the model's weights (SPEC §6).

With a = 1 − λ + λω and c = λb (or the inverse map's coefficients), the steered norm output is
a⊙norm(x) + c:
  * LayerNorm / GroupNorm with affine (γ, β): γ' = a⊙γ, β' = a⊙β + c.
  * RMSNorm y = w⊙x̂: w' = a⊙w; Gemma's y = (1 + w)⊙x̂: w' = a⊙(1 + w) − 1.
  * A norm without bias: c goes into the biases of the linear layers that read the norm's output
    and nothing else (W(y + c) + β = Wy + (β + Wc)), turning on the config flags that make the
    model's own class load those biases, or switching to the exactly equivalent Llama class.
  * Anything else raises FusionError naming the module and the reason, before any weight changes.

What each family's norms compute, which Linears read them and which config flag gives those
Linears a bias all come from one table, ``lineas_fast.fold.families.FAMILIES``. Models, diffusers
pipelines and targets all go through ``lineas_fast.targets.as_target``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lineas_fast._version import __version__
from lineas_fast.checks import number
from lineas_fast.fold.families import (
    ALWAYS,
    FAMILIES,
    NormSpec,
    equivalent_refusal,
    model_type_of,
    norm_spec,
    owner_of,
)
from lineas_fast.hooks import AlreadySteeredError, installed
from lineas_fast.numerics import check_effective, check_written, effective_coefficients, module_dtype
from lineas_fast.placement import offloaded
from lineas_fast.records import mark_folded, refuse_steered
from lineas_fast.steering import Steering
from lineas_fast.targets import Target, as_target


class FusionError(ValueError):
    """Some maps cannot fold into a standard checkpoint. ``problems`` maps module → reason."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        lines = "\n".join(f"  {m}: {why}" for m, why in problems.items())
        super().__init__(
            f"cannot fold {len(problems)} steering map(s) into the weights:\n{lines}\n"
            f"Use steering.attach(model) (hooks with the fused kernel) or "
            f"lf.fuse_in_memory(model, steering) for these modules."
        )


OFFLOADED = (
    "its weights are offloaded by accelerate (on the meta device between forwards: a "
    "device_map with 'cpu' or 'disk' entries), and folding writes weights; fold a model "
    "loaded without offload, or steer this one with steering.attach(model)"
)


@dataclass
class _Plan:
    name: str
    module: nn.Module
    a: torch.Tensor  # (d,) float64
    c: torch.Tensor  # (d,) float64
    spec: NormSpec
    readers: list = field(default_factory=list)  # [(name, nn.Linear)] when c goes there
    owner: str = ""  # the module whose config governs this norm ("" = root)
    model_type: str = ""
    convert: bool = False  # the readers need the family's exactly equivalent class

    @property
    def kind(self) -> str:
        return self.spec.kind


def coefficients(omega, bias, strength: float, inverse: bool = False):
    """(a, c) float64 with steer(z) = a⊙z + c; a negative strength means the inverse map."""
    return effective_coefficients(omega, bias, strength, inverse)


def spec_of(name: str, named: dict) -> tuple[NormSpec | None, str | None, str, str]:
    """(norm spec or None, why not, owner name, model_type) of module ``name``."""
    owner, owner_mod = owner_of(name, named)
    mtype = model_type_of(owner_mod) if owner_mod is not None else ""
    spec, why = norm_spec(named[name], mtype)
    return spec, why, owner, mtype


def plan_fusion(model, steering: Steering, strength: float = 1.0, inverse: bool = False) -> list[_Plan]:
    """Check every map can fold; returns the plan or raises FusionError listing all problems.
    ``model``: a model, a diffusers pipeline or a ``Target``."""
    target = as_target(model)
    steering = target.resolve(steering)
    steering.validate(target, strict=False)
    named = target.named
    plans, problems = [], {}
    for name in steering.modules:
        a, c = coefficients(*steering[name], strength, inverse)
        if strength == 0:
            continue
        spec, why, owner, mtype = spec_of(name, named)
        if spec is None:
            problems[name] = why
            continue
        plan = _Plan(name, named[name], a, c, spec, owner=owner, model_type=mtype)
        if offloaded(plan.module):
            problems[name] = OFFLOADED
            continue
        has_bias = spec.kind == "layernorm" and getattr(plan.module, "bias", None) is not None
        if not has_bias and bool((c != 0).any()):
            why = _attach_readers(plan, named)
            if why is None and any(offloaded(lin) for _, lin in plan.readers):
                why = f"the Linear layers that read it: {OFFLOADED}"
            if why:
                problems[name] = why
                continue
        plans.append(plan)
    if problems:
        raise FusionError(problems)
    return plans


def _attach_readers(plan: _Plan, named: dict) -> str | None:
    """Find the Linears that take this norm's shift in their biases (the family table's
    readers); the reason when there are none."""
    parent, _, local = plan.name.rpartition(".")
    mtype = plan.model_type
    fam = FAMILIES.get(mtype)
    if fam is None:
        return (
            f"norm without bias in a model of type {mtype or '(none)'!r}, which is not in "
            f"lineas_fast.fold.families.FAMILIES: no known Linear layers read only its output, so "
            f"the shift c = λb has no bias to go into"
        )
    if local in fam.residual:
        return (
            f"its output is added straight into the residual stream ({mtype}), so the shift "
            f"c = λb has no bias to go into (a scale-only map folds)"
        )
    if local in fam.rotary:
        return (
            f"per-head norm over head_dim whose output goes through the rotary position "
            f"embedding ({mtype}): a shift there has no bias to go into (a scale-only map "
            f"folds into its weight)"
        )
    if local == fam.final:
        return (
            f"final norm: its output is read by the LM head, which has no bias and no config "
            f"flag that adds one ({mtype})"
        )
    if local not in fam.readers:
        return (
            f"norm without bias and no known linear layers that read only its output "
            f"(model type {mtype!r}, module {local!r} is not in the family table's readers)"
        )
    group, names = fam.readers[local]
    flag = fam.bias.get(group, (None, ()))[0]
    if flag is None:
        why = equivalent_refusal(mtype, named[plan.owner].config)
        if why is None and plan.owner:
            why = (
                f"switching to the exactly equivalent class needs the model itself, not its "
                f"component {plan.owner!r}"
            )
        if why is None and FAMILIES[fam.equivalent[0]].bias.get(group, (None,))[0] is None:
            why = f"the equivalent {fam.equivalent[0]} class has no bias flag for {group} either"
        if why:
            return (
                f"the shift must go into the biases of {group}.{{{','.join(names)}}}, but "
                f"{mtype}'s {group} has no bias parameters and no config flag that adds "
                f"them, and {why}"
            )
        plan.convert = True
    readers = []
    for r in names:
        full = f"{parent}.{group}.{r}" if parent else f"{group}.{r}"
        lin = named.get(full)
        if not isinstance(lin, nn.Linear):
            return f"expected a Linear reader at {full!r}, found {type(lin).__name__}"
        readers.append((full, lin))
    plan.readers = readers
    return None


def fuse(
    model,
    steering: Union[Steering, Sequence[Steering]],
    strength: float = 1.0,
    inverse: bool = False,
    strict: bool = True,
    compose: bool = False,
):
    """Fold steering maps into the weights; returns the steered model (the same object, or for
    a family that needs biases its own class lacks, e.g. Qwen2/Mistral/Phi-3, an exactly
    equivalent ``LlamaForCausalLM``: always use the return value).

    ``model`` is a model, a diffusers pipeline (the maps fold into its shared modules and the
    pipeline is returned) or a ``lineas_fast.Target``. A list of steerings is composed first
    (the first applied first, each at ``strength``), then folded once: the result equals
    hooking them all in order. (Calling ``fuse`` again on an already fused model steers that
    model: the new map acts on the norm's output, which no longer contains shifts folded into
    the next layer's biases.) A negative strength (or ``inverse=True``) folds the inverse map.
    Raises FusionError, leaving the model untouched, when any map cannot fold.

    Validates like ``Steering.attach``: modules, dimensions and (``strict``) the model
    fingerprint; a finite ``strength`` whose effective coefficients fit the model's dtype
    (``lineas_fast.numerics``); a model that carries attached maps is refused (folding under
    live hooks would steer twice), and so is a model that already carries a fold (its modules
    or config record one) unless ``compose=True``. Every new tensor is computed and checked
    (finite, within its dtype) before any is written. The fold is recorded on the folded
    modules and in the owning model's config (``lineas_fast_fold``, saved in config.json).
    """
    target = as_target(model)
    refuse_steered(target.root, compose, "fold this steering")
    strength = number(strength, "strength")
    steerings = [steering] if isinstance(steering, Steering) else list(steering)
    if not steerings or not all(isinstance(st, Steering) for st in steerings):
        raise TypeError("fuse needs a Steering or a non-empty list of them")
    for st in steerings:
        st.validate(target, strict=strict)
    refuse_attached(target)
    steerings = [target.resolve(st) for st in steerings]
    refuse_gates(steerings)
    if strength == 0:
        return target.original
    effective = effective_map(steerings[0], strength, inverse)
    for st in steerings[1:]:
        effective = effective_map(st, strength, inverse).compose(effective)
    for n in effective.modules:
        check_effective(n, *effective[n], module_dtype(target.named[n], module_dtype(target.root)), strength)
    plans = plan_fusion(target, effective)
    result = target.original
    if any(p.convert for p in plans):
        result = to_llama(target.root)
        target = as_target(result)
        plans = plan_fusion(target, effective)  # the modules are new objects
    staged = [w for p in plans for w in _fold_values(p)]  # computed and checked before any write
    if any(p.readers for p in plans):
        _ensure_reader_biases(target, plans)  # new (zero) biases: the values above already hold
    params = dict(target.root.named_parameters())
    with torch.no_grad():
        for _, name, values in staged:
            params[name].copy_(values.to(params[name].device, params[name].dtype))
    record = fold_record(steerings, strength, inverse)
    mark_folded(target.root, [p.name for p in plans], record)
    return result


def refuse_attached(target) -> None:
    """Folding a model that carries attached maps would apply them twice (once folded, once by
    the live wrappers): refuse, naming the modules."""
    live = [n for n, m in target.named.items() if installed(m)]
    if live:
        raise AlreadySteeredError(
            f"modules {live[:5]} carry attached steering maps; remove "
            f"their handles before folding (else they would apply twice)"
        )


def refuse_gates(steerings: Sequence[Steering]) -> None:
    gated = {
        n: "per-token DSAS gate: the strength differs per token, so no fixed weight holds "
        "it; use steering.attach(model), which runs the gate inside the fused kernel"
        for st in steerings
        for n in st.gates
    }
    if gated:
        raise FusionError(gated)


def effective_map(steering: Steering, strength: float, inverse: bool = False) -> Steering:
    """The map z ↦ a⊙z + c that ``steering`` applies at ``strength``, as a float64 Steering."""
    return Steering(
        {n: coefficients(*steering[n], strength, inverse) for n in steering.modules}, steering.metadata
    )


def folded_scale(spec: NormSpec, weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The norm's new weight (float64) so that its output is a⊙(old output): a⊙w, or for an
    offset norm (1 + w) the w' with 1 + w' = a⊙(1 + w)."""
    w = weight.detach().double()
    return a * (1 + w) - 1 if spec.offset else a * w


def _fold_values(p: _Plan) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """[(parameter, its name, its new float64 value)] of one fold, each checked to be finite
    and within the parameter's dtype (``NumericRangeError`` otherwise); nothing is written."""
    mod = p.module
    w = mod.weight
    a, c = p.a.to(w.device), p.c.to(w.device)
    out = [(w, f"{p.name}.weight", folded_scale(p.spec, w, a))]
    if p.spec.kind == "layernorm" and getattr(mod, "bias", None) is not None:
        out.append((mod.bias, f"{p.name}.bias", a * mod.bias.detach().double() + c))
    else:
        for name, lin in p.readers:  # a reader without a bias yet gets one (zeros) before writing
            shift = lin.weight.detach().double() @ c.to(lin.weight.device)
            old = lin.bias.detach().double() if lin.bias is not None else torch.zeros_like(shift)
            out.append((lin.bias if lin.bias is not None else lin.weight, f"{name}.bias", old + shift))
    for param, name, values in out:
        check_written(name, values, param.dtype)
    return out


def _fold(p: _Plan) -> None:
    """Fold one plan in place (after checking every new tensor)."""
    for param, _, values in _fold_values(p):
        param.copy_(values.to(param.device, param.dtype))


def fold_record(steerings: Sequence[Steering], strength: float, inverse: bool) -> dict:
    """What a fold records (JSON: it goes into config.json)."""
    return {
        "steerings": [str(st.metadata.get("name", "")) for st in steerings],
        "strength": float(strength),
        "inverse": bool(inverse),
        "modules": sorted({n for st in steerings for n in st.modules}),
        "version": __version__,
    }


def _ensure_reader_biases(target: Target, plans: list[_Plan]) -> None:
    """Give every reader Linear a bias the saved checkpoint will load: switch the family's
    config flag on, creating zero biases on every Linear the flag governs (inside the module
    that owns the config)."""
    named = target.named
    for owner, mtype, group in {
        (p.owner, p.model_type, p.readers[0][0].split(".")[-2]) for p in plans if p.readers
    }:
        flag, governed = FAMILIES[mtype].bias[group]
        if flag == ALWAYS:
            continue
        setattr(named[owner].config, flag, True)
        prefix = f"{owner}." if owner else ""
        suffixes = tuple(f".{group}.{g}" for g in governed)
        for name, lin in named.items():
            if (
                isinstance(lin, nn.Linear)
                and name.startswith(prefix)
                and name.endswith(suffixes)
                and lin.bias is None
            ):
                lin.bias = nn.Parameter(
                    torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                    requires_grad=lin.weight.requires_grad,
                )


_LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
    "initializer_range",
)


def to_llama(model: nn.Module) -> nn.Module:
    """The exactly equivalent LlamaForCausalLM of a model whose family names Llama as its
    equivalent (Qwen2 and Mistral without sliding window; Phi-3 with its fused qkv_proj and
    gate_up_proj split into q/k/v_proj and gate/up_proj, with full-head default RoPE, no
    sliding window and no residual dropout). Existing biases are kept; a Llama bias flag is on
    when any Linear it governs has a bias; new biases are zero."""

    cfg, mtype = model.config, model_type_of(model)
    fam = FAMILIES.get(mtype)
    if fam is None or fam.equivalent is None or fam.equivalent[0] != "llama":
        raise FusionError({"<model>": f"{mtype} has no exactly equivalent Llama class"})
    why = fam.equivalent[1](cfg)
    if why:
        raise FusionError({"<model>": f"{mtype} → Llama: {why}"})
    source = model.state_dict()
    parts = {}  # source key → [target keys]
    for key in source:
        head, _, leaf = key.rpartition(".")
        for old, new_names in fam.fused.items():  # Phi-3: qkv_proj → q/k/v_proj
            if head == old or head.endswith("." + old):
                layer = head[: len(head) - len(old)]
                parts[key] = [f"{layer}{n}.{leaf}" for n in new_names]
                break
        else:
            parts[key] = [key]
    names = [k for ks in parts.values() for k in ks]
    flags = {
        flag: any(k.endswith(f".{group}.{g}.bias") for k in names for g in governed)
        for group, (flag, governed) in FAMILIES["llama"].bias.items()
    }
    kw = {k: getattr(cfg, k) for k in _LLAMA_KEYS if getattr(cfg, k, None) is not None}
    llama_cfg = LlamaConfig(**kw, **flags)
    llama_cfg.architectures = ["LlamaForCausalLM"]
    param = next(model.parameters())
    with torch.device(param.device):
        new = LlamaForCausalLM(llama_cfg).to(param.dtype)
    want = new.state_dict()
    state = {}
    for key, targets in parts.items():
        if len(targets) == 1:
            state[targets[0]] = source[key]
            continue
        sizes = [want[t].shape[0] if t in want else -1 for t in targets]
        if -1 in sizes or sum(sizes) != source[key].shape[0]:
            raise FusionError(
                {"<model>": f"{mtype} → Llama: cannot split {key} {tuple(source[key].shape)} into {targets}"}
            )
        state.update(zip(targets, torch.split(source[key], sizes, dim=0)))
    try:
        missing, unexpected = new.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise FusionError({"<model>": f"{mtype} → Llama: {e}"}) from None
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise FusionError(
            {
                "<model>": f"{mtype} → Llama: parameter names differ "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            }
        )
    with torch.no_grad():
        for k in missing:
            new.get_parameter(k).zero_()
    new.generation_config = model.generation_config
    new.train(model.training)
    return new
