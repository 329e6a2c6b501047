"""The observability stack of docker/compose.yml, checked statically (no Docker here):
the compose file against the Compose Specification's schema, the Prometheus scrape
targets against the processes that serve metrics, and the Grafana dashboard against
the metric names the code really exports — both ways."""

from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import pytest
import yaml
from django.test import Client
from django_prometheus.db import metrics as django_db
from django_prometheus.middleware import Metrics
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from batches import metrics as batch_recorded
from pipeline import metrics as recorded
from tests.conftest import ROOT

DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yml").read_text())
PROMETHEUS = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
DASHBOARD = json.loads((DOCKER / "grafana" / "dashboards" / "orchestrator.json").read_text())
METRIC = re.compile(r"\b(?:orchestrator|django_http|django_db)_[a-z_]+\b")
# django-prometheus's families that the platform records (orchestrator_site.middleware.
# http_metrics, orchestrator_site.db.postgresql): the one exception to the prefix.
DJANGO_RECORDED = {
    "django_http_responses_total_by_status_view_method",
    "django_http_requests_latency_seconds_by_view_method",
    "django_http_requests_total_by_method",
    "django_http_responses_streaming",
    "django_db_execute",
    "django_db_errors",
    "django_db_query_duration_seconds",
    "django_db_new_connections",
    "django_db_new_connection_errors",
}


def test_compose_is_valid_against_the_compose_specification() -> None:
    # The schema as vendored (with its licence) by check-jsonschema, a dev dependency.
    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    jsonschema.validate(COMPOSE, schema)
    broken = {**COMPOSE, "services": {**COMPOSE["services"], "jaeger": {**COMPOSE["services"]["jaeger"], "ports": "16686"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)  # the check can fail


def test_traces_go_to_jaeger_over_otlp_http() -> None:
    services = COMPOSE["services"]
    assert {"jaeger", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        if "build" in svc:
            assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
            assert svc["environment"]["PROMETHEUS_MULTIPROC_DIR"] in svc["tmpfs"], name


def exposed_metrics_port(service: str) -> int:
    svc = COMPOSE["services"][service]
    if svc["command"][0] == "uvicorn":
        return int(svc["command"][svc["command"].index("--port") + 1])
    return int(svc["environment"]["WORKER_METRICS_PORT"])


def test_prometheus_scrapes_every_process_group_on_its_metrics_port() -> None:
    targets = {target for job in PROMETHEUS["scrape_configs"] for group in job["static_configs"] for target in group["targets"]}
    expected = {f"{name}:{exposed_metrics_port(name)}" for name in ("gateway", "worker-realtime", "worker-batch", "beat")}
    assert targets == expected
    gateway_job = next(job for job in PROMETHEUS["scrape_configs"] if job["job_name"] == "gateway")
    assert gateway_job["metrics_path"] == "/metrics"
    assert COMPOSE["services"]["worker-realtime"]["environment"]["WORKER_METRICS_ADDR"] == "0.0.0.0"  # reachable by prometheus


def test_mounted_files_exist() -> None:
    for name in ("prometheus", "grafana"):
        for volume in COMPOSE["services"][name]["volumes"]:
            assert (DOCKER / volume.split(":")[0]).exists(), volume


def exported_names() -> set[str]:
    """Every sample name the code can expose: the recorded metrics of pipeline.metrics
    and batches.metrics (by their type's suffixes; a labelled one has no sample
    until something records it) and what a real scrape of /metrics computes."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    django_http = vars(Metrics.get_instance()).values()  # what http_metrics records into
    for metric in [*vars(recorded).values(), *vars(batch_recorded).values(), *django_http, *vars(django_db).values()]:
        if isinstance(metric, MetricWrapperBase):
            names |= {metric._name + suffix for suffix in suffixes[metric._type]}
    scraped = Client().get("/metrics").content.decode()
    families = list(text_string_to_metric_families(scraped))
    names |= {sample.name for family in families for sample in family.samples}
    # A gauge computed at scrape time is exported even when it has no sample yet (no budget exists).
    names |= {family.name for family in families if family.type == "gauge"}
    return {n for n in names if METRIC.fullmatch(n)}


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in DASHBOARD["panels"] for target in panel.get("targets", [])]


@pytest.mark.django_db
def test_the_dashboard_uses_only_exported_metrics_and_shows_them_all() -> None:
    exported = exported_names()
    used = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    assert used <= exported, f"the dashboard asks for metrics nobody exports: {sorted(used - exported)}"
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported if name.startswith("orchestrator_")} | DJANGO_RECORDED
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert families <= shown, f"exported but on no panel: {sorted(families - shown)}"


def test_every_panel_reads_the_provisioned_data_source() -> None:
    provisioned = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == uid and p["targets"] for p in panels)
    assert len({p["id"] for p in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])  # Grafana needs unique ids
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "orchestrator.yml").read_text())
    mounted = dict(v.split(":")[:2] for v in COMPOSE["services"]["grafana"]["volumes"])
    assert mounted["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_the_spend_panel_shows_dollars_per_hour_by_tenant_worker_and_model() -> None:
    (panel,) = [p for p in DASHBOARD["panels"] if any("orchestrator_spend_usd_total" in t["expr"] for t in p.get("targets", []))]
    assert panel["fieldConfig"]["defaults"]["unit"] == "currencyUSD"
    assert panel["targets"][0]["expr"] == "sum by (tenant, worker, model) (rate(orchestrator_spend_usd_total[5m])) * 3600"
