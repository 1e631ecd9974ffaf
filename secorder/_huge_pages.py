"""Ask Linux to back a large, freshly allocated CPU tensor with transparent huge pages.

The first write to fresh memory costs a page fault per 4 KiB page (about 3 us on the
machines we measure on). A Lanczos basis of ``(m + 1) x n`` entries is written once,
slot by slot, so on the CPU those faults can cost as much as the arithmetic of the
steps: 0.3 s of a 9 s SLQ call on a 269,322-parameter MLP. ``madvise(MADV_HUGEPAGE)``
on the region before it is first touched lets the kernel map it in 2 MiB pages where
the system allows it (``/sys/kernel/mm/transparent_hugepage/enabled`` set to
``madvise`` or ``always``), which is the same request PyTorch's own CPU allocator
makes under ``THP_MEM_ALLOC_ENABLE=1``. Anything else (another OS, a CUDA tensor, a
small tensor, a tensor under a ``torch.func`` transform, a refusal) leaves the tensor
as it is: this only ever changes speed.

Example:
    >>> import torch
    >>> t = torch.empty(2**20)
    >>> advise_huge_pages(t) in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import Tensor

__all__ = ["advise_huge_pages", "MIN_BYTES"]

_HUGE = 1 << 21  # 2 MiB
_MADV_HUGEPAGE = 14
#: Tensors smaller than this are left alone (a few faults are cheaper than the call).
MIN_BYTES = 16 * _HUGE
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise


def advise_huge_pages(t: Tensor) -> bool:
    """Advise huge pages for the 2 MiB-aligned interior of ``t``'s memory; True if the kernel accepted."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    try:
        if torch._C._functorch.is_functorch_wrapped_tensor(t) or not t.is_contiguous():
            return False
        nbytes = t.numel() * t.element_size()
        if nbytes < MIN_BYTES:
            return False
        fn = _libc_madvise()
        if not fn:
            return False
        ptr = t.data_ptr()
        start = (ptr + _HUGE - 1) & ~(_HUGE - 1)
        end = (ptr + nbytes) & ~(_HUGE - 1)
        return end > start and fn(start, end - start, _MADV_HUGEPAGE) == 0
    except Exception:  # noqa: BLE001 - a speed hint must never fail a computation
        return False
