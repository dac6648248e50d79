"""``outbox dev crm``: the reference CRM, for the demo, the tests and as the contract a real CRM
adapter implements (docs/crm.md).

An HTTP/JSON service on 127.0.0.1 with its own PostgreSQL database (schema ``crm``, created at
start): contacts and orders upserted and read by external id, one at a time or in batches,
idempotency keys honoured (same key, same answer, no second write), a log of every write
(``crm.writes``: who wrote, which idempotency key, the sync metadata) so tests can check order and
duplicates, change notifications (webhooks) for edits made by agents, never for sync upserts, and
faults injectable at runtime through ``/admin/faults`` (errors, 429 bursts, latency, a hang).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import signal
import time
import uuid
from dataclasses import asdict, dataclass, fields
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import click
import psycopg
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from outbox import dsn as dsnmod
from outbox.errors import ConfigError, DatabaseUnavailable
from outbox.secret import SIGNATURE_HEADER, read_secret, sign

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

KINDS = ("contacts", "orders")
MAX_BATCH = 100
ACTOR_HEADER = "X-CRM-Actor"  # "agent": an edit made by a person in the CRM (notified); absent or "sync": an upsert
TOKEN_ENV = "OUTBOX_CRM_TOKEN"
WEBHOOK_SECRET_ENV = "OUTBOX_CRM_WEBHOOK_SECRET"
POOL_SIZE = 4

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS crm;
CREATE TABLE IF NOT EXISTS crm.records (
    id          bigserial UNIQUE,
    kind        text NOT NULL,
    external_id text NOT NULL,
    fields      jsonb NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    version     integer NOT NULL DEFAULT 1,
    updated_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (kind, external_id)
);
CREATE TABLE IF NOT EXISTS crm.idempotency (
    key        text PRIMARY KEY,
    response   jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS crm.writes (
    seq             bigserial PRIMARY KEY,
    kind            text NOT NULL,
    external_id     text NOT NULL,
    version         integer NOT NULL,
    actor           text NOT NULL,
    idempotency_key text,
    meta            jsonb,
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS crm.webhooks (
    seq          bigserial PRIMARY KEY,
    body         jsonb NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    next_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at timestamptz,
    last_error   text
);
"""


