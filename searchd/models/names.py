"""Names shared by the model registry (``zoo``) and the checkpoint adapters (``adapters``):
the checkpoint kinds the adapters load, and the shipped neural digits zoos (EDM and
rectified-flow members, and the class-conditional member)."""

NEURAL_KINDS: tuple[str, ...] = ("diffusers", "edm", "generic")
NEURAL_ZOO_NAMES: tuple[str, ...] = tuple(f"digits-unet-{w}" for w in ("s", "m", "l"))
# Rectified-flow members (scripts/train_digits_flow.py): diffusers flow checkpoints.
FLOW_ZOO_NAMES: tuple[str, ...] = tuple(f"digits-flow-{w}" for w in ("s", "m"))
# Class-conditional digits UNets (not members of the unconditional zoo's model schedules).
CONDITIONAL_NEURAL_NAMES: tuple[str, ...] = ("digits-unet-cond-s",)
