"""A bandwidth cap for uploads: a token bucket shared by every upload of a store, and
a request body that draws from it as it is read."""

from __future__ import annotations

import io
import threading
import time

CHUNK = 64 << 10          # a body hands out at most this much per read: smooth pacing


class TokenBucket:
    """``rate`` bytes per second on average, bursts up to ``burst`` bytes.

    :meth:`consume` takes tokens at once and may leave the bucket in debt; the caller
    then sleeps the debt off outside the lock, so concurrent uploads share the rate
    fairly and none holds the lock while waiting.
    """

    def __init__(self, rate: float, burst: float | None = None):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = float(burst if burst is not None else max(CHUNK, rate / 10))
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, n: int) -> None:
        """Take ``n`` bytes' worth of tokens, sleeping as long as the rate requires."""
        if n <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class ThrottledBody(io.RawIOBase):
    """A seekable, read-only request body over ``data`` that pays ``bucket`` per byte.

    The body pays for every byte up to the furthest one read, once (bodies are read
    front to back; a skipped range counts as sent); a rewind (botocore hashing the
    payload before sending it, say) reads them again for free, so each byte of one
    attempt costs once.  Each retry gets a new body and pays again: it is sent again.
    """

    def __init__(self, data, bucket: TokenBucket):
        super().__init__()
        self._data = memoryview(data)
        self._bucket = bucket
        self._pos = 0
        self._paid = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._data)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        remaining = len(self._data) - self._pos
        n = remaining if size is None or size < 0 else min(size, remaining)
        n = min(n, CHUNK) if size is not None and size >= 0 else n
        if n <= 0:
            return b""
        end = self._pos + n
        if end > self._paid:        # everything up to the furthest byte read is paid once
            self._bucket.consume(end - self._paid)
            self._paid = end
        out = self._data[self._pos:end].tobytes()
        self._pos = end
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)
