"""The method: flow-matching formulations, timesteps and losses, the LoRA adapters, the training
configuration and the prompt a run records. Plain torch; no ComfyUI."""