# --------------------------------------------------------------------------- pure: faults, validation
@dataclass
class Faults:
    """What the CRM does wrong, set at runtime with ``PUT /admin/faults`` (a JSON object of these keys)."""

    error_rate: float = 0.0  # share of API calls answered 500
    rate_limit_rate: float = 0.0  # share of API calls answered 429
    burst_429: int = 0  # the next N API calls are answered 429
    retry_after: float = 1.0  # seconds, in the Retry-After of a 429
    retry_after_form: str = "mixed"  # "seconds", "date" (HTTP-date) or "mixed"
    after_write_share: float = 0.5  # share of the 500s answered after the write committed (the answer is lost)
    latency_ms: float = 0.0  # added to every API call
    hang: bool = False  # API calls wait until this is set back to false

    @classmethod
    def from_json(cls, data: Any, base: Faults | None = None) -> Faults:
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        known = {f.name: f.type for f in fields(cls)}
        current = asdict(base or cls())
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown fault {key!r} (known: {', '.join(known)})")
            current[key] = value
        faults = cls(**current)
        for name in ("error_rate", "rate_limit_rate", "after_write_share"):
            value = getattr(faults, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number from 0 to 1")
        if faults.error_rate + faults.rate_limit_rate > 1:
            raise ValueError("error_rate + rate_limit_rate must not exceed 1")
        if faults.retry_after_form not in ("seconds", "date", "mixed"):
            raise ValueError("retry_after_form must be seconds, date or mixed")
        if not isinstance(faults.burst_429, int) or faults.burst_429 < 0:
            raise ValueError("burst_429 must be a non-negative integer")
        for name in ("retry_after", "latency_ms"):
            if not isinstance(getattr(faults, name), (int, float)) or getattr(faults, name) < 0:
                raise ValueError(f"{name} must be a non-negative number")
        return faults


def retry_after_header(seconds: float, form: str, rng: random.Random, now: float | None = None) -> str:
    """The Retry-After value for a 429: delta-seconds, or an HTTP-date that far ahead."""
    if form == "mixed":
        form = rng.choice(("seconds", "date"))
    if form == "seconds":
        return str(max(0, round(seconds)))
    return formatdate((time.time() if now is None else now) + seconds, usegmt=True)


def validate_fields(kind: str, data: Any) -> str | None:
    """Why a record's fields are refused (a permanent 400), or None. Deliberately small rules: a
    contact needs a name and a plausible email; an order's total is a number."""
    if not isinstance(data, dict):
        return "fields must be a JSON object"
    if kind == "contacts":
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            return "name must be a non-empty string"
        email = data.get("email")
        if email is not None and (not isinstance(email, str) or "@" not in email or len(email) > 254):
            return f"invalid email {str(email)[:80]!r}"
    elif kind == "orders":
        total = data.get("total")
        if total is not None:
            try:
                float(total)
            except (TypeError, ValueError):
                return f"invalid total {str(total)[:40]!r}"
    return None


@dataclass(frozen=True, slots=True)
class Item:
    """One record of an upsert call."""

    external_id: str
    fields: dict[str, Any]
    active: bool = True
    idempotency_key: str | None = None
    meta: Any = None


def parse_items(body: Any, single_external_id: str | None = None, header_key: str | None = None) -> list[Item]:
    """The records of a request body; ValueError for a malformed request (400 for the whole call)."""
    if single_external_id is not None:
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        raw = [{**body, "external_id": single_external_id, "idempotency_key": header_key}]
    else:
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise ValueError("expected a JSON object with a 'records' array")
        raw = body["records"]
        if not 1 <= len(raw) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} records, not {len(raw)}")
    items = []
    for r in raw:
        if not isinstance(r, dict):
            raise ValueError("every record must be a JSON object")
        ext, key = r.get("external_id"), r.get("idempotency_key")
        if not isinstance(ext, str) or not ext or len(ext) > 255:
            raise ValueError("external_id must be a string of 1 to 255 characters")
        if key is not None and (not isinstance(key, str) or not key or len(key) > 255):
            raise ValueError("idempotency_key must be a string of 1 to 255 characters")
        active = r.get("active", True)
        if not isinstance(active, bool):
            raise ValueError("active must be true or false")
        items.append(Item(ext, r.get("fields", {}), active, key, r.get("meta")))
    exts = [i.external_id for i in items]
    if len(set(exts)) != len(exts):
        raise ValueError("duplicate external_id in one batch")
    keys = [i.idempotency_key for i in items if i.idempotency_key]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate idempotency_key in one batch")
    return items


