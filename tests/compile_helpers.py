"""Shared pieces of the compiled-mode tests: a graph-counting backend, a fresh dynamo per test, the eager path."""

import contextlib

import torch
from torch._dynamo.backends.registry import lookup_backend


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (one per compile or recompile)."""

    def __init__(self, inner: str = "aot_eager"):
        self.inner = lookup_backend(inner)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def fresh_dynamo():
    """A fixture's body: the test starts and ends with no compiled code cached."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def eager_path(stack):
    """The plain eager path of the same stack (compiled forward and static gates off), then back to compiled."""
    unet, fn = stack.unet, stack.unet.__dict__.pop("forward")
    stack.static = False
    try:
        yield
    finally:
        stack.static = True
        unet.forward = fn
