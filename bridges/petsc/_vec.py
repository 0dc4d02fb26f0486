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


def check_tensor(tensor: torch.Tensor, who: str) -> None:
    """Raise a clear error unless PETSc can use `tensor`'s memory directly."""
    if tensor.device.type != "cpu":
        raise ValueError(f"{who}: tensor is on device '{tensor.device}', but this PETSc build is "
                         f"CPU-only; move it with tensor.cpu()")
    if tensor.dtype != scalar_dtype():
        raise TypeError(f"{who}: tensor has dtype {tensor.dtype}, but PETSc's scalar type is "
                        f"{scalar_dtype()}; convert with tensor.to({scalar_dtype()})")
