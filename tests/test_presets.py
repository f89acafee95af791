"""Model presets: tiny models built from configs, real from_pretrained paths exercised on saved folders."""

import pytest
import torch

from adapter_studio import PresetError, available_presets, load_pipeline, load_preset
from adapter_studio.tokenizer import tiny_clip_tokenizer


def _image(pipe, **kw):
    return pipe("a red house", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                height=64, width=64, **kw).images


def test_presets_listed_and_tiny_builds_are_deterministic():
    assert {"tiny-sd15", "tiny-sdxl", "tiny-video", "tiny-controlnet", "sd15", "sdxl", "animatediff-sd15"} <= set(available_presets())
    a, b = load_pipeline("tiny-sd15"), load_pipeline("tiny-sd15")
    for (k, v), (k2, v2) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    c = load_pipeline("tiny-sd15", seed=1)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert a.vae_scale_factor == 8
    assert type(a.unet).__name__ == "UNet2DConditionModel" and type(a.image_encoder).__name__ == "CLIPVisionModelWithProjection"


def test_tiny_shapes_differ_between_backbones():
    sd, xl = load_pipeline("tiny-sd15"), load_pipeline("tiny-sdxl")
    assert sd.unet.config.cross_attention_dim != xl.unet.config.cross_attention_dim
    assert xl.unet.config.addition_embed_type == "text_time" and xl.text_encoder_2 is not None
    video = load_pipeline("tiny-video")
    assert type(video.unet).__name__ == "UNetMotionModel"
    frames = video("a cat", num_frames=4, num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 4, 64, 64, 3)


def test_tokenizer_is_written_by_the_code(tmp_path):
    tok = tiny_clip_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) > 4
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a photo of a cat"


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_pretrained_path_loads_a_saved_folder(tmp_path, preset):
    pipe = load_pipeline(preset)
    pipe.save_pretrained(tmp_path / "model")
    ref = _image(pipe)
    by_folder = load_pipeline(str(tmp_path / "model"))
    real_kind = "sdxl" if preset == "tiny-sdxl" else "sd15"
    by_preset = load_pipeline(real_kind, pretrained=str(tmp_path / "model"), image_encoder=None)
    assert type(by_folder).__name__ == type(pipe).__name__ == type(by_preset).__name__
    assert load_preset(str(tmp_path / "model")).kind == real_kind
    assert abs(_image(by_folder) - ref).max() < 1e-5
    assert abs(_image(by_preset) - ref).max() < 1e-5


def test_video_pretrained_path_with_motion_adapter_folder(tmp_path):
    from adapter_studio.presets import build_tiny_components

    video = load_pipeline("tiny-video")
    load_pipeline("tiny-sd15").save_pretrained(tmp_path / "sd")
    build_tiny_components(load_preset("tiny-video"))["motion_adapter"].save_pretrained(tmp_path / "motion")
    pipe = load_pipeline("animatediff-sd15", pretrained=str(tmp_path / "sd"), motion_adapter=str(tmp_path / "motion"))
    assert type(pipe.unet).__name__ == "UNetMotionModel"
    torch.testing.assert_close(pipe.unet.conv_in.weight, video.unet.conv_in.weight)


def test_bad_presets_get_clear_errors(tmp_path):
    with pytest.raises(PresetError, match="unknown model 'no-such-thing'.*tiny-sd15"):
        load_preset("no-such-thing")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: spaceship\nsource: tiny\n")
    with pytest.raises(PresetError, match="kind 'spaceship'"):
        load_preset(str(bad))
    with pytest.raises(PresetError, match="could not load"):
        load_pipeline("sd15", pretrained=str(tmp_path / "empty"), image_encoder=None)
