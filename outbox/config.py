"""One typed settings object per command, from command line, environment and a TOML file.

Precedence, highest first: command-line option, environment variable (click's
``auto_envvar_prefix="OUTBOX"`` convention: ``OUTBOX_RELAY_DSN``, ``OUTBOX_CONSUME_READSTORE_GROUP``),
the ``--config`` TOML file (one table per command: ``[relay]``, ``[consume.readstore]``), then
defaults. Everything is validated once at start; an error names the bad key in one line.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import click
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from outbox import contract
from outbox.dsn import parse as parse_dsn
from outbox.errors import ConfigError

_IDENT = re.compile(r"^[A-Za-z0-9_.-]+$")
_QUALIFIED = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*$")

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------- the TOML file
def load_file(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def default_map_for(command: click.Command, data: dict[str, Any], path: str, where: str = "") -> dict[str, Any]:
    """Check a config table against a command tree and turn it into click's ``default_map``.

    Unknown keys are an error, so that a misspelt key is never silently ignored.
    """
    result: dict[str, Any] = {}
    params: dict[str, str] = {}  # every accepted spelling -> the parameter's name
    for p in command.params:
        if p.name and p.name not in ("config", "help"):
            params[p.name] = p.name
            for opt in p.opts:
                if opt.startswith("--"):
                    params[opt[2:].replace("-", "_")] = p.name
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        name = f"{where}.{raw_key}" if where else raw_key
        sub = (command.get_command(click.Context(command), raw_key)
               if isinstance(command, click.Group) and isinstance(value, dict) else None)
        if sub is not None:
            result[raw_key] = default_map_for(sub, value, path, name)
        elif key in params and not isinstance(value, dict):
            result[params[key]] = value
        else:
            raise ConfigError(f"config file {path}: unknown key '{name}'")
    return result


# --------------------------------------------------------------------------- validation
def build(model: type[M], **values: Any) -> M:
    """Validate command parameters into a settings object; one line naming the bad key."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or model.__name__
        raise ConfigError(f"invalid setting '{key}': {err['msg']}") from None


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_table(value: str) -> str:
    if not _QUALIFIED.match(value):
        raise ValueError("must be SCHEMA.TABLE (unquoted identifiers)")
    return value


def _check_dsn(value: str) -> str:
    parse_dsn(value)
    return value


class KafkaSettings(_Settings):
    """How to reach Kafka. Passwords come from the environment only, never from argv."""

    bootstrap: str = Field(min_length=1)
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @field_validator("security_protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        allowed = {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}
        if v.upper() not in allowed:
            raise ValueError(f"must be one of {', '.join(sorted(allowed))}")
        return v.upper()

    def librdkafka_config(self) -> dict[str, Any]:
        """The same settings for a librdkafka client (the relay's producer)."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol.lower()}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            for key, value in (("ssl.ca.location", self.ssl_cafile), ("ssl.certificate.location", self.ssl_certfile),
                               ("ssl.key.location", self.ssl_keyfile)):
                if value:
                    conf[key] = value
        if self.security_protocol.startswith("SASL"):
            conf["sasl.mechanism"] = self.sasl_mechanism or "PLAIN"
            if self.sasl_username:
                conf["sasl.username"] = self.sasl_username
            if self.sasl_password:
                conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka producers, consumers and admin clients."""
        kw: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile)
        if self.security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kw


