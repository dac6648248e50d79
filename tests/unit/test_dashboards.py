"""The Grafana dashboards and provisioning files hang together (their queries run in
tests/integration/test_metrics_scrape.py against a real Prometheus)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DASHBOARDS = Path(__file__).resolve().parent.parent.parent / "dashboards"
DATASOURCE_UID = "outbox-prometheus"


def load(name: str) -> dict[str, Any]:
    return json.loads((DASHBOARDS / f"{name}.json").read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]


def test_provisioning_names_the_datasource_the_dashboards_use() -> None:
    datasources = (DASHBOARDS / "provisioning" / "datasources.yml").read_text()
    assert re.search(rf"^\s+uid: {DATASOURCE_UID}$", datasources, re.M)
    assert "type: prometheus" in datasources
    providers = (DASHBOARDS / "provisioning" / "dashboards.yml").read_text()
    assert "type: file" in providers and "path:" in providers


@pytest.mark.parametrize("uid", ["outbox-fleet", "outbox-store"])
def test_dashboard_has_its_fixed_uid_and_well_formed_panels(uid: str) -> None:
    d = load(uid)
    assert d["uid"] == uid
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{uid}: panel '{p['title']}' overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == DATASOURCE_UID
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DATASOURCE_UID and t["expr"].strip()


def test_fleet_dashboard_puts_the_worst_store_first() -> None:
    d = load("outbox-fleet")
    table = next(p for p in panels(d) if p["type"] == "table")
    assert table["targets"][0]["expr"].startswith("sort_desc(")
    sort = next(t for t in table["transformations"] if t["id"] == "sortBy")
    assert sort["options"]["sort"][0] == {"field": "Behind", "desc": True}
    bars = [p for p in panels(d) if p["type"] == "bargauge"]
    assert bars and all(re.match(r"sort_desc\(topk\(\d+, ", p["targets"][0]["expr"]) for p in bars)


def test_store_dashboard_filters_by_its_source_id_variable() -> None:
    d = load("outbox-store")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert "label_values(outbox_relay_info, source_id)" in variables["source_id"]["definition"]
    relay_exprs = [t["expr"] for p in panels(d) for t in p.get("targets", []) if "outbox_relay_" in t["expr"]]
    assert relay_exprs and all('source_id="$source_id"' in e for e in relay_exprs)
