"""What every benchmark shares: the servers, scratch databases and topics, processes, figures, results.

Servers: when any of PGHOST, PGPORT, PGUSER or KAFKA_BOOTSTRAP_SERVERS is set (the test
session's ``servers`` fixture, or ``eval "$(outbox dev env)"``), the benchmarks use those
servers and never start one; otherwise they start the developer sandbox (``outbox dev up``).

Everything a benchmark creates (databases ``bench_*``, their replication slots, topics
``bench-*``) is dropped when it ends, also when it fails or is interrupted.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from outbox.dev.pos import drop_database

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("OUTBOX_BENCH_RESULTS") or ROOT / "bench" / "results")
OUTBOX = [sys.executable, "-m", "outbox.cli"]
PGBIN = Path("/usr/lib/postgresql/15/bin")
SERVER_VARS = ("PGHOST", "PGPORT", "PGUSER", "KAFKA_BOOTSTRAP_SERVERS")

# A realistic outbox payload, built by PostgreSQL itself (no client round trip per row): an
# order with three lines, ~400 bytes of jsonb text. ``n`` is the row's number in the statement.
PAYLOAD_SQL = """jsonb_build_object(
    'id', n, 'customer_id', (random() * 100000)::int, 'status', 'paid',
    'total', round((random() * 500)::numeric, 2), 'currency', 'EUR', 'placed_at', clock_timestamp(),
    'note', CASE WHEN random() < 0.3 THEN 'livraison à domicile' END,
    'store', jsonb_build_object('id', 'store-0042', 'register', 3, 'cashier', 'Zoë Müller'),
    'lines', jsonb_build_array(
        jsonb_build_object('sku', 'SKU-' || lpad((random() * 399)::int::text, 5, '0'), 'qty', 1 + (random() * 4)::int,
                           'unit_price', round((random() * 100)::numeric, 2)),
        jsonb_build_object('sku', 'SKU-' || lpad((random() * 399)::int::text, 5, '0'), 'qty', 1 + (random() * 4)::int,
                           'unit_price', round((random() * 100)::numeric, 2)),
        jsonb_build_object('sku', 'SKU-' || lpad((random() * 399)::int::text, 5, '0'), 'qty', 1 + (random() * 4)::int,
                           'unit_price', round((random() * 100)::numeric, 2))),
    'ref', md5(random()::text))"""

# k events in one statement (one transaction in autocommit): aggregate 'order', unique ids.
INSERT_EVENTS_SQL = (
    "INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload) "
    f"SELECT 'order', gen_random_uuid()::text, 'order.created', {PAYLOAD_SQL} FROM generate_series(1, %s) AS n"
)


# --------------------------------------------------------------------------- servers
def ensure_servers(say: Any = None) -> dict[str, str]:
    """The servers to use: those named in the environment, else the developer sandbox (started)."""
    if not any(os.environ.get(v) for v in SERVER_VARS):
        from outbox.dev.sandbox import Sandbox

        sandbox = Sandbox()
        sandbox.up()
        os.environ.update(sandbox.env())
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        raise SystemExit("bench: PGHOST/PGPORT/PGUSER are set but KAFKA_BOOTSTRAP_SERVERS is not: set it too")
    return {v: os.environ.get(v, "") for v in SERVER_VARS}


def bootstrap() -> str:
    return os.environ["KAFKA_BOOTSTRAP_SERVERS"]


def admin_conn() -> psycopg.Connection[Any]:
    return psycopg.connect(dbname="postgres", autocommit=True)


def pg_binary(name: str) -> str:
    path = PGBIN / name
    return str(path) if path.exists() else name


# --------------------------------------------------------------------------- scratch objects
def new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def create_topics(names: Sequence[str], partitions: int = 3, configs: dict[str, str] | None = None) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})
                                   for n in names])
    finally:
        await admin.close()
    await wait_topics(names, partitions)


async def wait_topics(names: Sequence[str], partitions: int, timeout: float = 30) -> None:
    """Until the broker describes every partition (create_topics returns before that)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap())
    await admin.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(list(names))
            if all(t.get("error_code") == 0 and len(t.get("partitions") or ()) == partitions for t in described):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics {names} not ready after {timeout:.0f} s: {described}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def delete_topics(prefix: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap())
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith((prefix, "__" + prefix))]  # and offsets
        if topics:
            await admin.delete_topics(topics)
    finally:
        await admin.close()


