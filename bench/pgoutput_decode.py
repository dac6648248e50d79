"""Micro-benchmark of relay.pgoutput: decode 200k outbox-like Insert messages, print messages/s.

    .venv/bin/python bench/pgoutput_decode.py [count]

Two figures, each the median of 5 runs: ``decode`` alone on bytes, and ``frame+decode``, the
relay's hot path (parse_copy_data on a CopyData frame, then decode of the memoryview payload).
"""
from __future__ import annotations

import statistics
import struct
import sys
import time
import uuid

from outbox.relay.pgoutput import Insert, decode, parse_copy_data


def insert_message() -> bytes:
    """An Insert into an outbox-like table: 7 text columns of realistic sizes."""
    payload = (
        '{"orderId": "%s", "customer": {"id": 48213, "name": "Zoë Müller", "email": "zoe@example.com"}, '
        '"lines": [{"sku": "SKU-1029", "qty": 2, "price": "19.90"}, {"sku": "SKU-2231", "qty": 1, "price": "5.00"}], '
        '"total": "44.80", "currency": "EUR", "placedAt": "2024-05-06T07:08:09.123456Z"}' % uuid.uuid4()
    )
    values = [
        str(uuid.uuid4()),  # id
        "order",  # aggregatetype
        str(uuid.uuid4()),  # aggregateid
        "order.created",  # type
        payload,  # payload (~330 bytes of JSON)
        "crm",  # origin
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # traceparent
    ]
    out = b"I" + struct.pack(">I", 16403) + b"N" + struct.pack(">H", len(values))
    for v in values:
        raw = v.encode()
        out += b"t" + struct.pack(">I", len(raw)) + raw
    return out


def run(count: int) -> None:
    message = insert_message()
    frame = b"w" + struct.pack(">QQq", 0x16B3748, 0x16B3748, 0) + message
    assert isinstance(decode(message), Insert)
    messages = [message] * count
    frames = [memoryview(frame)] * count  # psycopg hands CopyData over as memoryviews
    print(f"{count} Insert messages of {len(message)} bytes, 7 text columns; median of 5 runs")

    def bench(label: str, body: object) -> None:
        rates = []
        for _ in range(5):
            start = time.perf_counter()
            body()  # type: ignore[operator]
            rates.append(count / (time.perf_counter() - start))
        print(f"  {label:<14} {statistics.median(rates):>10,.0f} messages/s  (runs: {', '.join(f'{r:,.0f}' for r in rates)})")

    def decode_only() -> None:
        for m in messages:
            decode(m)

    def frame_and_decode() -> None:
        for f in frames:
            decode(parse_copy_data(f).payload)  # type: ignore[union-attr]

    bench("decode", decode_only)
    bench("frame+decode", frame_and_decode)


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
