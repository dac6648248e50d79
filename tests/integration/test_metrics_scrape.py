"""A real Prometheus scrapes a relay and a read-store consumer; every dashboard and alert query
returns data.

Catches misspelt metric or label names, dead panels and rules that do not evaluate, which
neither promtool's unit tests (synthetic series) nor the unit tests of outbox.metrics can.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox.dev.pos import run_workload
from tests.support.db import install_pos
from tests.support.processes import ConsumerProcess, RelayProcess
from tests.support.prometheus import DASHBOARDS, tool
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

SOURCE_ID = "scrape1"
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval becomes at a 1 s scrape interval (at least 4 scrapes)



# Series this pipeline (a relay and the read-store consumer, all healthy) cannot have: the CRM
# sink's (not running here), and counters whose label values exist only once the event happened
# (the aggregate type of a table whose capture trigger parked a change). Prometheus still
# evaluates their rules here (health "ok"); dashboards/alerts.test.yml fires each of them.
NOT_IN_THIS_PIPELINE = {
    "outbox_crm_park_failures_total": "the CRM sink",
    "outbox_relay_capture_parked_total": "labelled by the aggregate type of a parked capture",
    "outbox_relay_events_parked_total": "labelled by the topic of a parked event",
}

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """``prometheus`` as a process scraping the given jobs every second, with the alert rules loaded."""

    def __init__(self, jobs: dict[str, int]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-prometheus-"))
        self.port = free_port()
        scrape = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n" for job, port in jobs.items())
        (self.dir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {DASHBOARDS / 'alerts.yml'}\n"
            f"scrape_configs:\n{scrape}")
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        binary = tool("prometheus")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, f"--config.file={self.dir / 'prometheus.yml'}",
                                          f"--storage.tsdb.path={self.dir / 'data'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)

        wait_until(ready, timeout=30, message=lambda: f"prometheus to be ready: {self.log.read_text()[-2000:]}",
                   ignore=(OSError,))
        return self

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400 for a bad query: the body says why
            body = json.load(exc)
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr``; AssertionError when Prometheus refuses the query."""
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]  # type: ignore[no-any-return]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every target of every panel, template variables filled in."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
        for panel in panels:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$source_id", SOURCE_ID)
                assert "$" not in expr, f"{path.name} '{panel['title']}': unknown variable in {expr}"
                out.append((f"{path.name} '{panel['title']}' {target['refId']}", expr))
    return out


