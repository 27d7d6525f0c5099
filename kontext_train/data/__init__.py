"""Stage 1, the dataset: images read from folders, synthetic degradations, Kontext buckets,
the latent cache and the batches a step trains on."""