class Scratch:
    """Databases, topic prefixes and processes of one benchmark, all removed on exit."""

    def __init__(self) -> None:
        self.databases: list[str] = []
        self.topic_prefixes: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.files: list[Path] = []

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def database(self, prefix: str) -> str:
        name = new_name(prefix)
        with admin_conn() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return name

    def topic_prefix(self, prefix: str = "bench") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.topic_prefixes.append(name)
        return name

    def file(self, suffix: str) -> Path:
        fd, path = tempfile.mkstemp(prefix="outbox-bench-", suffix=suffix)
        os.close(fd)
        self.files.append(Path(path))
        return Path(path)

    def spawn(self, args: list[str], log: Path | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kw)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.processes:
            stop_process(proc)
        for name in self.databases:
            with contextlib.suppress(Exception):
                drop_database(name)
        for prefix in self.topic_prefixes:
            with contextlib.suppress(Exception):
                run_async(delete_topics(prefix))
        for path in self.files:
            path.unlink(missing_ok=True)
        self.processes, self.databases, self.topic_prefixes, self.files = [], [], [], []


def run_async(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, also when called inside a running loop."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 40) -> int | None:
    """SIGTERM (the relay then drains and confirms), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# --------------------------------------------------------------------------- the outbox pieces
def outbox_cli(*args: str) -> str:
    proc = subprocess.run(OUTBOX + list(args), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"outbox {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout


def install_outbox(dbname: str, captures: Iterable[str] = ()) -> None:
    outbox_cli("install", "--dsn", f"dbname={dbname}", *[a for c in captures for a in ("--capture", c)])


def relay_args(dbname: str, prefix: str, *extra: str) -> list[str]:
    return OUTBOX + ["relay", "--dsn", f"dbname={dbname}", "--source-id", "bench", "--kafka-bootstrap", bootstrap(),
                     "--topic-prefix", prefix, "--retention", "0", *extra]


DELIVERIES = ("at-least-once", "exactly-once")


def delivery_args(delivery: str, prefix: str) -> list[str]:
    """Relay options for a delivery mode; exactly-once keeps its offsets topic with the benchmark's topics."""
    if delivery == "at-least-once":
        return []
    return ["--delivery", delivery, "--offsets-topic", f"__{prefix}-offsets", "--transactional-id", f"bench-{prefix}"]


class Sentinel:
    """One last event written after a backlog, watched by a read_committed consumer: once it is visible,
    every event before it is too (in exactly-once mode, where end offsets also count transaction markers)."""

    AGGREGATE = "benchdone"

    def __init__(self, prefix: str) -> None:
        self.topic = f"{prefix}.{self.AGGREGATE}"
        self._consumer: Any = None
        self._partition: Any = None
        self.seen = False

    async def __aenter__(self) -> Sentinel:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(), enable_auto_commit=False,
                                          isolation_level="read_committed", fetch_max_wait_ms=10)
        with contextlib.suppress(Exception):  # exists already: an earlier run of this benchmark made it
            await create_topics([self.topic], partitions=1)
        await self._consumer.start()
        self._partition = TopicPartition(self.topic, 0)
        self._consumer.assign([self._partition])
        await self.arm()
        return self

    async def arm(self) -> None:
        """Watch for the next sentinel only."""
        await self._consumer.seek_to_end(self._partition)
        await self._consumer.position(self._partition)
        self.seen = False

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self) -> bool:
        if not self.seen:
            batches = await self._consumer.getmany(timeout_ms=10)
            self.seen = any(batches.values())
        return self.seen

    @classmethod
    def write(cls, dbname: str) -> None:
        with psycopg.connect(dbname=dbname, autocommit=True) as conn:
            conn.execute("INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload)"
                         " VALUES (%s, 'done', 'bench.done', '{}')", (cls.AGGREGATE,))


def wait_slot_active(dbname: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with admin_conn() as conn:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"relay exited {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
            if conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s AND active"
                            " AND slot_name LIKE 'outbox%%'", (dbname,)).fetchone():
                return
            time.sleep(0.05)
    raise RuntimeError(f"relay not streaming after {timeout:.0f} s: {log.read_text(errors='replace')[-1500:]}")