# --------------------------------------------------------------------------- I/O: the database
CLAIM = "INSERT INTO crm.idempotency (key) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING RETURNING key"
CACHED = "SELECT key, response FROM crm.idempotency WHERE key = ANY(%s::text[])"
UPSERT = """
INSERT INTO crm.records AS r (kind, external_id, fields, active, updated_by)
SELECT %s, u.external_id, u.fields, u.active, %s
  FROM unnest(%s::text[], %s::jsonb[], %s::bool[]) AS u(external_id, fields, active)
ON CONFLICT (kind, external_id) DO UPDATE SET
       fields = r.fields || EXCLUDED.fields, active = EXCLUDED.active, version = r.version + 1,
       updated_by = EXCLUDED.updated_by, updated_at = clock_timestamp()
RETURNING r.id, r.external_id, r.fields, r.active, r.version, r.version = 1 AS created, r.updated_at
"""
LOG_WRITES = """
INSERT INTO crm.writes (kind, external_id, version, actor, idempotency_key, meta)
SELECT %s, u.external_id, u.version, %s, u.key, u.meta
  FROM unnest(%s::text[], %s::int[], %s::text[], %s::jsonb[]) AS u(external_id, version, key, meta)
"""
SAVE_RESPONSES = """
UPDATE crm.idempotency i SET response = u.response
  FROM unnest(%s::text[], %s::jsonb[]) AS u(key, response) WHERE i.key = u.key
"""
# The notification of an agent edit names only the fields the edit changed, with their values before
# it (``previous``: null for a record the edit created); built in SQL, so numbers keep their digits.
BEFORE = "SELECT external_id, fields::text FROM crm.records WHERE kind = %s AND external_id = ANY(%s::text[]) FOR UPDATE"
NOTIFY = """
INSERT INTO crm.webhooks (body)
SELECT jsonb_build_object(
         'id', u.id, 'type', %s::text || CASE WHEN u.before IS NULL THEN '.created' ELSE '.updated' END, 'kind', %s::text,
         'external_id', r.external_id, 'version', r.version, 'active', r.active, 'occurred_at', r.updated_at,
         'fields', coalesce((SELECT jsonb_object_agg(k, r.fields -> k) FROM unnest(u.sent) AS k
                              WHERE u.before IS NULL OR u.before::jsonb -> k IS DISTINCT FROM r.fields -> k), '{}'),
         'previous', CASE WHEN u.before IS NOT NULL THEN
                     coalesce((SELECT jsonb_object_agg(k, coalesce(u.before::jsonb -> k, 'null'::jsonb)) FROM unnest(u.sent) AS k
                                WHERE u.before::jsonb -> k IS DISTINCT FROM r.fields -> k), '{}') END)
  FROM (SELECT n.id, n.external_id, n.before, ARRAY(SELECT jsonb_array_elements_text(n.sent::jsonb)) AS sent
          FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[]) AS n(id, external_id, before, sent)) AS u
  JOIN crm.records r ON r.kind = %s::text AND r.external_id = u.external_id
 WHERE u.before IS NULL OR EXISTS (SELECT FROM unnest(u.sent) AS k WHERE u.before::jsonb -> k IS DISTINCT FROM r.fields -> k)
"""
READ = "SELECT id, external_id, fields, active, version, false, updated_at FROM crm.records WHERE kind = %s AND external_id = %s"
LIST = """SELECT id, external_id, fields, active, version, false, updated_at FROM crm.records
 WHERE kind = %s AND id > %s ORDER BY id LIMIT %s"""


def _record_json(kind: str, row: tuple[Any, ...]) -> dict[str, Any]:
    rid, ext, data, active, version, _created, updated_at = row
    return {"id": rid, "kind": kind, "external_id": ext, "fields": data, "active": active, "version": version,
            "updated_at": updated_at.isoformat()}


