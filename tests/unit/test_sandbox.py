"""The sandbox's pure parts: paths, ports, config text, exports, jar manifests, tool messages."""
from __future__ import annotations

import hashlib
import shlex
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from outbox.dev import sandbox as sb
from outbox.errors import SandboxError

HOME = Path("/home/ann")


# --------------------------------------------------------------------------- directories
def test_dir_from_environment_wins() -> None:
    assert sb.default_sandbox_dir({"OUTBOX_SANDBOX_DIR": "/srv/sbx"}, 0, HOME) == Path("/srv/sbx")


def test_dir_for_root_is_reachable_by_postgres() -> None:
    assert sb.default_sandbox_dir({}, 0, Path("/root")) == Path("/var/lib/outbox-relay/sandbox")


def test_dir_for_a_user_is_under_their_data_home() -> None:
    assert sb.default_sandbox_dir({}, 1000, HOME) == HOME / ".local/share/outbox-relay/sandbox"
    assert sb.default_sandbox_dir({"XDG_DATA_HOME": "/x"}, 1000, HOME) == Path("/x/outbox-relay/sandbox")


def test_cache_dir() -> None:
    assert sb.default_cache_dir({}, HOME) == HOME / ".cache/outbox-relay"
    assert sb.default_cache_dir({"OUTBOX_CACHE_DIR": "/c"}, HOME) == Path("/c")
    assert sb.kafka_libs_dir(Path("/c")) == Path("/c/kafka-4.1.1/libs")


def test_sandbox_constructor_does_no_io(tmp_path: Path) -> None:
    box = sb.Sandbox(tmp_path / "nowhere", pg_port=1, kafka_port=2)
    assert not (tmp_path / "nowhere").exists()
    assert box.layout.pg_data == tmp_path / "nowhere/pg/data"


def test_sandbox_directory_follows_environment(tmp_path: Path) -> None:
    box = sb.Sandbox(environ={"OUTBOX_SANDBOX_DIR": str(tmp_path)})
    assert box.directory == tmp_path


# --------------------------------------------------------------------------- ports
def test_ports_default_then_explicit() -> None:
    assert sb.resolve_ports(None, None, None, Path("/d")) == sb.Ports(54329, 39092)
    assert sb.resolve_ports(5, 7, None, Path("/d")) == sb.Ports(5, 7)
    assert sb.Ports(5, 7).controller == 8


def test_recorded_ports_win_over_defaults() -> None:
    recorded = sb.Ports(54349, 39292)
    assert sb.resolve_ports(None, None, recorded, Path("/d")) == recorded
    assert sb.resolve_ports(54349, 39292, recorded, Path("/d")) == recorded


def test_changing_ports_of_an_existing_sandbox_is_refused() -> None:
    with pytest.raises(SandboxError, match="uses PostgreSQL port 54349 and Kafka port 39292"):
        sb.resolve_ports(None, 40000, sb.Ports(54349, 39292), Path("/d"))


def test_ports_may_change_until_a_server_has_data() -> None:
    recorded = sb.Ports(54329, 39092)
    assert sb.resolve_ports(None, 40000, recorded, Path("/d"), fixed=False) == sb.Ports(54329, 40000)
    assert sb.resolve_ports(None, None, recorded, Path("/d"), fixed=False) == recorded


@pytest.mark.parametrize("pg,kafka", [(39092, 39092), (39093, 39092), (70000, 39092), (5432, 65535)])
def test_bad_ports(pg: int, kafka: int) -> None:
    with pytest.raises(SandboxError):
        sb.resolve_ports(pg, kafka, None, Path("/d"))


def test_state_round_trip_and_damage(tmp_path: Path) -> None:
    state = sb.State(sb.Ports(1, 2), "abc")
    assert sb.parse_state(sb.state_json(state), tmp_path) == state
    with pytest.raises(SandboxError, match="damaged"):
        sb.parse_state("{", tmp_path)


def test_recorded_ports_are_read_from_the_directory(tmp_path: Path) -> None:
    (tmp_path / "sandbox.json").write_text(sb.state_json(sb.State(sb.Ports(54349, 39292), "x")))
    assert sb.Sandbox(tmp_path).env()["PGPORT"] == "54349"


