"""How many requests serve takes at once, when it says it is full, and when it stops taking any.

Rows past ``max_running + max_queue`` in flight (a request of ``n`` choices is ``n`` rows, as the engine
decodes them) are refused at once with 429 and a
``Retry-After`` estimated from how long recent requests took, instead of queueing without bound
while every client waits. While the server drains for a stop signal, new requests get 503 with
``Retry-After``: the requests in flight finish, nothing new starts. All calls come from the
server's event loop, so no lock is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Refusal:
    status: int  # 429 full, 503 draining
    message: str
    code: str
    retry_after: int


class Admission:
    def __init__(self, max_running: int, max_queue: int, request_timeout: float):
        self.max_running, self.max_queue, self.request_timeout = max_running, max_queue, request_timeout
        self.in_flight = 0
        self.draining = False
        self.seconds_per_request = 1.0  # a moving average of what requests took, for Retry-After

    @property
    def running(self) -> int:
        return min(self.in_flight, self.max_running)

    @property
    def waiting(self) -> int:
        return max(0, self.in_flight - self.max_running)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, served max_running at a time."""
        return max(1, math.ceil(self.seconds_per_request * (self.waiting + 1) / self.max_running))

    def admit(self, rows: int = 1) -> Refusal | None:
        """None and ``rows`` more in flight, or why not."""
        if self.draining:
            return Refusal(503, "the server is shutting down and takes no new requests; retry on another replica "
                                "or after it restarts", "server_shutting_down", self.retry_after())
        if self.in_flight + rows > self.max_running + self.max_queue:
            return Refusal(429, f"the server is full ({self.running} requests running, {self.waiting} waiting, "
                                f"--max-queue {self.max_queue}); retry after the Retry-After seconds",
                           "server_busy", self.retry_after())
        self.in_flight += rows
        return None

    def release(self, seconds: float, rows: int = 1) -> None:
        self.in_flight -= rows
        self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * seconds
