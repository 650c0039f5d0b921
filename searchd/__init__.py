"""searchd: search for the best sampling schedule of a pretrained diffusion model."""

__version__ = "0.1.0"
