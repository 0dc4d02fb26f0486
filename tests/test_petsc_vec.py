"""DLPack transfers between torch tensors and PETSc Vecs."""
import gc

import pytest
import torch

from bridges.petsc import PETSc, as_vec, vec_as_tensor
from bridges.petsc._grid import SerialLayout
from bridges.petsc._vec import VecViews


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


# -- VecViews: cached views of a solve's Vecs ----------------------------------------------------
def _filled(n, value):
    vec = PETSc.Vec().createSeq(n)
    vec.set(value)
    return vec


def test_cached_views_read_without_and_write_with_a_new_state():
    views, vec = VecViews((2, 2)), _filled(4, 1.0)
    state = vec.stateGet()
    view = views.read(vec)
    assert view.shape == (2, 2) and views.read(vec) is view  # made once
    assert vec.stateGet() == state  # a read leaves PETSc's state alone
    assert vec.norm() == pytest.approx(2.0)  # PETSc caches this norm for the current state
    views.write(vec).fill_(3.0)
    assert vec.stateGet() > state
    assert vec.norm() == pytest.approx(6.0)  # not the cached 2.0


def test_a_write_through_a_read_view_leaves_petsc_a_stale_norm():
    """Why `write` raises the state: PETSc reuses values it cached for a state (the check above
    could fail)."""
    views, vec = VecViews((4,)), _filled(4, 1.0)
    assert vec.norm() == pytest.approx(2.0)
    views.read(vec).fill_(3.0)
    assert vec.norm() == pytest.approx(2.0)  # stale
    vec.stateIncrease()
    assert vec.norm() == pytest.approx(6.0)


def test_a_cached_view_keeps_its_vec_alive_until_cleared():
    views, vec = VecViews((3,)), _filled(3, 5.0)
    view = views.read(vec)
    assert vec.getRefCount() == 2  # the owner's and the view's
    vec.destroy()  # the owner lets go: the cached view still holds the Vec and its memory
    gc.collect()
    others = [_filled(3, -1.0) for _ in range(20)]  # none can take its handle or memory
    assert view.tolist() == [5.0, 5.0, 5.0]
    assert all(views.read(o).tolist() == [-1.0] * 3 for o in others)
    views.clear()
    assert len(views) == 0
    fresh = [_filled(3, float(k)) for k in range(20)]  # may reuse the freed Vec's handle
    assert [views.read(f)[0].item() for f in fresh] == [float(k) for k in range(20)]


def test_views_keep_a_bounded_number_of_small_vecs_and_release_the_others():
    views = VecViews((2,), capacity=4)
    vecs = [_filled(2, 1.0) for _ in range(10)]
    for vec in vecs:
        views.read(vec)
    assert len(views) == 4
    assert [v.getRefCount() for v in vecs] == [1] * 6 + [2] * 4  # the oldest went
    big = VecViews((10,), largest=8)
    big.read(_filled(10, 1.0))
    assert len(big) == 0  # larger Vecs are viewed afresh each time


def test_a_serial_layout_releases_its_views():
    layout = SerialLayout((3,))
    vec = layout.global_vec()
    layout.owned_view(vec, "w").fill_(2.0)
    assert layout.exchange(vec).tolist() == [2.0] * 3 and vec.getRefCount() == 2
    layout.release_views()
    assert vec.getRefCount() == 1
