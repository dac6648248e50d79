"""``outbox dev``: a local PostgreSQL 15 and a single-node Kafka (KRaft), run as plain processes.

Everything lives under one directory (``--dir``, else ``$OUTBOX_SANDBOX_DIR``, else
``/var/lib/outbox-relay/sandbox`` for root or ``~/.local/share/outbox-relay/sandbox``)::

    sandbox.json            ports and Kafka cluster id, recorded by the first ``up``
    pg/data/                the cluster (postmaster.pid inside); pg/socket/; pg/postgres.log
    kafka/server.properties kafka/data/ kafka/kafka.pid kafka/kafka.log

Kafka's jars come from Maven Central (``sandbox_kafka/pom.xml``) into a cache folder and are
checked against ``sandbox_kafka/jars.sha256`` before every start. Pure logic (paths, ports,
config text, manifests, the Kafka metadata probe) comes first; the I/O edges follow.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from outbox.errors import SandboxError
from outbox.lazy import LazyGroup

KAFKA_VERSION = "4.1.1"
DEFAULT_PG_PORT = 54329
DEFAULT_KAFKA_PORT = 39092
DEFAULT_PG_BINDIR = Path("/usr/lib/postgresql/15/bin")
ROOT_SANDBOX_DIR = Path("/var/lib/outbox-relay/sandbox")
PG_SUPERUSER = "outbox"
PG_OS_USER = "postgres"  # initdb and postgres refuse to run as root
READY_TIMEOUT = 90.0
KAFKA_STOP_TIMEOUT = 30.0
KAFKA_DIR = Path(__file__).resolve().with_name("sandbox_kafka")
POM = KAFKA_DIR / "pom.xml"
MANIFEST = KAFKA_DIR / "jars.sha256"
PG_CONF_NAME = "outbox-sandbox.conf"
PG_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
STATUS_NOT_RUNNING = 3

Echo = Callable[[str], None]


# =========================================================================== pure logic
@dataclass(frozen=True)
class Ports:
    pg: int
    kafka: int

    @property
    def controller(self) -> int:
        """The KRaft controller listener sits right above the broker port."""
        return self.kafka + 1


@dataclass(frozen=True)
class State:
    """What the first ``up`` records in ``sandbox.json``."""

    ports: Ports
    cluster_id: str


@dataclass(frozen=True)
class Layout:
    """Every path of one sandbox directory."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "sandbox.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def pg(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg / "data"

    @property
    def pg_socket(self) -> Path:
        return self.pg / "socket"

    @property
    def pg_log(self) -> Path:
        return self.pg / "postgres.log"

    @property
    def initdb_log(self) -> Path:
        return self.pg / "initdb.log"

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def kafka_data(self) -> Path:
        return self.kafka / "data"

    @property
    def kafka_props(self) -> Path:
        return self.kafka / "server.properties"

    @property
    def kafka_pidfile(self) -> Path:
        return self.kafka / "kafka.pid"

    @property
    def kafka_log(self) -> Path:
        return self.kafka / "kafka.log"

    @property
    def format_log(self) -> Path:
        return self.kafka / "format.log"


@dataclass(frozen=True)
class ServerStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    data_dir: Path


def default_sandbox_dir(environ: Mapping[str, str], euid: int, home: Path) -> Path:
    """``$OUTBOX_SANDBOX_DIR``, else a system path for root (reachable by ``postgres``), else XDG data."""
    if environ.get("OUTBOX_SANDBOX_DIR"):
        return Path(environ["OUTBOX_SANDBOX_DIR"]).expanduser().absolute()
    if euid == 0:
        return ROOT_SANDBOX_DIR
    data_home = Path(environ["XDG_DATA_HOME"]) if environ.get("XDG_DATA_HOME") else home / ".local" / "share"
    return data_home / "outbox-relay" / "sandbox"


def default_cache_dir(environ: Mapping[str, str], home: Path) -> Path:
    if environ.get("OUTBOX_CACHE_DIR"):
        return Path(environ["OUTBOX_CACHE_DIR"]).expanduser().absolute()
    cache_home = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else home / ".cache"
    return cache_home / "outbox-relay"


def kafka_libs_dir(cache_dir: Path) -> Path:
    return cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"


def resolve_ports(pg: int | None, kafka: int | None, recorded: Ports | None, where: Path,
                  fixed: bool = True) -> Ports:
    """Explicit ports, else the recorded ones, else the defaults.

    Once a server has data (``fixed``) the ports never change: Kafka's storage records its
    controller address when formatted. An explicit port that differs is then an error.
    """
    if recorded is not None and fixed:
        if (pg is not None and pg != recorded.pg) or (kafka is not None and kafka != recorded.kafka):
            raise SandboxError(
                f"the sandbox in {where} uses PostgreSQL port {recorded.pg} and Kafka port {recorded.kafka}: "
                f"drop --pg-port/--kafka-port (and OUTBOX_SANDBOX_*_PORT), or use another --dir"
            )
        return recorded
    base = recorded or Ports(DEFAULT_PG_PORT, DEFAULT_KAFKA_PORT)
    ports = Ports(pg or base.pg, kafka or base.kafka)
    check_ports(ports)
    return ports


def check_ports(ports: Ports) -> None:
    if not (1 <= ports.pg <= 65535 and 1 <= ports.kafka <= 65534):
        raise SandboxError(f"invalid sandbox ports {ports.pg}/{ports.kafka}: use 1-65535 (Kafka also needs port+1)")
    if ports.pg in (ports.kafka, ports.controller):
        raise SandboxError(
            f"PostgreSQL port {ports.pg} collides with Kafka's ports {ports.kafka}-{ports.controller}: pick another"
        )


def state_json(state: State) -> str:
    return json.dumps(
        {"pg_port": state.ports.pg, "kafka_port": state.ports.kafka, "kafka_cluster_id": state.cluster_id},
        indent=2,
    ) + "\n"


def parse_state(text: str, path: Path) -> State:
    try:
        data = json.loads(text)
        return State(Ports(int(data["pg_port"]), int(data["kafka_port"])), str(data["kafka_cluster_id"]))
    except (ValueError, KeyError, TypeError):
        raise SandboxError(f"{path} is damaged: fix or delete it (it records the sandbox's ports)") from None


def new_cluster_id(raw: bytes | None = None) -> str:
    """A Kafka cluster id: a random UUID in unpadded base64url, never starting with '-' (as Kafka's)."""
    while True:
        data = raw if raw is not None else uuid.uuid4().bytes
        text = base64.urlsafe_b64encode(data).decode().rstrip("=")
        if not text.startswith("-") or raw is not None:
            return text


def sandbox_env(directory: Path, ports: Ports) -> dict[str, str]:
    """Variables that point libpq (as the trusted superuser) and Kafka clients at the sandbox."""
    return {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(ports.pg),
        "PGUSER": PG_SUPERUSER,
        "PGDATABASE": "postgres",
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{ports.kafka}",
        "OUTBOX_SANDBOX_DIR": str(directory),
    }


def export_lines(env: Mapping[str, str]) -> str:
    """Shell text for ``eval "$(outbox dev env)"``."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def _pg_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def postgres_settings(port: int, socket_dir: Path) -> str:
    """The sandbox's settings, included at the end of postgresql.conf (ALTER SYSTEM still wins)."""
    return (
        "# Written by 'outbox dev up' before each start: edits here are overwritten.\n"
        "listen_addresses = '127.0.0.1'\n"
        f"port = {port}\n"
        f"unix_socket_directories = {_pg_quote(str(socket_dir))}\n"
        "wal_level = logical\n"
        "max_replication_slots = 50\n"
        "max_wal_senders = 50\n"
    )


def include_line() -> str:
    return f"\n# outbox-relay sandbox settings\ninclude_if_exists = '{PG_CONF_NAME}'\n"


def socket_path_problem(socket_dir: Path, port: int) -> str | None:
    path = str(socket_dir / f".s.PGSQL.{port}")
    if len(path.encode()) > SOCKET_PATH_MAX:
        return (f"PostgreSQL's socket path {path} is longer than {SOCKET_PATH_MAX} bytes: "
                f"choose a shorter sandbox --dir")
    return None


def kafka_properties(ports: Ports, data_dir: Path) -> str:
    """server.properties of a combined broker+controller (KRaft) on 127.0.0.1 only."""
    return "\n".join([
        "# Written by 'outbox dev up' before each start: edits here are overwritten.",
        "process.roles=broker,controller",
        "node.id=1",
        f"listeners=PLAINTEXT://127.0.0.1:{ports.kafka},CONTROLLER://127.0.0.1:{ports.controller}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{ports.kafka}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"controller.quorum.bootstrap.servers=127.0.0.1:{ports.controller}",
        f"log.dirs={data_dir}",
        "num.partitions=3",
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        "",
    ])


def parse_manifest(text: str, source: Path = MANIFEST) -> dict[str, str]:
    """``sha256sum`` output (``<hex>  <name>`` or ``<hex> *<name>``) as name -> digest."""
    result: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name.lstrip(" *")
        if len(digest) != 64 or not name or "/" in name or any(c not in "0123456789abcdef" for c in digest):
            raise SandboxError(f"{source} line {number} is not '<sha256>  <jar name>': fix the manifest")
        result[name] = digest
    return result


def manifest_problems(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Missing, unexpected and mismatching jars, one short phrase each (empty when all match)."""
    problems = [f"{name} missing" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"{name} unexpected" for name in sorted(actual.keys() - expected.keys())]
    problems += [f"{name} has the wrong sha256" for name in sorted(expected.keys() & actual.keys())
                 if expected[name] != actual[name]]
    return problems


def summarize(problems: list[str], limit: int = 3) -> str:
    more = f" and {len(problems) - limit} more" if len(problems) > limit else ""
    return ", ".join(problems[:limit]) + more


def install_hint(package: str, euid: int) -> str:
    sudo = "" if euid == 0 else "sudo "
    return f"run '{sudo}apt-get install -y {package}'"


def can_traverse(mode: int, owner: int, group: int, uid: int, gids: set[int]) -> bool:
    """Whether a user may enter a directory with these permission bits."""
    if uid == owner:
        return bool(mode & stat.S_IXUSR)
    if group in gids:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def format_status(servers: list[ServerStatus]) -> str:
    lines = []
    for s in servers:
        state = f"running (pid {s.pid})" if s.running else "stopped"
        lines.append(f"{s.name:<11} {state:<20} {s.address:<16} data {s.data_dir}")
    return "\n".join(lines)


# =========================================================================== tools on this machine
def _path_of(environ: Mapping[str, str]) -> str | None:
    return environ.get("PATH", os.defpath)


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in PG_SERVER_BINARIES)


def find_pg_bindir(environ: Mapping[str, str], euid: int, default: Path = DEFAULT_PG_BINDIR) -> Path:
    """``$OUTBOX_PG_BINDIR``, else the Debian path of PostgreSQL 15, else ``pg_config --bindir``."""
    hint = f"{install_hint('postgresql-15', euid)} (or set OUTBOX_PG_BINDIR)"
    if environ.get("OUTBOX_PG_BINDIR"):
        bindir = Path(environ["OUTBOX_PG_BINDIR"])
        if _has_server_binaries(bindir):
            return bindir
        raise SandboxError(f"OUTBOX_PG_BINDIR={bindir} lacks initdb, pg_ctl or postgres: {hint}")
    if _has_server_binaries(default):
        return default
    pg_config = shutil.which("pg_config", path=_path_of(environ))
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            if _has_server_binaries(Path(out.stdout.strip())):
                return Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    raise SandboxError(f"PostgreSQL 15 server binaries not found: {hint}")


def find_java(environ: Mapping[str, str], euid: int) -> str:
    java = shutil.which("java", path=_path_of(environ))
    if not java:
        raise SandboxError(f"Java not found on PATH (Kafka needs Java 17+): "
                           f"{install_hint('openjdk-17-jre-headless', euid)}")
    return java


def find_mvn(environ: Mapping[str, str], euid: int) -> str:
    mvn = shutil.which("mvn", path=_path_of(environ))
    if not mvn:
        raise SandboxError(f"Maven not found on PATH (it fetches the Kafka jars once): {install_hint('maven', euid)}")
    return mvn


# =========================================================================== jars
def hash_jars(libs: Path) -> dict[str, str]:
    """sha256 of every file in a folder (any file counts, so an extra one is noticed)."""
    result = {}
    for path in sorted(libs.iterdir()):
        if path.is_file():
            with open(path, "rb") as fh:
                result[path.name] = hashlib.file_digest(fh, "sha256").hexdigest()
        else:
            result[path.name + "/"] = ""
    return result


def load_manifest(path: Path = MANIFEST) -> dict[str, str]:
    try:
        return parse_manifest(path.read_text(), path)
    except OSError as exc:
        raise SandboxError(f"cannot read the jar manifest {path}: {exc.strerror}; reinstall outbox-relay") from None


def verify_jars(libs: Path, expected: Mapping[str, str]) -> None:
    """Raise unless ``libs`` holds exactly the manifest's jars."""
    if not libs.is_dir():
        raise SandboxError(f"Kafka {KAFKA_VERSION} jars not found in {libs}: run 'outbox dev fetch'")
    problems = manifest_problems(expected, hash_jars(libs))
    if problems:
        raise SandboxError(f"Kafka jars in {libs} do not match {MANIFEST.name} ({summarize(problems)}): "
                           f"run 'outbox dev fetch' to replace them")


def fetch_jars(libs: Path, expected: Mapping[str, str], mvn: str, echo: Echo) -> None:
    """Download with Maven into a temporary folder next to ``libs``, verify, then rename into place."""
    parent = libs.parent
    parent.mkdir(parents=True, exist_ok=True)
    log = parent / "fetch.log"
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=parent))
    try:
        shutil.copy(POM, work / "pom.xml")  # Maven may write next to the pom: keep the package clean
        echo(f"fetching Kafka {KAFKA_VERSION} jars from Maven Central...")
        started = time.monotonic()
        cmd = [mvn, "-B", "-q", "--strict-checksums", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={work / 'libs'}"]
        with open(log, "wb") as out:
            try:
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=work, timeout=1800).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        if rc != 0:
            raise SandboxError(f"fetching the Kafka jars with Maven failed (exit {rc}): read {log}")
        problems = manifest_problems(expected, hash_jars(work / "libs"))
        if problems:
            raise SandboxError(f"Kafka jars fetched from Maven Central do not match {MANIFEST} "
                               f"({summarize(problems)}): not using them; read {log}")
        _replace_dir(work / "libs", libs, work / "old")
        echo(f"fetched {len(expected)} Kafka jars into {libs} ({time.monotonic() - started:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _replace_dir(new: Path, target: Path, trash: Path) -> None:
    if target.exists():
        target.rename(trash)
    try:
        new.rename(target)
    except OSError:  # a concurrent fetch won the race: fine if what it put there is right
        if not target.is_dir():
            raise


# =========================================================================== processes
def pid_alive(pid: int) -> bool:
    """True for a live process (a zombie counts as dead: PID 1 may be slow to reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def pid_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]
    except OSError:
        return []


def read_pid(path: Path) -> int | None:
    """The first line of a pid file (postmaster.pid or our kafka.pid), or None."""
    try:
        first = path.read_text().split("\n", 1)[0].strip()
        return int(first) if first else None
    except (OSError, ValueError):
        return None


def port_in_use(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def kafka_metadata_ok(port: int, timeout: float = 2.0) -> bool:
    """Whether the broker answers a Metadata request listing at least one broker."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # log_level 0: librdkafka would print a line per refused connection while Kafka starts
    client = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "client.id": "outbox-sandbox",
                          "socket.timeout.ms": max(int(timeout * 1000), 10), "log_level": 0})
    try:
        return bool(client.list_topics(timeout=timeout).brokers)
    except KafkaException:
        return False


