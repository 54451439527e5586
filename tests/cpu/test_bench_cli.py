"""``lineas-fast bench`` on a tiny model: the JSON file's structure, positive finite rates, the
overhead arithmetic, providers that cannot run listed with their reason, and its user errors
(exit 2, one line, nothing written). No timing is asserted: CPU timings here are noise."""

import json
import math
import os

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.cli import main
from lineas_fast.serve.bench import add_overheads, measure, table

NORM = "model.layers.{}.post_attention_layernorm"
FAST = "--batch 1 2 --prompt-len 8 --new-tokens 3 --repeats 1 --vllm off"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    model = tiny_model("llama")
    model.save_pretrained(d / "model")
    tiny_tokenizer().save_pretrained(d / "model")
    g = torch.Generator().manual_seed(0)
    maps = {
        NORM.format(i): (1 + 0.1 * torch.randn(32, generator=g), 0.1 * torch.randn(32, generator=g))
        for i in range(3)
    }
    fp = lf.model_fingerprint(model)
    lf.Steering(maps, metadata={"model": fp}).save(str(d / "s.safetensors"))
    gates = {n: {"w": torch.zeros(32), "c": torch.zeros(1)} for n in maps}
    lf.Steering(maps, metadata={"model": fp}, gates=gates).save(str(d / "gated.safetensors"))
    lf.Steering({NORM.format(7): (torch.ones(32), torch.zeros(32))}).save(str(d / "other.safetensors"))
    return d


def run(cmd, capsys):
    code = main(cmd.split())
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_bench_writes_json_and_table(files, capsys):
    out = files / "b.json"
    code, stdout, err = run(
        f"bench --model {files}/model --steering {files}/s.safetensors --strength 0.5 {FAST} --out {out}",
        capsys,
    )
    assert code == 0, err
    data = json.loads(out.read_text())
    for key in (
        "device",
        "threads",
        "lineas_fast",
        "torch",
        "transformers",
        "python",
        "commit",
        "dtype",
        "model",
        "steering",
        "strength",
        "settings",
        "definitions",
        "results",
        "skipped",
    ):
        assert key in data, key
    assert data["dtype"] == "float32" and data["strength"] == 0.5
    assert data["settings"] == {"batches": [1, 2], "prompt_len": 8, "new_tokens": 3, "repeats": 1}
    rows = data["results"]
    assert [(r["provider"], r["batch"]) for r in rows] == [
        (p, b) for p in ("unsteered", "hooks", "fused_norms", "folded") for b in (1, 2)
    ]
    for r in rows:
        assert r["engine"] == "transformers"
        for k in ("prefill_tok_s", "decode_tok_s", "prefill_s", "generate_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["provider"], k)
        for k in ("prefill_overhead_pct", "decode_overhead_pct"):
            assert math.isfinite(r[k])
        want = (
            r["prefill_tok_s"]
            / next(u for u in rows if u["provider"] == "unsteered" and u["batch"] == r["batch"])[
                "prefill_tok_s"
            ]
        )
        assert r["prefill_vs_unsteered"] == pytest.approx(want)
        assert r["prefill_overhead_pct"] == pytest.approx((1 / want - 1) * 100)
    assert all(r["prefill_overhead_pct"] == 0 for r in rows if r["provider"] == "unsteered")
    assert set(data["skipped"]) == {"vllm_unsteered", "vllm_folded"}
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("engine"))
    assert lines[head].split()[:3] == ["engine", "provider", "batch"]
    assert set(lines[head + 1]) == {"-", " "}
    assert sum(line.startswith("transformers") for line in lines) == 8
    assert f"wrote {out}" in stdout
    assert not [p for p in os.listdir(files) if p.startswith(".lineas-tmp")]


def test_bench_lists_providers_a_gated_steering_cannot_use(files, capsys):
    out = files / "gated.json"
    one_batch = FAST.replace("--batch 1 2", "--batch 1")  # an option is given once
    code, stdout, err = run(
        f"bench --model {files}/model --steering {files}/gated.safetensors {one_batch} --out {out}",
        capsys,
    )
    assert code == 0, err
    data = json.loads(out.read_text())
    assert [r["provider"] for r in data["results"]] == ["unsteered", "hooks"]
    for p in ("fused_norms", "folded"):
        assert "per-token DSAS gate" in data["skipped"][p]
    assert "skipped folded" in stdout


def test_measure_takes_extra_providers_and_overheads_are_relative():
    model = tiny_model("llama")
    st = lf.Steering({NORM.format(0): (torch.full((32,), 1.2), torch.zeros(32))})
    rows, skipped = measure(
        model,
        st,
        batches=(1,),
        prompt_len=4,
        new_tokens=2,
        repeats=1,
        providers=("unsteered",),
        extra={"same_again": lambda: (model, lambda: None)},
        log=lambda s: None,
    )
    assert [r["provider"] for r in rows] == ["unsteered", "same_again"] and skipped == {}
    fake = [
        {"engine": "e", "provider": "unsteered", "batch": 1, "prefill_tok_s": 100.0, "decode_tok_s": 10.0},
        {"engine": "e", "provider": "x", "batch": 1, "prefill_tok_s": 80.0, "decode_tok_s": 5.0},
    ]
    add_overheads(fake)
    assert fake[1]["prefill_overhead_pct"] == pytest.approx(25.0)
    assert fake[1]["decode_overhead_pct"] == pytest.approx(100.0)
    assert "+25.0%" in table(fake)


ERRORS = [
    (
        "out-suffix",
        "bench --model {d}/model --steering {d}/s.safetensors --out {d}/b.txt",
        ["--out", ".json"],
    ),
    (
        "out-is-steering",
        "bench --model {d}/model --steering {d}/s.json --out {d}/s.json",
        ["--out", "--steering"],
    ),
    (
        "no-model",
        "bench --model {d}/absent --steering {d}/s.safetensors --out {d}/b.json",
        ["--model", "does not exist"],
    ),
    (
        "bad-steering",
        "bench --model {d}/model --steering {d}/model/config.json --out {d}/b.json",
        ["--steering", "config.json"],
    ),
    (
        "other-model",
        "bench --model {d}/model --steering {d}/other.safetensors --out {d}/b.json",
        ["--steering", "does not fit"],
    ),
    (
        "too-long",
        "bench --model {d}/model --steering {d}/s.safetensors --prompt-len 120 "
        "--new-tokens 20 --out {d}/b.json",
        ["--prompt-len", "max_position_embeddings=128"],
    ),
    (
        "batch-zero",
        "bench --model {d}/model --steering {d}/s.safetensors --batch 0 --out {d}/b.json",
        ["--batch", "0"],
    ),
    (
        "strength-inf",
        "bench --model {d}/model --steering {d}/s.safetensors --strength inf --out {d}/b.json",
        ["--strength", "inf"],
    ),
]
if not torch.cuda.is_available():
    ERRORS.append(
        (
            "no-cuda",
            "bench --model {d}/model --steering {d}/s.safetensors --device cuda --out {d}/b.json",
            ["--device cuda", "no CUDA"],
        )
    )
try:
    import vllm  # noqa: F401
except ImportError:
    ERRORS.append(
        (
            "no-vllm",
            "bench --model {d}/model --steering {d}/s.safetensors --vllm on --out {d}/b.json",
            ["--vllm on", "not importable"],
        )
    )


@pytest.mark.parametrize("case,cmd,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_bench_errors_are_one_line_exit_2(files, capsys, case, cmd, words):
    before = sorted(os.listdir(files))
    code, stdout, err = run(cmd.format(d=files), capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert sorted(os.listdir(files)) == before