# --------------------------------------------------------------------------- env exports
def test_env_points_libpq_and_kafka_at_the_sandbox() -> None:
    env = sb.sandbox_env(Path("/s"), sb.Ports(54329, 39092))
    assert env == {
        "PGHOST": "127.0.0.1", "PGPORT": "54329", "PGUSER": "outbox", "PGDATABASE": "postgres",
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:39092", "OUTBOX_SANDBOX_DIR": "/s",
    }


def test_export_lines_quote_for_the_shell() -> None:
    text = sb.export_lines({"PGPORT": "54329", "OUTBOX_SANDBOX_DIR": "/tmp/my sandbox's"})
    lines = text.splitlines()
    assert lines[0] == "export PGPORT=54329"
    assert shlex.split(lines[1]) == ["export", "OUTBOX_SANDBOX_DIR=/tmp/my sandbox's"]
    assert text.endswith("\n")


# --------------------------------------------------------------------------- server config
def test_kafka_properties() -> None:
    text = sb.kafka_properties(sb.Ports(1, 39092), Path("/s/kafka/data"))
    lines = set(text.splitlines())
    for line in (
        "process.roles=broker,controller",
        "listeners=PLAINTEXT://127.0.0.1:39092,CONTROLLER://127.0.0.1:39093",
        "controller.quorum.bootstrap.servers=127.0.0.1:39093",
        "log.dirs=/s/kafka/data",
        "num.partitions=3",
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
    ):
        assert line in lines


def test_postgres_settings() -> None:
    text = sb.postgres_settings(54329, Path("/tmp/it's/socket"))
    assert "wal_level = logical\n" in text
    assert "listen_addresses = '127.0.0.1'\n" in text
    assert "port = 54329\n" in text
    assert "max_replication_slots = 50\n" in text and "max_wal_senders = 50\n" in text
    assert "unix_socket_directories = '/tmp/it''s/socket'\n" in text
    assert "fsync" not in text and "synchronous_commit" not in text  # durability defaults kept
    assert "include_if_exists = 'outbox-sandbox.conf'" in sb.include_line()


def test_socket_path_limit() -> None:
    assert sb.socket_path_problem(Path("/var/lib/outbox-relay/sandbox/pg/socket"), 54329) is None
    problem = sb.socket_path_problem(Path("/" + "x" * 100), 54329)
    assert problem and "shorter" in problem


def test_cluster_id_is_base64url_of_16_bytes() -> None:
    assert sb.new_cluster_id(bytes(range(16))) == "AAECAwQFBgcICQoLDA0ODw"
    cid = sb.new_cluster_id()
    assert len(cid) == 22 and not cid.startswith("-") and "=" not in cid


# --------------------------------------------------------------------------- jar manifest
def _jars(folder: Path, **jars: bytes) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, content in jars.items():
        (folder / f"{name}.jar").write_bytes(content)
        digests[f"{name}.jar"] = hashlib.sha256(content).hexdigest()
    return digests


def test_manifest_parses_sha256sum_output() -> None:
    digest = "a" * 64
    assert sb.parse_manifest(f"{digest}  a.jar\n{digest} *b.jar\n\n") == {"a.jar": digest, "b.jar": digest}
    with pytest.raises(SandboxError, match="line 1"):
        sb.parse_manifest("nothex  a.jar\n")


def test_checked_in_manifest_pins_kafka_and_one_slf4j_binding() -> None:
    manifest = sb.load_manifest()
    assert "kafka_2.13-4.1.1.jar" in manifest and "kafka-clients-4.1.1.jar" in manifest
    assert "slf4j-api-1.7.36.jar" in manifest and "slf4j-simple-1.7.36.jar" in manifest
    bindings = [n for n in manifest if n.startswith(("slf4j-simple", "slf4j-reload4j", "log4j-slf4j", "logback"))]
    assert bindings == ["slf4j-simple-1.7.36.jar"]
    assert sb.POM.is_file()


def test_verify_jars_accepts_an_exact_match(tmp_path: Path) -> None:
    expected = _jars(tmp_path, a=b"A", b=b"B")
    sb.verify_jars(tmp_path, expected)