@dataclass(frozen=True)
class OsUser:
    """Who runs PostgreSQL: ourselves, or ``postgres`` when we are root."""

    uid: int
    gid: int
    name: str
    switch: bool

    def chown(self, path: Path) -> None:
        if self.switch:
            os.chown(path, self.uid, self.gid)


def pg_os_user(euid: int) -> OsUser:
    if euid != 0:
        return OsUser(euid, os.getegid(), pwd.getpwuid(euid).pw_name, switch=False)
    try:
        entry = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise SandboxError(f"OS user '{PG_OS_USER}' not found (PostgreSQL refuses to run as root): "
                           f"{install_hint('postgresql-15', euid)}, which creates it") from None
    return OsUser(entry.pw_uid, entry.pw_gid, PG_OS_USER, switch=True)


def _gids_of(user: OsUser) -> set[int]:
    return set(os.getgrouplist(user.name, user.gid))


def _server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without libpq variables (they must not steer pg_ctl or initdb)."""
    return {k: v for k, v in environ.items() if not k.startswith("PG")}


def _run_as(user: OsUser, cmd: list[str], cwd: Path, environ: Mapping[str, str], timeout: float,
            log: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool as ``user``: output captured, or written to ``log`` when given."""
    uid = user.uid if user.switch else None
    gid = user.gid if user.switch else None
    groups: list[int] | None = [] if user.switch else None
    try:
        if log is None:
            return subprocess.run(cmd, cwd=cwd, env=_server_env(environ), stdin=subprocess.DEVNULL, timeout=timeout,
                                  capture_output=True, text=True, start_new_session=True,
                                  user=uid, group=gid, extra_groups=groups)
        with open(log, "w") as out:
            return subprocess.run(cmd, cwd=cwd, env=_server_env(environ), stdin=subprocess.DEVNULL, timeout=timeout,
                                  stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                  user=uid, group=gid, extra_groups=groups)
    except subprocess.TimeoutExpired:
        raise SandboxError(f"{Path(cmd[0]).name} did not finish within {timeout:.0f} s: "
                           f"read {log or 'the PostgreSQL log'}") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _echo_stderr(message: str) -> None:
    click.echo(message, err=True)


