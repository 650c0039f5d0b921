"""Names shared by the model registry (``zoo``) and the checkpoint adapters (``adapters``):
the checkpoint kinds the adapters load, and the shipped neural digits zoo."""

NEURAL_KINDS: tuple[str, ...] = ("diffusers", "edm", "generic")
NEURAL_ZOO_NAMES: tuple[str, ...] = tuple(f"digits-unet-{w}" for w in ("s", "m", "l"))
