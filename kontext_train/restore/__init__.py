"""Stage 3, restoring: the settings a LoRA was trained with and the sampling that follows them."""