# Vector selectors in a PromQL expression: a metric name with optional {matchers}, not a
# function call, not a keyword, not inside by/without/on/ignoring/group_x (...) label lists.
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])\s*(\{[^}]*\})?(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[str]:
    expr = _LABEL_LISTS.sub(" ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    return [name + (matchers or "") for name, matchers in _SELECTOR.findall(expr) if name.lower() not in _KEYWORDS]


def test_selectors_are_found_in_alert_expressions() -> None:
    # the helper the scrape test relies on; without servers
    assert selectors('up{job="outbox-relay"} == 0 or outbox_relay_up == 0') == ['up{job="outbox-relay"}', "outbox_relay_up"]
    assert selectors("max by (job, group) (x_seconds) > 60 and changes(y[10m]) == 0") == ["x_seconds", "y"]
    assert selectors("a / (a + b) > 0.8e1") == ["a", "a", "b"]


def test_metrics_endpoint_serves_binds_where_told_and_stops() -> None:
    from outbox import metrics
    from outbox.errors import ConfigError

    with metrics.serve("127.0.0.1", None) as off:
        assert off is None  # no --metrics-port: no endpoint
    with metrics.serve("127.0.0.1", 0) as server:
        assert server is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "# TYPE outbox_relay_events_published_total counter" in body
        with pytest.raises(ConfigError, match="cannot serve metrics on 127.0.0.1"):
            metrics.MetricsServer("127.0.0.1", server.port)  # taken: one clear line
    with pytest.raises(OSError):  # stopped and closed
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_prometheus_scrapes_every_hop_and_every_query_has_data(
        new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str) -> None:
    store, readstore = new_database("store"), new_database("readstore")
    install_pos(store)
    relay_port, consumer_port = free_port(), free_port()
    relay = RelayProcess(store, SOURCE_ID, topic_prefix, kafka_bootstrap, "--metrics-port", str(relay_port))
    consumer = ConsumerProcess(readstore, topic_prefix, kafka_bootstrap, f"{topic_prefix}-rs")
    consumer.args += ["--metrics-port", str(consumer_port)]
    prometheus = Prometheus({"outbox-relay": relay_port, "outbox-consumer": consumer_port})
    try:
        relay.start()
        consumer.start()
        prometheus.start()
        run_workload(store, 120, seed=7)
        with psycopg.connect(store) as conn:
            events = conn.execute("SELECT count(*) FROM outbox.events WHERE type <> 'outbox.heartbeat'").fetchone()[0]  # type: ignore[index]
        assert events > 0

        # every event published and applied, as Prometheus saw it (and so the metrics count right)
        queries = ("sum(outbox_relay_events_published_total)", "sum(outbox_consumer_events_applied_total)",
                   "sum(outbox_consumer_lag_messages)")

        def caught_up() -> bool:
            for p in (relay, consumer):
                assert p.proc is not None and p.proc.poll() is None, p.output()
            published, applied, lag = (prometheus.value(q) for q in queries)
            # both may exceed: a relay session restarted by a Kafka hiccup publishes again, and a consumer
            # rebalance re-applies a batch whose offsets were not committed yet (at-least-once, idempotent sink)
            return (published or 0) >= events and (applied or 0) >= events and lag == 0

        def scraped() -> str:
            values = ", ".join(f"{q} = {prometheus.value(q)}" for q in queries)
            return f"{events} events in the store; {values}\nrelay:\n{relay.output()[-3000:]}\nconsumer:\n{consumer.output()[-3000:]}"
        wait_until(caught_up, timeout=90, interval=0.5,
                   message=lambda: f"the read store to apply every event, as scraped: {scraped()}")
        wait_until(lambda: prometheus.value(f'outbox_relay_behind_source_seconds{{source_id="{SOURCE_ID}"}}'), timeout=60,
                   interval=0.5, until=lambda behind: behind == 0, message="the relay to be idle")
        # rate() needs two samples in its window; give every target a few
        wait_until(lambda: prometheus.value("min(count_over_time(up[1m]))") or 0, timeout=60, interval=0.5,
                   until=lambda scrapes: scrapes >= 5, message="five scrapes of each target")
        wait_until(lambda: prometheus.value('outbox_relay_slot_wal_status{wal_status="reserved"}'), timeout=60,
                   interval=0.5, until=lambda status: status == 1, message="a slot sample")

        assert prometheus.value('min(up{job=~"outbox-relay|outbox-consumer"})') == 1
        for healthy in ("outbox_relay_up", "outbox_relay_replication_connected", "outbox_relay_kafka_connected"):
            assert prometheus.value(healthy) == 1, healthy
        assert prometheus.value("sum(outbox_consumer_events_rejected_total)") == 0
        assert (prometheus.value("sum(outbox_relay_commit_to_ack_seconds_count)") or 0) > 0
        assert (prometheus.value("sum(outbox_consumer_end_to_end_seconds_count)") or 0) > 0
        assert (prometheus.value("sum(outbox_relay_read_batch_events_sum)") or 0) >= events  # read again after a restart
        assert prometheus.value("max(outbox_consumer_lag_seconds)") == 0  # caught up
        assert prometheus.value("outbox_relay_slot_safe_wal_size_bytes") == float("inf")  # no max_slot_wal_keep_size here

        failures = []
        queries = dashboard_queries()
        assert len(queries) > 40
        for where, expr in queries:
            try:
                if not prometheus.query(expr):
                    failures.append(f"{where}: no data for {expr}")
            except AssertionError as exc:
                failures.append(f"{where}: {exc}")

        # Alert rules: an alert's expression is a condition, empty while all is well, so each rule is
        # checked in two ways: Prometheus loaded and evaluated it without error (health "ok"), and
        # every series selector it references (metric name with its label matchers) has data.
        def rules_evaluated() -> bool:
            groups = prometheus.api("rules")["data"]["groups"]
            return all(r["health"] == "ok" for g in groups for r in g["rules"]) and bool(groups)
        wait_until(rules_evaluated, timeout=20, interval=0.5, message="the alert rules to be evaluated")
        rules = [r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]]
        assert len(rules) >= 8
        for rule in rules:
            found = selectors(rule["query"])
            assert found, f"no selector found in {rule['name']}: {rule['query']}"
            for selector in found:
                if selector.split("{")[0] in NOT_IN_THIS_PIPELINE:
                    continue
                if not prometheus.query(selector):
                    failures.append(f"alert {rule['name']}: no data for {selector}")
        firing = [r["name"] for r in rules if r["state"] != "inactive"]
        assert not failures, "\n".join(failures)
        assert firing == [], f"alerts pending or firing on a healthy pipeline: {firing}"
    finally:
        prometheus.stop()
        for p in (relay, consumer):
            p.close()
