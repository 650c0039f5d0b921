"""CLIP score of text-to-image samples: how well each image matches its prompt.

``CLIPScore.load(path)`` reads a CLIP model in transformers' format from a local directory
(``config.json``, the weights, and the tokenizer's ``vocab.json``/``merges.txt``; e.g. a
download of ``openai/clip-vit-large-patch14`` or of ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``,
which ships transformers weights beside its OpenCLIP ones). The score of an image and its
prompt is ``100 * max(cos(image embedding, text embedding), 0)`` (Hessel et al. 2021, as
torchmetrics computes it); a candidate's CLIP score is the mean over its samples, sample i
scored against the prompt it was generated from (``i mod P`` of the P prompts, as
``searchd.models.diffusers`` assigns them).

Preprocessing follows CLIP's (PIL-based) image processor on images saved as PNG: samples
in [-1, 1] are quantized to 8-bit levels, resized so the shorter side is the model's input
size with PIL's bicubic filter on an 8-bit image (``pil_resize_uint8``: PIL's coefficients,
``searchd.evaluation.resize``, with the 8-bit rounding and clipping PIL applies after each
pass; within one level of PIL), centre-cropped, scaled to [0, 1] and normalized with the
processor's mean and standard deviation (``preprocessor_config.json`` when the directory
has one, else OpenAI's).

The published protocol for Stable Diffusion (``configs/sd15.yaml``): COCO-30k, i.e. one
caption of each of 30,000 MS-COCO val2014 images as the prompts, and CLIP score with
OpenCLIP ViT-g/14 (as GigaGAN and the guidance-distillation papers report it) or OpenAI's
ViT-L/14 (torchmetrics' default); the model used is recorded with the score
(``describe``). Needs ``transformers`` (not a dependency of searchd's core).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation.resize import pil_resize_matrix, to_rgb, to_uint8_levels

# CLIP's image normalization (OpenAI's, also OpenCLIP's for its OpenAI-style models).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "CLIP score needs transformers: pip install transformers"
        ) from e
    return transformers


def pil_resize_uint8(images: Tensor, size: tuple[int, int]) -> Tensor:
    """PIL's bicubic resize of 8-bit images: levels 0..255 [B, C, H, W] -> ``size``.

    PIL resizes an 8-bit image horizontally, then vertically, storing each pass as 8-bit
    levels (rounded and clipped); the same here, with PIL's filter coefficients in float64
    (PIL's are fixed point: results within one level). Returns float32 levels.
    """
    x = images.to(torch.float64)
    h, w = x.shape[-2:]
    if w != size[1]:
        x = torch.floor(x @ pil_resize_matrix(w, size[1]).T + 0.5).clamp(0, 255)
    if h != size[0]:
        x = torch.floor(pil_resize_matrix(h, size[0]) @ x + 0.5).clamp(0, 255)
    return x.to(torch.float32)


@dataclass
class ClipScoreStats:
    """Mergeable sums of per-sample CLIP scores: count, sum and sum of squares (float64)."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, scores: Tensor | np.ndarray) -> ClipScoreStats:
        s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        self.n += int(s.numel())
        self.total += float(s.sum())
        self.total_sq += float((s * s).sum())
        return self

    def merge(self, other: ClipScoreStats) -> ClipScoreStats:
        return ClipScoreStats(self.n + other.n, self.total + other.total,
                              self.total_sq + other.total_sq)

    @property
    def mean(self) -> float:
        """The CLIP score (mean over samples)."""
        return self.total / self.n if self.n else math.nan

    @property
    def stderr(self) -> float:
        """Standard error of the mean."""
        if self.n < 2:
            return math.nan
        var = (self.total_sq - self.n * self.mean**2) / (self.n - 1)
        return math.sqrt(max(var, 0.0) / self.n)


class CLIPScore:
    """A CLIP model that scores images against prompts.

    Args:
        model: a transformers ``CLIPModel`` (eval mode).
        tokenizer: its tokenizer.
        image_size: the vision tower's input side.
        mean, std: the image normalization.
        device: where the model runs.
        batch_size: images per forward pass.
        name: what the score is recorded with (the directory name).
    """

    def __init__(self, model: Any, tokenizer: Any, image_size: int,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, *,
                 device: str | torch.device = "cpu", batch_size: int = 64,
                 name: str = "clip") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.batch_size = int(batch_size)
        self.name = name
        self._text_cache: dict[tuple[str, ...], Tensor] = {}

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, batch_size: int = 64) -> CLIPScore:
        """A CLIP model and tokenizer from a local directory in transformers' format."""
        tf = _transformers()
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP model {str(path)!r}: no config.json (give a local directory in "
                "transformers' format, e.g. a download of openai/clip-vit-large-patch14)"
            )
        model = tf.CLIPModel.from_pretrained(str(path)).to(dtype)
        tokenizer = tf.CLIPTokenizer.from_pretrained(str(path))
        size = int(model.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean = tuple(cfg.get("image_mean", mean))
            std = tuple(cfg.get("image_std", std))
        return cls(model, tokenizer, size, mean, std, device=device, batch_size=batch_size,
                   name=path.name)

    def describe(self) -> dict[str, Any]:
        """What a recorded score was computed with."""
        return {"model": self.name, "image_size": self.image_size,
                "score": "100 * max(cos, 0), mean over samples"}

    # Embeddings ---------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] -> the vision tower's input [B, 3, S, S]."""
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W]; got shape {tuple(images.shape)}")
        x = to_rgb(to_uint8_levels(images.detach().cpu()))
        h, w = x.shape[-2:]
        s = self.image_size
        # The shorter side to s, the longer one scaled and truncated (as CLIP's processor).
        nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        x = pil_resize_uint8(x, (nh, nw))
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top : top + s, left : left + s] / 255.0
        return (x - self.mean) / self.std

    @staticmethod
    def _pooled(out: Any) -> Tensor:
        # transformers < 5 returns the projected tensor, >= 5 an output with pooler_output.
        return out if isinstance(out, Tensor) else out.pooler_output

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings [P, D] (float32, CPU), cached per prompt list."""
        key = tuple(prompts)
        if key not in self._text_cache:
            # CLIP's context (77 tokens): the tokenizer's limit, or the position table's.
            length = min(int(self.tokenizer.model_max_length),
                         int(self.model.config.text_config.max_position_embeddings))
            tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                 max_length=length, return_tensors="pt")
            with torch.inference_mode():
                e = self._pooled(self.model.get_text_features(
                    input_ids=tok.input_ids.to(self.device),
                    attention_mask=tok.attention_mask.to(self.device)))
            self._text_cache[key] = torch.nn.functional.normalize(e.float(), dim=-1).cpu()
        return self._text_cache[key]

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings [B, D] (float32, CPU) of images in [-1, 1]."""
        out = []
        dtype = next(self.model.parameters()).dtype
        for a in range(0, images.shape[0], self.batch_size):
            px = self.preprocess(images[a : a + self.batch_size]).to(self.device, dtype)
            with torch.inference_mode():
                e = self._pooled(self.model.get_image_features(pixel_values=px))
            out.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu())
        return torch.cat(out)

    def scores(self, images: Tensor, prompts: Sequence[str],
               prompt_index: Sequence[int] | Tensor) -> Tensor:
        """Per-sample CLIP scores [B]: image b against ``prompts[prompt_index[b] mod P]``."""
        idx = torch.as_tensor(prompt_index, dtype=torch.int64).reshape(-1)
        if idx.shape != (images.shape[0],):
            raise ValueError(f"{idx.numel()} prompt indices for {images.shape[0]} images")
        text = self.text_embeddings(prompts)[idx % len(prompts)]
        cos = (self.image_embeddings(images) * text).sum(-1)
        return 100.0 * cos.clamp_min(0.0)

    def score(self, images: Tensor, prompts: Sequence[str],
              prompt_index: Sequence[int] | Tensor) -> ClipScoreStats:
        """The mergeable statistics of a batch's scores (mean: ``.mean``)."""
        return ClipScoreStats().add(self.scores(images, prompts, prompt_index))
