"""Text-to-image steering on a tiny random Stable Diffusion pipeline (no downloads)."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipeline import SOURCE_PROMPTS, TARGET_PROMPTS, tiny_pipeline  # noqa: E402

import lineas_fast as lf  # noqa: E402
from lineas_fast.cli import main  # noqa: E402

NORMS = r"unet\..*norm\d?"
REL_BOUND = 1e-5


@pytest.fixture(scope="module")
def trained():
    pipe = tiny_pipeline()
    hist = []
    st = lf.train(
        pipe,
        None,
        SOURCE_PROMPTS,
        TARGET_PROMPTS,
        modules=NORMS,
        steps=8,
        optimizer="adam",
        lr=0.01,
        batch_size=len(SOURCE_PROMPTS),
        progress=False,
        callback=hist.append,
    )
    return pipe, st, hist


def latents(pipe, prompt="a cat", steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=g, output_type="latent").images


def test_training_lowers_loss_on_unet_norms(trained):
    pipe, st, hist = trained
    assert hist[-1].loss < hist[0].loss
    assert all(n.startswith("unet.") for n in st.modules) and len(st) > 10
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_strength_zero_is_bit_identical_and_steering_changes_latents(trained):
    pipe, st, _ = trained
    plain = latents(pipe)
    with st.apply(pipe, strength=0.0):
        assert torch.equal(latents(pipe), plain)
    with st.apply(pipe, strength=1.0):
        assert not torch.allclose(latents(pipe), plain, atol=1e-4)


def test_inverse_of_inverse_is_the_map(trained):
    _, st, _ = trained
    ii = st.inverse().inverse()
    for n in st.modules:
        assert torch.allclose(ii[n][0], st[n][0], atol=1e-6)
        assert torch.allclose(ii[n][1], st[n][1], atol=1e-6)


def test_fused_unet_equals_hooked(trained):
    _, st, _ = trained
    pipe = tiny_pipeline()
    with st.apply(pipe, strength=-0.7):
        hooked = latents(pipe)
    lf.fuse(pipe.unet, st, strength=-0.7)  # "unet." prefix handled
    fused = latents(pipe)
    assert (hooked - fused).abs().max() <= REL_BOUND * hooked.abs().max()


def test_fused_pipeline_saves_and_plain_diffusers_loads(tmp_path, trained):
    _, st, _ = trained
    pipe = tiny_pipeline()
    with st.apply(pipe):
        hooked = latents(pipe)
    lf.fuse(pipe, st)
    pipe.save_pretrained(tmp_path / "fused")
    code = (
        "import sys, torch; from diffusers import StableDiffusionPipeline as P; "
        "p = P.from_pretrained(sys.argv[1]); g = torch.Generator().manual_seed(0); "
        "torch.save({'lat': p('a cat', num_inference_steps=2, generator=g, "
        "output_type='latent').images, "
        "'lf': any(k.startswith('lineas_fast') for k in sys.modules)}, sys.argv[2])"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "fused"), str(tmp_path / "o.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.load(tmp_path / "o.pt")
    assert got["lf"] is False
    assert (hooked - got["lat"]).abs().max() <= REL_BOUND * hooked.abs().max()


def test_linear_act_for_pipelines():
    pipe = tiny_pipeline()
    st = lf.fit_linear_act(
        pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=r"unet\.down_blocks\.0\..*norm\d?"
    )
    assert len(st) >= 2 and st.support() > 0


def test_cli_generate_image_writes_grid(tmp_path, trained):
    pipe, st, _ = trained
    pipe.save_pretrained(tmp_path / "pipe")
    st.save(str(tmp_path / "s.safetensors"))
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate-image",
                "--pipeline",
                str(tmp_path / "pipe"),
                "--steering",
                str(tmp_path / "s.safetensors"),
                "--prompt",
                "a cat",
                "--strengths",
                "-1",
                "0",
                "1",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    from PIL import Image

    im = Image.open(out)
    assert im.format == "PNG" and im.size[0] == 3 * im.size[1]


def test_bad_input(trained):
    pipe, st, _ = trained
    with pytest.raises(ValueError, match="empty list of prompts"):
        lf.train(pipe, None, [], TARGET_PROMPTS, modules=NORMS, steps=1)
    with pytest.raises(ValueError, match="matches no module"):
        lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=r"unet\.nothing.*", steps=1)
    with pytest.raises(ValueError, match="UNet modules only"):
        lf.train(
            pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=r"text_encoder\..*final_layer_norm", steps=1
        )
    from diffusers import UNet2DConditionModel

    other = tiny_pipeline()
    other.unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    with pytest.raises(ValueError, match="coordinates but its map has|trained on model"):
        st.attach(other)


def test_sdxl_pipeline_trains_and_fuses():
    from tiny_pipeline import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    hist = []
    st = lf.train(
        pipe,
        None,
        SOURCE_PROMPTS,
        TARGET_PROMPTS,
        modules=NORMS,
        steps=4,
        optimizer="adam",
        lr=0.01,
        batch_size=len(SOURCE_PROMPTS),
        progress=False,
        callback=hist.append,
        timestep=399,
    )
    assert hist[-1].loss < hist[0].loss
    with st.apply(pipe):
        hooked = latents(pipe)
    lf.fuse(pipe, st)
    fused = latents(pipe)
    assert (hooked - fused).abs().max() <= REL_BOUND * hooked.abs().max()


def test_bf16_unet_trains_with_float32_maps():
    pipe = tiny_pipeline()
    pipe.unet.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    hist = []
    st = lf.train(
        pipe,
        None,
        SOURCE_PROMPTS,
        TARGET_PROMPTS,
        modules=r"unet\.down_blocks\..*norm\d?",
        steps=4,
        optimizer="adam",
        lr=0.01,
        batch_size=len(SOURCE_PROMPTS),
        progress=False,
        callback=hist.append,
    )
    assert hist[-1].loss < hist[0].loss
    assert all(st[n][0].dtype == torch.float32 for n in st.modules)


# --- common random numbers: source and target samples of a step on one fresh noise draw ------
EARLY = r"unet\.down_blocks\.0\..*norm\d?"  # before the first cross-attention
HELD_OUT = 60


def held_out(target, prompts, seed=1234):
    """HELD_OUT samples, sample k prompt k mod len(prompts) on row k of a noise draw that
    training never makes (its draws come from the run's generator, seeded 0)."""
    enc = target.encode([prompts[k % len(prompts)] for k in range(HELD_OUT)])
    return target.with_noise(
        enc, range(HELD_OUT), target.draw_noise(HELD_OUT, torch.Generator().manual_seed(seed))
    )


@torch.no_grad()
def read(target, enc, names, steering=None):
    if steering is None:
        return target.pooled(enc, names)
    with steering.apply(target):
        return target.pooled(enc, names)


def w2(x, y, names):
    from lineas_fast.wasserstein import sliced_wasserstein

    return sliced_wasserstein([x[n] for n in names], [y[n] for n in names]).item()


def moved(st, names):
    """Σ over names of ‖(ω − 1, b)‖₂."""
    return sum(float(((st[n][0] - 1).square().sum() + st[n][1].square().sum()).sqrt()) for n in names)


def test_noise_draws_and_renoised_sets():
    from lineas_fast.targets import PipelineTarget

    t = PipelineTarget(tiny_pipeline())
    assert t.shared_noise and not lf.as_target(torch.nn.Linear(2, 2)).shared_noise
    enc = t.encode(SOURCE_PROMPTS)  # encode's fixed noise: seed 0, row k
    g = torch.Generator().manual_seed(0)
    assert torch.equal(enc["noise"], torch.randn(5, 4, 8, 8, generator=g))
    noise = torch.randn(3, 4, 8, 8)
    sub = t.with_noise(enc, [4, 0, 4], noise)
    assert sub["n"] == 3 and sub["noise"] is noise
    assert torch.equal(sub["prompt_embeds"], enc["prompt_embeds"][[4, 0, 4]])
    with pytest.raises(ValueError, match=r"shape \(2, 4, 8, 8\)"):
        t.with_noise(enc, [0, 1], noise)
    with pytest.raises(TypeError, match="shared_noise must be True or False"):
        PipelineTarget(tiny_pipeline(), shared_noise="yes")


def test_shared_noise_leaves_prompt_blind_modules_alone():
    """Modules before the first cross-attention see the noise only: on equal noise source and
    target read the same there, so with shared noise the loss is 0 and the maps stay the
    identity; with independent noise (a batch of 4 of the 5 source prompts against the 6
    targets' fixed noise) the maps learn the noise."""
    from lineas_fast.targets import PipelineTarget

    pipe = tiny_pipeline()
    t = PipelineTarget(pipe)
    names = t.match(EARLY)
    src, tgt = held_out(t, SOURCE_PROMPTS), held_out(t, TARGET_PROMPTS)
    x, y = read(t, src, names), read(t, tgt, names)
    assert all(torch.equal(x[n], y[n]) for n in names)  # the premise: prompt-blind here
    kw = dict(modules=EARLY, steps=5, optimizer="adam", lr=0.01, batch_size=4, progress=False)
    hist = []
    st = lf.train(t, None, SOURCE_PROMPTS, TARGET_PROMPTS, callback=hist.append, **kw)
    assert max(r.loss for r in hist) <= 1e-9
    assert moved(st, names) <= 1e-6
    old_hist = []
    old = lf.train(
        PipelineTarget(pipe, shared_noise=False),
        None,
        SOURCE_PROMPTS,
        TARGET_PROMPTS,
        callback=old_hist.append,
        **kw,
    )
    assert min(r.loss for r in old_hist) > 1e-4 and moved(old, names) > 0.05


def test_shared_noise_lowers_held_out_w2_and_moves_early_maps_less():
    """30 Adam steps on every UNet norm: the LinEAS loss on held-out noise (source and target
    sample k on the same noise) falls, by more than with independent noise, and the maps of the
    prompt-blind modules move less (measured: W2 0.510 → 0.109 shared vs 0.159 independent;
    early maps 1.31 vs 2.02)."""
    from lineas_fast.targets import PipelineTarget

    pipe = tiny_pipeline()
    t = PipelineTarget(pipe)
    names = t.match(NORMS)
    src, tgt = held_out(t, SOURCE_PROMPTS), held_out(t, TARGET_PROMPTS)
    x, y = read(t, src, names), read(t, tgt, names)
    early = [n for n in names if torch.equal(x[n], y[n])]
    assert 2 <= len(early) < len(names)
    before = w2(x, y, names)
    kw = dict(
        modules=NORMS, steps=30, optimizer="adam", lr=0.01, batch_size=len(SOURCE_PROMPTS), progress=False
    )
    shared = lf.train(t, None, SOURCE_PROMPTS, TARGET_PROMPTS, **kw)
    old = lf.train(PipelineTarget(pipe, shared_noise=False), None, SOURCE_PROMPTS, TARGET_PROMPTS, **kw)
    after, after_old = (w2(read(t, src, names, st), y, names) for st in (shared, old))
    assert after < 0.5 * before
    assert after < 0.85 * after_old
    assert moved(shared, early) < 0.8 * moved(old, early)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_each_step_draws_one_noise_for_its_source_and_target_samples(monkeypatch):
    """Per step: one draw of batch_size noises, the target batch read on it (no grad) and the
    source batch on the same tensor; a new draw every step; with shared_noise=False no draw."""
    from lineas_fast.targets import PipelineTarget

    calls = []
    with_noise = PipelineTarget.with_noise

    def spy(self, enc, idx, noise):
        calls.append((noise, list(idx), torch.is_grad_enabled()))
        return with_noise(self, enc, idx, noise)

    monkeypatch.setattr(PipelineTarget, "with_noise", spy)
    pipe = tiny_pipeline()
    kw = dict(modules=NORMS, steps=3, batch_size=4, optimizer="adam", lr=0.01, progress=False)
    lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, **kw)
    assert len(calls) == 6
    for (tn, tidx, tgrad), (sn, sidx, sgrad) in zip(calls[::2], calls[1::2]):
        assert tn is sn and tn.shape == (4, 4, 8, 8) and not tgrad and sgrad
        assert len(set(tidx)) == len(set(sidx)) == 4  # distinct prompts in each batch
    assert not torch.equal(calls[0][0], calls[2][0]) and not torch.equal(calls[2][0], calls[4][0])
    calls.clear()
    lf.train(PipelineTarget(pipe, shared_noise=False), None, SOURCE_PROMPTS, TARGET_PROMPTS, **kw)
    assert calls == []
