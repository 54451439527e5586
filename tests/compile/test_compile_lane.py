"""Ahead-of-time compile lane: every kernel configuration builds for sm_80 and sm_90 with the
JIT's run-time specialisation, with no spill, within the device limits and within its budget;
the lane reports a kernel that does not build and one that exceeds its budget."""

import json

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lineas_fast.kernels import compile_check
from lineas_fast.kernels.registry import BUDGETS, all_configs, budget_for


def _config(prefix):
    return next(c for c in all_configs() if c.label.startswith(prefix))


AFFINE_FWD = "affine_steer_fwd[dtype=bf16,CHANNEL_FIRST=False,TOKEN_STRENGTH=False,BLOCK_T=16"
AFFINE_BWD = "affine_steer_bwd[dtype=bf16,CHANNEL_FIRST=False,TOKEN_STRENGTH=True,NEED_DPARAM=True"
GATED_BWD = "gated_steer_bwd[dtype=bf16,RELU=False,NEED_DPARAM=True,BLOCK_T=1,BLOCK_D=4096"


def test_registry_covers_every_kernel_and_flag():
    labels = [c.label for c in all_configs()]
    assert any("wasserstein_fwd" in x and "N_PAD=1024" in x for x in labels)
    for flag in ("TOKEN_STRENGTH=True", "NEED_DSTRENGTH=True", "CHANNEL_FIRST=True"):
        assert any(flag in x for x in labels), flag
    for dt in ("fp32", "bf16", "fp16"):
        assert any(f"dtype={dt}" in x for x in labels), dt
    for c in all_configs():  # every paper-shape configuration of every kernel has a budget
        assert budget_for(c) is not None or not c.paper_shapes, c.label


@pytest.mark.parametrize(
    "prefix",
    [
        AFFINE_FWD,
        AFFINE_BWD,
        GATED_BWD,
        "rms_norm_shift_fwd",
        "wasserstein_fwd",
        "affine_steer_bwd[dtype=fp16,CHANNEL_FIRST=True",
    ],
)
@pytest.mark.parametrize("arch", [80, 90])
def test_specialisation_is_what_the_jit_launch_uses(prefix, arch):
    """The ASTSource the lane compiles carries exactly the signature, constants and attributes
    that ``JITFunction.run`` produces for the same arguments (captured by its cache hook under a
    fake driver), under whichever triton is installed."""
    cfg = _config(prefix)
    src, _, _ = compile_check.jit_specialization(cfg, arch)
    run = compile_check.jit_run_specialization(cfg, arch)
    assert run["signature"] == src.signature
    assert run["constants"] == src.constants
    assert run["attrs"] == src.attrs
    # pointers (16-byte aligned) and ints divisible by 16 carry tt.divisibility = 16
    names = cfg.kernel.arg_names
    div = {names[k[0]] for k, v in src.attrs.items() if ["tt.divisibility", 16] in v}
    pointers = {n for n, t in cfg.signature.items() if t.startswith("*")}
    assert pointers <= div


def test_ints_equal_to_one_become_constants():
    """Channel-last affine launches pass S = n_sblk = 1: the JIT (and so the lane) compiles them
    as constants; D = 3584 and P = 8192 are marked divisible by 16."""
    cfg = _config(AFFINE_FWD)
    src, _, _ = compile_check.jit_specialization(cfg, 90)
    names = cfg.kernel.arg_names
    assert src.signature["S"] == "constexpr" and src.signature["n_sblk"] == "constexpr"
    assert src.constants[(names.index("S"),)] == 1
    assert ["tt.divisibility", 16] in src.attrs[(names.index("D"),)]
    assert src.signature["P"] == "i32"


def test_specialisation_changes_the_code():
    """The specialised build is the vectorised one (16-byte loads and stores); the same kernel
    built without the run-time attributes (as the lane did before) has none."""
    cfg = _config(AFFINE_FWD)
    target = GPUTarget("cuda", 90, 32)
    src, opts, _ = compile_check.jit_specialization(cfg, 90)
    spec = triton.compile(src, target=target, options=opts).asm["ptx"]
    plain = triton.compile(
        ASTSource(cfg.kernel, cfg.signature, cfg.constexprs),
        target=target,
        options={"num_warps": cfg.num_warps},
    ).asm["ptx"]
    assert spec.count("ld.global.v4") >= 2 and spec.count("st.global.v4") >= 1
    assert plain.count("ld.global.v4") == 0


def test_sass_counts_on_a_known_kernel():
    """The SASS parser counts what a cross-warp reduction needs (barriers, shared memory) and
    finds no barrier in the affine forward."""
    rows, failures = compile_check.run(
        [0], [90], source="broken_kernels:over_budget_configs", workers=1, log=lambda *_: None
    )
    row = rows[0]
    assert row["barriers"] >= 1 and row["shared_bytes"] > 0 and row["instructions"] > 20
    assert row["loops"] == 0 and row["loop_barriers"] == 0
    fwd = compile_check.compile_config(_config(AFFINE_FWD), 90)
    assert fwd["barriers"] == 0 and fwd["shuffles"] == 0 and fwd["problems"] == []
    assert 0 < fwd["warp_instructions_per_element"] < 1
    bwd = compile_check.compile_config(_config(GATED_BWD), 90)
    assert bwd["loops"] >= 1 and 0 < bwd["loop_instructions"] < bwd["instructions"]


def test_over_budget_configuration_fails_the_lane():
    rows, failures = compile_check.run(
        [0], [80], source="broken_kernels:over_budget_configs", workers=1, log=lambda *_: None
    )
    assert len(failures) == 1 and "budget 'affine-fwd': barriers" in failures[0]
    assert rows[0]["budget"] == "affine-fwd"
    assert (
        compile_check.main(
            ["--source", "broken_kernels:over_budget_configs", "--arch", "90", "--workers", "1"]
        )
        == 1
    )


def test_every_kernel_builds_for_a100_and_h100(tmp_path):
    out = tmp_path / "kernel-resources.json"
    assert compile_check.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert report["triton"] == triton.__version__ and report["archs"] == ["sm_80", "sm_90"]
    assert {b["name"] for b in report["budgets"]} == {b.name for b in BUDGETS}
    rows = report["kernels"]
    assert {r["arch"] for r in rows} == {80, 90}
    assert len(rows) == 2 * len(all_configs())
    for r in rows:
        assert r["registers"] > 0 and r["num_warps"] in (1, 2, 4, 8, 16, 32)
        assert r["instructions"] > 0 and r["elements"] > 0
        assert r["specialization"]["divisible_by_16"], r["config"]
        if r["paper_shapes"]:
            assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r["config"]
            assert r["problems"] == [] and "budget" in r, r["config"]


def test_lane_reports_broken_kernel_by_name():
    rows, failures = compile_check.run(
        [0, 1], [80], source="broken_kernels:broken_configs", workers=1, log=lambda *_: None
    )
    assert len(failures) == 1 and failures[0].startswith("broken_arange[BLOCK=3] sm_80")
    assert "does not compile" in failures[0] and "arange" in failures[0]
    assert [r["kernel"] for r in rows] == ["fine_arange"]
