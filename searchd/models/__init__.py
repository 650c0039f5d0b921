"""Models wrapped as denoisers ``D(x, sigma) -> x0_hat``, and the registry that loads them."""

from searchd.models.base import Denoiser, expand_to, sigma_per_sample
from searchd.models.gmm import GaussianMixtureDenoiser
from searchd.models.zoo import (
    ModelSpec,
    known_kinds,
    known_models,
    load,
    register,
    register_alias,
    register_kind,
    zoo,
)

__all__ = [
    "Denoiser",
    "GaussianMixtureDenoiser",
    "ModelSpec",
    "expand_to",
    "known_kinds",
    "known_models",
    "load",
    "register",
    "register_alias",
    "register_kind",
    "sigma_per_sample",
    "zoo",
]
