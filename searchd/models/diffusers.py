"""diffusers checkpoints as EDM denoisers: UNets, DiT-style transformers, latent and text models.

``load_diffusers(path_or_hub_id, ...)`` reads either a pipeline directory (``model_index.json``
with ``unet/`` or ``transformer/``, ``scheduler/``, and for latent/text models ``vae/``,
``text_encoder/``, ``tokenizer/``) or a single model directory (``config.json`` of the
network, with ``scheduler_config.json`` beside it or a ``searchd.json`` naming its
parameterization, as the digits neural zoo ships). Hub ids are read the same way through
``huggingface_hub`` when the network allows.

What the loader works out, and from where (each can be overridden by an option):

- the network class: ``config.json``'s ``_class_name``, one of ``SUPPORTED``;
- the parameterization: ``searchd.json``, else the scheduler: discrete ``alphas_cumprod``
  (from the scheduler class itself, so every beta schedule diffusers knows is exact) with the
  scheduler's ``prediction_type`` (epsilon, v_prediction, sample), or flow matching for
  ``FlowMatch*`` schedulers (timestep = 1000 t). The denoiser's ``sigma_grid`` is the
  ascending ``sqrt((1 - abar) / abar)``; a sigma between grid points is fed to the network as
  a fractional timestep (log-sigma interpolation);
- the sample shape: ``(in_channels, sample_size, sample_size)``: the latent shape for
  latent models, whose ``decode`` attribute maps latents to images in [-1, 1] with the VAE
  (``latents / scaling_factor + shift_factor``); ``decode`` is None for pixel models;
- conditioning: class labels for class-conditional networks (DiT, ``UNet2DModel`` with
  ``num_class_embeds``); prompts for text-conditioned ones (``UNet2DConditionModel``,
  ``Transformer2DModel`` with cross-attention, and Stable Diffusion 3's
  ``SD3Transformer2DModel``, which also takes pooled prompt embeddings), encoded once at
  load time.

Prompts and labels per sample: row r of a call (or sample ``sample_index[r]`` when the
caller passes it) uses prompt ``r mod P`` of the P prompts (labels likewise). An evaluator
that batches samples in blocks whose sizes are multiples of P therefore gives sample i the
prompt ``i mod P`` whatever the batch layout. Classifier-free guidance (``guidance_scale``)
is composed inside the denoiser, one batched network call of conditional and unconditional
rows; solvers never see it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from searchd.models.generic import (
    ClassLabels,
    Conditioning,
    DiscreteTime,
    Flow,
    NetworkDenoiser,
    Parameterization,
    TextEmbeddings,
    VariancePreserving,
    call_timestep_keyword,
    import_target,
    make_parameterization,
)
from searchd.models.runtime import Runtime, prepare_module

SUPPORTED = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "Transformer2DModel",
    "SD3Transformer2DModel",
)
DENOISER_FOLDERS = ("unet", "transformer")
SEARCHD_META = "searchd.json"
# diffusers clamps a zero-SNR final level to this alphas_cumprod (rescale_betas_zero_snr).
MIN_ALPHA_CUMPROD = 2.0**-24
# encode(prompts) -> hidden states [P, L, D], or (hidden states, pooled [P, D']) for SD3.
TextEncoder = Callable[[list[str]], "Tensor | tuple[Tensor, Tensor]"]


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "diffusers checkpoints need the diffusers extra: pip install 'searchd[diffusers]'"
        ) from e
    return diffusers


# Where the files are: a local directory or a hub repository -------------------------------
class Source:
    """A local directory or a Hugging Face hub repository, read file by file."""

    def __init__(self, location: str | Path, revision: str | None = None):
        self.location = str(location)
        self.revision = revision
        path = Path(self.location).expanduser()
        self.local = path.is_dir()
        if self.local:
            self.root: str = str(path.resolve())
            self._files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        else:
            if path.exists() or self.location.count("/") != 1:
                raise ValueError(
                    f"{self.location!r} is neither a directory nor a hub id (owner/name)"
                )
            try:
                from huggingface_hub import list_repo_files

                self._files = set(list_repo_files(self.location, revision=revision))
            except Exception as e:  # noqa: BLE001 - any network or hub error
                raise ValueError(
                    f"cannot read hub repository {self.location!r} ({type(e).__name__}: {e}); "
                    "download it (huggingface-cli download) and give the local directory"
                ) from None
            self.root = self.location

    def exists(self, rel: str) -> bool:
        return rel in self._files

    def read_json(self, rel: str) -> dict[str, Any]:
        if self.local:
            return json.loads(Path(self.root, rel).read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(
            Path(hf_hub_download(self.location, rel, revision=self.revision)).read_text()
        )

    def folder(self, sub: str | None) -> dict[str, Any]:
        """``from_pretrained`` arguments for the files in subfolder ``sub`` (None: the root)."""
        kw: dict[str, Any] = {"subfolder": sub} if sub else {}
        if self.revision is not None:
            kw["revision"] = self.revision
        return kw


def _join(sub: str | None, name: str) -> str:
    return f"{sub}/{name}" if sub else name


def find_denoiser_folder(src: Source, subfolder: str | None = None) -> str | None:
    """The subfolder holding the denoising network (None: the root)."""
    if subfolder is not None:
        if not src.exists(_join(subfolder, "config.json")):
            raise ValueError(f"{src.location}: no config.json in subfolder {subfolder!r}")
        return subfolder
    for sub in DENOISER_FOLDERS:
        if src.exists(f"{sub}/config.json"):
            return sub
    if src.exists("config.json"):
        return None
    raise ValueError(
        f"{src.location}: no diffusers model found (expected config.json, "
        f"or one of {', '.join(f'{s}/config.json' for s in DENOISER_FOLDERS)})"
    )


def find_scheduler_config(src: Source, model_folder: str | None) -> dict[str, Any] | None:
    """The scheduler config of a pipeline or model directory, or None."""
    for rel in (
        "scheduler/scheduler_config.json",
        _join(model_folder, "scheduler_config.json"),
        "scheduler_config.json",
    ):
        if src.exists(rel):
            return src.read_json(rel)
    return None


# Parameterization from a scheduler config --------------------------------------------------
def parameterization_from_scheduler(
    config: Mapping[str, Any], prediction_type: str | None = None
) -> Parameterization:
    """The parameterization a diffusers scheduler config describes.

    Discrete-time (DDPM/DDIM/PNDM/Euler... schedulers with betas): ``alphas_cumprod`` from
    the betas of the scheduler class built from the config (every beta schedule and the
    zero-terminal-SNR rescaling as diffusers computes them; the cumulative product in
    float64), and ``prediction_type``
    from the config unless given. ``FlowMatch*`` schedulers: rectified flow with the network
    fed ``num_train_timesteps * t`` (the scheduler's ``shift`` and ``use_dynamic_shifting``
    are kept on the ``Flow``: they say how that scheduler treats given sigmas).
    """
    diffusers = _diffusers()
    cls_name = str(config.get("_class_name", "DDPMScheduler"))
    if "FlowMatch" in cls_name:
        return Flow(time_scale=float(config.get("num_train_timesteps", 1000)),
                    shift=float(config.get("shift", 1.0) or 1.0),
                    dynamic_shifting=bool(config.get("use_dynamic_shifting", False)))
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown scheduler class {cls_name!r} in the scheduler config")
    sched = cls.from_config(dict(config))
    betas = getattr(sched, "betas", None)
    abar = getattr(sched, "alphas_cumprod", None)
    if betas is not None:
        # Recomputed in float64 from the betas: diffusers keeps alphas_cumprod in float32,
        # whose 1 - abar loses ~1e-4 relative precision at the lowest noise levels.
        abar = torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0)
    if abar is None:
        raise ValueError(
            f"scheduler {cls_name} has no alphas_cumprod; give options.parameterization explicitly"
        )
    abar = torch.as_tensor(abar, dtype=torch.float64)
    # A zero-terminal-SNR schedule ends in abar = 0 (sigma = inf): use diffusers' stand-in.
    abar = torch.where(abar > 0, abar, torch.full_like(abar, MIN_ALPHA_CUMPROD))
    pred = prediction_type or str(config.get("prediction_type", "epsilon"))
    return VariancePreserving(pred, DiscreteTime(abar))


# Latent decoding and text encoding ---------------------------------------------------------
class LatentDecoder:
    """``decode(latents [B, c, h, w]) -> images [B, C, H, W]`` in [-1, 1] with a VAE.

    Latents live in the diffusion model's space, ``z = (vae_latent - shift) * scaling``;
    decoding inverts that and clamps to [-1, 1]. Runs in chunks of ``batch_size`` rows under
    ``torch.inference_mode``; VAEs whose config says ``force_upcast`` decode in float32.
    """

    def __init__(self, vae: nn.Module, runtime: Runtime, batch_size: int = 32):
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        if getattr(cfg, "force_upcast", False) and runtime.dtype != torch.float32:
            runtime = Runtime(
                device=runtime.torch_device,
                dtype=torch.float32,
                channels_last=runtime.channels_last,
            )
        self.runtime = runtime.resolve()
        self.vae = prepare_module(vae, self.runtime)
        self.batch_size = int(batch_size)

    def __call__(self, latents: Tensor) -> Tensor:
        out = []
        with self.runtime.context():
            for lo in range(0, latents.shape[0], self.batch_size):
                z = latents[lo : lo + self.batch_size]
                z = self.runtime.input_tensor(z / self.scaling_factor + self.shift_factor)
                out.append(self.vae.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(out).clone().to(latents.device)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with ``#`` are
    skipped. Raises ``ValueError`` if none is left."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; '#' starts a comment line)")
    return prompts


class CLIPPromptEncoder:
    """Encode prompts with a pipeline's tokenizer and text encoder (transformers' CLIP):
    ``encode(prompts) -> last hidden states [P, 77, D]``, padded to the tokenizer's length."""

    def __init__(self, src: Source, runtime: Runtime):
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as e:
            raise ImportError(
                "text-conditioned diffusers pipelines need transformers: pip install transformers"
            ) from e
        self.tokenizer = CLIPTokenizer.from_pretrained(src.root, **src.folder("tokenizer"))
        encoder = CLIPTextModel.from_pretrained(src.root, **src.folder("text_encoder"))
        self.runtime = runtime.resolve()
        self.encoder = prepare_module(encoder, self.runtime)

    def __call__(self, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        with self.runtime.context():
            hidden = self.encoder(tok.input_ids.to(self.runtime.torch_device))[0]
        return hidden.float().clone()


class SD3PromptEncoder:
    """Encode prompts as Stable Diffusion 3 does: its pipeline's ``encode_prompt`` (two CLIP
    encoders and T5, read from the pipeline folder; needs transformers) ->
    ``(hidden states [P, L, 4096], pooled [P, 2048])``. The transformer and VAE are not
    loaded here; the text encoders are dropped once the prompts are encoded."""

    def __init__(self, src: Source, runtime: Runtime):
        diffusers = _diffusers()
        self.runtime = runtime.resolve()
        self.pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
            src.root, transformer=None, vae=None, torch_dtype=self.runtime.dtype,
            **({"revision": src.revision} if src.revision else {}),
        ).to(self.runtime.torch_device)

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None,
                device=self.runtime.torch_device, do_classifier_free_guidance=False,
            )
        return hidden.float().clone(), pooled.float().clone()


