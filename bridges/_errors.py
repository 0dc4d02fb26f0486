"""The exception types of the toolkit."""
from __future__ import annotations

import traceback

import torch


class ForeignError(RuntimeError):
    """Foreign code (Julia, PETSc, a black-box function or program) failed.

    Attributes:
        original: the exception the foreign side raised, or None.
        foreign_traceback: the foreign side's own traceback or backtrace text ('' if unknown).
    """

    def __init__(self, message: str, *, original: BaseException | None = None,
                 foreign_traceback: str | None = None):
        super().__init__(message)
        self.original = original
        if foreign_traceback is None and original is not None:
            foreign_traceback = "".join(traceback.format_exception(original))
        self.foreign_traceback = foreign_traceback or ""

    @classmethod
    def wrap(cls, where: str, exc: BaseException) -> "ForeignError":
        """A ForeignError saying `where` failed, keeping `exc` and its traceback."""
        return cls(f"{where} raised {type(exc).__name__}: {exc}", original=exc)


class SolverFailure(ForeignError):
    """A solve that cannot succeed stopped early and says why: a collapsing step, a non-finite
    state, or a linear solve too inaccurate for a correct gradient. Raised from inside a
    foreign solver's callback, it reaches the caller as it is."""


class MissingDerivativeError(RuntimeError):
    """A bridged op was asked for a derivative its adapter does not provide: forward mode (no
    pushforward) or a second derivative. Jacobian builders catch it to fall back to another
    mode; elsewhere it reaches the user with the op's name."""


class NoisyGradientWarning(UserWarning):
    """A finite-difference derivative is estimated to be inaccurate: the black box is noisy
    compared with how much its outputs change over the step the scheme could afford."""


def check_finite(tensor, who: str, advice: str, error=ValueError) -> None:
    """Raise `error` naming the first nan/inf entry of `tensor` (its index and value). Under
    torch.func transforms (vmap, grad) values cannot be read: nothing is checked there."""
    if torch._C._are_functorch_transforms_active():
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        count = int(bad.sum())
        raise error(f"{who} holds {float(tensor[index])} at index {index} ({count} non-finite "
                    f"value{'s' if count > 1 else ''} in all); {advice}")
