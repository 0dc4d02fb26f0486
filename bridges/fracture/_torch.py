"""The torch-native reference solve of A(k) p = b(k) as a bridged op: scipy's sparse LU, whose
factorisation also serves the gradient's one transposed solve."""
from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import splu

from .._core import foreign_function
from ._grid import assemble, check_boundary_values, check_permeability, check_values, grad_k

def _torch_forward(k, p_left, p_right):
    check_values(k, "pressure_torch")  # (again: under torch.func transforms, only here)
    kn = k.double().numpy()  # (numpy has no bfloat16)
    A, b = assemble(kn, p_left, p_right)
    lu = splu(A.tocsc(), permc_spec="MMD_AT_PLUS_A")  # symmetric pattern: fill-reducing ordering
    p = torch.from_numpy(lu.solve(b).reshape(k.shape)).to(k.dtype)

    def pullback(grad_p):
        lam = lu.solve(grad_p.detach().double().reshape(-1).numpy(), trans="T")
        lam = torch.from_numpy(lam.reshape(k.shape)).to(k.dtype)
        return grad_k(p, lam, k, p_left, p_right), None, None
    return p, pullback


_TorchOp = foreign_function(_torch_forward, name="fracture_pressure_torch")


def pressure_torch(k, p_left=2.0, p_right=1.0):
    """Pressure (ny, nx) for cell permeability k (ny, nx), by a sparse LU solve (scipy SuperLU);
    its gradient reuses the factorisation for one transposed solve."""
    check_permeability(k, "pressure_torch")
    check_boundary_values(p_left, p_right, "pressure_torch")
    return _TorchOp(k, float(p_left), float(p_right))
