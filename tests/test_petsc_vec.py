"""DLPack transfers between torch tensors and PETSc Vecs."""
import gc

import pytest
import torch

from bridges.petsc import PETSc, as_vec, vec_as_tensor


def test_tensor_and_vec_share_memory_both_ways():
    t = torch.arange(6, dtype=torch.float64)
    vec = as_vec(t)
    assert vec_as_tensor(vec).data_ptr() == t.data_ptr()
    with vec as arr:  # numpy view of the Vec's memory
        assert arr.ctypes.data == t.data_ptr()
    vec.setValue(0, 42.0)
    vec.assemble()
    assert t[0].item() == 42.0
    t[1] = -3.0
    assert vec.getValue(1) == -3.0
    assert vec.norm(PETSc.NormType.NORM_1) == pytest.approx(t.abs().sum().item())


def test_vec_to_tensor_is_a_view():
    vec = PETSc.Vec().createSeq(4)
    vec.set(2.0)
    t = vec_as_tensor(vec)
    t.mul_(3.0)
    assert vec.sum() == pytest.approx(24.0)


def test_non_contiguous_tensor_is_copied_explicitly():
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    view = base.T
    vec = as_vec(view)
    torch.testing.assert_close(vec_as_tensor(vec), view.reshape(-1))
    assert vec_as_tensor(vec).data_ptr() != base.data_ptr()


def test_requires_grad_tensor_is_detached_and_shared():
    t = torch.ones(3, dtype=torch.float64, requires_grad=True)
    vec = as_vec(t)
    assert vec_as_tensor(vec).data_ptr() == t.data_ptr()
    assert not vec_as_tensor(vec).requires_grad


def test_vec_keeps_tensor_memory_alive():
    t = torch.full((1000,), 5.0, dtype=torch.float64)
    vec = as_vec(t)
    del t
    gc.collect()
    torch.empty(1000, dtype=torch.float64).fill_(-1.0)  # would reuse freed memory
    assert vec.sum() == pytest.approx(5000.0)


def test_wrong_dtype_and_device_are_named():
    with pytest.raises(TypeError, match="dtype torch.float32, but PETSc's scalar type is "
                                        "torch.float64"):
        as_vec(torch.ones(2, dtype=torch.float32))
    with pytest.raises(ValueError, match="device 'meta'.*CPU-only"):
        as_vec(torch.empty(2, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        as_vec([1.0])
