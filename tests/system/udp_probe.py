"""Runs inside the booted container (python3, stdlib): flow A sends a packet every 0.1 s for
`seconds`; when the file `newflow` appears, flow B sends 10 packets. Every answer's version
is recorded with its time; the result is written as JSON to `out`."""

import json
import socket
import sys
import time
from pathlib import Path

port, seconds, newflow, out = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]


def flow() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.1)
    return s


def ask(s: socket.socket, seq: int) -> str | None:
    s.sendto(f"{seq:08d}".encode() + b"x" * 164, ("127.0.0.1", port))
    try:
        return s.recv(2048).split(b" ", 1)[0].decode()
    except OSError:
        return None


a = flow()
answers_a: list[list[object]] = []
answers_b: list[list[object]] = []
end = time.time() + seconds
seq = 0
while time.time() < end:
    seq += 1
    answers_a.append([time.time(), ask(a, seq)])
    if newflow.exists() and not answers_b:
        b = flow()
        answers_b = [[time.time(), ask(b, i)] for i in range(10)]
    time.sleep(0.1)
Path(out).write_text(json.dumps({"a": answers_a, "b": answers_b}))
