"""One typed settings object per command, from command line, environment and a TOML file.

Each option is declared once, as a field of a settings model: its type, default, bounds and help
(``Field(description=...)``); how it looks on the command line, where that differs from the
field (its flag, metavar, a file path, bounds checked by click), in a :class:`Cli` marker next to
it. :func:`options_for` turns a model into click options and :func:`settings_from` turns the
parsed parameters back into the model. Shared parts are declared once too: the :data:`Dsn` type
and its validator, :class:`KafkaSettings` (options ``--kafka-*``, a nested model),
:class:`MetricsSettings` (``--metrics-port``, ``--metrics-host``), :class:`RedriveSettings`. A sink's
settings model lives in the sink's module, on :class:`SinkSettings` (consumers/sink.py).

Precedence, highest first: command-line option, environment variable (click's
``auto_envvar_prefix="OUTBOX"`` convention: ``OUTBOX_RELAY_DSN``, ``OUTBOX_CONSUME_READSTORE_GROUP``),
the ``--config`` TOML file (one table per command: ``[relay]``, ``[consume.readstore]``), then
defaults. Everything is validated once at start; an error names the bad key in one line.
"""
from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import click
from annotated_types import Ge, Gt, Le, Lt
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo

from outbox import contract
from outbox.dsn import parse as parse_dsn
from outbox.errors import ConfigError
from outbox.tomlfile import load_file as load_file  # re-exported: outbox.cli and the commands read config files

_IDENT = re.compile(r"^[A-Za-z0-9_.-]+$")
_QUALIFIED = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*$")

F = TypeVar("F", bound=Callable[..., Any])
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------- the TOML file
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


# --------------------------------------------------------------------------- declaring an option
@dataclass(frozen=True, slots=True)
class Cli:
    """How a settings field appears on the command line, where that is not derived from the field.

    By default a field ``batch_size: int`` becomes ``--batch-size INTEGER`` with the field's default
    (shown) and its description as help; ``bool`` becomes a flag, ``tuple[str, ...]`` a repeatable
    option, a ``Literal`` a choice, a nested settings model its own options with the field name as
    prefix (``kafka`` -> ``--kafka-bootstrap``).
    """

    flag: str | None = None  # e.g. "--capture" or "--migrate/--no-migrate"; default --<field-name>
    param: str | None = None  # click parameter name (env var and TOML key follow it); default the field name
    metavar: str | None = None
    file: bool = False  # a file path (click.Path(dir_okay=False), shown as FILE)
    checked: bool = False  # bounds checked by click while parsing (and shown in --help) instead of at validation
    default: Any = None  # a command-line default other than the field's (a callable: computed when parsed)
    required: bool | None = None  # default: the field has no default


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret setting: from the environment variable ``env``, or (with ``file_flag``) the first line
    of a file named on the command line; never from argv itself (outbox/secret.py)."""

    env: str
    file_flag: str | None = None
    what: str = "secret"

    @property
    def param(self) -> str | None:
        return self.file_flag[2:].replace("-", "_") if self.file_flag else None


def _marker(info: FieldInfo, kind: type[Any]) -> Any:
    return next((m for m in info.metadata if isinstance(m, kind)), None)


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The model's fields in command-line order: its own first, then each base's (mixins last)."""
    names: list[str] = []
    for klass in model.__mro__:
        for name in vars(klass).get("__annotations__", {}):
            if name in model.model_fields and name not in names:
                names.append(name)
    return [(name, model.model_fields[name]) for name in names]


def _nested(info: FieldInfo) -> type[BaseModel] | None:
    ann = info.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _bounds(info: FieldInfo, base: type[Any]) -> click.ParamType[Any]:
    lo: Any = None
    hi: Any = None
    lo_open = hi_open = False
    for m in info.metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, Lt):
            hi, hi_open = m.lt, True
    if base is int:
        return click.IntRange(lo, hi, min_open=lo_open, max_open=hi_open)
    return click.FloatRange(lo, hi, min_open=lo_open, max_open=hi_open)


