"""Records of steering that a model already carries, so no steering is applied twice by accident.

* In memory, each module whose weights hold a fold (``fuse``) or that was swapped for a steered
  norm (``fuse_in_memory``) carries ``FOLDED_MARK``: the fold's record (a dict).
* On disk, the model that owns those modules records every fold in its config under
  ``CONFIG_KEY`` (a list of records, oldest first): a transformers ``PretrainedConfig``
  attribute or a diffusers ``register_to_config`` entry, saved with ``save_pretrained`` in
  ``config.json`` and read back by ``from_pretrained``. GGUF files keep theirs in
  ``lineas_fast.*`` metadata keys (``fold/gguf.py``).

``refuse_steered`` is called by ``Steering.attach``, ``fuse``, ``fuse_in_memory`` before any
work: a model carrying a record is refused unless the caller asks for composition
(``compose=True``), in which case the new steering acts on top of the folded one.
"""

from __future__ import annotations

from torch import nn

FOLDED_MARK = "_lineas_fast_folded"
CONFIG_KEY = "lineas_fast_fold"


class AlreadySteeredError(ValueError):
    """A module already carries steering (an attached map, or a fold in its weights)."""


def _configs(root: nn.Module) -> list:
    """(module name, config) of every module of the tree with a config (outermost first)."""
    out = []
    for name, mod in root.named_modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and (hasattr(cfg, "to_dict") or isinstance(cfg, dict)):
            out.append((name, cfg))
    return out


def _config_records(cfg) -> list:
    value = cfg.get(CONFIG_KEY) if isinstance(cfg, dict) else getattr(cfg, CONFIG_KEY, None)
    return list(value) if isinstance(value, (list, tuple)) else ([value] if value else [])


def fold_records(root: nn.Module) -> list[str]:
    """Where ``root`` carries steering: "module NAME" for marked modules, "config of NAME" for
    configs with fold records."""
    where = [f"module {n!r}" for n, m in root.named_modules() if FOLDED_MARK in m.__dict__]
    where += [f"config of {n or type(root).__name__!r}" for n, cfg in _configs(root) if _config_records(cfg)]
    return where


def refuse_steered(root: nn.Module, compose: bool, action: str) -> None:
    """Refuse ``action`` on a model that carries a fold, unless composing explicitly."""
    if compose:
        return
    where = fold_records(root)
    if where:
        raise AlreadySteeredError(
            f"cannot {action}: the model already carries folded steering ({', '.join(where[:4])}"
            f"{', ...' if len(where) > 4 else ''}); applying another steering would steer twice. "
            f"Start from the unsteered model, or pass compose=True (CLI: --compose) to apply this "
            f"one on top of the folded one"
        )


def mark_folded(root: nn.Module, names: list[str], record: dict) -> None:
    """Record a fold of ``names`` (module names in ``root``) in memory and in the config of the
    innermost model with a config that owns each module (the root's when none)."""
    named = dict(root.named_modules())
    for n in names:
        named[n].__dict__[FOLDED_MARK] = record
    owners = _configs(root)
    touched = set()
    for n in names:
        owner = max(
            (o for o in owners if o[0] == "" or n == o[0] or n.startswith(o[0] + ".")),
            key=lambda o: len(o[0]),
            default=None,
        )
        if owner is None or owner[0] in touched:
            continue
        touched.add(owner[0])
        mod = named[owner[0]]
        cfg = owner[1]
        records = _config_records(cfg) + [record]
        if hasattr(mod, "register_to_config") and not hasattr(cfg, "to_json_string"):
            mod.register_to_config(**{CONFIG_KEY: records})  # diffusers
        else:
            setattr(cfg, CONFIG_KEY, records)


def unmark_unfolded(root: nn.Module) -> None:
    """After ``unfuse_in_memory``: drop the marks of modules that no longer exist in ``root`` or
    no longer hold a fold, and the config records when no marked module is left. (Folded
    LayerNorm weights stay folded, and keep their mark.)"""
    marked = [m for _, m in root.named_modules() if FOLDED_MARK in m.__dict__]
    if marked:
        return
    for name, cfg in _configs(root):
        if not _config_records(cfg):
            continue
        mod = root.get_submodule(name) if name else root
        if hasattr(mod, "register_to_config") and not hasattr(cfg, "to_json_string"):
            mod.register_to_config(**{CONFIG_KEY: []})
        elif hasattr(cfg, CONFIG_KEY):
            delattr(cfg, CONFIG_KEY)
