"""tritonmoe._launch: the cached direct launch may reuse a compiled kernel only where Triton
would have specialised the arguments the same way."""
import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from tritonmoe._launch import _signature


def sig(*args):
    return _signature(args)


@pytest.mark.parametrize("a, b", [
    (1, 2),                  # Triton turns an int equal to 1 into a constant
    (16, 17), (32, 33),      # divisibility by 16
    (2**31 - 16, 2**31),     # int32 -> int64 argument
    (2**63 - 16, 2**63),     # int64 -> uint64
    (True, False),
    (None, 0),
])
def test_signature_separates_what_triton_specialises(a, b):
    assert sig(a) != sig(b)


def test_signature_tensors_by_dtype_and_alignment():
    x = torch.zeros(64, dtype=torch.float32)
    assert sig(x) == sig(torch.ones(8, dtype=torch.float32))
    assert sig(x) != sig(x.to(torch.float16))
    assert sig(x) != sig(x[1:])          # 4-byte offset: not 16-byte aligned
    assert sig(x) == sig(x[4:])          # 16-byte offset: aligned


def test_signature_same_class_same_key():
    # what varies per call without changing Triton's specialisation maps to one key (bounded cache)
    assert sig(48, 2**20) == sig(64, 2**21) and sig(3) == sig(5) and sig(1.5) != sig(2.5)


def test_signature_descriptors():
    w = torch.zeros(64, 32, dtype=torch.float16)
    d = lambda t, block: TensorDescriptor(t, list(t.shape), list(t.stride()), block)  # noqa: E731
    assert sig(d(w, [16, 16])) == sig(d(w.clone(), [16, 16])) == sig(d(w[:48], [16, 16]))
    assert sig(d(w, [16, 16])) != sig(d(w[:40], [16, 16]))  # rows no longer divisible by 16
    assert sig(d(w, [16, 16])) != sig(d(w, [32, 16]))
    assert sig(d(w, [16, 16])) != sig(d(w.to(torch.float32), [16, 16]))