# =========================================================================== the sandbox
class Sandbox:
    """One sandbox directory with its PostgreSQL and Kafka. No I/O happens before a method call."""

    def __init__(self, directory: str | Path | None = None, *, pg_port: int | None = None,
                 kafka_port: int | None = None, environ: Mapping[str, str] | None = None,
                 echo: Echo = _echo_stderr) -> None:
        self._directory = directory
        self._pg_port = pg_port
        self._kafka_port = kafka_port
        self._environ = environ
        self.echo = echo

    # ---------------------------------------------------------------- where things are
    @property
    def environ(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    @property
    def directory(self) -> Path:
        if self._directory is not None:
            return Path(self._directory).expanduser().absolute()
        return default_sandbox_dir(self.environ, os.geteuid(), Path.home())

    @property
    def layout(self) -> Layout:
        return Layout(self.directory)

    @property
    def libs(self) -> Path:
        return kafka_libs_dir(default_cache_dir(self.environ, Path.home()))

    def recorded(self) -> State | None:
        path = self.layout.state
        try:
            return parse_state(path.read_text(), path)
        except FileNotFoundError:
            return None

    def has_data(self) -> bool:
        """Whether either server was ever initialised here (from then on its ports are fixed)."""
        layout = self.layout
        return (layout.pg_data / "PG_VERSION").exists() or (layout.kafka_data / "meta.properties").exists()

    def ports(self) -> Ports:
        recorded = self.recorded()
        return resolve_ports(self._pg_port, self._kafka_port, recorded.ports if recorded else None,
                             self.directory, fixed=self.has_data())

    def env(self) -> dict[str, str]:
        """What ``outbox dev env`` exports, as a dict."""
        return sandbox_env(self.directory, self.ports())

    # ---------------------------------------------------------------- state of the servers
    def pg_pid(self) -> int | None:
        pid = read_pid(self.layout.pg_data / "postmaster.pid")
        if pid and pid_alive(pid) and any("postgres" in part for part in pid_cmdline(pid)[:1]):
            return pid
        return None

    def kafka_pid(self) -> int | None:
        pid = read_pid(self.layout.kafka_pidfile)
        if pid and pid_alive(pid) and "kafka.Kafka" in pid_cmdline(pid):
            return pid
        return None

    def status(self) -> list[ServerStatus]:
        ports, layout = self.ports(), self.layout
        pg_pid, kafka_pid = self.pg_pid(), self.kafka_pid()
        return [
            ServerStatus("PostgreSQL", pg_pid is not None, pg_pid, f"127.0.0.1:{ports.pg}", layout.pg_data),
            ServerStatus("Kafka", kafka_pid is not None, kafka_pid, f"127.0.0.1:{ports.kafka}", layout.kafka_data),
        ]

    # ---------------------------------------------------------------- commands
    def fetch(self) -> Path:
        """Make sure the cache holds the manifest's Kafka jars; download them again when it does not."""
        libs, expected = self.libs, load_manifest()
        if libs.is_dir() and not manifest_problems(expected, hash_jars(libs)):
            self.echo(f"Kafka {KAFKA_VERSION} jars verified in {libs}")
            return libs
        fetch_jars(libs, expected, find_mvn(self.environ, os.geteuid()), self.echo)
        return libs

    def up(self) -> None:
        """Start whatever is not running yet; first run: initdb, fetch jars, format Kafka storage."""
        euid = os.geteuid()
        ports = self.ports()
        self._make_root(euid)
        with self._locked():
            state = self._record(ports)
            pg_running, kafka_running = self.pg_pid(), self.kafka_pid()
            bindir = None if pg_running else find_pg_bindir(self.environ, euid)
            java = None if kafka_running else find_java(self.environ, euid)
            if java is not None:
                self._ensure_jars(euid)
            if bindir is None:
                self.echo(f"PostgreSQL already running on 127.0.0.1:{ports.pg} (pid {pg_running})")
            else:
                self._start_pg(bindir, ports.pg, pg_os_user(euid))
            if java is None:
                self.echo(f"Kafka already running on 127.0.0.1:{ports.kafka} (pid {kafka_running})")
            else:
                self._start_kafka(java, state)

    def down(self) -> None:
        """Stop both servers (data is kept); stopping a stopped sandbox is fine."""
        if not self.directory.is_dir():
            self.echo(f"no sandbox in {self.directory}: nothing to stop")
            return
        with self._locked():
            self._stop_kafka()
            self._stop_pg()

    def stop_kafka(self) -> None:
        """Stop only Kafka (fault tests: the broker goes away); :meth:`up` starts it again."""
        with self._locked():
            self._stop_kafka()

    def restart_pg(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, the data stays (fault tests)."""
        euid = os.geteuid()
        bindir = find_pg_bindir(self.environ, euid)
        with self._locked():
            self.echo("restarting PostgreSQL...")
            cmd = [str(bindir / "pg_ctl"), "-D", str(self.layout.pg_data), "-l", str(self.layout.pg_log),
                   "-m", "fast", "-w", "-t", str(int(READY_TIMEOUT)), "restart"]
            done = _run_as(pg_os_user(euid), cmd, self.layout.pg, self.environ, READY_TIMEOUT + 30)
            if done.returncode != 0:
                why = _last_line(done.stdout + done.stderr)
                raise SandboxError(f"PostgreSQL did not restart ({why}): read {self.layout.pg_log}")

    def stop_postgres(self) -> None:
        """Stop PostgreSQL only (fast shutdown; fault tests keep it down a while); ``up`` starts it again."""
        with self._locked():
            self._stop_pg()

    # ---------------------------------------------------------------- steps
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.layout.lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _make_root(self, euid: int) -> None:
        """Create the sandbox directory; as root, make sure ``postgres`` can reach it."""
        root = self.directory
        missing = [p for p in (root, *root.parents) if not p.exists()]
        for path in reversed(missing):
            path.mkdir(mode=0o755)
        if euid != 0:
            return
        mode = root.stat().st_mode
        if not mode & stat.S_IXOTH:
            root.chmod(stat.S_IMODE(mode) | stat.S_IXGRP | stat.S_IXOTH)  # our directory: let postgres in
        user = pg_os_user(euid)
        gids = _gids_of(user)
        for path in reversed([root, *root.parents]):
            st = path.stat()
            if not can_traverse(st.st_mode, st.st_uid, st.st_gid, user.uid, gids):
                raise SandboxError(
                    f"PostgreSQL runs as OS user '{user.name}' (it refuses root), which cannot enter {path}: "
                    f"choose a --dir it can reach (e.g. under /var/lib) or run 'chmod o+x {path}'"
                )

    def _record(self, ports: Ports) -> State:
        state = self.recorded()
        if state is None or state.ports != ports:
            state = State(ports, state.cluster_id if state else new_cluster_id())
            tmp = self.layout.state.with_suffix(".tmp")
            tmp.write_text(state_json(state))
            tmp.replace(self.layout.state)
        return state

    def _ensure_jars(self, euid: int) -> None:
        expected = load_manifest()
        if not self.libs.is_dir():
            fetch_jars(self.libs, expected, find_mvn(self.environ, euid), self.echo)
        verify_jars(self.libs, expected)

    def _start_pg(self, bindir: Path, port: int, user: OsUser) -> None:
        layout = self.layout
        problem = socket_path_problem(layout.pg_socket, port)
        if problem:
            raise SandboxError(problem)
        if port_in_use(port):
            raise SandboxError(f"port {port} on 127.0.0.1 is taken by another program: stop it, or choose "
                               f"another --pg-port (with a new --dir if this sandbox ever started)")
        for path in (layout.pg, layout.pg_socket):
            path.mkdir(mode=0o700 if path == layout.pg_socket else 0o755, exist_ok=True)
            user.chown(path)
        if not (layout.pg_data / "PG_VERSION").exists():
            self._initdb(bindir, user)
        conf = layout.pg_data / PG_CONF_NAME
        conf.write_text(postgres_settings(port, layout.pg_socket))
        user.chown(conf)
        self.echo(f"starting PostgreSQL on 127.0.0.1:{port}...")
        started = time.monotonic()
        cmd = [str(bindir / "pg_ctl"), "-D", str(layout.pg_data), "-l", str(layout.pg_log),
               "-w", "-t", str(int(READY_TIMEOUT)), "start"]
        done = _run_as(user, cmd, layout.pg, self.environ, READY_TIMEOUT + 30)
        if done.returncode != 0:
            why = _last_line(done.stdout + done.stderr)
            raise SandboxError(f"PostgreSQL did not start on 127.0.0.1:{port} ({why}): read {layout.pg_log}")
        self.echo(f"PostgreSQL ready on 127.0.0.1:{port} ({time.monotonic() - started:.1f} s)")

    def _initdb(self, bindir: Path, user: OsUser) -> None:
        layout = self.layout
        self.echo(f"creating a PostgreSQL cluster in {layout.pg_data}...")
        # Trust authentication: the server listens on 127.0.0.1 and a private socket directory
        # only, so only local users of this machine can reach it, as on a developer laptop.
        cmd = [str(bindir / "initdb"), "-D", str(layout.pg_data), "-U", PG_SUPERUSER, "--auth=trust",
               "-E", "UTF8", "--locale=C.UTF-8"]
        done = _run_as(user, cmd, layout.pg, self.environ, 300, log=layout.initdb_log)
        if done.returncode != 0:
            raise SandboxError(f"initdb failed (exit {done.returncode}): read {layout.initdb_log}")
        with open(layout.pg_data / "postgresql.conf", "a") as fh:
            fh.write(include_line())

    def _start_kafka(self, java: str, state: State) -> None:
        layout, ports = self.layout, state.ports
        for port in (ports.kafka, ports.controller):
            if port_in_use(port):
                raise SandboxError(f"port {port} on 127.0.0.1 is taken by another program (Kafka needs "
                                   f"{ports.kafka} and {ports.controller}): stop it, or choose another "
                                   f"--kafka-port (with a new --dir if this sandbox ever started)")
        layout.kafka.mkdir(exist_ok=True)
        layout.kafka_props.write_text(kafka_properties(ports, layout.kafka_data))
        classpath = f"{self.libs}/*"
        if not (layout.kafka_data / "meta.properties").exists():
            self._format_kafka(java, classpath, state.cluster_id)
        self.echo(f"starting Kafka {KAFKA_VERSION} on 127.0.0.1:{ports.kafka}...")
        started = time.monotonic()
        pid = self._spawn_kafka(java, classpath)
        deadline = started + READY_TIMEOUT
        while not kafka_metadata_ok(ports.kafka):
            if not pid_alive(pid):
                raise SandboxError(f"Kafka exited while starting on 127.0.0.1:{ports.kafka}: read {layout.kafka_log}")
            if time.monotonic() > deadline:
                self._stop_kafka()
                raise SandboxError(f"Kafka was not ready on 127.0.0.1:{ports.kafka} within {READY_TIMEOUT:.0f} s "
                                   f"(stopped it): read {layout.kafka_log}")
            time.sleep(0.25)
        self.echo(f"Kafka ready on 127.0.0.1:{ports.kafka} ({time.monotonic() - started:.1f} s)")

    def _format_kafka(self, java: str, classpath: str, cluster_id: str) -> None:
        layout = self.layout
        self.echo(f"formatting Kafka storage in {layout.kafka_data}...")
        cmd = [java, "-Xmx256m", "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone",
               "-t", cluster_id, "-c", str(layout.kafka_props)]
        with open(layout.format_log, "w") as out:
            try:
                rc = subprocess.run(cmd, cwd=layout.kafka, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=180).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        if rc != 0:
            raise SandboxError(f"formatting Kafka storage failed (exit {rc}): read {layout.format_log}")

    def _spawn_kafka(self, java: str, classpath: str) -> int:
        """Start the broker detached: a throw-away ``sh`` in a new session backgrounds it and exits,
        so Kafka is never our child (no zombie, nothing for Python to reap) and outlives us."""
        layout = self.layout
        cmd = [java, "-Xmx512m", "-XX:+ExitOnOutOfMemoryError",
               "-Dorg.slf4j.simpleLogger.showDateTime=true",
               "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS",
               "-cp", classpath, "kafka.Kafka", str(layout.kafka_props)]
        script = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'
        done = subprocess.run(["sh", "-c", script, "sh", str(layout.kafka_log), *cmd], cwd=layout.kafka,
                              capture_output=True, text=True, timeout=30, start_new_session=True)
        try:
            pid = int(done.stdout.strip())
        except ValueError:
            raise SandboxError(f"could not start Kafka ({_last_line(done.stderr)}): read {layout.kafka_log}") from None
        layout.kafka_pidfile.write_text(f"{pid}\n")
        return pid

    def _stop_kafka(self) -> None:
        pid = self.kafka_pid()
        if pid is None:
            self.layout.kafka_pidfile.unlink(missing_ok=True)
            self.echo("Kafka is not running")
            return
        self.echo(f"stopping Kafka (pid {pid})...")
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, KAFKA_STOP_TIMEOUT):
            self.echo(f"Kafka did not stop within {KAFKA_STOP_TIMEOUT:.0f} s: killing it")
            os.kill(pid, signal.SIGKILL)
            if not _wait_gone(pid, 10):
                raise SandboxError(f"Kafka (pid {pid}) survived SIGKILL: read {self.layout.kafka_log}")
        self.layout.kafka_pidfile.unlink(missing_ok=True)
        self.echo(f"Kafka stopped ({time.monotonic() - started:.1f} s)")

    def _stop_pg(self) -> None:
        pid = self.pg_pid()
        if pid is None:
            self.echo("PostgreSQL is not running")
            return
        euid = os.geteuid()
        bindir = find_pg_bindir(self.environ, euid)
        self.echo(f"stopping PostgreSQL (pid {pid})...")
        started = time.monotonic()
        cmd = [str(bindir / "pg_ctl"), "-D", str(self.layout.pg_data), "-m", "fast", "-w", "-t", "60", "stop"]
        done = _run_as(pg_os_user(euid), cmd, self.layout.pg, self.environ, 90)
        if done.returncode != 0 and pid_alive(pid):
            why = _last_line(done.stdout + done.stderr)
            raise SandboxError(f"PostgreSQL did not stop ({why}): read {self.layout.pg_log}")
        self.echo(f"PostgreSQL stopped ({time.monotonic() - started:.1f} s)")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# =========================================================================== the CLI
_dir_option = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), envvar="OUTBOX_SANDBOX_DIR",
    help="Sandbox directory [default: $OUTBOX_SANDBOX_DIR, else /var/lib/outbox-relay/sandbox as root, "
         "else ~/.local/share/outbox-relay/sandbox].",
)
_pg_port_option = click.option(
    "--pg-port", type=click.IntRange(1, 65535), envvar="OUTBOX_SANDBOX_PG_PORT",
    help=f"PostgreSQL port on 127.0.0.1 [default: {DEFAULT_PG_PORT}; later commands reuse the recorded one].",
)
_kafka_port_option = click.option(
    "--kafka-port", type=click.IntRange(1, 65534), envvar="OUTBOX_SANDBOX_KAFKA_PORT",
    help=f"Kafka port on 127.0.0.1; the KRaft controller takes the next one [default: {DEFAULT_KAFKA_PORT}].",
)


# the reference CRM pulls in aiohttp (~0.1 s): imported only for "dev crm"
@click.group(cls=LazyGroup, lazy={"crm": "outbox.dev.crm_reference:crm"})
def dev() -> None:
    """A local PostgreSQL 15 and Kafka (KRaft) for development, tests and the demo.

    \b
      outbox dev up               start both (first run: initdb, fetch Kafka jars, format storage)
      eval "$(outbox dev env)"    point psql, libpq and Kafka clients at them
      outbox dev status           show both; exit 0 when both run, 3 otherwise
      outbox dev down             stop both; data is kept for the next 'up'

    Everything (data, logs, pids, ports) lives in one directory. Both servers listen on
    127.0.0.1 only; PostgreSQL trusts local connections (superuser 'outbox').
    """


@dev.command()
@_dir_option
@_pg_port_option
@_kafka_port_option
def up(directory: Path | None, pg_port: int | None, kafka_port: int | None) -> None:
    """Start the sandbox's PostgreSQL and Kafka (already running ones are left alone)."""
    Sandbox(directory, pg_port=pg_port, kafka_port=kafka_port).up()


@dev.command()
@_dir_option
def down(directory: Path | None) -> None:
    """Stop both servers (PostgreSQL fast shutdown; Kafka SIGTERM, SIGKILL after 30 s). Data is kept."""
    Sandbox(directory).down()


@dev.command()
@_dir_option
@_pg_port_option
@_kafka_port_option
def env(directory: Path | None, pg_port: int | None, kafka_port: int | None) -> None:
    """Print shell exports for the sandbox: eval "$(outbox dev env)" then psql, outbox, kcat."""
    click.echo(export_lines(Sandbox(directory, pg_port=pg_port, kafka_port=kafka_port).env()), nl=False)


@dev.command()
@_dir_option
@click.pass_context
def status(ctx: click.Context, directory: Path | None) -> None:
    """Show whether each server runs (pid, address, data directory).

    Exit status: 0 when both run, 3 otherwise.
    """
    servers = Sandbox(directory).status()
    click.echo(format_status(servers))
    if not all(s.running for s in servers):
        ctx.exit(STATUS_NOT_RUNNING)


@dev.command()
def fetch() -> None:
    """Download the Kafka jars from Maven Central (once) and verify them against jars.sha256.

    The cache is $OUTBOX_CACHE_DIR, else ~/.cache/outbox-relay.
    """
    Sandbox().fetch()
