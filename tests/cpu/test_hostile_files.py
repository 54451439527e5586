"""Every file lineas_fast reads is untrusted input: hostile steering files, edited training
checkpoints, corrupt GGUF files and tampered sweep caches and results are refused before use,
with an error of the documented type naming the file and the culprit (key, tensor or field),
and nothing is written (outputs absent, earlier files byte-identical). The inputs are real:
safetensors written by the safetensors library (or by hand where the library refuses to write
the damage), checkpoints written by a real training run and edited with torch.save, GGUF files
written by the gguf package, sweeps run on a tiny model. Memory bombs are measured: the
refusal's peak RSS in a fresh process stays far below the declared size."""

import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import NORMS, SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.training.checkpoints import CheckpointError, read_checkpoint

FORMAT = "lineas_fast.steering"
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listing(folder) -> dict:
    """{name: bytes} of every file in ``folder``: what a refusal must leave unchanged."""
    names = sorted(os.listdir(folder))
    return {
        p: open(os.path.join(folder, p), "rb").read() if os.path.isfile(os.path.join(folder, p)) else "dir"
        for p in names
    }


# --- steering files --------------------------------------------------------------------------
def st_file(path, tensors=None, modules=("a",), **header):
    """A steering-shaped safetensors file written by the safetensors library."""
    tensors = tensors if tensors is not None else {"a.omega": torch.ones(4), "a.bias": torch.zeros(4)}
    meta = {"format": FORMAT, "modules": json.dumps(list(modules)), **header}
    save_file(tensors, str(path), metadata=meta)


def raw_file(path, header: dict, data: bytes = b"", declared_len=None):
    """A safetensors file written by hand (damage the library refuses to write)."""
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if declared_len is None else declared_len))
        f.write(blob)
        f.write(data)


def pair(dtype, value=1.0, d=4):
    return {
        "a.omega": torch.full((d,), value, dtype=torch.float64).to(dtype),
        "a.bias": torch.zeros(d, dtype=dtype),
    }


META = {"format": FORMAT, "modules": '["a"]'}
N_BOMB = 134_000_000


def _deep(n):
    return "[" * n + "]" * n


