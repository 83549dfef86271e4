"""Checkpoints: pure mappings from every supported file layout to (config, weights).

Nothing here imports a model class: `mimi.read(source)` and `lm.read(source)` return the
config (as a dict of the model config's fields) and lazily read tensors already renamed and
re-laid-out into moshi_mlx's parameter names; models/loading.py builds and fills the models,
and `moshi-mlx convert` writes the same tensors back out. Loading is strict: missing,
unexpected and mis-shaped keys are named (strict.py).
"""
