"""Zero-copy array transfers between torch and anything exposing DLPack or the array interface.

Copies happen only where the memory layout forces them, and then explicitly:
- `as_numpy` never copies (numpy understands any strides);
- `as_tensor` copies only arrays torch cannot view (negative strides);
- `contiguous` copies a non-contiguous tensor for foreign sides that need one dense block.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch

# dtypes numpy can represent, hence every foreign side that goes through numpy
NUMPY_DTYPES = frozenset((torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128,
                torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool))


def _dtype_names(dtypes) -> str:
    return ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))


def as_numpy(tensor: torch.Tensor, *, who: str = "as_numpy") -> np.ndarray:
    """A numpy view of a CPU tensor's memory (detached; writes show through both ways)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_cpu:
        raise ValueError(f"{who}: tensor is on device '{tensor.device}', but numpy memory lives on "
                         f"the CPU; move it with tensor.cpu() first")
    if tensor.dtype not in NUMPY_DTYPES:
        raise TypeError(f"{who}: dtype {tensor.dtype} has no numpy equivalent; supported dtypes: "
                        f"{_dtype_names(NUMPY_DTYPES)}. Convert with tensor.to(torch.float64)")
    try:
        return tensor.detach().numpy()
    except RuntimeError:  # a lazy conjugate or negative view must be materialised first
        return tensor.detach().resolve_conj().resolve_neg().numpy()


def as_tensor(array, *, who: str = "as_tensor") -> torch.Tensor:
    """A torch tensor sharing memory with `array` (a tensor, DLPack producer or array-like).

    Python scalars become 0-d tensors. Arrays with negative strides, which torch cannot view,
    are copied.
    """
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, np.ndarray):
        return from_numpy(array)
    if isinstance(array, (numbers.Number, np.generic)):
        return torch.as_tensor(np.asarray(array))
    if hasattr(array, "__dlpack__"):
        try:
            return torch.from_dlpack(array)
        except (BufferError, RuntimeError, TypeError):
            pass  # e.g. a read-only producer; fall back to the array interface below
    if hasattr(array, "__array_interface__") or hasattr(array, "__array__"):
        return from_numpy(np.asarray(array))
    raise TypeError(f"{who}: cannot convert {type(array).__name__} to a tensor; expected a "
                    f"torch.Tensor, a numpy array, a Python number, or an object exposing "
                    f"__dlpack__ or the array interface")


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing `array`; copied only for negative strides, which torch cannot view."""
    if array.strides and min(array.strides) < 0:
        array = array.copy()  # torch cannot represent negative strides
    if not array.flags.writeable:
        with warnings.catch_warnings():  # the tensor stays read-only in spirit; torch only warns
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(array)


def contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when it is one dense C-ordered block, otherwise a contiguous copy."""
    return tensor if tensor.is_contiguous() else tensor.contiguous()


# -- what the class factory converts and checks (bridges._core, bridges._functorch) ----------
def spec_of(t):
    """What a gradient or tangent must match: shape, dtype, device (None for the CPU)."""
    return t.shape, t.dtype, None if t.is_cpu else t.device


def _from_numpy(array):
    """An op's output or gradient as a tensor: a view, or a copy of a read-only array (a foreign
    side's cache or constant, which an in-place change of the tensor would rewrite)."""
    if not array.flags.writeable:
        return torch.from_numpy(array.copy())
    try:
        return torch.from_numpy(array)
    except ValueError:  # negative strides: from_numpy copies
        return from_numpy(array)


def to_tensor(array, what):
    """`array` as a tensor without copying (`what()` describes it in errors; built only then)."""
    if isinstance(array, torch.Tensor):
        return array
    if type(array) is np.ndarray:
        return _from_numpy(array)
    return as_tensor(array, who=what())


def conform(tensor, spec, what):
    """`tensor` checked against (shape, dtype, device) and cast to that dtype and device."""
    shape, dtype, device = spec
    if tensor.shape != shape:
        raise ValueError(f"{what()} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if tensor.dtype != dtype or (not tensor.is_cpu if device is None else
                                 tensor.device != device):
        tensor = tensor.to(device=device or "cpu", dtype=dtype)
    return tensor