def write_events(dbname: str, sizes: Sequence[int], synchronous_commit: bool = False) -> float:
    """Commit one transaction of k events per entry of ``sizes``; returns the seconds it took."""
    with psycopg.connect(dbname=dbname, autocommit=True) as conn:
        if not synchronous_commit:
            conn.execute("SET synchronous_commit = off")
        started = time.perf_counter()
        with conn.pipeline() as pipeline:
            for k in sizes:
                conn.execute(INSERT_EVENTS_SQL, (k,), prepare=True)
                pipeline.sync()  # ends the implicit transaction: without it the whole pipeline is one
        return time.perf_counter() - started


def mixed_sizes(total: int, seed: int = 1) -> list[int]:
    """Transaction sizes summing to ``total``: half single events, some tens, a few in the hundreds."""
    import random

    rng = random.Random(seed)
    sizes: list[int] = []
    left = total
    while left > 0:
        r = rng.random()
        k = 1 if r < 0.5 else rng.randint(2, 10) if r < 0.8 else rng.randint(11, 50) if r < 0.95 else rng.randint(51, 500)
        k = min(k, left)
        sizes.append(k)
        left -= k
    return sizes


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class Offsets:
    """End offsets of a set of topics, polled with one aiokafka client (no consumer group)."""

    def __init__(self, topics: Sequence[str]) -> None:
        self.topics = list(topics)
        self._consumer: Any = None
        self._partitions: list[Any] = []

    async def __aenter__(self) -> Offsets:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap())
        await admin.start()
        try:
            described = await admin.describe_topics(self.topics)
        finally:
            await admin.close()
        self._partitions = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
        if not self._partitions:
            raise RuntimeError(f"no partitions for {self.topics}")
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap(), enable_auto_commit=False)
        await self._consumer.start()
        self._consumer.assign(self._partitions)  # makes the client track these topics' metadata
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def total(self) -> int:
        ends = await self._consumer.end_offsets(self._partitions)
        return int(sum(ends.values()))


# --------------------------------------------------------------------------- figures and results
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of unsorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def spread(values: Sequence[float]) -> str:
    return "runs: " + ", ".join(_fmt(v) for v in values) if len(values) > 1 else "1 run"


def _fmt(v: float) -> str:
    if v != v:  # nan
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def figure(bench: str, label: str, value: float, unit: str, detail: str = "") -> None:
    """One figure line; tests and readers rely on '<bench>  <label>  <value> <unit>'."""
    print(f"{bench:<9} {label:<48} {_fmt(value):>12} {unit:<9} {detail}".rstrip(), flush=True)


def say(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


@dataclass
class Result:
    benchmark: str
    quick: bool
    params: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def save(self) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"{self.benchmark}-{stamp}{'-quick' if self.quick else ''}.json"
        body = {"benchmark": self.benchmark, "quick": self.quick, "started": self.started, "machine": machine(),
                "params": self.params, "runs": self.runs, "figures": self.figures}
        path.write_text(json.dumps(body, indent=2, default=str) + "\n")
        print(f"{'':<9} saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
        return path


_MACHINE: dict[str, Any] | None = None


def machine() -> dict[str, Any]:
    """The machine and software versions, recorded with every result."""
    global _MACHINE
    if _MACHINE is not None:
        return _MACHINE
    import aiokafka

    info: dict[str, Any] = {"cores": os.cpu_count(), "python": platform.python_version(),
                            "aiokafka": aiokafka.__version__, "psycopg": psycopg.__version__,
                            "libpq": psycopg.pq.version(), "kernel": platform.release()}
    with contextlib.suppress(OSError):
        cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name")]
        info["cpu"] = cpu[0] if cpu else platform.processor()
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["ram_gib"] = round(int(mem[1]) / 1024 / 1024, 1)
    with contextlib.suppress(Exception), admin_conn() as conn:
        info["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        info["pg_settings"] = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers',"
            " 'wal_level', 'max_wal_size')").fetchall())
    with contextlib.suppress(Exception):
        from outbox.dev.sandbox import KAFKA_VERSION

        info["kafka"] = f"{KAFKA_VERSION} (sandbox jars; broker not asked)"
    with contextlib.suppress(Exception):
        out = subprocess.run(["kcat", "-V"], capture_output=True, text=True, timeout=10).stdout
        info["kcat"] = next((ln.strip() for ln in out.splitlines() if ln.strip().startswith("Version")), "")
    _MACHINE = info
    return info


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("consumers").setLevel(logging.WARNING)
    yield
