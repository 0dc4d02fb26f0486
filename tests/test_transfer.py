"""Zero-copy transfers between torch and numpy / DLPack producers."""
import numpy as np
import pytest
import torch

from bridges import as_numpy, as_tensor
from bridges._transfer import contiguous


def test_as_numpy_shares_memory_both_ways():
    t = torch.arange(6, dtype=torch.float64)
    a = as_numpy(t)
    assert a.ctypes.data == t.data_ptr()
    a[0] = 42.0
    assert t[0] == 42.0
    t[1] = -1.0
    assert a[1] == -1.0


def test_as_numpy_views_non_contiguous_tensor_without_copy():
    t = torch.arange(12, dtype=torch.float64).reshape(3, 4).T  # transposed view
    a = as_numpy(t)
    assert a.shape == (4, 3) and a.ctypes.data == t.data_ptr()
    np.testing.assert_array_equal(a, t.numpy())


def test_as_numpy_detaches_tensors_that_require_grad():
    t = torch.ones(3, requires_grad=True)
    a = as_numpy(t)
    a[0] = 5.0
    assert t[0].item() == 5.0 and t.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_as_numpy_rejects_unsupported_dtype_with_list(dtype):
    with pytest.raises(TypeError, match=r"dtype torch.bfloat16 has no numpy equivalent; supported "
                                        r"dtypes: bool, complex128, complex64, float16, float32, "
                                        r"float64, int16, int32, int64, int8, uint8"):
        as_numpy(torch.ones(2, dtype=dtype))


def test_as_numpy_rejects_non_cpu_device():
    with pytest.raises(ValueError, match="on device 'meta'.*tensor.cpu"):
        as_numpy(torch.empty(2, device="meta"))


def test_as_numpy_rejects_non_tensor():
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        as_numpy([1.0, 2.0])


def test_as_tensor_from_numpy_shares_memory():
    a = np.arange(5.0)
    t = as_tensor(a)
    assert t.data_ptr() == a.ctypes.data
    t[0] = 7.0
    assert a[0] == 7.0


def test_as_tensor_from_fortran_ordered_array_keeps_strides():
    a = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    t = as_tensor(a)
    assert t.shape == (2, 3) and t.data_ptr() == a.ctypes.data and not t.is_contiguous()
    np.testing.assert_array_equal(t.numpy(), a)


def test_as_tensor_copies_negative_strides_explicitly():
    a = np.arange(5.0)[::-1]
    t = as_tensor(a)
    np.testing.assert_array_equal(t.numpy(), a)
    a_base = a.base
    a_base[0] = 100.0  # a copy: later writes to the source do not show through
    assert t[-1].item() == 0.0


def test_as_tensor_from_dlpack_producer():
    class Producer:  # any object that speaks DLPack
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kwargs):
            return self.t.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()
    src = torch.arange(4.0)
    t = as_tensor(Producer(src))
    assert t.data_ptr() == src.data_ptr()


def test_as_tensor_from_read_only_array_interface_object():
    a = np.arange(3.0)
    a.flags.writeable = False

    class ArrayLike:
        __array_interface__ = a.__array_interface__
    t = as_tensor(ArrayLike())
    np.testing.assert_array_equal(t.numpy(), a)


def test_as_tensor_scalars_and_errors():
    assert as_tensor(2.5).shape == () and as_tensor(2.5).item() == 2.5
    assert as_tensor(np.float32(1.5)).dtype == torch.float32
    with pytest.raises(TypeError, match="cannot convert dict to a tensor"):
        as_tensor({})


def test_contiguous_copies_only_when_needed():
    t = torch.arange(6.0).reshape(2, 3)
    assert contiguous(t) is t
    c = contiguous(t.T)
    assert c.is_contiguous() and c.data_ptr() != t.data_ptr()
    torch.testing.assert_close(c, t.T)


def test_as_numpy_materialises_lazy_conjugate():
    t = torch.tensor([1 + 2j, 3 - 1j]).conj()
    np.testing.assert_array_equal(as_numpy(t), np.array([1 - 2j, 3 + 1j]))