def _option(name: str, info: FieldInfo, prefix: str) -> Decorator | None:
    secret = _marker(info, Secret)
    if secret is not None:
        if secret.file_flag is None:
            return None  # from the environment only
        return click.option(secret.file_flag, secret.param, type=click.Path(dir_okay=False), default=None,
                            help=info.description)
    cli: Cli = _marker(info, Cli) or Cli()
    param = cli.param or prefix + name
    flag = cli.flag or "--" + param.replace("_", "-")
    base = _unwrap(info.annotation)
    kw: dict[str, Any] = {"help": info.description, "show_default": True}
    if cli.metavar:
        kw["metavar"] = cli.metavar
    if base is bool:
        kw["is_flag"] = True
    elif typing.get_origin(base) is tuple:
        kw["multiple"] = True
    elif typing.get_origin(base) is Literal:
        kw["type"] = click.Choice([str(a) for a in typing.get_args(base)])
    elif cli.file:
        kw["type"] = click.Path(dir_okay=False)
    elif base in (int, float):
        kw["type"] = _bounds(info, base) if cli.checked else base
    required = info.is_required() if cli.required is None else cli.required
    if required:
        kw["required"] = True
    default = cli.default if cli.default is not None else (None if info.is_required() else info.default)
    if not kw.get("multiple") or default:
        kw["default"] = default
    if callable(default):
        kw["show_default"] = False  # the help says where it comes from
    return click.option(flag, param, **kw)


def options_for(model: type[BaseModel], *, prefix: str = "",
                after: Mapping[str, Sequence[Decorator]] | None = None) -> Decorator:
    """A decorator adding one click option per field of ``model`` (nested models expanded), in the
    model's order; ``after`` places options that are not settings (``--sql``) after a field's option.
    """
    decorators: list[Decorator] = []
    for name, info in _fields(model):
        nested = _nested(info)
        if nested is not None:
            decorators.append(options_for(nested, prefix=f"{prefix}{name}_"))
        elif (option := _option(name, info, prefix)) is not None:
            decorators.append(option)
        decorators.extend((after or {}).get(name, ()))

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return decorate


