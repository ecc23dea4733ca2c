"""Training dictionaries on an iterator of activation batches: objectives, trainer, resampling,
evals, checkpoints."""
