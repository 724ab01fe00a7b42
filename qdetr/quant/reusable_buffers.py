"""Output memory for short-lived CPU tensors, reused instead of freshly mapped.

A fake-quantized activation ``x̂`` lives only until the conv / linear that reads it returns
(it is recomputed, not saved, for backward), and the recomputed ``x̂`` of the backward pass
lives only for one autograd node. Allocated afresh each time, a large CPU tensor comes from
new pages that the kernel must map and zero on first touch (about 2 µs per 4 KiB page on the
development machine: 30 ms for 64 MiB, against 2.4 ms to write the same bytes again), which
made page faults a visible part of the fake-quantization overhead.

:class:`ReusableBuffers` keeps a few flat buffers per thread and dtype and hands out tensors
sharing their memory. A buffer is handed out again only when no tensor refers to its memory
any more (the storage's reference count, which every tensor, view and saved-for-backward copy
holds), so a tensor that someone keeps (a forward hook, autograd, a user) is never
overwritten: the request is then served by a fresh allocation.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["ReusableBuffers"]


def _use_count(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


class ReusableBuffers:
    """Per-thread pool of at most ``max_buffers`` flat CPU buffers per dtype.

    Args:
        max_buffers: buffers kept per thread and dtype (each grows to the largest request).
        min_numel: requests below this size get a plain ``torch.empty`` (small allocations are
            recycled by the C allocator already).
        max_oversize: a buffer serves a request only if it is at most this many times larger
            (so a small tensor that someone keeps does not pin a large buffer).

    Shapes:
        ``empty(shape, dtype)`` returns a contiguous tensor of ``shape``.

    Examples:
        >>> pool = ReusableBuffers(max_buffers=1, min_numel=4)
        >>> a = pool.empty((2, 8), torch.float32)
        >>> a_ptr = a.data_ptr()
        >>> b = pool.empty((2, 8), torch.float32)          # a still alive: fresh memory
        >>> b.data_ptr() != a_ptr
        True
        >>> del a
        >>> c = pool.empty((4, 3), torch.float32)          # the buffer is free again
        >>> c.data_ptr() == a_ptr, c.shape, c._base is None
        (True, torch.Size([4, 3]), True)
    """

    def __init__(self, max_buffers: int = 2, min_numel: int = 1 << 16, max_oversize: int = 4) -> None:
        if max_buffers < 1:
            raise ValueError(f"max_buffers must be >= 1; got {max_buffers}")
        if max_oversize < 1:
            raise ValueError(f"max_oversize must be >= 1; got {max_oversize}")
        self.max_buffers = max_buffers
        self.min_numel = min_numel
        self.max_oversize = max_oversize
        self._local = threading.local()

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) start empty: buffers are scratch memory, not state.
        return {"max_buffers": self.max_buffers, "min_numel": self.min_numel, "max_oversize": self.max_oversize}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"ReusableBuffers(max_buffers={self.max_buffers}, min_numel={self.min_numel}, "
            f"max_oversize={self.max_oversize})"
        )

    def clear(self) -> None:
        """Drop this thread's buffers (their memory returns once no tensor uses it).

        Examples:
            >>> pool = ReusableBuffers(min_numel=1)
            >>> _ = pool.empty((3,), torch.float32)
            >>> pool.clear()
            >>> pool.nbytes()
            0
        """
        self._local.pools = {}

    def nbytes(self) -> int:
        """Bytes held by this thread's buffers.

        Examples:
            >>> pool = ReusableBuffers(min_numel=1)
            >>> _ = pool.empty((2, 4), torch.float64)
            >>> pool.nbytes()
            64
        """
        pools = getattr(self._local, "pools", None) or {}
        return sum(buf.nbytes() for entries in pools.values() for buf, _ in entries)

    @staticmethod
    def supported() -> bool:
        """Whether this PyTorch exposes storage reference counts (else every request allocates).

        Examples:
            >>> ReusableBuffers.supported()
            True
        """
        return hasattr(torch._C, "_storage_Use_Count")

    def _buffers(self, dtype: torch.dtype) -> list:
        pools = getattr(self._local, "pools", None)
        if pools is None:
            pools = self._local.pools = {}
        return pools.setdefault(dtype, [])

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor of ``shape`` and ``dtype`` with unspecified contents.

        Args:
            shape: the tensor's shape.
            dtype: its dtype.

        Returns:
            A tensor that is not a view (``_base`` is None) and shares memory only with a pool
            buffer that nothing else refers to.
        """
        numel = 1
        for n in shape:
            numel *= n
        if numel < self.min_numel or not self.supported():
            return torch.empty(shape, dtype=dtype)
        buffers = self._buffers(dtype)
        nbytes = numel * dtype.itemsize
        buf, smallest_free = None, None
        for i, (candidate, base) in enumerate(buffers):
            if _use_count(candidate) != base:
                continue  # a live tensor uses it
            if nbytes <= candidate.nbytes() <= self.max_oversize * nbytes:
                buf = candidate
                break
            if candidate.nbytes() > nbytes:
                continue  # far too large: a small tensor that someone keeps would pin it
            if smallest_free is None or candidate.nbytes() < buffers[smallest_free][0].nbytes():
                smallest_free = i
        if buf is None:
            if smallest_free is None and len(buffers) >= self.max_buffers:
                return torch.empty(shape, dtype=dtype)  # every buffer in use
            buf = torch.empty(numel, dtype=dtype).untyped_storage()
            entry = (buf, _use_count(buf))  # the pool's own reference (the storage object)
            if smallest_free is not None:  # grow: replace the smallest free buffer
                buffers[smallest_free] = entry
            else:
                buffers.append(entry)
        return torch.empty(0, dtype=dtype).set_(buf, 0, tuple(shape))