# The loader ----------------------------------------------------------------------------------
def _sample_shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
    size = config.get("sample_size")
    if size is None:
        raise ValueError("the model config has no sample_size; give options.shape")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config["in_channels"]), int(h), int(w))


def load_diffusers(
    path: str | Path,
    *,
    parameterization: str | Mapping[str, Any] | Parameterization | None = None,
    prediction_type: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    prompts: Sequence[str] | str | Path | None = None,
    negative_prompt: str = "",
    text_encoder: TextEncoder | str | None = None,
    labels: Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    vae: str | Path | None = None,
    shape: Sequence[int] | None = None,
    cost: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    runtime: Runtime | Mapping[str, Any] | None = None,
    name: str | None = None,
) -> NetworkDenoiser:
    """Load a diffusers model (local directory or hub id) as a ``NetworkDenoiser``.

    Args:
        path: pipeline or model directory, or hub id ``owner/name``.
        parameterization: override (a name or mapping of ``generic.make_parameterization``);
            default: ``searchd.json`` in the model folder, else the scheduler config.
        prediction_type: override the scheduler's (epsilon, v_prediction, sample).
        subfolder: the network's subfolder (default: ``unet``/``transformer``/root).
        prompts: text models: a list of prompts or a prompts file (``read_prompts``).
        negative_prompt: the unconditional prompt of guidance (default: empty).
        text_encoder: ``encode(list[str]) -> [P, L, D]`` encoder hidden states (SD3: a pair
            ``(hidden [P, L, D], pooled [P, D'])``), or a ``module:function`` entry point
            returning one; default: the pipeline's CLIP tokenizer and text encoder (SD3: its
            pipeline's ``encode_prompt``, both CLIPs and T5; needs transformers).
        labels: class-conditional models: the label table (default: every class in turn).
        guidance_scale: classifier-free guidance weight (1: none).
        vae: latent models: a VAE directory (default: the pipeline's ``vae/`` if present).
        shape, cost, sigma_min, sigma_max: overrides.
        runtime: a ``Runtime`` or its options (device, dtype, autocast, ...).
        name: for messages (default: the directory or hub id).

    Returns:
        The denoiser; its ``decode`` is the VAE decoder for latent models, else None.
    """
    diffusers = _diffusers()
    rt = runtime if isinstance(runtime, Runtime) else Runtime.from_options(runtime)
    rt = rt.resolve()
    src = Source(path, revision)
    folder = find_denoiser_folder(src, subfolder)
    config = src.read_json(_join(folder, "config.json"))
    cls_name = str(config.get("_class_name"))
    if cls_name not in SUPPORTED:
        raise ValueError(
            f"{src.location}: model class {cls_name!r} is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    if config.get("addition_embed_type"):
        raise ValueError(
            f"{src.location}: UNets with added conditioning "
            f"({config['addition_embed_type']!r}, e.g. SDXL) are not supported"
        )
    meta_rel = _join(folder, SEARCHD_META)
    meta = src.read_json(meta_rel) if src.exists(meta_rel) else {}

    # The parameterization: explicit option > searchd.json > scheduler config.
    if parameterization is not None:
        param = make_parameterization(parameterization)
    elif "parameterization" in meta:
        param = make_parameterization(meta["parameterization"])
    else:
        sched = find_scheduler_config(src, folder)
        if sched is None:
            raise ValueError(
                f"{src.location}: no scheduler config and no searchd.json; give "
                "options.parameterization (e.g. {kind: vp_eps, grid: ddpm_linear})"
            )
        param = parameterization_from_scheduler(sched, prediction_type)
    if sigma_min is not None:
        param.sigma_min = float(sigma_min)
    if sigma_max is not None:
        param.sigma_max = float(sigma_max)

    model_cls = getattr(diffusers, cls_name)
    net = model_cls.from_pretrained(
        src.root, torch_dtype=rt.dtype, low_cpu_mem_usage=False, **src.folder(folder)
    )
    sample_shape = (
        tuple(shape)
        if shape is not None
        else tuple(meta.get("shape", ())) or (_sample_shape(config))
    )

    cond = _conditioning(
        src,
        config,
        cls_name,
        rt,
        prompts=prompts,
        negative_prompt=negative_prompt,
        text_encoder=text_encoder,
        labels=labels,
        guided=guidance_scale != 1.0,
        declared=meta.get("conditioning"),
    )
    decode = None
    if vae is not None:
        decode = LatentDecoder(
            diffusers.AutoencoderKL.from_pretrained(
                str(vae), torch_dtype=rt.dtype, low_cpu_mem_usage=False
            ),
            rt,
        )
    elif src.exists("vae/config.json"):
        decode = LatentDecoder(
            diffusers.AutoencoderKL.from_pretrained(
                src.root, torch_dtype=rt.dtype, low_cpu_mem_usage=False, **src.folder("vae")
            ),
            rt,
        )
    base_cost = float(cost if cost is not None else meta.get("cost", 1.0))
    return NetworkDenoiser(
        net,
        param,
        sample_shape,
        call=call_timestep_keyword,
        conditioning=cond,
        guidance_scale=guidance_scale,
        runtime=rt,
        cost=base_cost * (2.0 if guidance_scale != 1.0 else 1.0),
        name=name or Path(src.location).name,
        decode=decode,
    )


def _conditioning(
    src: Source,
    config: Mapping[str, Any],
    cls_name: str,
    runtime: Runtime,
    *,
    prompts: Sequence[str] | str | Path | None,
    negative_prompt: str,
    text_encoder: TextEncoder | str | None,
    labels: Sequence[int] | None,
    guided: bool,
    declared: Mapping[str, Any] | None = None,
) -> Conditioning | None:
    """Class labels or prompt embeddings for the network, as its config asks.

    ``declared``: ``searchd.json``'s ``conditioning`` (``num_classes``, ``null_label``), for
    class-conditional UNets trained with label dropout, whose embedding table holds the
    classes and one "no class" row (``digits-unet-cond-s``)."""
    text = cls_name in ("UNet2DConditionModel", "SD3Transformer2DModel") or (
        cls_name == "Transformer2DModel" and config.get("cross_attention_dim")
    )
    if text:
        if prompts is None:
            raise ValueError(
                f"{src.location}: a text-conditioned model needs prompts "
                "(options.prompts: a file with one prompt per line)"
            )
        plist = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        if isinstance(text_encoder, str):
            text_encoder = import_target(text_encoder)()
        default = SD3PromptEncoder if cls_name == "SD3Transformer2DModel" else CLIPPromptEncoder
        encode: TextEncoder = text_encoder or default(src, runtime)
        cond = encode(plist)
        # The negative prompt is encoded even without constant guidance: a guidance
        # schedule (per-step weights) needs the unconditional input too.
        uncond = encode([negative_prompt])
        if isinstance(cond, tuple):  # (hidden states, pooled): SD3's two inputs
            return TextEmbeddings(cond[0], uncond[0], pooled=cond[1], uncond_pooled=uncond[1])
        return TextEmbeddings(cond, uncond)
    if prompts is not None:
        raise ValueError(f"{src.location}: prompts given for a model that is not text-conditioned")
    n_classes = None
    null = None
    if cls_name in ("DiTTransformer2DModel", "Transformer2DModel"):
        n_classes = config.get("num_embeds_ada_norm")
        null = n_classes  # DiT's label embedding keeps one extra row for "no class"
    elif cls_name == "UNet2DModel" and config.get("num_class_embeds"):
        n_classes = config["num_class_embeds"]
        if declared:
            n_classes = int(declared["num_classes"])
            null = declared.get("null_label")
            if null is not None and not n_classes <= int(null) < config["num_class_embeds"]:
                raise ValueError(
                    f"{src.location}: searchd.json's null_label {null} is not an extra row "
                    f"of the {config['num_class_embeds']} class embeddings"
                )
    if n_classes:
        return ClassLabels(int(n_classes), labels, null_label=null)
    if labels is not None:
        raise ValueError(f"{src.location}: labels given for a model without class conditioning")
    return None
