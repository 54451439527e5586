"""Text-to-image steering on a tiny random Stable Diffusion pipeline (no downloads)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

import lineas_fast as lf  # noqa: E402
from lineas_fast.cli import main  # noqa: E402
from tiny_pipeline import SOURCE_PROMPTS, TARGET_PROMPTS, tiny_pipeline  # noqa: E402

NORMS = r"unet\..*norm\d?"
REL_BOUND = 1e-5


@pytest.fixture(scope="module")
def trained():
    pipe = tiny_pipeline()
    hist = []
    st = lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=NORMS, steps=8,
                  optimizer="adam", lr=0.01, batch_size=len(SOURCE_PROMPTS), progress=False,
                  callback=hist.append)
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
    lf.fuse(pipe.unet, st, strength=-0.7)             # "unet." prefix handled
    fused = latents(pipe)
    assert (hooked - fused).abs().max() <= REL_BOUND * hooked.abs().max()


def test_fused_pipeline_saves_and_plain_diffusers_loads(tmp_path, trained):
    _, st, _ = trained
    pipe = tiny_pipeline()
    with st.apply(pipe):
        hooked = latents(pipe)
    lf.fuse(pipe, st)
    pipe.save_pretrained(tmp_path / "fused")
    code = ("import sys, torch; from diffusers import StableDiffusionPipeline as P; "
            "p = P.from_pretrained(sys.argv[1]); g = torch.Generator().manual_seed(0); "
            "torch.save({'lat': p('a cat', num_inference_steps=2, generator=g, "
            "output_type='latent').images, 'lf': any(k.startswith('lineas_fast') for k in sys.modules)}, sys.argv[2])")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fused"), str(tmp_path / "o.pt")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.load(tmp_path / "o.pt")
    assert got["lf"] is False
    assert (hooked - got["lat"]).abs().max() <= REL_BOUND * hooked.abs().max()


def test_linear_act_for_pipelines():
    pipe = tiny_pipeline()
    st = lf.fit_linear_act(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS,
                           modules=r"unet\.down_blocks\.0\..*norm\d?")
    assert len(st) >= 2 and st.support() > 0


def test_cli_generate_image_writes_grid(tmp_path, trained):
    pipe, st, _ = trained
    pipe.save_pretrained(tmp_path / "pipe")
    st.save(str(tmp_path / "s.safetensors"))
    out = tmp_path / "grid.png"
    assert main(["generate-image", "--pipeline", str(tmp_path / "pipe"), "--steering",
                 str(tmp_path / "s.safetensors"), "--prompt", "a cat", "--strengths", "-1", "0",
                 "1", "--steps", "2", "--out", str(out)]) == 0
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
        lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS,
                 modules=r"text_encoder\..*final_layer_norm", steps=1)
    from diffusers import UNet2DConditionModel
    other = tiny_pipeline()
    other.unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                      block_out_channels=(16, 32), layers_per_block=1,
                                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                      cross_attention_dim=32, norm_num_groups=8,
                                      attention_head_dim=8)
    with pytest.raises(ValueError, match="coordinates but its map has|trained on model"):
        st.attach(other)


def test_sdxl_pipeline_trains_and_fuses():
    from tiny_pipeline import tiny_sdxl_pipeline
    pipe = tiny_sdxl_pipeline()
    hist = []
    st = lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=NORMS, steps=4,
                  optimizer="adam", lr=0.01, batch_size=len(SOURCE_PROMPTS), progress=False,
                  callback=hist.append, timestep=399)
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
    st = lf.train(pipe, None, SOURCE_PROMPTS, TARGET_PROMPTS, modules=r"unet\.down_blocks\..*norm\d?",
                  steps=4, optimizer="adam", lr=0.01, batch_size=len(SOURCE_PROMPTS),
                  progress=False, callback=hist.append)
    assert hist[-1].loss < hist[0].loss
    assert all(st[n][0].dtype == torch.float32 for n in st.modules)
