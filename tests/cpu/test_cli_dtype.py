"""``--dtype``: every command that loads a model keeps the checkpoint's own floating type unless
told otherwise (``lineas_fast/cli/dtypes.py``). ``fuse`` of a bfloat16 folder writes bfloat16
tensors of the input's size that compute what the hooks compute on the bfloat16 model; the
fold's range checks use the type the model is loaded in; ``train`` runs in bfloat16 with float32
maps, under torchrun with ``--fsdp`` too (the ranks built on the meta device included)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import lineas_fast as lf
from lineas_fast.cli import bench, build_parser, main
from lineas_fast.cli.common import load_model, load_model_or_pipeline, load_pipeline
from lineas_fast.cli.dtypes import config_dtype, pipeline_dtype, resolve_dtype
from lineas_fast.cli.errors import CLIError

NORM = NORMS["llama"]
BF16_EPS = 2.0**-8
# what an outer torchrun sets: never inherited by the jobs started here
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def save(folder, dtype, config_edit=None):
    model = tiny_model("llama").to(dtype)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if config_edit is not None:
        cfg = json.loads((folder / "config.json").read_text())
        config_edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def steering_for(model, scale=0.3, seed=0):
    names = [n for n, _ in model.named_modules() if __import__("re").fullmatch(NORM, n)]
    g = torch.Generator().manual_seed(seed)
    maps = {
        n: (1 + scale * torch.randn(32, generator=g), scale * torch.randn(32, generator=g)) for n in names
    }
    return lf.Steering(maps, {"model": lf.model_fingerprint(model)})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("dtypes")
    out = {name: save(d / name, getattr(torch, name)) for name in ("float32", "bfloat16", "float16")}
    out["unnamed"] = save(
        d / "unnamed", torch.float32, lambda c: (c.pop("dtype", None), c.pop("torch_dtype", None))
    )
    out["torch_dtype"] = save(
        d / "torch_dtype", torch.bfloat16, lambda c: c.update(torch_dtype=c.pop("dtype"))
    )  # the key transformers < 4.56 writes
    out["prefixed"] = save(d / "prefixed", torch.bfloat16, lambda c: c.update(dtype="torch.bfloat16"))
    out["float64"] = save(d / "float64", torch.float32, lambda c: c.update(dtype="float64"))
    steering_for(tiny_model("llama"), scale=1.0).save(str(d / "s.safetensors"))
    (d / "src.txt").write_text("\n".join(SOURCE) + "\n")
    (d / "tgt.txt").write_text("\n".join(TARGET) + "\n")
    out["steering"], out["src"], out["tgt"] = str(d / "s.safetensors"), str(d / "src.txt"), str(d / "tgt.txt")
    return out


# --- which type each value of --dtype gives ------------------------------------------------------
@pytest.mark.parametrize(
    "folder,given,expected",
    [
        ("float32", None, "float32"),
        ("bfloat16", None, "bfloat16"),
        ("float16", "auto", "float16"),
        ("unnamed", None, "float32"),
        ("torch_dtype", None, "bfloat16"),
        ("prefixed", None, "bfloat16"),
        ("bfloat16", "float32", "float32"),
        ("float32", "bfloat16", "bfloat16"),
        ("float64", "float32", "float32"),  # an explicit type needs nothing from the config
    ],
)
def test_resolved_dtype(folders, folder, given, expected):
    assert resolve_dtype(given, folders[folder]) == expected


def test_auto_refuses_a_type_it_does_not_load(folders):
    with pytest.raises(CLIError, match=r"--dtype auto: --model .* names dtype 'float64'.*give --dtype"):
        config_dtype(folders["float64"])


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["train"], torch.bfloat16),
        (["train", "--dtype", "float32"], torch.float32),
        (["train", "--dtype", "float16"], torch.float16),
        (["fuse"], torch.bfloat16),
        (["fuse", "--dtype", "float32"], torch.float32),
    ],
)
def test_train_and_fuse_load_the_type_asked_for(folders, argv, expected):
    extra = ["--source", "x", "--target", "x"] if argv[0] == "train" else ["--steering", "x"]
    args = build_parser().parse_args([*argv, "--model", folders["bfloat16"], *extra, "--out", "o"])
    model, _ = load_model_or_pipeline(args)
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("folder,expected", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_ranks_built_on_the_meta_device_get_the_same_type(folders, folder, expected):
    """Under torchrun --fsdp the ranks other than 0 build the model from its config: in the type
    rank 0 reads, or its shards would not match."""
    model, _ = load_model(folders[folder], None, on_meta=True)
    read, _ = load_model(folders[folder], None)
    assert all(p.is_meta for p in model.parameters())
    assert [(n, p.dtype) for n, p in model.named_parameters()] == [
        (n, p.dtype) for n, p in read.named_parameters()
    ]
    assert {p.dtype for p in read.parameters()} == {expected}


@pytest.mark.parametrize(
    "given,expected", [(None, "bfloat16"), ("float16", "float16"), ("float32", "float32")]
)
def test_bench_measures_the_checkpoints_type_by_default(folders, tmp_path, given, expected):
    argv = ["bench", "--model", folders["bfloat16"], "--steering", folders["steering"], "--device", "cpu"]
    argv += ["--out", str(tmp_path / "b.json")] + (["--dtype", given] if given else [])
    assert bench.check_args(build_parser().parse_args(argv))[1] == expected


# --- fuse writes what it read ----------------------------------------------------------------------
def logits(model, tok):
    enc = tok(["hello there", "a b c"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.double()


def stored(folder) -> dict:
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_fuse_of_a_bfloat16_folder_writes_bfloat16_that_computes_the_hooks(folders, tmp_path, capsys):
    src, out = folders["bfloat16"], str(tmp_path / "fused")
    assert main(["fuse", "--model", src, "--steering", folders["steering"], "--out", out]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert set(stored(out).values()) == {"BF16"} and set(stored(src).values()) == {"BF16"}
    assert json.loads(open(os.path.join(out, "config.json")).read())["dtype"] == "bfloat16"
    size_in = os.path.getsize(os.path.join(src, "model.safetensors"))
    size_out = os.path.getsize(os.path.join(out, "model.safetensors"))
    assert size_in <= size_out <= 1.05 * size_in  # the readers' new biases only, not float32's 2x
    tok, steering = tiny_tokenizer(), lf.Steering.load(folders["steering"])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    plain = logits(model, tok)
    with steering.apply(model, strength=1.0):
        hooked = logits(model, tok)
    fused = logits(AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval(), tok)
    exact = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()  # the same weights
    with steering.apply(exact, strength=1.0):
        oracle = logits(exact, tok)  # float64 arithmetic: the oracle
    bound = 4 * BF16_EPS * float(oracle.abs().max())  # a few bfloat16 roundings of the logits
    for got in (fused, hooked):
        assert float((got - oracle).abs().max()) <= bound
    assert float((fused - hooked).abs().max()) <= bound
    assert float((hooked - plain).abs().max()) > 10 * bound  # and the steering shows


def test_fuse_can_be_told_another_type(folders, tmp_path, capsys):
    out = str(tmp_path / "fused32")
    argv = ["fuse", "--model", folders["bfloat16"], "--steering", folders["steering"], "--out", out]
    assert main([*argv, "--dtype", "float32"]) == 0
    assert set(stored(out).values()) == {"F32"}


@pytest.mark.parametrize("dtype,code", [(None, 2), ("float32", 0)])
def test_the_folds_range_check_uses_the_type_loaded(folders, tmp_path, capsys, dtype, code):
    """A scale of 301 fits float32 activations but not float16 ones (bound 255.9): a float16
    folder is refused as float16, and folds when loaded as float32."""
    model = tiny_model("llama")
    big = steering_for(model, scale=0.0)
    first = big.modules[0]
    om, b = big[first]
    om = om.clone()
    om[5] = 301.0
    path = str(tmp_path / "big.safetensors")
    lf.Steering({**{n: big[n] for n in big.modules}, first: (om, b)}, big.metadata).save(path)
    out = str(tmp_path / "out")
    argv = ["fuse", "--model", folders["float16"], "--steering", path, "--out", out]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == code
    err = capsys.readouterr().err
    if code:
        assert "301 at coordinate 5" in err and "the bound for float16 activations" in err
        assert not os.path.exists(out)
    else:
        assert set(stored(out).values()) == {"F32"}


# --- the other commands ------------------------------------------------------------------------------
def test_train_in_bfloat16_keeps_float32_maps(folders):
    model = AutoModelForCausalLM.from_pretrained(folders["bfloat16"], dtype="auto").eval()
    with lf.Trainer(
        model, tiny_tokenizer(), SOURCE, TARGET, modules=NORM, steps=2, batch_size=4, progress=False
    ) as run:
        run.step()
        run.step()
    assert {t.dtype for pair in run.maps.values() for t in pair} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(r.loss == r.loss for r in run.history)


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_generate_runs_in_the_type_asked_for(folders, capsys, dtype):
    argv = ["generate", "--model", folders["bfloat16"], "--steering", folders["steering"], "--prompt", "hi"]
    argv += ["--max-new-tokens", "2"] + (["--dtype", dtype] if dtype else [])
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prompt"] == "hi"


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["generate", "--model", "float64", "--steering", "missing.safetensors", "--prompt", "hi"],
            "lineas-fast generate: error: --dtype auto: --model",
        ),
        (
            ["fuse", "--gguf", "missing.gguf", "--steering", "s", "--out", "o.gguf", "--dtype", "bfloat16"],
            "lineas-fast fuse: error: --dtype bfloat16 applies to --model and --pipeline folders",
        ),
        (
            ["train", "--model", "m", "--source", "s", "--target", "t", "--out", "o", "--dtype", "int8"],
            "invalid choice",
        ),
    ],
    ids=["auto-float64", "gguf", "bad-choice"],
)
def test_refused_dtypes(folders, tmp_path, capsys, argv, message):
    """Refused before any file but the config is read (the steering and GGUF here do not exist)."""
    argv = [folders.get(a, a) if a == "float64" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_pipeline_loads_in_the_type_of_its_unet_weights(tmp_path):
    from tiny_pipeline import tiny_pipeline

    folder = str(tmp_path / "pipe")
    tiny_pipeline().to(torch.bfloat16).save_pretrained(folder)
    assert pipeline_dtype(folder) == "bfloat16"
    for given, expected in ((None, torch.bfloat16), ("float32", torch.float32)):
        pipe = load_pipeline(folder, dtype=given)
        assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {expected}
    assert pipeline_dtype(str(tmp_path)) == "float32"  # no UNet weights: float32


# --- under torchrun with --fsdp ------------------------------------------------------------------
def test_train_under_torchrun_with_fsdp_runs_in_the_checkpoints_type(folders, tmp_path):
    flags = ["train", "--model", folders["bfloat16"], "--source", folders["src"], "--target", folders["tgt"]]
    flags += ["--modules", NORM, "--steps", "3", "--batch-size", "4", "--optimizer", "sgd", "--lr", "0.1"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = tmp_path / "cli.py"
    script.write_text("import sys\nfrom lineas_fast.cli import main\nsys.exit(main())\n")
    runs = {
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
        ],
        "one": [sys.executable, str(script)],
        "one32": [sys.executable, str(script)],
    }
    for name, cmd in runs.items():
        more = ["--fsdp"] if name == "two" else ["--dtype", "float32"] if name == "one32" else []
        proc = subprocess.run(
            [*cmd, *flags, *more, "--out", str(tmp_path / f"{name}.safetensors")],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    maps = {name: lf.Steering.load(str(tmp_path / f"{name}.safetensors")) for name in runs}
    assert maps["two"].metadata["fsdp"] is True

    def gap(a, b):
        return max(float((x - y).abs().max()) for m in a.modules for x, y in zip(a[m], b[m]))

    # the two ranks trained what one bfloat16 process trains, not what a float32 one does
    close, apart = gap(maps["two"], maps["one"]), gap(maps["one"], maps["one32"])
    assert close < 1e-5 and apart > 10 * max(close, 1e-7)
