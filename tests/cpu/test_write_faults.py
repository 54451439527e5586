"""Faults at write time end in clear errors with nothing lost: a full disk (a real 256 KiB
tmpfs) under every writer, and saves through symlinks that point elsewhere."""

import contextlib
import os
import subprocess
import uuid

import pytest
import torch

import lineas_fast as lf
from lineas_fast import atomic


@contextlib.contextmanager
def small_tmpfs(tmp_path, size="256k"):
    """A real, small tmpfs (needs root, as CI runs; elsewhere the test is skipped, saying so)."""
    mnt = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def big_steering(d=200_000):
    return lf.Steering({"m": (torch.ones(d), torch.zeros(d))}, {"name": "big"})


def entries(folder):
    return sorted(os.listdir(folder))


def test_a_full_disk_at_the_final_write_is_an_oserror_naming_the_path(tmp_path):
    with small_tmpfs(tmp_path) as mnt:
        old = mnt / "old.safetensors"
        lf.Steering({"m": (torch.ones(4), torch.zeros(4))}).save(str(old))
        before = old.read_bytes()
        out = mnt / "steering.safetensors"
        with pytest.raises(OSError) as err:
            big_steering().save(str(out))  # 1.6 MB into 256 KiB: safetensors' own error
        assert err.value.errno == 28 and str(out) in str(err.value)
        assert entries(mnt) == ["old.safetensors"]  # no temporary, nothing new
        with pytest.raises(OSError) as err:
            big_steering().save(str(old))  # over an existing output: the old one stays
        assert err.value.errno == 28 and old.read_bytes() == before


def test_a_full_disk_under_torch_save_and_a_plain_write(tmp_path):
    with small_tmpfs(tmp_path) as mnt:
        for writer in (
            lambda tmp: torch.save({"x": torch.zeros(400_000)}, tmp),  # RuntimeError from the zip writer
            lambda tmp: open(tmp, "wb").write(b"x" * 2_000_000),  # an OSError without the output's name
        ):
            out = mnt / "file.bin"
            with pytest.raises(OSError) as err:
                with atomic.atomic_path(out) as tmp:
                    writer(tmp)
            assert err.value.errno == 28 and err.value.filename == str(out)
            assert entries(mnt) == []


def test_a_full_disk_in_a_folder_write_keeps_the_old_folder(tmp_path):
    with small_tmpfs(tmp_path) as mnt:
        out = mnt / "model"
        with atomic.atomic_dir(out) as tmp:
            open(os.path.join(tmp, "a.txt"), "w").write("old")
        with pytest.raises(OSError) as err:
            with atomic.atomic_dir(out) as tmp:
                torch.save(torch.zeros(400_000), os.path.join(tmp, "w.pt"))
        assert err.value.errno == 28
        assert entries(mnt) == ["model"] and (out / "a.txt").read_text() == "old"


def test_a_symlink_into_another_folder_is_not_written_through(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dangling = out_dir / "steering.safetensors"
    dangling.symlink_to(elsewhere / "deep" / "target.safetensors")
    with pytest.raises(OSError, match="symlink.*outside"):
        lf.Steering({"m": (torch.ones(3), torch.zeros(3))}).save(str(dangling))
    assert not elsewhere.exists()  # no folder created at the link's target
    (elsewhere).mkdir()
    (elsewhere / "real.safetensors").write_text("precious")
    link = out_dir / "linked.safetensors"
    link.symlink_to(elsewhere / "real.safetensors")
    with pytest.raises(OSError, match="symlink"):
        lf.Steering({"m": (torch.ones(3), torch.zeros(3))}).save(str(link))
    assert (elsewhere / "real.safetensors").read_text() == "precious"


def test_a_symlink_within_the_output_folder_is_written_through(tmp_path):
    (tmp_path / "v2.safetensors").write_text("old")
    link = tmp_path / "latest.safetensors"
    link.symlink_to("v2.safetensors")
    lf.Steering({"m": (torch.ones(3), torch.zeros(3))}).save(str(link))
    assert link.is_symlink() and lf.Steering.load(str(tmp_path / "v2.safetensors")).modules == ["m"]


def test_the_later_exclusive_writer_fails_and_leaves_the_first_result(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(FileExistsError, match="another writer"):
        with atomic.atomic_dir(out, exclusive=True) as late:
            open(os.path.join(late, "who"), "w").write("late")
            with atomic.atomic_dir(out, exclusive=True) as early:
                open(os.path.join(early, "who"), "w").write("early")
    assert (out / "who").read_text() == "early"
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".lineas-")]
