"""Outputs whose names are at or near the file-name limit (NAME_MAX, 255 bytes): every atomic
write keeps the destination's suffix in its temporary's name and fits the limit; a name over the
limit is refused before anything is written (the command line: before a model is loaded)."""

import errno
import os

import pytest
import torch
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast import atomic as io
from lineas_fast.cli import main
from lineas_fast.training.checkpoints import read_checkpoint

LIMIT = 255
NORMS = r"model\.layers\.\d+\.post_attention_layernorm"


def name(size: int, suffix: str = "", fill: str = "c") -> str:
    """A file name of ``size`` bytes (UTF-8) ending in ``suffix``."""
    body = size - len(suffix.encode())
    return fill * (body // len(fill.encode())) + "c" * (body % len(fill.encode())) + suffix


def leftovers(folder) -> list[str]:
    return [e for e in os.listdir(folder) if e.startswith(".lineas-")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentences")
    (d / "src.txt").write_text("\n".join(SOURCE) + "\n")
    (d / "tgt.txt").write_text("\n".join(TARGET) + "\n")
    return str(d / "src.txt"), str(d / "tgt.txt")


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory, model_dir):
    """A model folder whose weights cannot be read: a command that fails on its output's name
    and not on this folder checked the name before loading the model."""
    d = tmp_path_factory.mktemp("broken")
    for f in os.listdir(model_dir):
        (d / f).write_bytes(open(os.path.join(model_dir, f), "rb").read())
    (d / "model.safetensors").write_bytes(b"not safetensors")
    return str(d)


@pytest.mark.parametrize(
    "filename",
    [
        "ckpt",  # no suffix: torch.save refuses a temporary '.lineas-tmp-...-ckpt' by name
        name(180, ".pt"),
        name(200, ".pt"),
        name(LIMIT, ".pt"),
        name(LIMIT, ".safetensors"),
        name(LIMIT),
        name(LIMIT, ".pt", fill="é"),  # 2-byte characters: the limit counts bytes
        name(LIMIT, "." + "x" * 40),  # a 41-byte "suffix" is not kept
    ],
    ids=["no-suffix", "180", "200", "255-pt", "255-safetensors", "255-bare", "255-utf8", "255-long-ext"],
)
def test_atomic_file_write_keeps_the_suffix_and_fits(tmp_path, filename):
    dest = tmp_path / filename
    with io.atomic_path(str(dest)) as tmp:
        temp_name = os.path.basename(tmp)
        with open(tmp, "w") as f:
            f.write("new")
    assert len(os.fsencode(temp_name)) <= LIMIT
    suffix = os.path.splitext(filename)[1]
    if len(suffix) <= 32:
        assert temp_name.endswith(suffix)
    assert dest.read_text() == "new" and leftovers(tmp_path) == []


@pytest.mark.parametrize("filename", ["ckpt", name(LIMIT, ".pt"), name(LIMIT)])
def test_a_checkpoint_at_the_limit_is_written_and_read_back(tmp_path, filename):
    path = str(tmp_path / filename)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    lf.train(
        model, tok, SOURCE, TARGET, modules=NORMS, steps=2, batch_size=4, progress=False,
        checkpoint_every=1, checkpoint_path=path,
    )  # fmt: skip
    assert read_checkpoint(path)["step"] == 2 and leftovers(tmp_path) == []


def test_a_folder_at_the_limit_is_swapped_in(tmp_path):
    dest = tmp_path / name(LIMIT)
    for content in ("old", "new"):  # a new folder, then an overwrite by exchange
        with io.atomic_dir(str(dest)) as tmp:
            assert len(os.fsencode(os.path.basename(tmp))) <= LIMIT
            (tmp_path / tmp / "f").write_text(content)
    assert (dest / "f").read_text() == "new" and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "write",
    [
        lambda p: io.atomic_path(p).__enter__(),
        lambda p: io.atomic_dir(p).__enter__(),
        lambda p: lf.Steering({"m": (torch.ones(4), torch.zeros(4))}).save(p),
    ],
    ids=["atomic_path", "atomic_dir", "Steering.save"],
)
@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_name_over_the_limit_is_refused_before_writing(tmp_path, write, where):
    over = name(LIMIT + 1, ".pt")
    path = tmp_path / over if where == "file" else tmp_path / over / "out.pt"
    with pytest.raises(OSError) as e:
        write(str(path))
    assert e.value.errno == errno.ENAMETOOLONG and "NAME_MAX" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_the_library_refuses_a_checkpoint_name_over_the_limit_before_training(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(OSError, match="checkpoint_path .*NAME_MAX"):
        lf.train(
            model, tiny_tokenizer(), SOURCE, TARGET, modules=NORMS, steps=2, progress=False,
            checkpoint_every=1, checkpoint_path=str(tmp_path / name(LIMIT + 1, ".pt")),
        )  # fmt: skip
    assert os.listdir(tmp_path) == []


# --- the command line ---------------------------------------------------------------------------
def train_args(model, sentences, out, checkpoint=None):
    args = ["train", "--model", model, "--source", sentences[0], "--target", sentences[1]]
    args += ["--modules", NORMS, "--steps", "2", "--batch-size", "4", "--out", out]
    if checkpoint:
        args += ["--checkpoint", checkpoint, "--checkpoint-every", "1"]
    return args


def test_train_writes_outputs_named_at_the_limit(tmp_path, model_dir, sentences, capsys):
    out = str(tmp_path / name(LIMIT, ".safetensors"))
    checkpoint = str(tmp_path / name(LIMIT, ".pt"))
    assert main(train_args(model_dir, sentences, out, checkpoint)) == 0, capsys.readouterr().err
    assert len(lf.Steering.load(out)) == 3 and read_checkpoint(checkpoint)["step"] == 2
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "command,flag",
    [
        ("train --out", "--out"),
        ("train --checkpoint", "--checkpoint"),
        ("fuse --out", "--out"),
        ("fuse --gguf --out", "--out"),
        ("bench --out", "--out"),
    ],
)
def test_cli_refuses_a_name_over_the_limit_before_loading(
    tmp_path, broken_model, sentences, capsys, command, flag
):
    over = str(tmp_path / name(LIMIT + 1, ".json" if command.startswith("bench") else ".pt"))
    steering = str(tmp_path / "s.safetensors")
    lf.Steering({"model.layers.0.post_attention_layernorm": (torch.ones(32), torch.zeros(32))}).save(steering)
    ok = str(tmp_path / "ok.safetensors")
    gguf = tmp_path / "in.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    argv = {
        "train --out": train_args(broken_model, sentences, over),
        "train --checkpoint": train_args(broken_model, sentences, ok, over),
        "fuse --out": ["fuse", "--model", broken_model, "--steering", steering, "--out", over],
        "fuse --gguf --out": ["fuse", "--gguf", str(gguf), "--steering", steering, "--out", over + ".gguf"],
        "bench --out": ["bench", "--model", broken_model, "--steering", steering, "--out", over],
    }[command]
    before = sorted(os.listdir(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lineas-fast {command.split()[0]}: error: {flag} ")
    assert "NAME_MAX" in err[0]
    assert sorted(os.listdir(tmp_path)) == before


def test_the_refusal_names_a_folder_over_the_limit(tmp_path, broken_model, sentences, capsys):
    out = str(tmp_path / name(LIMIT + 1) / "s.safetensors")
    assert main(train_args(broken_model, sentences, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("lineas-fast train: error: --out ") and "NAME_MAX" in err
    assert os.listdir(tmp_path) == []