@pytest.mark.parametrize("change,phrase", [
    (lambda d: (d / "a.jar").unlink(), "a.jar missing"),
    (lambda d: (d / "evil.jar").write_bytes(b"x"), "evil.jar unexpected"),
    (lambda d: (d / "b.jar").write_bytes(b"tampered"), "b.jar has the wrong sha256"),
])
def test_verify_jars_names_each_problem(tmp_path: Path, change: Callable[[Path], object], phrase: str) -> None:
    expected = _jars(tmp_path, a=b"A", b=b"B")
    change(tmp_path)
    with pytest.raises(SandboxError) as err:
        sb.verify_jars(tmp_path, expected)
    assert phrase in err.value.message
    assert "outbox dev fetch" in err.value.message and "\n" not in err.value.message


def test_verify_jars_without_a_cache(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="run 'outbox dev fetch'"):
        sb.verify_jars(tmp_path / "none", {"a.jar": "0" * 64})


def test_problem_summary_is_short() -> None:
    problems = [f"j{i}.jar missing" for i in range(10)]
    assert sb.summarize(problems) == "j0.jar missing, j1.jar missing, j2.jar missing and 7 more"
    assert sb.manifest_problems({"a": "1"}, {"a": "1"}) == []


# --------------------------------------------------------------------------- missing tools
def test_missing_postgres_names_the_package(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}
    with pytest.raises(SandboxError) as err:
        sb.find_pg_bindir(env, 0, default=tmp_path / "nope")
    assert err.value.message == ("PostgreSQL 15 server binaries not found: "
                                 "run 'apt-get install -y postgresql-15' (or set OUTBOX_PG_BINDIR)")
    with pytest.raises(SandboxError, match="sudo apt-get install -y postgresql-15"):
        sb.find_pg_bindir(env, 1000, default=tmp_path / "nope")


def _fake_bindir(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in sb.PG_SERVER_BINARIES:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    return folder


def test_postgres_bindir_from_environment_or_pg_config(tmp_path: Path) -> None:
    bindir = _fake_bindir(tmp_path / "pg/bin")
    assert sb.find_pg_bindir({"OUTBOX_PG_BINDIR": str(bindir), "PATH": ""}, 0, default=tmp_path) == bindir
    with pytest.raises(SandboxError, match="OUTBOX_PG_BINDIR=.* lacks initdb"):
        sb.find_pg_bindir({"OUTBOX_PG_BINDIR": str(tmp_path), "PATH": ""}, 0, default=bindir)
    path = tmp_path / "path"
    path.mkdir()
    (path / "pg_config").write_text(f"#!/bin/sh\necho {bindir}\n")
    (path / "pg_config").chmod(0o755)
    assert sb.find_pg_bindir({"PATH": str(path)}, 0, default=tmp_path / "nope") == bindir


def test_missing_java_and_maven(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}
    with pytest.raises(SandboxError, match=r"Java not found .*run 'apt-get install -y openjdk-17-jre-headless'$"):
        sb.find_java(env, 0)
    with pytest.raises(SandboxError, match=r"Maven not found .*run 'apt-get install -y maven'$"):
        sb.find_mvn(env, 0)
    (tmp_path / "java").write_text("#!/bin/sh\n")
    (tmp_path / "java").chmod(0o755)
    assert sb.find_java(env, 0) == str(tmp_path / "java")


def test_traversal_bits() -> None:
    d = stat.S_IFDIR
    assert sb.can_traverse(d | 0o755, 0, 0, 101, {104})
    assert not sb.can_traverse(d | 0o700, 0, 0, 101, {104})
    assert sb.can_traverse(d | 0o710, 0, 104, 101, {104})
    assert sb.can_traverse(d | 0o700, 101, 0, 101, {104})


def test_status_text() -> None:
    text = sb.format_status([
        sb.ServerStatus("PostgreSQL", True, 42, "127.0.0.1:1", Path("/s/pg/data")),
        sb.ServerStatus("Kafka", False, None, "127.0.0.1:2", Path("/s/kafka/data")),
    ])
    first, second = text.splitlines()
    assert "running (pid 42)" in first and "/s/pg/data" in first
    assert "stopped" in second and "127.0.0.1:2" in second