def kafka_options(func: F) -> F:
    """The Kafka connection options, shared by every command that talks to Kafka."""
    options = [
        click.option("--kafka-bootstrap", "kafka_bootstrap", metavar="HOST:PORT", required=True,
                     default=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                     help="Kafka bootstrap servers, comma separated [default: $KAFKA_BOOTSTRAP_SERVERS]."),
        click.option("--kafka-security-protocol", default="PLAINTEXT", show_default=True,
                     help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."),
        click.option("--kafka-sasl-mechanism", default=None, help="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."),
        click.option("--kafka-sasl-username", default=None, help="SASL user; the password is read from OUTBOX_KAFKA_SASL_PASSWORD."),
        click.option("--kafka-ssl-cafile", default=None, type=click.Path(dir_okay=False), help="CA bundle for TLS."),
        click.option("--kafka-ssl-certfile", default=None, type=click.Path(dir_okay=False), help="Client certificate for TLS."),
        click.option("--kafka-ssl-keyfile", default=None, type=click.Path(dir_okay=False), help="Client key for TLS."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def kafka_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """Pop the kafka_* click parameters into the dict KafkaSettings wants."""
    return {
        "bootstrap": params.pop("kafka_bootstrap"),
        "security_protocol": params.pop("kafka_security_protocol"),
        "sasl_mechanism": params.pop("kafka_sasl_mechanism"),
        "sasl_username": params.pop("kafka_sasl_username"),
        "sasl_password": os.environ.get("OUTBOX_KAFKA_SASL_PASSWORD"),
        "ssl_cafile": params.pop("kafka_ssl_cafile"),
        "ssl_certfile": params.pop("kafka_ssl_certfile"),
        "ssl_keyfile": params.pop("kafka_ssl_keyfile"),
    }


def metrics_options(func: F) -> F:
    """Where a long-running command serves Prometheus metrics (off unless --metrics-port is given)."""
    options = [
        click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
                     help="Serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port, logged) "
                          "[default: off]."),
        click.option("--metrics-host", default="127.0.0.1", show_default=True, metavar="HOST",
                     help="Address the metrics endpoint binds to; 0.0.0.0 (or ::) to let a remote Prometheus scrape."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def redrive_options(func: F) -> F:
    """A consumer's periodic re-drive of its own dead letters (consumers/dlq.py)."""
    options = [
        click.option("--redrive-every", type=float, default=None, metavar="MINUTES",
                     help="Every MINUTES, send the records this group parked in <topic>.dlq back to their topic "
                          "[default: never; outbox replay --dlq does it by hand]."),
        click.option("--redrive-max-attempts", type=int, default=5, show_default=True, metavar="N",
                     help="A dead letter tried N times stays parked (counted in "
                          "outbox_consumer_dead_letters_exhausted_total)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def dsn_option(func: F) -> F:
    return click.option(
        "--dsn", required=True, metavar="DSN",
        help="Store database: a libpq string ('dbname=store1 host=...') or a postgresql:// URL; "
             "PGHOST, PGPORT, PGUSER, PGPASSWORD... fill what it leaves out, as with psql.",
    )(func)


# --------------------------------------------------------------------------- the settings
class Capture(_Settings):
    table: str  # schema.table
    aggregate: str

    _table = field_validator("table")(_check_table)

    @field_validator("aggregate")
    @classmethod
    def _aggregate(cls, v: str) -> str:
        contract.topic_for(contract.DEFAULT_TOPIC_PREFIX, v)  # raises ContractError (a ValueError)
        return v

    @classmethod
    def parse(cls, text: str) -> "Capture":
        table, sep, aggregate = text.partition("=")
        if not sep or not table or not aggregate:
            raise ConfigError(f"invalid --capture {text!r}: expected SCHEMA.TABLE=AGGREGATE, e.g. pos.customers=customer")
        return build(cls, table=table.strip(), aggregate=aggregate.strip())


class InstallSettings(_Settings):
    dsn: str
    captures: tuple[Capture, ...] = ()
    slot: str | None = None
    sql: bool = False
    relay_role: str | None = None  # a least-privilege role for the relay, created or granted by install
    lock_timeout: float = Field(default=2.0, gt=0)  # SET LOCAL lock_timeout per transaction that locks a table
    lock_wait: float = Field(default=300.0, ge=0)  # total wait per table (or for the slot) before giving up

    _dsn = field_validator("dsn")(_check_dsn)


class RelaySettings(_Settings):
    dsn: str
    source_id: str
    kafka: KafkaSettings
    topic_prefix: str = contract.DEFAULT_TOPIC_PREFIX
    slot: str | None = None
    max_in_flight: int = Field(default=20_000, ge=1)
    status_interval: float = Field(default=10.0, gt=0)
    retention: float = Field(default=3600.0, ge=0)
    heartbeat_interval: float = Field(default=10.0, ge=0)  # 0: no heartbeat
    drain_timeout: float = Field(default=30.0, ge=0)  # SIGTERM: seconds to wait for in-flight events
    kafka_message_timeout: float = Field(default=300.0, gt=0)  # librdkafka message.timeout.ms, in seconds
    delivery: Literal["at-least-once", "exactly-once"] = "at-least-once"
    transactional_id: str | None = None  # exactly-once; None: outbox-relay.<source_id>
    offsets_topic: str = contract.DEFAULT_OFFSETS_TOPIC  # exactly-once
    transaction_interval: float = Field(default=0.1, gt=0)  # exactly-once: seconds per Kafka transaction
    transaction_max_events: int = Field(default=10_000, ge=1)  # exactly-once: events per Kafka transaction
    transaction_timeout: float | None = Field(default=None, gt=0)  # exactly-once: transaction.timeout.ms, seconds
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # None: no /metrics endpoint

    _dsn = field_validator("dsn")(_check_dsn)

    @field_validator("source_id", "topic_prefix", "offsets_topic")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not _IDENT.match(v):
            raise ValueError("use only letters, digits, '.', '_' and '-'")
        return v

    @field_validator("transactional_id")
    @classmethod
    def _transactional_id(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    @property
    def exactly_once(self) -> bool:
        return self.delivery == "exactly-once"


class ReadStoreSettings(_Settings):
    dsn: str
    kafka: KafkaSettings
    topic_prefix: str = contract.DEFAULT_TOPIC_PREFIX
    group: str = "outbox-readstore"
    batch_size: int = Field(default=2000, ge=1)
    redrive_every: float | None = Field(default=None, gt=0)  # minutes; None: no periodic re-drive
    redrive_max_attempts: int = Field(default=5, ge=1)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # None: no /metrics endpoint

    _dsn = field_validator("dsn")(_check_dsn)


class CrmSinkSettings(_Settings):
    """``outbox consume crm``: Kafka -> the CRM's HTTP API, with a ledger in a small database of its own."""

    crm_url: str
    dsn: str  # the sink's ledger database
    kafka: KafkaSettings
    crm_token: SecretStr | None = None  # from OUTBOX_CRM_TOKEN or --crm-token-file, never argv
    topic_prefix: str = contract.DEFAULT_TOPIC_PREFIX
    group: str = "outbox-crm"
    mapping: str | None = None  # TOML file; None: the POS demo's customer and order mappings
    batch_size: int = Field(default=50, ge=1, le=100)  # records per CRM call (1: single upserts only)
    concurrency: int = Field(default=4, ge=1, le=64)  # CRM calls in flight
    rate: float = Field(default=10.0, gt=0)  # CRM calls per second (token bucket)
    burst: int | None = Field(default=None, ge=1)  # None: max(1, rate)
    max_attempts: int = Field(default=10, ge=1)
    retry_base: float = Field(default=0.5, gt=0)
    retry_max: float = Field(default=60.0, gt=0)
    timeout: float = Field(default=10.0, gt=0)
    max_buffered: int = Field(default=5000, ge=1)  # records per partition held before it is paused
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    _dsn = field_validator("dsn")(_check_dsn)

    @field_validator("crm_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


class CrmWebhookSettings(_Settings):
    """``outbox consume crm-webhook``: the CRM's change notifications -> a Kafka topic."""

    kafka: KafkaSettings
    topic: str = "crm.changes"
    port: int = Field(default=8481, ge=0, le=65535)
    host: str = "127.0.0.1"
    secret: SecretStr | None = None  # OUTBOX_CRM_WEBHOOK_SECRET or --secret-file


class CrmWritebackSettings(_Settings):
    """``outbox consume crm-writeback``: CRM changes from Kafka -> one store database's legacy tables."""

    dsn: str  # the store database
    source_id: str
    kafka: KafkaSettings
    topic: str = "crm.changes"
    group: str | None = None  # None: outbox-crm-writeback-<source_id>
    mapping: str | None = None
    batch_size: int = Field(default=500, ge=1)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    _dsn = field_validator("dsn")(_check_dsn)

class BackfillSettings(_Settings):
    """``outbox backfill`` (outbox/backfill.py)."""

    dsn: str
    source_id: str
    table: str
    where: str | None = None
    chunk_size: int = Field(default=2000, ge=1, le=1_000_000)
    rate: int | None = Field(default=None, ge=1)  # rows per second; None: as fast as it goes
    dry_run: bool = False
    resume: bool = False

    _dsn = field_validator("dsn")(_check_dsn)

    _table = field_validator("table")(_check_table)


class ReplaySettings(_Settings):
    """``outbox replay`` (consumers/replay.py, consumers/dlq.py)."""

    kafka: KafkaSettings
    group: str | None = None
    topics: tuple[str, ...] = ()
    from_: str | None = None
    dlq_topics: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()
    yes: bool = False
    force: bool = False
    dry_run: bool = False


def slot_name_for(dbname: str) -> str:
    """Default replication slot name for a store database (slot names are cluster-wide)."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", dbname.lower())
    return f"outbox_{cleaned}"[:63]


