"""Reading a process's Prometheus endpoint (``--metrics-port``)."""
from __future__ import annotations

import urllib.request


def scrape(port: int, name: str = "") -> dict[str, float]:
    """Samples served on 127.0.0.1:``port``/metrics whose series starts with ``name``:
    ``'metric{label="value"}' -> value``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out
