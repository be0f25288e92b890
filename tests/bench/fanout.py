"""The chat scenario's two programs: a fan-out measurement and the reference server it is judged
against.

    python tests/bench/fanout.py measure URL [--clients 100] [--rate 500] [--seconds 5]
    python tests/bench/fanout.py [--port 0] reference

`measure` joins `--clients` WebSocket clients to one room (`URL` is a ws:// URL with the room
in it, e.g. ws://127.0.0.1:8019/ws?room=bench), then one of them sends `--rate` messages a
second for `--seconds`, each carrying its sequence number and the time it was sent. Every
client counts the messages it receives; a message's delivery latency is from its send to its
arrival at the last client. It prints one JSON line: deliveries/s and latency percentiles.
Its WebSocket client is the minimum of RFC 6455 written here (so it is the same for both
servers): a handshake, masked text frames out, frames in.

`reference` is the same broadcast on the `websockets` library (an optional, benchmark-only
package, like wrk): each text message `{"type": "message", "text"}` is answered to everyone in
the room as `{"type": "message", "id", "room", "user", "text", "ts"}`, as chat.py does, without
keeping history.
"""
import argparse
import asyncio
import base64
import json
import os
import re
import sys
import time
from urllib.parse import urlsplit


# --- the client ---------------------------------------------------------------------------------

async def connect(url, name):
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 22)
    key = base64.b64encode(os.urandom(16)).decode()
    path = f"{parts.path}?{parts.query}&name={name}" if parts.query else f"{parts.path}?name={name}"
    writer.write((f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"the handshake was answered {head[:100]!r}")
    return reader, writer


def parse_frames(buffer):
    """The whole frames at the start of `buffer` (from the server: unmasked, RFC 6455 §5.1) as
    (opcode, payload), and how many bytes they took. Reading chunks and parsing them here, not
    a frame per read, keeps the client cheap: it must take 50,000 frames a second."""
    frames, at, end = [], 0, len(buffer)
    while end - at >= 2:
        length, start = buffer[at + 1] & 0x7F, at + 2
        if length == 126:
            length, start = int.from_bytes(buffer[at + 2:at + 4], "big"), at + 4
        elif length == 127:
            length, start = int.from_bytes(buffer[at + 2:at + 10], "big"), at + 10
        if start + length > end:
            break
        frames.append((buffer[at] & 0x0F, bytes(buffer[start:start + length])))
        at = start + length
    return frames, at


def client_frame(opcode, payload):
    """A masked frame from the client (RFC 6455 §5.3)."""
    mask = os.urandom(4)
    length = len(payload)
    header = bytes([0x80 | opcode])
    if length < 126:
        header += bytes([0x80 | length])
    elif length < 1 << 16:
        header += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
    return header + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")


BENCH_TEXT = re.compile(rb'"type": ?"message".*"text": ?"bench (\d+)"')


class Room:
    def __init__(self, clients):
        self.clients = clients
        self.sent = {}          # sequence number → send time
        self.arrivals = {}      # sequence number → [count, last arrival time]
        self.deliveries = 0

    async def receive(self, reader, writer):
        buffer = bytearray()
        while data := await reader.read(1 << 16):
            buffer += data
            frames, used = parse_frames(buffer)
            del buffer[:used]
            now = time.monotonic()
            for opcode, payload in frames:
                if opcode == 0x9:
                    writer.write(client_frame(0xA, payload))
                elif opcode == 0x8:
                    return
                elif opcode == 0x1 and (found := BENCH_TEXT.search(payload)):
                    arrival = self.arrivals.setdefault(int(found.group(1)), [0, now])
                    arrival[0] += 1
                    arrival[1] = now
                    self.deliveries += 1


async def measure(url, clients, rate, seconds):
    room = Room(clients)
    connections = [await connect(url, f"c{n}") for n in range(clients)]
    readers = [asyncio.create_task(room.receive(r, w)) for r, w in connections]
    await asyncio.sleep(1.0)  # the joins' presence and join events go out first
    sender = connections[0][1]
    started = time.monotonic()
    total = int(rate * seconds)
    for sequence in range(total):
        due = started + sequence / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        room.sent[sequence] = time.monotonic()
        text = json.dumps({"type": "message", "text": f"bench {sequence}"}).encode()
        sender.write(client_frame(0x1, text))
    deadline = time.monotonic() + 10
    while room.deliveries < total * clients and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    ended = max((last for _, last in room.arrivals.values()), default=time.monotonic())
    for task in readers:
        task.cancel()
    for _, writer in connections:
        writer.transport.abort()
    latencies = sorted(room.arrivals[s][1] - room.sent[s] for s in room.sent
                       if s in room.arrivals and room.arrivals[s][0] == clients)
    complete = len(latencies)

    def percentile(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 \
            if latencies else float("nan")

    return {"clients": clients, "rate": rate, "sent": total, "complete": complete,
            "deliveries": room.deliveries, "deliveries_per_s": room.deliveries / (ended - started),
            "p50_ms": percentile(50), "p99_ms": percentile(99), "max_ms": percentile(100)}


# --- the reference server -----------------------------------------------------------------------

async def reference(port):
    import websockets  # optional: the benchmark only runs this when it is installed
    from urllib.parse import parse_qs

    rooms = {}
    next_id = iter(range(1, 1 << 62))

    async def serve(connection):
        query = parse_qs(urlsplit(connection.request.path).query)
        room, user = query["room"][0], query["name"][0]
        members = rooms.setdefault(room, set())
        members.add(connection)
        try:
            async for text in connection:
                message = json.loads(text)
                ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                websockets.broadcast(members, json.dumps(
                    {"type": "message", "id": next(next_id), "room": room, "user": user,
                     "text": message["text"], "ts": ts}))
        finally:
            members.discard(connection)

    async with websockets.serve(serve, "127.0.0.1", port, compression=None) as server:
        host, port = server.sockets[0].getsockname()[:2]
        print(f"listening on http://{host}:{port}", flush=True)  # upgraded to ws:// per request
        await asyncio.Future()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="the reference server's port")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure")
    run.add_argument("url")
    run.add_argument("--clients", type=int, default=100)
    run.add_argument("--rate", type=float, default=500)
    run.add_argument("--seconds", type=float, default=5)
    commands.add_parser("reference")
    args = parser.parse_args()
    if args.command == "measure":
        print(json.dumps(asyncio.run(measure(args.url, args.clients, args.rate, args.seconds))))
    else:
        try:
            asyncio.run(reference(args.port))
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    sys.exit(main())
