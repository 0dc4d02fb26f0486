"""Zero-copy transfers between torch tensors and PETSc Vecs, through DLPack."""
from __future__ import annotations

import torch

from .._transfer import contiguous
from ._runtime import PETSc, scalar_dtype


def as_vec(tensor: torch.Tensor, *, comm=None, who: str = "as_vec"):
    """A PETSc Vec sharing memory with `tensor` (flattened), keeping the tensor alive.

    The tensor must be on the CPU and have PETSc's scalar dtype. A non-contiguous tensor is
    copied into a contiguous one first (the only copy this function makes).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(tensor).__name__}")
    check_tensor(tensor, who)
    flat = contiguous(tensor.detach()).reshape(-1)
    vec = PETSc.Vec().createWithDLPack(flat, comm=comm or PETSc.COMM_SELF)
    vec.setAttr("bridges_owner", flat)  # the Vec's memory belongs to this tensor
    return vec


def vec_as_tensor(vec, mode: str = "rw") -> torch.Tensor:
    """A 1-D torch tensor viewing the local part of `vec` (no copy).

    mode: "r" for a Vec PETSc has locked for reading (a callback's input), "w" or "rw" when the
    tensor will be written, so PETSc knows the Vec changed.
    """
    return torch.from_dlpack(vec.toDLPack(mode))


class VecViews:
    """Torch views of PETSc Vecs, made once per Vec and kept: a DLPack export and import costs a
    few microseconds, which a small system's callbacks would pay for every Vec on every call.

    A view holds a reference to its Vec (DLPack's), so a cached view keeps its Vec, and the Vec's
    memory, alive: no Vec is freed while it is cached, and no new Vec can take its handle. The
    last `capacity` Vecs of at most `largest` entries are kept (larger ones cost nothing to
    view next to their work); `clear()` drops them, releasing the references.

    `read(vec)` is read-only, as PETSc locks a callback's inputs. `write(vec)` first raises the
    Vec's state, as PETSc's own write access does: PETSc keeps norms and other values per
    state, and would otherwise reuse them after the caller writes through the view.
    """

    def __init__(self, shape, capacity=64, largest=4096):
        self.shape, self.capacity, self.largest = tuple(shape), capacity, largest
        self._views = {}  # Vec handle -> view

    def read(self, vec) -> torch.Tensor:
        view = self._views.get(vec.handle)
        if view is None:
            view = torch.from_dlpack(vec.toDLPack("r")).view(self.shape)
            if view.numel() <= self.largest:
                if len(self._views) >= self.capacity:  # the oldest goes
                    del self._views[next(iter(self._views))]
                self._views[vec.handle] = view
        return view

    def write(self, vec) -> torch.Tensor:
        vec.stateIncrease()
        return self.read(vec)

    def __len__(self):
        return len(self._views)

    def clear(self) -> None:
        self._views.clear()


def check_tensor(tensor: torch.Tensor, who: str) -> None:
    """Raise a clear error unless PETSc can use `tensor`'s memory directly."""
    if tensor.device.type != "cpu":
        raise ValueError(f"{who}: tensor is on device '{tensor.device}', but this PETSc build is "
                         f"CPU-only; move it with tensor.cpu()")
    if tensor.dtype != scalar_dtype():
        raise TypeError(f"{who}: tensor has dtype {tensor.dtype}, but PETSc's scalar type is "
                        f"{scalar_dtype()}; convert with tensor.to({scalar_dtype()})")
