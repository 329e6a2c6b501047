"""docker/autoscaling: the KEDA ScaledObjects and the HPA follow the scheduler's
exported desired workers, per queue, for the worker deployments compose defines."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline import metrics
from pipeline.queues import Queue

ROOT = Path(__file__).resolve().parents[2]
AUTOSCALING = ROOT / "docker" / "autoscaling"
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((AUTOSCALING / name).read_text()) if d]


def test_each_scaled_object_follows_the_desired_workers_of_its_queues() -> None:
    objects = documents("keda-scaledobjects.yaml")
    assert {o["kind"] for o in objects} == {"ScaledObject"} and {o["apiVersion"] for o in objects} == {"keda.sh/v1alpha1"}
    targets = {o["spec"]["scaleTargetRef"]["name"]: o for o in objects}
    assert set(targets) == {"worker-realtime", "worker-batch"} <= set(COMPOSE["services"])
    for name, wanted in (("worker-realtime", [Queue.REALTIME]), ("worker-batch", list(Queue.batch_queues()))):
        (trigger,) = targets[name]["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "1"
        assert query.startswith(f"max({metrics.DESIRED_WORKERS._name}{{queue")
        selector = re.search(r'queue=~?"([^"]+)"', query)
        assert selector is not None
        assert [q for q in Queue if re.fullmatch(selector.group(1).replace("\\\\", "\\"), q.value)] == wanted
        assert targets[name]["spec"]["minReplicaCount"] <= targets[name]["spec"]["maxReplicaCount"]


def test_the_hpa_reads_the_same_metric_one_replica_per_unit() -> None:
    (hpa,) = documents("hpa.yaml")
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in COMPOSE["services"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"] == {"name": metrics.DESIRED_WORKERS._name, "selector": {"matchLabels": {"queue": Queue.REALTIME.value}}}
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
