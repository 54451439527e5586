"""The command line under issue 23's remaining edges: a second fold or a steered generation on
a folded checkpoint is refused unless --compose; a sweep without matplotlib stops before any
work; a mount point is refused as a folder output before the fold."""

import os
import subprocess
import sys

import pytest
import torch
from test_write_faults import small_tmpfs
from tiny_models import tiny_model, tiny_tokenizer

import lineas_fast as lf
from lineas_fast.cli import main

NORMS = r"model\.layers\.\d+\.(input|post_attention)_layernorm"


@pytest.fixture
def folder(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)
    maps = {
        n: (1 + 0.2 * torch.randn(32, generator=g), 0.2 * torch.randn(32, generator=g))
        for n, _ in model.named_modules()
        if __import__("re").fullmatch(NORMS, n)
    }
    lf.Steering(maps, {"model": lf.model_fingerprint(model)}).save(str(tmp_path / "s.safetensors"))
    return tmp_path


def fuse(folder, model, out, *extra):
    args = ["fuse", "--model", str(model), "--steering", str(folder / "s.safetensors"), "--out", str(out)]
    return main([*args, *extra])


def test_a_second_fold_is_refused_unless_compose(folder, capsys):
    assert fuse(folder, folder / "model", folder / "once") == 0
    capsys.readouterr()
    assert fuse(folder, folder / "once", folder / "twice", "--no-strict") == 2
    err = capsys.readouterr().err
    assert "already carries folded steering" in err and "--compose" in err
    assert not (folder / "twice").exists()
    assert fuse(folder, folder / "once", folder / "twice", "--no-strict", "--compose") == 0


def test_generate_on_a_folded_checkpoint_is_refused_unless_compose(folder, capsys):
    assert fuse(folder, folder / "model", folder / "once") == 0
    capsys.readouterr()
    gen = ["generate", "--model", str(folder / "once"), "--steering", str(folder / "s.safetensors")]
    gen += ["--prompt", "hello", "--max-new-tokens", "2", "--no-strict"]
    assert main(gen) == 2
    assert "already carries folded steering" in capsys.readouterr().err
    assert main([*gen, "--compose"]) == 0


def test_sweep_without_matplotlib_stops_before_any_work(tmp_path):
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from lineas_fast.cli import main\n"
        f"sys.exit(main(['sweep', '--model', 'smollm2', '--out', {str(tmp_path / 'sw')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "matplotlib, which is not installed" in proc.stderr and "nothing was run" in proc.stderr
    assert not os.path.exists(tmp_path / "sw") or os.listdir(tmp_path / "sw") == []


def test_a_mount_point_is_refused_as_the_fold_output_before_loading(folder, capsys):
    with small_tmpfs(folder) as mnt:
        assert fuse(folder, folder / "model", mnt, "--overwrite") == 2
        assert "mount point" in capsys.readouterr().err
        assert os.listdir(mnt) == []


def test_a_prompt_that_tokenizes_to_zero_tokens_is_named(folder, capsys):
    from tokenizers import normalizers

    tok = tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace("~", "")  # drops "~"
    tok.save_pretrained(folder / "model")
    gen = ["generate", "--model", str(folder / "model"), "--steering", str(folder / "s.safetensors")]
    assert main([*gen, "--prompt", "hello", "--prompt", "~~", "--max-new-tokens", "2"]) == 2
    assert "--prompt 2 ('~~') tokenizes to zero tokens" in capsys.readouterr().err