STEERING_CASES = {
    # name: (writer(path), words the message must hold)
    "metadata nested 10000 deep": (lambda p: st_file(p, metadata=_deep(10_000)), ["'metadata'", "nested"]),
    "modules nested 10000 deep": (
        lambda p: save_file(
            pair(torch.float32), str(p), metadata={"format": FORMAT, "modules": _deep(10_000)}
        ),
        ["'modules'", "nested"],
    ),
    "float8 map": (lambda p: st_file(p, pair(torch.float8_e4m3fn)), ["a.omega", "F8_E4M3"]),
    "float8 e5m2 map": (lambda p: st_file(p, pair(torch.float8_e5m2)), ["a.omega", "F8_E5M2"]),
    "int32 map": (lambda p: st_file(p, pair(torch.int32)), ["a.omega", "I32"]),
    "bool map": (lambda p: st_file(p, pair(torch.bool)), ["a.omega", "BOOL"]),
    "float64 beyond float32": (lambda p: st_file(p, pair(torch.float64, 1e300)), ["a.omega", "float32"]),
    "NaN map": (lambda p: st_file(p, pair(torch.float32, float("nan"))), ["'a'", "not finite"]),
    "omega and bias of other shapes": (
        lambda p: st_file(p, {"a.omega": torch.ones(4), "a.bias": torch.zeros(5)}),
        ["'a'", "(4,)", "(5,)"],
    ),
    "omega 2-D": (
        lambda p: st_file(p, {"a.omega": torch.ones(2, 2), "a.bias": torch.zeros(2, 2)}),
        ["'a'", "(d,)"],
    ),
    "bias missing": (lambda p: st_file(p, {"a.omega": torch.ones(4)}), ["a.bias", "missing"]),
    "dims disagree": (lambda p: st_file(p, dims='{"a": 7}'), ["a.omega", "'dims'"]),
    "model a string": (lambda p: st_file(p, metadata='{"model": "x"}'), ["'model'", "fingerprint"]),
    "metadata a list": (lambda p: st_file(p, metadata="[1, 2]"), ["'metadata'", "object"]),
    "modules empty": (lambda p: st_file(p, modules=()), ["'modules'"]),
    "module twice": (lambda p: st_file(p, modules=("a", "a")), ["'modules'", "twice"]),
    "gate without tensors": (lambda p: st_file(p, gates='{"a": "sigmoid"}'), ["a.gate_w", "missing"]),
    "gate c of 3 values": (
        lambda p: st_file(
            p,
            {**pair(torch.float32), "a.gate_w": torch.ones(4), "a.gate_c": torch.zeros(3)},
            gates='{"a": "sigmoid"}',
        ),
        ["gate for 'a'", "one value"],
    ),
    "header not JSON": (lambda p: open(p, "wb").write(struct.pack("<Q", 5) + b"{oops" + b"\0" * 8), ["JSON"]),
    "header length beyond the file": (
        lambda p: raw_file(p, {"__metadata__": META}, declared_len=1 << 40),
        ["header length"],
    ),
    "offsets beyond the file (134M-coordinate map in 4 KiB)": (
        lambda p: raw_file(
            p,
            {
                "__metadata__": META,
                "a.omega": {"dtype": "F32", "shape": [N_BOMB], "data_offsets": [0, 4 * N_BOMB]},
                "a.bias": {"dtype": "F32", "shape": [N_BOMB], "data_offsets": [4 * N_BOMB, 8 * N_BOMB]},
            },
            b"\0" * 4000,
        ),
        ["a.omega", "data section"],
    ),
    "shape disagrees with offsets": (
        lambda p: raw_file(
            p,
            {
                "__metadata__": META,
                "a.omega": {"dtype": "F32", "shape": [N_BOMB], "data_offsets": [0, 16]},
                "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
            },
            b"\0" * 32,
        ),
        ["a.omega", "bytes"],
    ),
    "overlapping tensors": (
        lambda p: raw_file(
            p,
            {
                "__metadata__": META,
                "a.omega": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "a.bias": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            b"\0" * 24,
        ),
        ["overlap", "a.bias"],
    ),
    "not a steering file": (
        lambda p: save_file({"x": torch.ones(2)}, str(p)),
        ["not a lineas_fast steering"],
    ),
}


@pytest.mark.parametrize("case", list(STEERING_CASES))
def test_hostile_steering_file_refused(tmp_path, case):
    write, words = STEERING_CASES[case]
    path = tmp_path / "hostile.safetensors"
    write(path)
    before = listing(tmp_path)
    with pytest.raises(ValueError) as err:
        lf.Steering.load(str(path))
    msg = str(err.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert listing(tmp_path) == before  # nothing written, the file untouched


def test_float64_map_within_float32_is_cast(tmp_path):
    path = tmp_path / "f64.safetensors"
    st_file(path, pair(torch.float64, 0.5))
    st = lf.Steering.load(str(path))
    assert st["a"][0].dtype == torch.float32 and torch.equal(st["a"][0], torch.full((4,), 0.5))


BOMB = """
import json, resource, struct, sys
import lineas_fast as lf
path, n, sparse = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
meta = {"format": "lineas_fast.steering", "modules": '["a"]', "dims": json.dumps({"a": n})}
head = json.dumps({"__metadata__": meta,
    "a.omega": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
    "a.bias": {"dtype": "F32", "shape": [n], "data_offsets": [4 * n, 8 * n]}}).encode()
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head)
    if sparse:
        f.truncate(8 + len(head) + 8 * n)  # the declared size, as a hole: ~4 KiB on disk
    else:
        f.write(b"\\0" * 4000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    lf.Steering.load(path)
    print("LOADED")
except ValueError as e:
    print("REFUSED", e)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-hole", "truncated"])
def test_steering_memory_bomb_refused_without_allocating(tmp_path, sparse):
    """A 134M-coordinate map (1 GB declared, 4 KiB on disk) is refused from its header: the
    peak RSS of the refusing process grows by less than 32 MiB (its tensors would be 1 GB)."""
    path = tmp_path / "bomb.safetensors"
    out = subprocess.run(
        [sys.executable, "-c", BOMB, str(path), str(N_BOMB), "1" if sparse else "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "REFUSED" in out.stdout and str(path) in out.stdout, out.stdout + out.stderr
    assert "a.omega" in out.stdout
    growth_kb = int(out.stdout.split("GROWTH_KB")[1])
    assert growth_kb < 32 * 1024, growth_kb
    assert os.path.getsize(path) < 4 * N_BOMB or sparse


SAVE_CASES = {
    "model a string": ({"model": "x"}, ValueError, ["'model'", "fingerprint"]),
    "model a list": ({"model": [1, 2]}, ValueError, ["'model'"]),
    "a tensor value": ({"extra": torch.ones(2)}, TypeError, ["['extra']", "Tensor"]),
    "an object value": ({"extra": object()}, TypeError, ["['extra']", "object"]),
    "a non-string key": ({"extra": {1.5: "x"}}, ValueError, ["non-string key"]),
    "nested 100 deep": ({"extra": json.loads(_deep(100))}, ValueError, ["nested"]),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_refuses_metadata_load_would_refuse_and_keeps_the_old_file(tmp_path, case):
    meta, error, words = SAVE_CASES[case]
    path = tmp_path / "good.safetensors"
    good = lf.Steering({"a": (torch.ones(4), torch.zeros(4))}, {"note": "the good one"})
    good.save(str(path))
    before = listing(tmp_path)
    with pytest.raises((ValueError, TypeError)) as err:
        good.save(str(path), **meta)
    assert isinstance(err.value, error) or (error is ValueError and isinstance(err.value, TypeError))
    msg = str(err.value)
    assert str(path) in msg and all(w in msg for w in words), msg
    assert listing(tmp_path) == before  # the old file byte for byte, no temporary left
    assert lf.Steering.load(str(path)).metadata == {"note": "the good one"}


def test_saved_metadata_round_trips(tmp_path):
    path = tmp_path / "s.safetensors"
    st = lf.Steering({"a": (torch.ones(4), torch.zeros(4))})
    st.save(str(path), model={"model_type": "llama"}, n=np.int64(3), x=np.float32(0.5), p=tmp_path)
    meta = lf.Steering.load(str(path)).metadata
    assert meta == {"model": {"model_type": "llama"}, "n": 3, "x": 0.5, "p": str(tmp_path)}


# --- training checkpoints ----------------------------------------------------------------------
STEPS = 4
KW = dict(
    modules=NORMS["llama"], steps=STEPS, batch_size=4, optimizer="adam", lr=0.05, progress=False, seed=3
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: a 2-step run of a 4-step training on the tiny llama."""
    path = tmp_path_factory.mktemp("ck") / "run.pt"
    with lf.Trainer(
        tiny_model("llama"),
        tiny_tokenizer(),
        SOURCE,
        TARGET,
        checkpoint_every=2,
        checkpoint_path=str(path),
        **KW,
    ) as run:
        run.step()
        run.step()
    return torch.load(path, weights_only=True), str(path)


def first_map(state):
    return next(iter(state["maps"]))


def _set(key, value):
    def edit(s):
        s[key] = value

    return edit


def _map(fn):
    def edit(s):
        m = first_map(s)
        s["maps"][m] = fn(*s["maps"][m])

    return edit


def _adam(key, fn):
    def edit(s):
        s["optimizer"]["state"][0][key] = fn(s["optimizer"]["state"][0][key])

    return edit


def _sched(key, value):
    def edit(s):
        s["scheduler"][key] = value

    return edit


def _hist(fn):
    def edit(s):
        fn(s["history"])

    return edit


CHECKPOINT_CASES = {
    "negative step": (_set("step", -3), ["step", "-3"]),
    "step beyond the run": (_set("step", STEPS + 5), ["step", str(STEPS + 5)]),
    "step a string": (_set("step", "2"), ["step", "integer"]),
    "step a bool": (_set("step", True), ["step", "integer"]),
    "maps a string": (_set("maps", "oops"), ["maps", "str"]),
    "map omega of another shape": (
        _map(lambda om, b: (torch.ones(om.shape[0] + 3), b)),
        ["maps[", "omega", "shape"],
    ),
    "map bias float64": (_map(lambda om, b: (om, b.double())), ["maps[", "bias", "dtype"]),
    "map omega NaN": (_map(lambda om, b: (torch.full_like(om, float("nan")), b)), ["omega", "not finite"]),
    "map a single tensor": (_map(lambda om, b: (om,)), ["maps[", "pair"]),
    "map omega stride-0 giant": (
        _map(lambda om, b: (torch.ones(1).expand(om.shape[0]), b)),
        ["omega", "contiguous"],
    ),
    "gates on an ungated run": (_set("gates", {"x": (torch.ones(2), torch.ones(1))}), ["gates", "no gates"]),
    "optimizer a string": (_set("optimizer", "adam"), ["optimizer", "str"]),
    "adam exp_avg of another shape": (
        _adam("exp_avg", lambda t: torch.zeros(t.numel() + 1)),
        ["exp_avg", "shape"],
    ),
    "adam exp_avg_sq negative": (
        _adam("exp_avg_sq", lambda t: -torch.ones_like(t)),
        ["exp_avg_sq", "negative"],
    ),
    "adam exp_avg Inf": (
        _adam("exp_avg", lambda t: torch.full_like(t, float("inf"))),
        ["exp_avg", "not finite"],
    ),
    "adam step count beyond": (_adam("step", lambda t: torch.tensor(1e9)), ["optimizer.state[0].step"]),
    "adam unknown entry": (lambda s: s["optimizer"]["state"][0].update(evil=1), ["evil"]),
    "optimizer one parameter too many": (
        lambda s: s["optimizer"]["param_groups"][0]["params"].append(999),
        ["param_groups[0].params"],
    ),
    "optimizer betas edited": (
        lambda s: s["optimizer"]["param_groups"][0].update(betas=(0.5, 0.5)),
        ["param_groups[0].betas"],
    ),
    "optimizer lr NaN": (
        lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")),
        ["param_groups[0].lr"],
    ),
    "scheduler a string": (_set("scheduler", "cosine"), ["scheduler", "str"]),
    "scheduler last_epoch off": (_sched("last_epoch", 99), ["scheduler.last_epoch"]),
    "scheduler extra key": (_sched("optimizer", "x"), ["scheduler.optimizer"]),
    "scheduler lr_lambdas state": (_sched("lr_lambdas", ["x"]), ["scheduler.lr_lambdas"]),
    "scheduler base_lrs a string": (_sched("base_lrs", "0.1"), ["scheduler.base_lrs"]),
    "RNG state truncated": (
        lambda s: s.update(generator=s["generator"][:100].clone()),
        ["generator", "shape"],
    ),
    "RNG state float": (lambda s: s.update(generator=s["generator"].float()), ["generator", "dtype"]),
    "RNG state a string": (_set("generator", "seed 3"), ["generator", "tensor"]),
    "history a string": (_set("history", "none"), ["history", "list"]),
    "history too short": (_hist(lambda h: h.pop()), ["history", "records"]),
    "history record edited": (_hist(lambda h: h[0].update(loss="low")), ["history[0].loss"]),
    "config a string": (_set("config", "defaults"), ["config", "object"]),
    "data digest a string": (lambda s: s["data"].update(source="abc"), ["data.source", "object"]),
    "marker missing": (lambda s: s.pop("format"), ["marker"]),
    "field missing": (lambda s: s.pop("optimizer"), ["optimizer", "missing"]),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_edited_checkpoint_refused_before_training(tmp_path, checkpoint, case):
    import copy

    edit, words = CHECKPOINT_CASES[case]
    state = copy.deepcopy(checkpoint[0])
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    out = tmp_path / "out.pt"
    before = listing(tmp_path)
    with pytest.raises(ValueError) as err:
        lf.train(
            tiny_model("llama"),
            tiny_tokenizer(),
            SOURCE,
            TARGET,
            resume_from=str(path),
            checkpoint_path=str(out),
            checkpoint_every=1,
            **KW,
        )
    msg = str(err.value)
    assert str(path) in msg and all(w in msg for w in words), msg
    assert not out.exists() and listing(tmp_path) == before


def test_the_unedited_checkpoint_resumes(tmp_path, checkpoint):
    """The control: the same path through torch.save resumes (the edits above are the cause)."""
    path = tmp_path / "same.pt"
    torch.save(checkpoint[0], path)
    st = lf.train(tiny_model("llama"), tiny_tokenizer(), SOURCE, TARGET, resume_from=str(path), **KW)
    assert len(st.metadata["history"]) == STEPS


def _deflated_copy(src, dst, extra_mib=0):
    """The checkpoint's archive with every entry deflated, plus an entry of ``extra_mib`` MiB of
    zeros (a few hundred KiB compressed)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        prefix = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        if extra_mib:
            with zout.open(f"{prefix}/data/999", "w") as f:
                chunk = b"\0" * (1 << 20)
                for _ in range(extra_mib):
                    f.write(chunk)


def test_compressed_checkpoint_refused_from_the_zip_directory(tmp_path, checkpoint):
    path = tmp_path / "deflated.pt"
    _deflated_copy(checkpoint[1], path)
    with pytest.raises(CheckpointError, match="compressed") as err:
        read_checkpoint(str(path))
    assert str(path) in str(err.value) and "archive entry" in str(err.value)


INFLATE = """
import resource, sys
from lineas_fast.training.checkpoints import read_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    try:
        read_checkpoint(sys.argv[1])
        print("LOADED")
    except ValueError as e:
        print("REFUSED", e)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_inflating_checkpoint_refused_without_inflating(tmp_path, checkpoint):
    """A checkpoint that inflates to 512 MiB (about 0.5 MiB on disk), read twice: both refused,
    the process's peak RSS grows by less than 32 MiB."""
    path = tmp_path / "inflating.pt"
    _deflated_copy(checkpoint[1], path, extra_mib=512)
    assert os.path.getsize(path) < 4 << 20
    out = subprocess.run(
        [sys.executable, "-c", INFLATE, str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.stdout.count("REFUSED") == 2 and str(path) in out.stdout, out.stdout + out.stderr
    assert int(out.stdout.split("GROWTH_KB")[1]) < 32 * 1024


def test_checkpoint_read_once_for_the_cli_and_the_library(tmp_path, checkpoint):
    """The CLI's early check keeps what it read; the library's read takes it (the same object,
    not a second load); a file changed in between is read again."""
    path = tmp_path / "ck.pt"
    torch.save(checkpoint[0], path)
    first = read_checkpoint(str(path), keep=True)
    assert read_checkpoint(str(path)) is first
    assert read_checkpoint(str(path)) is not first  # handed over once only
    read_checkpoint(str(path), keep=True)
    torch.save({**checkpoint[0], "step": 1, "history": checkpoint[0]["history"][:1]}, path)
    assert read_checkpoint(str(path))["step"] == 1


# --- GGUF inputs ----------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")


def _corrupt_offset(path, name, fn):
    """Rewrite tensor ``name``'s data offset in place (the tensor-info field of the file)."""
    reader = gguf.GGUFReader(str(path), "r+")
    tensors = {t.name: t for t in reader.tensors}
    tensors[name].field.parts[-1][0] = fn(tensors, reader)
    reader.data.flush()
    del reader


GGUF_CASES = {
    "offset into another tensor": (
        lambda ts, r: ts["blk.0.attn_norm.weight"].field.parts[-1][0],
        ["overlap", "blk.0.ffn_norm.weight", "blk.0.attn_norm.weight"],
    ),
    "offset not aligned": (
        lambda ts, r: int(ts["blk.0.ffn_norm.weight"].field.parts[-1][0]) + 4,
        ["blk.0.ffn_norm.weight", "alignment"],
    ),
    "offset past the end": (lambda ts, r: 1 << 40, ["GGUF"]),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_corrupt_gguf_offsets_refused_before_folding(tmp_path, case):
    from test_gguf_fold import steering, write_tiny_gguf

    offset, words = GGUF_CASES[case]
    src = write_tiny_gguf(tmp_path / "in.gguf")
    _corrupt_offset(src, "blk.0.ffn_norm.weight", offset)
    before = listing(tmp_path)
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError) as err:
        lf.fuse_gguf(src, steering(["model.layers.0.input_layernorm"]), out_gguf=str(out), strict=False)
    msg = str(err.value)
    assert src in msg and all(w in msg for w in words), msg
    assert not out.exists() and listing(tmp_path) == before


# --- sweep caches and results ---------------------------------------------------------------------
def sweep_data():
    from lineas_fast.apps.sweep import SweepData

    return SweepData(
        SOURCE[:4], TARGET[:4], prompts=["you are a", "go away"], wiki=["the cat sat on the mat"]
    )


def run_small_sweep(model, out_dir, judge_calls=None):
    from lineas_fast.apps.sweep import Recipe, run_sweep

    def judge(texts):
        if judge_calls is not None:
            judge_calls.append(len(texts))
        return [0.0 for _ in texts]

    recipe = Recipe("mean_shift", NORMS["llama"], n_train=4)
    res = run_sweep(
        model,
        tiny_tokenizer(),
        sweep_data(),
        judge,
        [recipe],
        [1.0],
        str(out_dir),
        max_new_tokens=2,
        progress=False,
        log=lambda s: None,
    )
    return res, recipe


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    run_small_sweep(tiny_model("llama"), folder)
    return folder


def test_cached_fit_reused_by_content_not_by_name(tmp_path, sweep_dir):
    """A fitted steering under the recipe's file name, but fitted on another model, is not
    reused: the sweep refits and replaces it; the same model's file is reused as it is."""
    import shutil

    from lineas_fast.apps.sweep import Recipe

    recipe = Recipe("mean_shift", NORMS["llama"], n_train=4)
    name = os.path.join("steerings", recipe.key() + ".safetensors")
    os.makedirs(tmp_path / "steerings")
    shutil.copy(sweep_dir / name, tmp_path / name)  # fitted on tiny_model("llama", seed=0)
    planted = (tmp_path / name).read_bytes()
    run_small_sweep(tiny_model("llama", seed=1), tmp_path)  # another model, same architecture
    refit = lf.Steering.load(str(tmp_path / name))
    assert (tmp_path / name).read_bytes() != planted
    assert (
        refit.metadata["sweep_fit_key"] != lf.Steering.load(str(sweep_dir / name)).metadata["sweep_fit_key"]
    )
    stamp = os.stat(tmp_path / name).st_mtime_ns
    os.remove(tmp_path / "sweep.json")
    run_small_sweep(tiny_model("llama", seed=1), tmp_path)  # same model: reused
    assert os.stat(tmp_path / name).st_mtime_ns == stamp


def _rows(edit):
    def write(path):
        results = json.loads(path.read_text())
        edit(results)
        path.write_text(json.dumps(results))

    return write


SWEEP_CASES = {
    "not JSON": (lambda p: p.write_text('{"settings": '), ["not valid JSON"]),
    "nested 10000 deep": (lambda p: p.write_text(_deep(10_000)), ["nested"]),
    "not UTF-8": (lambda p: p.write_bytes(b"\xff\xfe{}"), ["UTF-8"]),
    "a list": (lambda p: p.write_text("[]"), ["'settings'"]),
    "rows a string": (_rows(lambda r: r.update(rows="all")), ["'rows'"]),
    "row perplexity a string": (
        _rows(lambda r: r["rows"][1].update(perplexity="low")),
        ["rows[1]", "perplexity"],
    ),
    "row strength missing": (_rows(lambda r: r["rows"][1].pop("strength")), ["rows[1]", "strength"]),
    "row method unknown": (_rows(lambda r: r["rows"][1].update(method="magic")), ["rows[1]", "method"]),
    "row settings missing": (_rows(lambda r: r["rows"][1].pop("settings")), ["rows[1]", "settings"]),
    "row a number": (_rows(lambda r: r["rows"].append(3)), ["rows[2]"]),
}


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_tampered_sweep_results_refused_and_kept(tmp_path, sweep_dir, case):
    import shutil

    write, words = SWEEP_CASES[case]
    folder = tmp_path / "sweep"
    shutil.copytree(sweep_dir, folder)
    write(folder / "sweep.json")
    before = {p: listing(folder / p) for p in ("", "steerings")}
    calls = []
    with pytest.raises(ValueError) as err:
        run_small_sweep(tiny_model("llama"), folder, calls)
    msg = str(err.value)
    assert str(folder / "sweep.json") in msg and all(w in msg for w in words), msg
    assert calls == [] and {p: listing(folder / p) for p in ("", "steerings")} == before


def test_sweep_of_another_model_under_the_same_name_is_not_reused(tmp_path, sweep_dir):
    import shutil

    folder = tmp_path / "sweep"
    shutil.copytree(sweep_dir, folder)
    before = listing(folder)
    with pytest.raises(ValueError, match="model_sha256") as err:
        run_small_sweep(tiny_model("llama", seed=1), folder)
    assert "other settings" in str(err.value) and listing(folder) == before
