"""A small closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending its next
request when the previous answer is in. Raw asyncio sockets keep its own CPU cost low, since it
shares the machine's two cores with the server it measures."""
from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

Request = tuple[str, str, bytes, dict[str, str]]  # method, path, body, headers


@dataclass
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]

    def line(self) -> str:
        return (f"{self.name:<38} {self.rate:8.0f} req/s  p50 {self.pct(50):6.2f} ms  p95 {self.pct(95):6.2f} ms"
                f"  p99 {self.pct(99):6.2f} ms  errors {self.errors}")


async def _read_response(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:].strip())
    if length:
        await reader.readexactly(length)
    return status


async def _worker(host: str, port: int, make: Callable[[int], Request], deadline: float, counter: list[int],
                  latencies: list[float], errors: list[int], ok: Callable[[int], bool], max_requests: int | None) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            n = counter[0]
            if max_requests is not None and n >= max_requests:
                break
            counter[0] += 1
            method, path, body, headers = make(n)
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            started = time.perf_counter()
            writer.write(head.encode() + b"\r\n" + body)
            status = await _read_response(reader)
            latencies.append((time.perf_counter() - started) * 1000)
            if not ok(status):
                errors[0] += 1
    finally:
        writer.close()


def run(name: str, host: str, port: int, make: Callable[[int], Request], *, concurrency: int = 16,
        seconds: float = 10.0, ok: Callable[[int], bool] = lambda s: s < 400, max_requests: int | None = None) -> Result:
    async def main() -> Result:
        latencies: list[float] = []
        errors = [0]
        counter = [0]
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*[
            _worker(host, port, make, deadline, counter, latencies, errors, ok, max_requests) for _ in range(concurrency)
        ])
        return Result(name, len(latencies), errors[0], time.perf_counter() - start, latencies)

    return asyncio.run(main())


def ratio(a: Result, b: Result) -> str:
    return f"{a.rate / b.rate:.2f}x the baseline's rate" if b.rate else "n/a"


__all__ = ["Result", "run", "ratio", "statistics"]
