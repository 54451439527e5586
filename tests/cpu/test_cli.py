import json
import os
import shutil
import subprocess
import sys

import pytest
from tiny_models import SOURCE, TARGET, tiny_model, tiny_tokenizer

from lineas_fast._version import __version__
from lineas_fast.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_train_then_generate(tmp_path, model_dir, capsys):
    src = write(tmp_path / "src.txt", SOURCE)
    tgt = tmp_path / "tgt.jsonl"
    tgt.write_text("\n".join(json.dumps({"text": t}) for t in TARGET) + "\n")
    out = str(tmp_path / "s.safetensors")
    rc = main(
        [
            "train",
            "--model",
            model_dir,
            "--source",
            src,
            "--target",
            str(tgt),
            "--modules",
            r"model\.layers\.\d+\.post_attention_layernorm",
            "--steps",
            "3",
            "--optimizer",
            "adam",
            "--out",
            out,
        ]
    )
    assert rc == 0 and os.path.isfile(out)
    assert "wrote" in capsys.readouterr().out
    rc = main(
        [
            "generate",
            "--model",
            model_dir,
            "--steering",
            out,
            "--strength",
            "-1",
            "--prompt",
            "you are",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
        ]
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [x["prompt"] for x in lines] == ["you are", "hi"]
    assert all(x["strength"] == -1 for x in lines)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--model", "MODEL", "--source", "nope.txt", "--target", "nope.txt", "--out", "o"],
            "source file 'nope.txt' does not exist",
        ),
        (
            ["train", "--model", "/no/such/dir", "--source", "SRC", "--target", "SRC", "--out", "o"],
            "model folder '/no/such/dir' does not exist",
        ),
        (
            [
                "train",
                "--model",
                "MODEL",
                "--source",
                "SRC",
                "--target",
                "SRC",
                "--out",
                "o",
                "--modules",
                "nothing.*",
            ],
            "matches no module",
        ),
        (
            ["generate", "--model", "MODEL", "--steering", "missing.safetensors", "--prompt", "x"],
            "does not exist",
        ),
        (["generate", "--model", "MODEL", "--steering", "SRC"], "cannot read steering file"),
    ],
)
def test_clear_errors(tmp_path, model_dir, capsys, args, message):
    src = write(tmp_path / "src.txt", SOURCE)
    args = [model_dir if a == "MODEL" else src if a == "SRC" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_help_runs_as_console_script():
    res = subprocess.run(
        [sys.executable, "-m", "lineas_fast.cli", "train", "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "--modules" in res.stdout and "--sparsity" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "lineas_fast.cli", "train", "--steps", "x"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "invalid int value" in res.stderr


ENTRY_POINTS = {
    "python -m lineas_fast": [sys.executable, "-m", "lineas_fast"],
    "python -m lineas_fast.cli": [sys.executable, "-m", "lineas_fast.cli"],
    "lineas-fast": [shutil.which("lineas-fast") or "lineas-fast"],
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    "argv,code,stream,expected",
    [
        (["--version"], 0, "stdout", f"lineas-fast {__version__}\n"),
        (["train", "--steps", "x"], 2, "stderr", "lineas-fast train: error: argument --steps: invalid int"),
    ],
    ids=["version", "bad-value"],
)
def test_every_entry_point_runs_the_cli(entry, argv, code, stream, expected):
    command = ENTRY_POINTS[entry]
    if entry == "lineas-fast" and shutil.which("lineas-fast") is None:
        pytest.skip("the lineas-fast console script is not installed here (pip install -e .)")
    res = subprocess.run(command + argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == code, res.stderr
    out = getattr(res, stream)
    assert out == expected if code == 0 else out.startswith(expected)
    if code == 0:
        assert res.stderr == ""
