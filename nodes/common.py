"""Types and small helpers shared by the node modules."""

CATEGORY = "Kontext Restore"

# Custom socket types passed between this pack's nodes.
DATASET = "KONTEXT_RESTORE_DATASET"
DEGRADATION = "KONTEXT_RESTORE_DEGRADATION"
LATENTS = "KONTEXT_RESTORE_LATENTS"
LOSS = "KONTEXT_RESTORE_LOSS"

SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF})
