"""CLIP score with the real transformers loader, on a tiny randomly initialised CLIP built from
a config and saved to a directory (no weights can be downloaded here): preprocessing against
transformers' own image processor, scores against the model's embeddings, and end to end
from a prompts file through a tiny text-to-image pipeline with a guidance schedule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from searchd.evaluation.clip_score import CLIPScore, ClipScoreStats  # noqa: E402


def byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's / CLIP's byte alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIP (2-layer towers, 32x32 images) and a byte-level BPE tokenizer, saved in
    transformers' format like a downloaded checkpoint."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    chars = byte_chars()
    vocab = [*chars, *(c + "</w>" for c in chars), "th", "the</w>", "<|startoftext|>",
             "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(d)
    n = len(vocab)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    return d


def test_preprocessing_matches_clip_image_processor(tiny_clip):
    """Our tensor preprocessing equals transformers' CLIPImageProcessor (PIL resize of the
    8-bit image, centre crop, normalization) to within one 8-bit level."""
    import transformers
    from PIL import Image

    # transformers >= 5 names the PIL-based processor CLIPImageProcessorPil (its
    # CLIPImageProcessor resizes with torchvision); before 5, CLIPImageProcessor is PIL's.
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    scorer = CLIPScore.load(tiny_clip)
    x = torch.rand(3, 3, 40, 52, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = scorer.preprocess(x)
    proc = processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    u8 = ((x * 127.5 + 128).clamp(0, 255).floor()).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ref = proc(images=[Image.fromarray(a) for a in u8], return_tensors="pt").pixel_values
    assert ours.shape == ref.shape == (3, 3, 32, 32)
    level = 1 / 255 / min(scorer.std.flatten().tolist())
    assert float((ours - ref).abs().max()) <= level + 1e-6


def test_scores_are_the_clamped_cosine_of_the_models_embeddings(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    scorer = CLIPScore.load(tiny_clip, batch_size=2)
    prompts = ["the digit seven", "a boat", "a red fox"]
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    idx = torch.tensor([0, 1, 2, 3, 4])  # prompt i mod 3
    got = scorer.scores(x, prompts, idx)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        t = tok([prompts[i % 3] for i in idx.tolist()], padding="max_length", max_length=77,
                truncation=True, return_tensors="pt")
        te = model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
        ie = model.get_image_features(pixel_values=scorer.preprocess(x))
    te = te if isinstance(te, torch.Tensor) else te.pooler_output
    ie = ie if isinstance(ie, torch.Tensor) else ie.pooler_output
    cos = torch.nn.functional.cosine_similarity(ie, te, dim=-1)
    torch.testing.assert_close(got, 100 * cos.clamp_min(0), rtol=1e-4, atol=1e-4)
    assert (got >= 0).all()
    # Batch size does not matter; statistics merge.
    alone = torch.cat([scorer.scores(x[i : i + 1], prompts, idx[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(alone, got, rtol=1e-5, atol=1e-5)
    a = scorer.score(x[:2], prompts, idx[:2]).merge(scorer.score(x[2:], prompts, idx[2:]))
    assert a.n == 5 and a.mean == pytest.approx(float(got.mean()), rel=1e-6)
    assert ClipScoreStats().add(got).stderr > 0


def test_missing_model_directory_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CLIPScore.load(tmp_path)


def test_end_to_end_prompts_file_to_clip_score(tiny_clip, tmp_path):
    """A prompts file drives a tiny latent text-to-image pipeline sampled with a guidance
    schedule (sample i: prompt i mod P, chosen by its seed); its decoded images are scored
    by the CLIP loaded from disk against the prompts they were made from."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from searchd.evaluation import Evaluator
    from searchd.models.diffusers import load_diffusers, read_prompts
    from searchd.schedule import Schedule
    from tests.test_models_diffusers import TinyTextEncoder
    from tests.tiny_models import tiny_vae

    root = tmp_path / "ldm"
    torch.manual_seed(6)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
    ).save_pretrained(root / "unet")
    tiny_vae(seed=1).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
                  ).save_pretrained(root / "scheduler")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# three prompts\na red fox\nthe digit seven\na boat\n")
    den = load_diffusers(root, prompts=prompts_file, text_encoder=TinyTextEncoder())
    sched = Schedule(np.array([14.0, 5.0, 1.5, 0.4, 0.0]), solver="euler",
                     guidance=[1.0, 3.0, 3.0, 1.0])
    ev = Evaluator(den, "pixels", None, metrics=("teacher_distance",), batch_size=4)
    seeds = list(range(10, 16))
    images = den.decode(ev.generate(sched, seeds))
    assert images.shape == (6, 3, 16, 16)
    scorer = CLIPScore.load(tiny_clip)
    prompts = read_prompts(prompts_file)
    scores = scorer.scores(images, prompts, torch.tensor(seeds))
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    # Seeds 10 and 13 ask for the same prompt (10 mod 3 == 13 mod 3): scored against it.
    te = scorer.text_embeddings(prompts)
    ie = scorer.image_embeddings(images)
    assert float(scores[3]) == pytest.approx(100 * max(float(ie[3] @ te[13 % 3]), 0), rel=1e-5)
    # The guidance schedule changed the images (w != 1 on two steps).
    plain = den.decode(ev.generate(Schedule(sched.sigmas, solver="euler"), seeds))
    assert not torch.allclose(plain, images, atol=1e-4)
