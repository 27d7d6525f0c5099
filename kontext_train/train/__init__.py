"""Stage 2, training: the step, its losses, checkpoints and resume, validation, the run that
ties them together, the run lock and several GPUs."""
