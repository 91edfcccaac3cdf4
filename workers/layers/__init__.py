"""Tensor-parallel building blocks of the models in ``workers.models``."""
