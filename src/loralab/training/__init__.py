"""The pieces of the train stage's recipe: the Trainer's hooks, callbacks, checkpoints and trackers."""
