"""A model file whose import fails: it needs a package that is not installed."""

from a_package_that_is_not_installed import Layer


def build(vocab_size, dim):
    return Layer(vocab_size, dim)
