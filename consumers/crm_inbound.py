"""The way back: changes made in the CRM reach the store databases' legacy tables (docs/crm.md).

    CRM (agent edit) --webhook--> outbox consume crm-webhook --> Kafka topic crm.changes
        --> outbox consume crm-writeback (one per store) --> UPDATE pos.customers ... with
            outbox.origin = 'crm' --> capture trigger stamps origin 'crm' into the event
        --> relay --> Kafka --> the CRM sink skips it (ce_origin = crm): one hop, no loop.

- :func:`run_webhook_receiver`: an HTTP endpoint that answers the CRM only after Kafka has
  acknowledged the notification (acks=all), so an answered webhook is never lost; the CRM
  retries unanswered ones. Key: the record's external id (per-record order).
- the write-back sink (``outbox consume crm-writeback``) is in consumers/crm_writeback.py; the
  notification format both read (:func:`consumers.crm_logic.parse_change`) in consumers/crm_logic.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from datetime import datetime, timezone

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter

from outbox import contract, metrics
from outbox.config import CrmWebhookSettings
from outbox.consumers.crm_logic import H_DELIVERY, Change, mapping_for_kind, parse_change
from outbox.consumers.dlq import DeadLetter, dlq_topic, relay_partitioner
from outbox.errors import ConfigError, KafkaUnavailable
from outbox.secret import SIGNATURE_HEADER, sign
from outbox.signals import stop_on_signals

__all__ = ["Change", "H_DELIVERY", "WebhookReceiver", "mapping_for_kind", "parse_change", "run_webhook_receiver"]

log = logging.getLogger(__name__)

WEBHOOK_GROUP = "outbox-crm-webhook"  # dlq_group of the notifications the receiver parks
WEBHOOKS_PARKED = metrics.sink_metric(
    Counter, "outbox_crm_webhooks_parked_total",
    "CRM notifications the webhook receiver could not use (not JSON, no <source_id>:<id> external id...), "
    "parked in <topic>.dlq and answered 2xx so the CRM's later notifications are not held up.", ["reason"])


# --------------------------------------------------------------------------- I/O: the webhook receiver
class WebhookReceiver:
    """POST /webhook -> the Kafka topic, acknowledged before the CRM gets its 204."""

    def __init__(self, settings: CrmWebhookSettings) -> None:
        self.s = settings
        self.port = settings.port
        self._secret = settings.secret.get_secret_value().encode() if settings.secret else None
        self._producer: AIOKafkaProducer | None = None
        self._runner: web.AppRunner | None = None
        self.received = 0

    async def start(self) -> None:
        # the relay's partitioner, as every producer of ours (consumers/dlq.py): one key, one partition
        self._producer = AIOKafkaProducer(**self.s.kafka.client_kwargs(), client_id="outbox-crm-webhook", acks="all",
                                          enable_idempotence=True, linger_ms=2, partitioner=relay_partitioner)
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise KafkaUnavailable(f"cannot reach Kafka at {self.s.kafka.bootstrap}: {exc} (check --kafka-bootstrap)") from None
        # ask for the topic's metadata now: a broker that creates topics on demand creates it, so
        # the writebacks subscribed to it are assigned before the first notification arrives
        with contextlib.suppress(KafkaError, asyncio.TimeoutError):
            await asyncio.wait_for(self._producer.partitions_for(self.s.topic), 10)
        app = web.Application(client_max_size=1024 * 1024)
        app.add_routes([web.post("/webhook", self.webhook), web.get("/healthz", self.health)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.s.host, self.s.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"cannot listen on {self.s.host}:{self.s.port}: {exc.strerror or exc} (choose another --port)") from None
        server = site._server  # noqa: SLF001 - the port chosen for --port 0
        assert isinstance(server, asyncio.Server) and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._producer is not None:
            await self._producer.stop()

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def webhook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self._secret is not None:
            given = request.headers.get(SIGNATURE_HEADER, "")
            if not hmac.compare_digest(given, sign(self._secret, body)):
                return web.json_response({"error": "bad or missing signature"}, status=401)
        try:
            change = parse_change(body)
        except ValueError as exc:
            return await self._park(request, body, f"{type(exc).__name__}: {exc}")
        assert self._producer is not None
        key = f"{change.source_id}:{change.aggregate_id}".encode()
        try:
            future = await self._producer.send(self.s.topic, value=body, key=key, headers=[
                (H_DELIVERY, change.delivery_id.encode()), (contract.H_CONTENT_TYPE, contract.CONTENT_TYPE.encode())])
            await asyncio.wait_for(future, 30)
        except (TimeoutError, KafkaError) as exc:
            log.warning("webhook %s not taken: Kafka did not acknowledge it (%s)", change.delivery_id, exc)
            return web.json_response({"error": "Kafka unavailable, retry later"}, status=503, headers={"Retry-After": "5"})
        self.received += 1
        return web.Response(status=204)

    async def _park(self, request: web.Request, body: bytes, error: str) -> web.Response:
        """A notification no write-back can use (a CRM-born lead without a store key, say): answering
        4xx would make the CRM retry it forever, in order, holding up every later edit. It is parked
        in ``<topic>.dlq`` with the reason (acknowledged by Kafka first) and answered 202."""
        assert self._producer is not None
        delivery = request.headers.get("X-CRM-Delivery", "")
        letter = DeadLetter(self.s.topic, -1, -1, error, ((H_DELIVERY, delivery.encode()),) if delivery else (),
                            None, body)
        record = letter.record(WEBHOOK_GROUP, datetime.now(timezone.utc))
        try:
            future = await self._producer.send(record.topic, value=record.value, key=record.key, headers=record.headers)
            await asyncio.wait_for(future, 30)
        except (KafkaError, TimeoutError) as exc:
            log.warning("unusable webhook %s not parked: Kafka did not acknowledge it (%s)", delivery or "?", exc)
            return web.json_response({"error": "Kafka unavailable, retry later"}, status=503, headers={"Retry-After": "5"})
        WEBHOOKS_PARKED.labels("invalid").inc()
        log.error("parked webhook %s in %s: %s", delivery or "?", dlq_topic(self.s.topic), letter.error)
        return web.json_response({"parked": letter.error}, status=202)


async def run_webhook_receiver(settings: CrmWebhookSettings, stop: asyncio.Event | None = None,
                               started: asyncio.Event | None = None) -> int:
    """Serve until ``stop`` (or SIGTERM/SIGINT); returns how many notifications went to Kafka."""
    own_stop = stop is None
    stop = stop or asyncio.Event()
    receiver = WebhookReceiver(settings)
    await receiver.start()
    try:
        log.info("CRM webhooks on http://%s:%d/webhook -> Kafka topic %s", settings.host, receiver.port, settings.topic)
        if started is not None:
            started.set()
        with stop_on_signals(stop) if own_stop else contextlib.nullcontext():
            await stop.wait()
    finally:
        await receiver.stop()
    return receiver.received
