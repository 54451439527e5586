"""The docs' code examples run as written, on a tiny model: each test takes a ```python block
from a page by what it holds and executes it with the names the page assumes (``lf``,
``model``, ``tok``, ``source``, ``target``)."""

import contextlib
import io
import os
import re

import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python_block(page: str, holding: str) -> str:
    """The one ```python block of ``page`` (relative to the repository) that contains ``holding``."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)
    found = [b for b in blocks if holding in b]
    assert len(found) == 1, f"{page}: {len(found)} python blocks hold {holding!r}"
    return found[0]


def run_example(code: str) -> tuple[dict, str]:
    """Execute ``code`` with the names the training docs assume; (its names, what it printed)."""
    torch.manual_seed(0)
    names = {"lf": lf, "torch": torch, "model": tiny_model("llama"), "tok": tiny_tokenizer()}
    names.update(source=SOURCE, target=TARGET)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<docs example>", "exec"), names)
    return names, printed.getvalue()


def test_the_step_by_step_trainer_example_collects_every_record():
    names, printed = run_example(python_block("docs/training.md", "lf.Trainer("))
    records, run = names["records"], names["run"]
    assert [r.step for r in records] == list(range(200))  # one record per step, none lost
    assert all(isinstance(r, lf.training.trainer.StepRecord) for r in records)
    assert all(r.loss == r.loss and r.loss >= 0 for r in records)
    lines = printed.splitlines()
    assert [line.split(":")[0] for line in lines] == ["step 50", "step 100", "step 150", "step 200"]
    assert lines[-1] == f"step 200: loss {records[-1].loss:.4g}"
    assert run.read_records() == []  # everything was read by the run, as the page says
    assert isinstance(names["steering"], lf.Steering) and len(names["steering"]) == 3
    assert names["steering"].metadata["history"][-1]["step"] == 199


def test_the_perplexity_budget_example_runs_and_meets_its_budget():
    from lineas_fast.apps.eval import perplexity

    code = python_block("docs/applying.md", "lf.calibrate_strength(")
    names, _ = run_example(code)
    strength, steering, held_out = names["strength"], names["steering"], names["held_out"]
    model, tok = names["model"], names["tok"]
    assert strength > 0 and names["out"].shape[1] > 0
    base = perplexity(model, tok, held_out)
    with steering.apply(model, strength=strength):
        assert perplexity(model, tok, held_out) <= base * 1.03
