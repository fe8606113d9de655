"""Training on top of transformers' Trainer: arguments, the trainer, checkpoints, callbacks,
evaluation, pictures, and the embedded tiny model of the default run."""