async def upsert(pool: AsyncConnectionPool[Any], kind: str, items: list[Item], actor: str) -> list[dict[str, Any]]:
    """Write a batch in one transaction; one result per item, in order: ``{"status": 200|201|400, ...}``.

    Items whose idempotency key was seen before get the stored answer and write nothing.
    """
    results: list[dict[str, Any] | None] = [None] * len(items)
    keys = [i.idempotency_key for i in items if i.idempotency_key]
    async with pool.connection() as conn, conn.transaction():
        cached: dict[str, Any] = {}
        if keys:
            claimed = {r[0] for r in await (await conn.execute(CLAIM, (keys,))).fetchall()}
            taken = [k for k in keys if k not in claimed]
            if taken:  # a concurrent call with the same key has committed by now (ON CONFLICT waited)
                cached = dict(await (await conn.execute(CACHED, (taken,))).fetchall())
        todo: list[int] = []
        for n, item in enumerate(items):
            if item.idempotency_key in cached:
                results[n] = {**cached[item.idempotency_key], "replayed": True}
            elif (problem := validate_fields(kind, item.fields)) is not None:
                results[n] = {"status": 400, "external_id": item.external_id, "error": problem}
            else:
                todo.append(n)
        before: dict[str, str] = {}
        if todo and actor == "agent":
            before = dict(await (await conn.execute(BEFORE, (kind, [items[n].external_id for n in todo]))).fetchall())
        if todo:
            cur = await conn.execute(UPSERT, (kind, actor, [items[n].external_id for n in todo],
                                              [json.dumps(items[n].fields) for n in todo], [items[n].active for n in todo]))
            rows = {row[1]: row for row in await cur.fetchall()}
            for n in todo:
                row = rows[items[n].external_id]
                results[n] = {"status": 201 if row[5] else 200, "record": _record_json(kind, row)}
            await conn.execute(LOG_WRITES, (kind, actor, [items[n].external_id for n in todo],
                                            [rows[items[n].external_id][4] for n in todo],
                                            [items[n].idempotency_key for n in todo],
                                            [None if items[n].meta is None else json.dumps(items[n].meta) for n in todo]))
            if actor == "agent":
                exts = [items[n].external_id for n in todo]
                await conn.execute(NOTIFY, (kind, kind, [str(uuid.uuid4()) for _ in todo], exts, [before.get(e) for e in exts],
                                            [json.dumps(list(items[n].fields)) for n in todo], kind))
        fresh = [(i.idempotency_key, r) for i, r in zip(items, results) if i.idempotency_key and i.idempotency_key not in cached]
        if fresh:
            await conn.execute(SAVE_RESPONSES, ([k for k, _ in fresh], [json.dumps(r) for _, r in fresh]))
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- I/O: HTTP
class ReferenceCrm:
    """The aiohttp application and its background webhook sender; ``start``/``stop``."""

    def __init__(self, dsn: str, port: int, *, token: str | None = None, webhook_url: str | None = None,
                 webhook_secret: str | None = None, seed: int | None = None) -> None:
        self.dsn = dsn
        self.port = port
        self.token = token
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret.encode() if webhook_secret else None
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.calls: dict[str, int] = {}
        from psycopg_pool import AsyncConnectionPool  # the [dev] extra; crm_inbound imports this module without it

        # opened in start(), closed in stop(); no I/O here
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, open=False, name="outbox-crm-reference",
            kwargs={"application_name": "outbox-crm-reference"})
        self._hang_over = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._sender: asyncio.Task[None] | None = None
        self._webhooks_due = asyncio.Event()

    # -- lifecycle
    async def start(self) -> None:
        await ensure_database(self.dsn)
        await self.pool.open(wait=True, timeout=30)
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('outbox-crm-reference schema'))")
            await conn.execute(SCHEMA_SQL)
            await conn.commit()
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        app.add_routes([
            web.get("/v1/{kind}", self.list_records),
            web.post("/v1/{kind}/batch", self.batch_upsert),
            web.get("/v1/{kind}/{external_id}", self.read),
            web.put("/v1/{kind}/{external_id}", self.single_upsert),
            web.patch("/v1/{kind}/{external_id}", self.single_upsert),
            web.get("/admin/faults", self.get_faults),
            web.put("/admin/faults", self.set_faults),
            web.get("/admin/stats", self.stats),
            web.put("/admin/webhook", self.set_webhook),
            web.get("/healthz", self.health),
        ])
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen on 127.0.0.1:{self.port}: {exc.strerror or exc} (choose another --port)") from None
        server = site._server  # noqa: SLF001 - the only way to learn the port chosen for --port 0
        assert isinstance(server, asyncio.Server) and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        self._sender = asyncio.create_task(self._send_webhooks())

    async def stop(self) -> None:
        self._hang_over.set()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._runner is not None:
            await self._runner.cleanup()
        await self.pool.close()

    # -- middleware: auth, faults, counting
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            response: web.StreamResponse = await handler(request)
            return response
        if self.token is not None and not hmac.compare_digest(request.headers.get("Authorization", ""), f"Bearer {self.token}"):
            return self._count(_error(401, "missing or wrong bearer token"))
        f = self.faults
        if f.hang:
            await self._hang_over.wait()
        if f.latency_ms:
            await asyncio.sleep(f.latency_ms / 1000)
        if f.burst_429 > 0:
            f.burst_429 -= 1
            return self._count(self._too_many())
        roll = self.rng.random()
        if roll < f.rate_limit_rate:
            return self._count(self._too_many())
        if roll < f.rate_limit_rate + f.error_rate:
            if self.rng.random() < f.after_write_share:
                with contextlib.suppress(web.HTTPException):
                    await handler(request)  # the write commits; its answer is lost
            return self._count(_error(500, "injected server error"))
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        return self._count(response)

    def _too_many(self) -> web.Response:
        response = _error(429, "rate limit exceeded (injected)")
        response.headers["Retry-After"] = retry_after_header(self.faults.retry_after, self.faults.retry_after_form, self.rng)
        return response

    def _count(self, response: web.StreamResponse) -> web.StreamResponse:
        key = str(response.status)
        self.calls[key] = self.calls.get(key, 0) + 1
        return response

    # -- the API
    def _kind(self, request: web.Request) -> str:
        kind = request.match_info["kind"]
        if kind not in KINDS:
            raise _error(404, f"unknown record kind {kind!r} (known: {', '.join(KINDS)})")
        return kind

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise _error(400, "the body is not JSON") from None

    async def single_upsert(self, request: web.Request) -> web.Response:
        kind = self._kind(request)
        actor = _actor(request)
        body = await self._body(request)
        try:
            items = parse_items(body, request.match_info["external_id"], request.headers.get("Idempotency-Key"))
        except ValueError as exc:
            raise _error(400, str(exc)) from None
        [result] = await upsert(self.pool, kind, items, actor)
        self._wake_sender(actor)
        status = result.pop("status")
        result.pop("replayed", None)
        return web.json_response(result.get("record", result), status=status)

    async def batch_upsert(self, request: web.Request) -> web.Response:
        kind = self._kind(request)
        actor = _actor(request)
        try:
            items = parse_items(await self._body(request))
        except ValueError as exc:
            raise _error(400, str(exc)) from None
        results = await upsert(self.pool, kind, items, actor)
        self._wake_sender(actor)
        return web.json_response({"results": results})

    async def read(self, request: web.Request) -> web.Response:
        kind = self._kind(request)
        async with self.pool.connection() as conn:
            row = await (await conn.execute(READ, (kind, request.match_info["external_id"]))).fetchone()
            await conn.rollback()
        if row is None:
            raise _error(404, "no such record")
        return web.json_response(_record_json(kind, row))

    async def list_records(self, request: web.Request) -> web.Response:
        kind = self._kind(request)
        try:
            after = int(request.query.get("after", "0"))
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            raise _error(400, "after and limit must be integers") from None
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(LIST, (kind, after, limit))).fetchall()
            await conn.rollback()
        return web.json_response({"records": [_record_json(kind, r) for r in rows],
                                  "next_after": rows[-1][0] if len(rows) == limit else None})

    # -- admin
    async def get_faults(self, _request: web.Request) -> web.Response:
        return web.json_response(asdict(self.faults))

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults = Faults.from_json(await self._body(request))
        except (ValueError, TypeError) as exc:
            raise _error(400, str(exc)) from None
        if self.faults.hang:
            self._hang_over.clear()
        else:
            self._hang_over.set()
        log.info("faults now %s", asdict(self.faults))
        return web.json_response(asdict(self.faults))

    async def stats(self, _request: web.Request) -> web.Response:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT count(*) FILTER (WHERE delivered_at IS NOT NULL), count(*) FILTER (WHERE delivered_at IS NULL)"
                " FROM crm.webhooks")).fetchone()
            await conn.rollback()
        assert row is not None
        return web.json_response({"calls": dict(sorted(self.calls.items())), "webhooks_delivered": row[0],
                                  "webhooks_pending": row[1]})

    async def set_webhook(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        url = body.get("url") if isinstance(body, dict) else None
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise _error(400, "url must be an http(s) URL or null")
        self.webhook_url = url
        self._webhooks_due.set()
        return web.json_response({"url": url})

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    # -- webhooks: in order, at least once, retried with backoff
    def _wake_sender(self, actor: str) -> None:
        if actor == "agent":
            self._webhooks_due.set()

    async def _send_webhooks(self) -> None:
        async with ClientSession(timeout=ClientTimeout(total=10)) as http:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._webhooks_due.wait(), 1.0)
                self._webhooks_due.clear()
                if not self.webhook_url:
                    continue
                try:
                    await self._deliver_due(http, self.webhook_url)
                except (psycopg.Error, OSError) as exc:
                    log.warning("webhook delivery paused: %s", dsnmod.first_line(exc))

    async def _deliver_due(self, http: ClientSession, url: str) -> None:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT seq, body, attempts FROM crm.webhooks WHERE delivered_at IS NULL ORDER BY seq LIMIT 100")).fetchall()
            await conn.rollback()
            for seq, body, attempts in rows:
                data = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", "X-CRM-Delivery": str(seq)}
                if self.webhook_secret:
                    headers[SIGNATURE_HEADER] = sign(self.webhook_secret, data)
                error = None
                try:
                    async with http.post(url, data=data, headers=headers) as response:
                        if response.status >= 300:
                            error = f"HTTP {response.status}"
                except (TimeoutError, ClientError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                if error is None:
                    await conn.execute("UPDATE crm.webhooks SET delivered_at = clock_timestamp(), attempts = %s WHERE seq = %s",
                                       (attempts + 1, seq))
                    await conn.commit()
                    continue
                await conn.execute("UPDATE crm.webhooks SET attempts = %s, last_error = %s WHERE seq = %s",
                                   (attempts + 1, error, seq))
                await conn.commit()
                log.warning("webhook %d to %s failed (%s); retrying", seq, url, error)
                await asyncio.sleep(min(30.0, 0.2 * 2 ** min(attempts, 8)))
                self._webhooks_due.set()  # keep order: nothing after it goes before it
                return


def _actor(request: web.Request) -> str:
    actor = request.headers.get(ACTOR_HEADER, "sync").lower()
    if actor not in ("sync", "agent"):
        raise _error(400, f"{ACTOR_HEADER} must be sync or agent")
    return actor


def _error(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 404: web.HTTPNotFound,
           429: web.HTTPTooManyRequests, 500: web.HTTPInternalServerError}[status]
    return cls(text=json.dumps({"error": message}), content_type="application/json")


async def ensure_database(dsn: str) -> None:
    """Create the CRM's database when it does not exist yet (a dev tool: convenience over ceremony)."""
    info = dsnmod.parse(dsn)
    try:
        await (await psycopg.AsyncConnection.connect(dsn)).close()
        return
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc) or not info.get("dbname"):
            raise DatabaseUnavailable(f"cannot connect to {dsnmod.describe(dsn)}: {dsnmod.first_line(exc)} "
                                      "(check --dsn and the PG* environment variables)") from None
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            await conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(info["dbname"])))
    log.info("created database %s", info["dbname"])


