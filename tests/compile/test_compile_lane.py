"""Ahead-of-time compile lane: every kernel configuration builds for sm_80 and sm_90, with no
spill and shared memory within the device limits, and the lane reports a kernel that fails."""
import json

from lineas_fast.kernels import compile_check
from lineas_fast.kernels.registry import all_configs


def test_registry_covers_every_kernel_and_flag():
    labels = [c.label for c in all_configs()]
    assert any("wasserstein_fwd" in x and "N_PAD=1024" in x for x in labels)
    for flag in ("TOKEN_STRENGTH=True", "NEED_DSTRENGTH=True", "CHANNEL_FIRST=True"):
        assert any(flag in x for x in labels), flag
    for dt in ("fp32", "bf16", "fp16"):
        assert any(f"dtype={dt}" in x for x in labels), dt


def test_every_kernel_builds_for_a100_and_h100(tmp_path):
    out = tmp_path / "kernel-resources.json"
    assert compile_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failures"] == []
    rows = report["kernels"]
    assert {r["arch"] for r in rows} == {80, 90}
    assert len(rows) == 2 * len(all_configs())
    for r in rows:
        assert r["registers"] > 0 and r["num_warps"] in (1, 2, 4, 8, 16, 32)
        if r["paper_shapes"]:
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r["config"]
            assert r["problems"] == [], r["config"]


def test_lane_reports_broken_kernel_by_name():
    rows, failures = compile_check.run([0, 1], [80], source="broken_kernels:broken_configs",
                                       workers=1, log=lambda *_: None)
    assert len(failures) == 1 and failures[0].startswith("broken_arange[BLOCK=3] sm_80")
    assert "does not compile" in failures[0] and "arange" in failures[0]
    assert [r["kernel"] for r in rows] == ["fine_arange"]
