"""The quality-sweep machinery on a tiny random model: recipes × strengths, rows written after
each evaluation, resume, the Pareto front, the target check and the command's early errors.
(Quality numbers come from `lineas-fast sweep` on the real models, not from a test.)"""

import json

import pytest
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.apps.sweep import Recipe, SweepData, check_recipes, meets_target, pareto_front, run_sweep
from lineas_fast.cli import main
from lineas_fast.training.trainer import TrainConfig

PATTERN = r"model\.layers\.\d+\.post_attention_layernorm"


SPARSE = 0.6  # above 0.5 Adam's early sign-like steps are all pruned
RUDE = ("fool", "stupid", "clown", "dumb", "idiot", "garbage", "lazy")


class CountingJudge:
    """A transparent keyword judge (1 if a rude word appears) that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return [float(any(w in t.lower() for w in RUDE)) for t in texts]


def data():
    return SweepData(
        SOURCE,
        TARGET[:8],
        prompts=["you are a", "what a", "go away", "nobody"],
        wiki=["the cat sat on the mat", "rivers flow to the sea in spring"],
        control=[
            "the sun rises in the east",
            "a table has four legs",
            "water boils when heated",
            "trains run on rails",
        ],
    )


RECIPES = [
    Recipe("lineas", PATTERN, steps=3, n_train=4),
    Recipe("lineas", PATTERN, sparsity=SPARSE, steps=3, n_train=8),
    Recipe("lineas", PATTERN, steps=3, n_train=4, gates="token", control_opening=0.3),
    Recipe("mean_shift", PATTERN, n_train=8),
    Recipe("linear_act", PATTERN, n_train=8),
]


def test_sweep_rows_front_and_resume(tmp_path):
    model, tok, judge = tiny_model("llama"), tiny_tokenizer(), CountingJudge()
    res = run_sweep(
        model,
        tok,
        data(),
        judge,
        RECIPES,
        [0.5, 1.0],
        str(tmp_path),
        max_new_tokens=3,
        progress=False,
        log=lambda s: None,
    )
    rows = res["rows"]
    assert [(r["method"], r["strength"]) for r in rows] == [("none", 0.0)] + [
        (r.method, s) for r in RECIPES for s in (0.5, 1.0)
    ]
    assert judge.calls == len(rows)
    assert all(r["support"] > 0 for r in rows[1:3] + rows[5:])
    # the sparsity reaches the trainer: γ = 0.6 prunes on the tiny model
    assert rows[3]["support"] < rows[1]["support"]
    # the evaluation really ran with the steering attached: λ changes the perplexity
    assert rows[1]["perplexity"] != rows[2]["perplexity"] != rows[0]["perplexity"]
    assert rows[3]["perplexity"] == rows[0]["perplexity"]  # everything pruned
    # the gated recipe reuses the ungated recipe's maps and adds gates; its rows say how far
    # the gates open on the neutral texts and on the prompts
    plain = lf.Steering.load(str(tmp_path / "steerings" / (RECIPES[0].key() + ".safetensors")))
    gated = lf.Steering.load(str(tmp_path / "steerings" / (RECIPES[2].key() + ".safetensors")))
    assert gated.gates and not plain.gates and gated.modules == plain.modules
    for n in plain.modules:
        assert torch.equal(gated[n][0], plain[n][0]) and torch.equal(gated[n][1], plain[n][1])
    assert all(0 <= rows[i]["gate_opening"][k] <= 1 for i in (5, 6) for k in ("wiki", "prompts"))
    assert "gate_opening" not in rows[1]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert saved["pareto"] == pareto_front(rows)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    fitted = sorted(p.name for p in (tmp_path / "steerings").iterdir())
    assert fitted == sorted(r.key() + ".safetensors" for r in RECIPES)
    # mean-shift at λ = 1 is the library's fit_mean_shift on the first n_train sentences
    ms = lf.fit_mean_shift(model, tok, SOURCE[:8], TARGET[:8], modules=PATTERN)
    from lineas_fast.apps.eval import perplexity

    with ms.apply(model):
        assert perplexity(model, tok, data().wiki) == pytest.approx(rows[8]["perplexity"], rel=1e-5)
    # a rerun into the same folder reuses every row: no evaluation, same results
    again = CountingJudge()
    res2 = run_sweep(
        model,
        tok,
        data(),
        again,
        RECIPES,
        [0.5, 1.0],
        str(tmp_path),
        max_new_tokens=3,
        progress=False,
        log=lambda s: None,
    )
    assert again.calls == 0
    assert [r["perplexity"] for r in res2["rows"][1:]] == [r["perplexity"] for r in rows[1:]]
    # a new strength evaluates only the new rows, reusing the fitted steerings; while it
    # evaluates, the file already holds every earlier row
    seen = []

    class Peeking(CountingJudge):
        def __call__(self, texts):
            seen.append(len(json.loads((tmp_path / "sweep.json").read_text())["rows"]))
            return super().__call__(texts)

    third = Peeking()
    run_sweep(
        model,
        tok,
        data(),
        third,
        RECIPES[:1],
        [0.5, 0.75],
        str(tmp_path),
        max_new_tokens=3,
        progress=False,
        log=lambda s: None,
    )
    assert third.calls == 1 and seen == [len(rows)]
    kept = json.loads((tmp_path / "sweep.json").read_text())
    assert len(kept["rows"]) == len(rows) + 1  # earlier rows stay in the front
    # other evaluation settings in the same folder are refused, not overwritten
    other = data()
    other.prompts = other.prompts[:2]
    with pytest.raises(ValueError, match="n_prompts"):
        run_sweep(
            model,
            tok,
            other,
            third,
            RECIPES[:1],
            [0.5],
            str(tmp_path),
            max_new_tokens=3,
            progress=False,
            log=lambda s: None,
        )
    assert json.loads((tmp_path / "sweep.json").read_text()) == kept


def test_pareto_front_and_target():
    rows = [
        {"perplexity": 10, "toxicity_mean_prob": 0.2, "toxicity_rate": 0.1},  # base
        {"perplexity": 10.5, "toxicity_mean_prob": 0.08, "toxicity_rate": 0.05},
        {"perplexity": 12, "toxicity_mean_prob": 0.09, "toxicity_rate": 0.0},  # beaten by 1
        {"perplexity": 30, "toxicity_mean_prob": 0.01, "toxicity_rate": 0.0},
        {"perplexity": 9.9, "toxicity_mean_prob": 0.3, "toxicity_rate": 0.2},
    ]
    assert pareto_front(rows) == [4, 0, 1, 3]
    base = rows[0]
    assert meets_target(rows[1], base, 2.0, 0.10)
    assert not meets_target(rows[3], base, 2.0, 0.10)  # perplexity +200%
    assert not meets_target(rows[2], base, 2.0, 0.10)  # +20%
    assert not meets_target({**rows[1], "toxicity_rate": 0.2}, base, 2.0, 0.10)  # rate rose


@pytest.mark.parametrize(
    "recipe, words",
    [
        (Recipe("lineas", PATTERN, n_train=100), "n_train=100"),
        (Recipe("nope", PATTERN), "method"),
        (Recipe("lineas", PATTERN, sparsity=-1.0), "sparsity"),
        (Recipe("lineas", PATTERN, gates="pixel"), "gates"),
    ],
)
def test_bad_recipes_are_refused_before_any_work(recipe, words):
    with pytest.raises(ValueError, match=words):
        check_recipes([recipe], data())


def test_recipe_keys_name_what_changes_the_steering():
    a = Recipe("mean_shift", PATTERN, n_train=8)
    assert a.key() == Recipe("mean_shift", PATTERN, n_train=8, sparsity=0.3, steps=7).key()
    assert a.key() != Recipe("mean_shift", PATTERN, n_train=16).key()
    assert Recipe(steps=10).key() != Recipe(steps=20).key()
    # the default lr is recorded as its number: a recipe fitted under an older default keeps
    # its own key and label when the default changes
    default = TrainConfig(optimizer="adam").resolved_lr()
    assert Recipe().settings()["lr"] == default
    assert Recipe().key() == Recipe(lr=default).key() != Recipe(lr=default * 3).key()
    assert f"adam {default:g}" in Recipe().label()


def test_sweep_cli_refuses_bad_recipes_file(tmp_path, capsys):
    bad = tmp_path / "recipes.json"
    bad.write_text(json.dumps([{"method": "lineas", "steps": 0}]))
    assert main(["sweep", "--recipes", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--recipes" in err and "item 0" in err and "steps" in err
    assert main(["sweep", "--loss-modules", "(", "--out", str(tmp_path / "o")]) == 2
    assert "--loss-modules" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sweep_cli_axes_make_the_product():
    from lineas_fast.cli import build_parser
    from lineas_fast.cli.sweep import recipes_from_args

    args = build_parser().parse_args(
        ["sweep", "--sparsity", "0", "0.1", "--n-train", "32", "64", "--methods", "lineas", "mean_shift"]
    )
    recipes = recipes_from_args(args)
    assert len([r for r in recipes if r.method == "lineas"]) == 4
    # without --modules the baselines run at the family's norms and at the attention outputs
    shift = [r for r in recipes if r.method == "mean_shift"]
    assert (
        sorted({r.modules for r in shift}) == [r".*o_proj", r".*post_attention_layernorm"] and len(shift) == 4
    )
    assert {r.modules for r in recipes if r.method == "lineas"} == {r".*post_attention_layernorm"}
    iti = recipes_from_args(build_parser().parse_args(["sweep", "--methods", "iti_c"]))
    assert [(r.method, r.modules) for r in iti] == [("iti_c", r".*o_proj")]
    given = recipes_from_args(build_parser().parse_args(["sweep", "--methods", "iti_c", "--modules", "a"]))
    assert [r.modules for r in given] == ["a"]