def settings_values(model: type[BaseModel], params: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """Pop ``model``'s click parameters from ``params`` into the values it validates. Nested models are
    validated on their own first (an error names their key: ``'security_protocol'``); secrets are
    read from their file or environment variable."""
    from outbox.secret import read_secret

    values: dict[str, Any] = {}
    for name, info in _fields(model):
        nested = _nested(info)
        secret = _marker(info, Secret)
        cli: Cli = _marker(info, Cli) or Cli()
        if nested is not None:
            values[name] = build(nested, **settings_values(nested, params, prefix=f"{prefix}{name}_"))
        elif secret is not None:
            path = params.pop(secret.param) if secret.param else None
            values[name] = read_secret(secret.env, path, secret.what) if secret.file_flag else os.environ.get(secret.env)
        elif (param := cli.param or prefix + name) in params:
            values[name] = params.pop(param)
    return values


def settings_from(model: type[M], params: dict[str, Any]) -> M:
    """The settings object of a command from its click parameters (see :func:`options_for`)."""
    return build(model, **settings_values(model, params))


# --------------------------------------------------------------------------- shared parts
def _check_table(value: str) -> str:
    if not _QUALIFIED.match(value):
        raise ValueError("must be SCHEMA.TABLE (unquoted identifiers)")
    return value


def _check_dsn(value: str) -> str:
    parse_dsn(value)
    return value


#: A PostgreSQL connection string, checked when the settings are built (never connects).
Dsn = Annotated[str, AfterValidator(_check_dsn), Cli(metavar="DSN")]
StoreDsn = Annotated[Dsn, Field(description=(
    "Store database: a libpq string ('dbname=store1 host=...') or a postgresql:// URL; PGHOST, PGPORT, PGUSER, "
    "PGPASSWORD... fill what it leaves out, as with psql."))]
Table = Annotated[str, AfterValidator(_check_table)]


class KafkaSettings(_Settings):
    """How to reach Kafka. Passwords come from the environment only, never from argv."""

    bootstrap: Annotated[str, Field(min_length=1, description=(
        "Kafka bootstrap servers, comma separated [default: $KAFKA_BOOTSTRAP_SERVERS].")),
        Cli(metavar="HOST:PORT", required=True, default=lambda: os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))]
    security_protocol: Annotated[str, Field(description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")] = "PLAINTEXT"
    sasl_mechanism: Annotated[str | None, Field(description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.")] = None
    sasl_username: Annotated[str | None, Field(
        description="SASL user; the password is read from OUTBOX_KAFKA_SASL_PASSWORD.")] = None
    sasl_password: Annotated[SecretStr | None, Secret(env="OUTBOX_KAFKA_SASL_PASSWORD")] = None
    ssl_cafile: Annotated[str | None, Field(description="CA bundle for TLS."), Cli(file=True)] = None
    ssl_certfile: Annotated[str | None, Field(description="Client certificate for TLS."), Cli(file=True)] = None
    ssl_keyfile: Annotated[str | None, Field(description="Client key for TLS."), Cli(file=True)] = None

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


class MetricsSettings(_Settings):
    """Where a long-running command serves Prometheus metrics (off unless --metrics-port is given)."""

    metrics_port: Annotated[int | None, Field(ge=0, le=65535, description=(
        "Serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port, logged) [default: off].")),
        Cli(metavar="PORT", checked=True)] = None
    metrics_host: Annotated[str, Field(description=(
        "Address the metrics endpoint binds to; 0.0.0.0 (or ::) to let a remote Prometheus scrape.")),
        Cli(metavar="HOST")] = "127.0.0.1"


class RedriveSettings(_Settings):
    """A consumer's periodic re-drive of its own dead letters (consumers/dlq.py)."""

    redrive_every: Annotated[float | None, Field(gt=0, description=(
        "Every MINUTES, send the records this group parked in <topic>.dlq back to their topic "
        "[default: never; outbox replay --dlq does it by hand].")), Cli(metavar="MINUTES")] = None
    redrive_max_attempts: Annotated[int, Field(ge=1, description=(
        "A dead letter tried N times stays parked (counted in outbox_consumer_dead_letters_exhausted_total).")),
        Cli(metavar="N")] = 5


class SinkDbTimeouts(_Settings):
    """Bounds on a sink's own database sessions (consumers/sink_offsets.py ``SinkDatabase``), so a
    consumer frozen mid-transaction (SIGSTOP, a VM paused) cannot block its successor forever."""

    db_lock_timeout: Annotated[float, Field(ge=0, description=(
        "lock_timeout of the sink's database sessions: a statement waiting longer for a lock (held by a frozen "
        "consumer) fails and the batch is retried with backoff; 0: wait forever.")), Cli(metavar="SECONDS")] = 10.0
    db_statement_timeout: Annotated[float, Field(ge=0, description=(
        "statement_timeout of the sink's database sessions (the batch is retried); 0: none.")),
        Cli(metavar="SECONDS")] = 300.0
    db_idle_in_transaction_timeout: Annotated[float, Field(ge=0, description=(
        "idle_in_transaction_session_timeout of the sink's database sessions: PostgreSQL ends a session that holds "
        "a transaction open this long without a statement (a frozen consumer), releasing its locks; 0: never.")),
        Cli(metavar="SECONDS")] = 60.0

    def session_settings(self) -> dict[str, str]:
        """The PostgreSQL settings, in milliseconds."""
        return {"lock_timeout": f"{round(self.db_lock_timeout * 1000)}ms",
                "statement_timeout": f"{round(self.db_statement_timeout * 1000)}ms",
                "idle_in_transaction_session_timeout": f"{round(self.db_idle_in_transaction_timeout * 1000)}ms"}


class SinkSettings(SinkDbTimeouts, MetricsSettings):
    """The base of every ``outbox consume <sink>``'s settings (consumers/sink.py): metrics, the bounds of
    its database sessions, and a field ``kafka: KafkaSettings`` declared by each where its ``--kafka-*``
    options go."""

    kafka: KafkaSettings


# --------------------------------------------------------------------------- the settings
Slot = Annotated[str | None, Field(description="Replication slot name (default: outbox_<database>)."), Cli(metavar="NAME")]
# install and uninstall: how long our DDL may hold the application's statements (outbox/lockwait.py)
LockTimeout = Annotated[float, Field(gt=0, description=(
    "SET LOCAL lock_timeout of each transaction that locks a legacy table or the outbox's own: the longest the "
    "application's statements may queue behind it. When the lock is not granted in time the transaction rolls "
    "back and is retried with backoff, printing who holds the lock.")), Cli(metavar="SECONDS")]
LockWait = Annotated[float, Field(ge=0, description=(
    "Give up, with one line naming the session in the way, after waiting this long in all for one table's lock "
    "(or, on install, for the transactions a new replication slot waits for). Each transaction of ours either "
    "completes or changes nothing.")), Cli(metavar="SECONDS")]


class Capture(_Settings):
    table: Table  # schema.table
    aggregate: str

    @field_validator("aggregate")
    @classmethod
    def _aggregate(cls, v: str) -> str:
        contract.topic_for(contract.DEFAULT_TOPIC_PREFIX, v)  # raises ContractError (a ValueError)
        return v

    @classmethod
    def parse(cls, text: str) -> Capture:
        table, sep, aggregate = text.partition("=")
        if not sep or not table or not aggregate:
            raise ConfigError(f"invalid --capture {text!r}: expected SCHEMA.TABLE=AGGREGATE, e.g. pos.customers=customer")
        return build(cls, table=table.strip(), aggregate=aggregate.strip())


class InstallSettings(_Settings):
    """``outbox install`` (outbox/install.py); on the command line a capture is SCHEMA.TABLE=AGGREGATE."""

    dsn: StoreDsn
    captures: Annotated[tuple[Capture, ...], Field(description=(
        "Capture a legacy table's changes as events of AGGREGATE (repeatable), e.g. pos.customers=customer.")),
        Cli(flag="--capture", metavar="SCHEMA.TABLE=AGGREGATE")] = ()
    sql: Annotated[bool, Field(description=(
        "Print the SQL for review instead of running it. Connects read-only to read primary keys and what is "
        "already installed; changes nothing."))] = False
    slot: Slot = None
    relay_role: Annotated[str | None, Field(description=(  # a least-privilege role for the relay
        "Create (LOGIN, no password) or grant a least-privilege role for the relay: REPLICATION, CONNECT, USAGE on "
        "schema outbox, SELECT, INSERT (heartbeats) and DELETE (purge) on outbox.events. Needs a superuser unless "
        "the role already has REPLICATION. Uninstall never drops it.")), Cli(metavar="NAME")] = None
    lock_timeout: LockTimeout = 2.0
    lock_wait: LockWait = 300.0
    capture_always: Annotated[bool, Field(description=(  # ENABLE ALWAYS: capture also in session_replication_role = replica
        "ENABLE ALWAYS the capture triggers of these captures: changes made with session_replication_role = replica "
        "(logical-replication subscribers, pg_restore, some ETL tools) are captured too, so a data restore or a "
        "replicated copy emits events. Without it, the mode a trigger has is kept."))] = False
    excludes: Annotated[tuple[str, ...], Field(description=(  # outbox.captures.exclude_columns (store revision 0006)
        "Leave COLUMN out of the events of a table this command captures (repeatable), e.g. pos.items.description: "
        "a wide column nobody consumes then costs no WAL per UPDATE, and an UPDATE of only excluded columns emits "
        "nothing. Key columns cannot be excluded. Each install states its captures whole: run it again without "
        "--exclude to capture the column again (no DDL: only outbox.captures changes).")),
        Cli(flag="--exclude", metavar="SCHEMA.TABLE.COLUMN")] = ()


class UninstallSettings(_Settings):
    """``outbox uninstall`` (outbox/install.py)."""

    dsn: StoreDsn
    slot: Slot = None
    sql: Annotated[bool, Field(description=(
        "Print the SQL for review instead of running it (connects read-only; changes nothing)."))] = False
    lock_timeout: LockTimeout = 2.0
    lock_wait: LockWait = 300.0


class RelaySettings(MetricsSettings):
    """``outbox relay`` (relay/cli.py)."""

    dsn: StoreDsn
    source_id: Annotated[str, Field(description=(
        "Name of this store in the event stream: keys are '<ID>:<aggregate id>', ce_source is /stores/<ID>.")),
        Cli(metavar="ID")]
    kafka: KafkaSettings
    topic_prefix: Annotated[str, Field(description="Events go to '<prefix>.<aggregate type>'.")] = \
        contract.DEFAULT_TOPIC_PREFIX
    slot: Annotated[str | None, Field(description=(
        "Replication slot (default: outbox_<database name>, as created by 'outbox install').")),
        Cli(metavar="NAME")] = None
    max_in_flight: Annotated[int, Field(ge=1, description=(
        "Events sent and not yet acknowledged before the relay stops reading the WAL."))] = 20_000
    max_in_flight_bytes: Annotated[int, Field(ge=1, le=2**31, description=(  # the producer's queue is sized above it
        "Bytes of event values sent and not yet acknowledged before the relay stops reading the WAL, whichever of "
        "this and --max-in-flight comes first: large events fill the producer's queue long before --max-in-flight "
        "events wait. The producer's queue (queue.buffering.max.kbytes) is twice this, at least 32 MB.")),
        Cli(metavar="BYTES")] = 16 * 2**20
    status_interval: Annotated[float, Field(gt=0, description=(
        "Seconds between standby status updates to PostgreSQL when nothing moves."))] = 10.0
    retention: Annotated[float, Field(ge=0, description=(
        "Seconds to keep published rows in outbox.events as an audit trail (0: keep forever). Events travel "
        "through the WAL, so purging never loses one."))] = 3600.0
    heartbeat_interval: Annotated[float, Field(ge=0, description=(  # 0: no heartbeat
        "Seconds between heartbeat rows written into outbox.events (0: none). A heartbeat goes through the WAL "
        "like an event, is never published, proves the path end to end (metric outbox_relay_heartbeat_age_seconds) "
        "and lets an idle database's slot advance."))] = 10.0
    drain_timeout: Annotated[float, Field(ge=0, description=(
        "On SIGTERM, seconds to wait for Kafka to acknowledge in-flight events before exiting anyway "
        "(unacknowledged events are not confirmed: a restarted relay sends them again).")), Cli(checked=True)] = 30.0
    kafka_message_timeout: Annotated[float, Field(ge=0.001, description=(  # librdkafka message.timeout.ms, in seconds
        "Seconds the producer keeps retrying an event while Kafka is unreachable (librdkafka message.timeout.ms). "
        "Past it the relay drops its producer and replays from its slot's confirmed position once Kafka is back: "
        "nothing is lost or skipped, some events repeat.")), Cli(checked=True)] = 300.0
    delivery: Annotated[Literal["at-least-once", "exactly-once"], Field(description=(
        "at-least-once: idempotent producer, acks=all, a crash may publish events again. exactly-once: Kafka "
        "transactions that also record the source position in --offsets-topic; read_committed consumers see each "
        "event once across crashes (docs/delivery.md)."))] = "at-least-once"
    transactional_id: Annotated[str | None, Field(description=(  # None: outbox-relay.<source_id>
        "exactly-once: the producer's transactional.id; a newer relay with the same id fences this one. One per "
        "source: a relay whose source was published with another id refuses to start "
        "[default: outbox-relay.<source id>].")), Cli(metavar="ID")] = None
    offsets_topic: Annotated[str, Field(description=(
        "exactly-once: compacted topic holding each source's published position, keyed by source id (created if "
        "missing; keep it outside consumers' topic patterns).")), Cli(metavar="TOPIC")] = contract.DEFAULT_OFFSETS_TOPIC
    transaction_interval: Annotated[float, Field(gt=0, description=(
        "exactly-once: commit the open Kafka transaction this often (at a source transaction boundary). Longer: "
        "more throughput, more latency.")), Cli(metavar="SECONDS")] = 0.1
    transaction_max_events: Annotated[int, Field(ge=1, description=(
        "exactly-once: start committing the open Kafka transaction once it holds this many events. A trigger, not "
        "a cap: whole source transactions only, and what is read while a commit runs goes into the next "
        "transaction.")), Cli(metavar="N")] = 10_000
    transaction_timeout: Annotated[float | None, Field(ge=0.001, description=(  # None: kafka_message_timeout, >= 120
        "exactly-once: the broker aborts a Kafka transaction open this long (transaction.timeout.ms; at most the "
        "broker's transaction.max.timeout.ms). A source transaction is never split, so one that takes longer than "
        "most of this to produce stops the relay with one line [default: --kafka-message-timeout, at least 120].")),
        Cli(metavar="SECONDS", checked=True)] = None

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


class CrmWebhookSettings(_Settings):
    """``outbox consume crm-webhook``: the CRM's change notifications -> a Kafka topic."""

    kafka: KafkaSettings
    port: Annotated[int, Field(ge=0, le=65535, description=(
        "Port of the webhook endpoint POST /webhook (0: any free port, logged).")), Cli(checked=True)] = 8481
    host: Annotated[str, Field(description="Address to listen on.")] = "127.0.0.1"
    topic: Annotated[str, Field(description=(
        "Kafka topic the notifications go to (key: the record's external id). Keep it outside the event topics' "
        "prefix."))] = "crm.changes"
    secret: Annotated[SecretStr | None, Field(description=(
        "Verify X-CRM-Signature (HMAC-SHA256) with this secret [default: $OUTBOX_CRM_WEBHOOK_SECRET, else "
        "unchecked].")), Secret(env="OUTBOX_CRM_WEBHOOK_SECRET", file_flag="--secret-file", what="webhook secret")] = None


class BackfillSettings(_Settings):
    """``outbox backfill`` (outbox/backfill.py)."""

    dsn: StoreDsn
    source_id: Annotated[str, Field(description=(
        "The store's source id (as given to its relay); recorded in the audit table.")), Cli(metavar="ID")]
    table: Annotated[Table, Field(description="A captured table (see outbox install --capture)."),
                     Cli(metavar="SCHEMA.TABLE")]
    where: Annotated[str | None, Field(description=(
        "Only rows matching this SQL condition (on the table's columns, alias t), e.g. \"region = 'north'\".")),
        Cli(metavar="SQL")] = None
    chunk_size: Annotated[int, Field(ge=1, le=1_000_000, description=(
        "Rows per chunk: one short transaction that locks them FOR SHARE and writes their snapshot events."))] = 2000
    rate: Annotated[int | None, Field(ge=0, description=(  # None (callers in Python): as fast as it goes
        "At most N rows per second, so writers and replicas keep up (0: no limit).")),
        Cli(metavar="N", default=5000)] = None
    dry_run: Annotated[bool, Field(description=(
        "Check the table and the WHERE clause, count the rows, write no events."))] = False
    reconcile: Annotated[bool, Field(description=(  # after the last chunk, a marker: sinks drop what the snapshot did not contain
        "After the last chunk, write an outbox.snapshot_complete marker: sinks then delete the table's aggregates the "
        "snapshot did not contain and no change touched since the run began (rows deleted while events were lost). "
        "The whole table: not with --where or --resume."))] = False
    resume: Annotated[bool, Field(description=(
        "Go on after the last finished chunk of the latest unfinished run with the same table, --where and "
        "--source-id (killed, failed or interrupted)."))] = False


class RepublishSettings(_Settings):
    """``outbox republish-parked`` (relay/republish.py)."""

    dsn: StoreDsn
    source_id: Annotated[str, Field(description=(
        "The --source-id of the relay that parked the events (their keys and ce_source).")), Cli(metavar="ID")]
    kafka: KafkaSettings
    topic_prefix: Annotated[str, Field(description="The relay's --topic-prefix.")] = contract.DEFAULT_TOPIC_PREFIX
    ids: Annotated[tuple[str, ...], Field(description=(
        "Re-publish only this parked event (its id; repeat for several). Default: every event the relay parked.")),
        Cli(flag="--id", metavar="UUID")] = ()
    dry_run: Annotated[bool, Field(description="Show what would be re-published; change nothing.")] = False


class ReplaySettings(_Settings):
    """``outbox replay`` (consumers/replay.py, consumers/dlq.py)."""

    group: Annotated[str | None, Field(description=(
        "The consumer group to rewind (with --dlq: only its dead letters).")), Cli(metavar="G")] = None
    topics: Annotated[tuple[str, ...], Field(description="A topic to rewind (repeat for several)."),
                      Cli(flag="--topic", metavar="T")] = ()
    from_: Annotated[str | None, Field(description=(
        "earliest, an offset (every partition), or a time (2026-01-31T12:00:00Z; the first record at or after it). "
        "With --dlq: earliest re-scans the whole dead-letter topic.")), Cli(flag="--from", metavar="WHEN")] = None
    dlq_topics: Annotated[tuple[str, ...], Field(description=(
        "Re-drive the records parked in this dead-letter topic (<topic>.dlq) back to the group that parked them, "
        "with their original ids (repeat for several).")), Cli(flag="--dlq", metavar="TOPIC")] = ()
    filters: Annotated[tuple[str, ...], Field(description=(
        "With --dlq, only matching records: group=G, error=TEXT (in dlq_error), type=PATTERN (ce_type, e.g. "
        "'customer.*'), key=PATTERN, id=CE_ID (repeatable), attempts-below=N.")),
        Cli(flag="--filter", metavar="NAME=VALUE")] = ()
    yes: Annotated[bool, Field(description="Do not ask for confirmation (needed without a terminal).")] = False
    force: Annotated[bool, Field(description=(
        "Rewind even though the group lists active members: wait (up to 90 s) for them to leave, as a killed "
        "consumer does when its session times out."))] = False
    dry_run: Annotated[bool, Field(description="Show what would be rewound or re-driven; change nothing.")] = False
    kafka: KafkaSettings


def slot_name_for(dbname: str) -> str:
    """Default replication slot name for a store database (slot names are cluster-wide)."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", dbname.lower())
    return f"outbox_{cleaned}"[:63]