# --------------------------------------------------------------------------- the CLI
@click.command("crm")
@click.option("--port", type=click.IntRange(0, 65535), default=8480, show_default=True,
              help="Port on 127.0.0.1 (0: any free port; the address is printed).")
@click.option("--dsn", default="dbname=crm", show_default=True, metavar="DSN",
              help="The CRM's own database (created when missing; schema crm created at start). "
                   "PGHOST, PGPORT, PGUSER... fill what it leaves out.")
@click.option("--webhook-url", default=None, metavar="URL",
              help="Where change notifications for agent edits are POSTed (also settable at runtime: PUT /admin/webhook).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help=f"Require this bearer token on /v1 (first line of the file) [default: ${TOKEN_ENV}, else no auth].")
@click.option("--webhook-secret-file", type=click.Path(dir_okay=False), default=None,
              help=f"Sign webhooks with HMAC-SHA256 of this secret [default: ${WEBHOOK_SECRET_ENV}, else unsigned].")
@click.option("--seed", type=int, default=None, help="Seed of the fault dice (reproducible fault sequences).")
def crm(port: int, dsn: str, webhook_url: str | None, token_file: str | None, webhook_secret_file: str | None,
        seed: int | None) -> None:
    """Run the reference CRM: contacts and orders by external id over HTTP/JSON (docs/crm.md).

    \b
      PUT  /v1/{contacts|orders}/{external_id}   upsert one (Idempotency-Key header)
      POST /v1/{contacts|orders}/batch           upsert up to 100 ({"records": [...]})
      GET  /v1/{contacts|orders}/{external_id}   read one; GET /v1/{kind}?after=ID lists
      PUT  /admin/faults                         {"error_rate": 0.15, "rate_limit_rate": 0.15, ...}
    Writes with the header X-CRM-Actor: agent are edits by a person: they send webhooks.
    SIGTERM or SIGINT stops it.
    """
    dsnmod.parse(dsn)
    server = ReferenceCrm(dsn, port, token=read_secret(TOKEN_ENV, token_file, "token"), webhook_url=webhook_url,
                         webhook_secret=read_secret(WEBHOOK_SECRET_ENV, webhook_secret_file, "webhook secret"), seed=seed)
    asyncio.run(_serve(server))


async def _serve(server: ReferenceCrm) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        click.echo(f"reference CRM listening on http://127.0.0.1:{server.port} (database {dsnmod.describe(server.dsn)})",
                   err=True)
        await stop.wait()
    finally:
        await server.stop()
