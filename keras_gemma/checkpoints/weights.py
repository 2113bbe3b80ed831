"""Assigning named arrays to a backbone, with errors that name what is wrong."""

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


class LazyTensor:
    """A tensor whose shape is known before its data is read.

    Loaders hand these to `assign_weights`, which checks every shape first and
    then reads and assigns one tensor at a time, so peak memory is about one
    copy of the model, not two.
    """

    def __init__(self, shape, load, load_rows=None):
        self.shape = tuple(shape)
        self.load = load
        self.load_rows = load_rows  # (start, stop) -> rows [start, stop), where the format allows


def assign_weights(backbone, arrays, source="checkpoint"):
    """Copies `arrays` (canonical name -> array or `LazyTensor`) into `backbone`.

    Every weight of the backbone (see `GemmaBackbone.weight_map`) must be given
    exactly once, with its exact shape; anything else raises `CheckpointError`
    naming the weights, before anything is assigned: never a silent random
    initialisation.
    """
    targets = backbone.weight_map()
    missing = sorted(set(targets) - set(arrays))
    unexpected = sorted(set(arrays) - set(targets))
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected weights: {', '.join(unexpected)}")
    for name in sorted(set(arrays) & set(targets)):
        shape, expected = _shape(arrays[name]), tuple(targets[name].shape)
        if shape != expected:
            problems.append(f"{name} has shape {shape}, expected {expected}")
    if problems:
        raise CheckpointError(f"The {source} does not fit the model: " + "; ".join(problems) + ".")
    for name, variable in targets.items():
        value = arrays[name]
        value = value.load() if isinstance(value, LazyTensor) else value
        variable.assign(np.asarray(value))


def _shape(value):
    return value.shape if isinstance(value, LazyTensor) else tuple(np.shape(value))
