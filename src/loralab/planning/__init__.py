"""Predicting a training run before any weight is loaded: device profiles, the model's shape, and the memory and
time models (arithmetic on decided switches), with measure.py as the I/O layer that times this machine."""
