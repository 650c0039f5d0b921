"""Names shared by the model registry (``zoo``) and the checkpoint adapters (``adapters``):
the checkpoint kinds the adapters load, the shipped neural digits zoo and its
class-conditional members."""

NEURAL_KINDS: tuple[str, ...] = ("diffusers", "edm", "generic")
NEURAL_ZOO_NAMES: tuple[str, ...] = tuple(f"digits-unet-{w}" for w in ("s", "m", "l"))
# Class-conditional digits UNets (not members of the unconditional zoo's model schedules).
CONDITIONAL_NEURAL_NAMES: tuple[str, ...] = ("digits-unet-cond-s",)
