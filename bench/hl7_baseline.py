"""The baseline beside the HL7 benchmark: an MLLP listener that appends each message's bytes to a file with
fsync, then acknowledges, and does nothing else. Rebond's rate divided by this one says what parsing,
mapping, indexing and the two commits per message cost."""
from __future__ import annotations

import asyncio
import os
import sys

START, END = b"\x0b", b"\x1c\x0d"
ACK = START + b"MSH|^~\\&|BASE||||20261123||ACK|1|P|2.5\rMSA|AA|1\r" + END


async def main(path: str, port: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lock = asyncio.Lock()

    def append(payload: bytes) -> None:
        os.write(fd, payload + b"\n")
        os.fsync(fd)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buffer += chunk
            while END in buffer:
                payload, _, buffer = buffer.partition(END)
                async with lock:  # one appender, as one file
                    await asyncio.to_thread(append, payload.lstrip(START))
                writer.write(ACK)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
