"""Rotating key/value caches for streaming attention (Kyutai's RingKVCache semantics)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..cpu import host as cpu_host
from ..cpu import kernels as cpu


def _quantize_int8(x: mx.array) -> tuple[mx.array, mx.array]:
    """x [..., D] → (int8 [..., D], float32 scales [..., 1]) with x ≈ q · scale."""
    x = x.astype(mx.float32)
    scale = mx.maximum(mx.abs(x).max(axis=-1, keepdims=True), 1e-30) / 127.0
    return mx.round(x / scale).astype(mx.int8), scale


def _quantize_int8_host(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_quantize_int8 for a host cache, in numpy (the same arithmetic)."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-30)) / np.float32(127.0)
    return np.round(x / scale).astype(np.int8), scale.astype(np.float32)


class KVCache:
    """Rotating KV cache holding the last `capacity` steps: it never runs out.

    Like Kyutai's RingKVCache, new keys are written before attending, so a chunk of T steps
    can overwrite entries its own first queries would have seen once the ring is full: the
    reference streams this way and we do the same. Writes are slice updates of the buffers
    (MLX reuses a buffer when nothing else holds it), so a step costs O(T), not O(capacity).
    The buffers grow in chunks until they reach the capacity (a short session does not pay
    for the whole context: 3.1 GB for Moshi 7B in float32); from then on memory is flat.

    bits=8 stores each key and value vector as int8 with one float32 scale (absmax / 127),
    a quarter of the float32 size (Moshi 7B's full context: 0.8 GB). Used for quantized
    models, whose weights already carry far larger rounding (see quantize.py).
    """

    GROW = 256  # steps added at a time

    def __init__(self, capacity: int, bits: int | None = None, host: bool = False):
        if bits not in (None, 8):
            raise ValueError(f"KV cache bits must be None (compute dtype) or 8, got {bits}")
        self.capacity = capacity
        self.bits = bits
        # host=True: numpy buffers, for layer steps run on the host (cpu/host.py, and the
        # chunks of Transformer._host_chunk_step); update() and fetch() still work, converting,
        # so either path can extend the cache.
        self.host = host
        # [B, H, slots, Dh] (int8 when bits=8), and the int8 scales [B, H, slots, 1]
        self.keys: mx.array | np.ndarray | None = None
        self.values: mx.array | np.ndarray | None = None
        self.key_scales: mx.array | None = None
        self.value_scales: mx.array | None = None
        self.offset = 0  # steps written since the last reset

    def reset(self) -> None:
        self.keys = self.values = self.key_scales = self.value_scales = None
        self.offset = 0

    @property
    def valid(self) -> int:
        """Slots holding a written step (all of them once the ring is full)."""
        return min(self.offset, self.capacity)

    def _buffers(self) -> list[str]:
        return ["keys", "values"] + (["key_scales", "value_scales"] if self.bits else [])

    def update_host(self, k: np.ndarray, v: np.ndarray) -> None:
        """Write one step k, v [B, H, Dh] (float32 numpy) into a host cache's ring. Its buffers
        are allocated whole: the pages the ring has not reached yet are never touched, so
        they take no memory."""
        B, H, Dh = k.shape
        if self.keys is None:
            dtype = np.int8 if self.bits else np.float32
            self.keys = np.zeros((B, H, self.capacity, Dh), dtype)
            self.values = np.zeros((B, H, self.capacity, Dh), dtype)
            if self.bits:
                self.key_scales = np.zeros((B, H, self.capacity, 1), np.float32)
                self.value_scales = np.zeros((B, H, self.capacity, 1), np.float32)
        slot = self.offset % self.capacity
        if self.bits:
            for name, x in (("keys", k), ("values", v)):
                q, scale = _quantize_int8_host(x)
                getattr(self, name)[:, :, slot] = q
                getattr(self, name[:-1] + "_scales")[:, :, slot] = scale
        else:
            self.keys[:, :, slot] = k
            self.values[:, :, slot] = v
        self.offset += 1

    def update_host_chunk(self, k: np.ndarray, v: np.ndarray) -> None:
        """Write T steps k, v [B, H, T, Dh] (float32 numpy) into a host cache's ring (T at most
        the capacity, as `update` requires)."""
        T = k.shape[2]
        if T > self.capacity:
            raise ValueError(f"KVCache: chunk of {T} steps exceeds the capacity {self.capacity}")
        if self.bits or self.keys is None:
            for t in range(T):
                self.update_host(k[:, :, t], v[:, :, t])
            return
        slots = (self.offset + np.arange(T)) % self.capacity
        self.keys[:, :, slots] = k
        self.values[:, :, slots] = v
        self.offset += T

    def attend_host(self, q: np.ndarray, scale: float) -> np.ndarray:
        """A host cache's attention of one query step q [B, H, Dh] over every written slot."""
        n = self.valid
        B, H, Dh = q.shape
        if self.bits and Dh % 8 == 0 and Dh <= 256:  # the kernel's head sizes
            out = cpu.attend_int8_host(q.reshape(B * H, Dh), self.keys, self.key_scales, self.values,
                                       self.value_scales, n, scale)
            return out.reshape(B, H, Dh)
        k, v = self.keys[:, :, :n], self.values[:, :, :n]
        if self.bits:
            k, v = k * self.key_scales[:, :, :n], v * self.value_scales[:, :, :n]
        scores = np.einsum("bhd,bhnd->bhn", q * np.float32(scale), k)
        return np.einsum("bhn,bhnd->bhd", cpu_host.softmax(scores), v)

    def update(self, k: mx.array, v: mx.array) -> None:
        """Write k, v [B, H, T, Dh] into the ring."""
        if self.host:
            k, v = np.array(k.astype(mx.float32)), np.array(v.astype(mx.float32))
            for t in range(k.shape[2]):
                self.update_host(k[:, :, t], v[:, :, t])
            return
        B, H, T, Dh = k.shape
        cap = self.capacity
        if T > cap:
            raise ValueError(f"KVCache: chunk of {T} steps exceeds the capacity {cap}")
        new = dict(zip(["keys", "values"], (k, v)))
        if self.bits:
            for name, x in (("keys", k), ("values", v)):
                new[name], new[name[:-1] + "_scales"] = _quantize_int8(x)
        if self.keys is None:
            size = min(cap, max(self.GROW, T))
            for name in self._buffers():
                x = new[name]
                setattr(self, name, mx.zeros((B, H, size, x.shape[-1]), dtype=x.dtype))
        size = self.keys.shape[2]
        if size < cap and self.offset + T > size:  # not wrapped yet: slots are positions
            grow = min(cap, max(self.offset + T, size + self.GROW, 2 * size)) - size
            for name in self._buffers():
                setattr(self, name, mx.pad(getattr(self, name), [(0, 0), (0, 0), (0, grow), (0, 0)]))
        start = self.offset % cap
        first = min(T, cap - start)
        for name in self._buffers():
            buf, x = getattr(self, name), new[name]
            buf[:, :, start:start + first] = x[:, :, :first]
            if first < T:
                buf[:, :, :T - first] = x[:, :, first:]
        self.offset += T

    def fetch(self) -> tuple[mx.array, mx.array]:
        """The cached keys and values (in the written slots), ordered as `positions()`."""
        n = self.valid
        k, v = self.keys[:, :, :n], self.values[:, :, :n]
        if self.host:
            if self.bits:
                k, v = k * self.key_scales[:, :, :n], v * self.value_scales[:, :, :n]
            return mx.array(k, mx.float32), mx.array(v, mx.float32)
        if self.bits:
            k = k.astype(mx.float32) * self.key_scales[:, :, :n]
            v = v.astype(mx.float32) * self.value_scales[:, :, :n]
        return k, v

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v [B, H, T, Dh]; return the cached keys/values, ordered as `positions()`."""
        self.update(k, v)
        k2, v2 = self.fetch()
        return k2.astype(k.dtype), v2.astype(v.dtype)

    def attend_one(self, q: mx.array, scale: float) -> mx.array | None:
        """Attention of one query step q [B, H, 1, Dh] over every written slot, with the
        compiled CPU kernel for int8 caches; None when it does not apply (then use fetch)."""
        if self.bits != 8 or self.host:
            return None
        return cpu.attend_int8(q, self.keys, self.key_scales, self.values, self.value_scales, self.valid, scale)

    @staticmethod
    def positions(capacity: int, offset: int) -> np.ndarray:
        """Absolute position held by each slot returned by `update_and_fetch` once
        `offset` steps have been written: slot s holds the latest p < offset with p ≡ s."""
        if offset < capacity:
            return np.arange(offset)
        last = offset - 1
        return last - ((last - np.arange(capacity)) % capacity)
