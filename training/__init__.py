"""Training dictionaries on an iterator of activation batches: objectives, trainer, resampling,
evals, checkpoints.

    from training.config import TrainConfig, ObjectiveConfig
    from training.trainer import Trainer, train_sweep
    from training.evals import evaluate, loss_recovered

    result = Trainer(TrainConfig(objective=ObjectiveConfig(name="topk_auxk")), d_in=512).fit(batches)
"""
