"""The config file, environment variables and validation errors, through the real CLI."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from outbox.cli import cli
from outbox.config import Capture, RelaySettings, build, slot_name_for
from outbox.errors import ConfigError


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, env=env, auto_envvar_prefix="OUTBOX")
    return result.exit_code, result.output


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    f = tmp_path / "outbox.toml"
    f.write_text('[relay]\nsourceid = "s1"\n')
    code, out = run(["--config", str(f), "relay"])
    assert code == 2 and "unknown key 'relay.sourceid'" in out


def test_malformed_config_file_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "outbox.toml"
    f.write_text("[relay\n")
    code, out = run(["--config", str(f), "relay"])
    assert code == 2 and "not valid TOML" in out and out.count("\n") == 1


def test_config_values_reach_validation_and_name_the_bad_key(tmp_path: Path) -> None:
    f = tmp_path / "outbox.toml"
    f.write_text('[relay]\ndsn = "dbname=x"\nsource-id = "has space"\nkafka-bootstrap = "k:9092"\n')
    code, out = run(["--config", str(f), "relay"])
    assert code == 2 and "invalid setting 'source_id'" in out


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    f = tmp_path / "outbox.toml"
    f.write_text('[relay]\ndsn = "dbname=x"\nsource-id = "ok"\nkafka-bootstrap = "k:9092"\nmax-in-flight = 10\n')
    code, out = run(["--config", str(f), "relay"], env={"OUTBOX_RELAY_MAX_IN_FLIGHT": "0"})
    assert code == 2 and "max_in_flight" in out


def test_option_spelling_is_accepted_for_multiple_options(tmp_path: Path) -> None:
    f = tmp_path / "outbox.toml"
    f.write_text('[install]\ndsn = "dbname=x"\ncapture = ["bad"]\n')
    code, out = run(["--config", str(f), "install"])
    assert code == 2 and "invalid --capture 'bad'" in out


def test_missing_config_file() -> None:
    code, out = run(["--config", "/nonexistent/outbox.toml", "relay"])
    assert code == 2 and "does not exist" in out


def test_malformed_dsn_is_rejected_before_connecting() -> None:
    with pytest.raises(ConfigError, match="invalid DSN"):
        build(RelaySettings, dsn="host='unterminated", source_id="s", kafka={"bootstrap": "k:1"})


def test_capture_parsing() -> None:
    assert Capture.parse("pos.customers=customer") == Capture(table="pos.customers", aggregate="customer")
    with pytest.raises(ConfigError):
        Capture.parse("customers=customer")


def test_slot_names_are_valid_identifiers() -> None:
    assert slot_name_for("Store-1") == "outbox_store_1"
    assert len(slot_name_for("x" * 100)) == 63
