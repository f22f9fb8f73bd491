"""deploy/, offline: the Kubernetes manifests are valid Kubernetes and agree with the server's own
settings, and haproxy.cfg and the compose variant agree with the server's limits and drain.

Settings are read the way the server reads them: `server.Settings.from_env` on the image's
environment (the Dockerfile's ENV lines) overlaid with the manifest's.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
import yaml

import server
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DEMO_KEY = "gpp-llm-service-secret"
# The oldest Kubernetes whose schemas the package bundles, and the newest.
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version() + ".0")


@cache
def manifests() -> dict[str, dict[str, Any]]:
    """Every resource under deploy/k8s, by kind."""
    docs = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (only,) = pod()["containers"]
    return only  # type: ignore[no-any-return]


def all_containers() -> list[dict[str, Any]]:
    return [*pod().get("initContainers", []), *pod()["containers"]]


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text().replace("\\\n", " ")


def image_env() -> dict[str, str]:
    """The ENV lines of the server's Dockerfile (NAME=value pairs)."""
    pairs = [pair for line in re.findall(r"^ENV (.*)$", dockerfile(), re.M) for pair in line.split()]
    return dict(pair.split("=", 1) for pair in pairs)


def settings() -> server.Settings:
    env = {e["name"]: e["value"] for e in container()["env"] if "value" in e}
    return server.Settings.from_env({**image_env(), **env, "API_KEY": "x"})


def env_value(name: str) -> dict[str, Any]:
    return next(e for e in container()["env"] if e["name"] == name)


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kind", ["Deployment", "Service", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler"])
def test_every_manifest_is_valid_kubernetes(kind: str, version: str) -> None:
    # strict: a misspelt or misplaced field is an error, not a field Kubernetes silently drops
    kubernetes_validate.validate(manifests()[kind], version, strict=True)


def test_the_validation_catches_a_misplaced_field() -> None:
    broken = yaml.safe_load((K8S / "deployment.yaml").read_text())
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_kustomization_applies_every_manifest_and_names_both_images() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {c["image"].split(":")[0] for c in all_containers()}
    assert {i["name"] for i in kustomization["images"]} == images


def test_the_grace_period_covers_the_pause_the_drain_and_the_backstop() -> None:
    sleep = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    needed = int(sleep[1]) + settings().drain_timeout + server.DRAIN_BACKSTOP_SECONDS
    assert pod()["terminationGracePeriodSeconds"] >= needed


def test_probes_use_routes_the_server_has() -> None:
    probes = {kind: container()[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/health"  # never fails under load: a busy pod stays
    assert probes["readinessProbe"]["path"] == "/ready"
    paths = server.openapi(settings())["paths"]
    ports = {p["name"] for p in container()["ports"]}
    for probe in probes.values():
        assert probe["path"] in paths
        assert probe["port"] in ports


def test_the_container_port_is_the_port_the_server_listens_on() -> None:
    (port,) = container()["ports"]
    assert port["containerPort"] == settings().port
    assert settings().host == "0.0.0.0"  # from the image; 127.0.0.1 would fail every probe


def test_readiness_is_probed_only_where_the_model_loads_at_start() -> None:
    # Without LOAD_ON_START a pod loads its model on the first request, which never comes to a
    # pod that is not ready: it would stay unready forever.
    probed = {container()[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe")}
    assert "/ready" in probed
    assert settings().load_on_start


def test_the_pod_runs_as_the_images_user() -> None:
    user = re.search(r"^USER (\S+)", dockerfile(), re.M)
    assert user is not None
    uid = re.search(rf"useradd --uid (\d+) --gid (\S+) .*\b{user[1]}\b", dockerfile())
    gid = re.search(rf"groupadd --gid (\d+) {uid[2] if uid else ''}\b", dockerfile())
    assert uid is not None and gid is not None
    security = pod()["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["runAsNonRoot"]) == (int(uid[1]), int(gid[1]), True)


def test_every_container_is_locked_down_with_guaranteed_resources() -> None:
    assert pod()["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod()["automountServiceAccountToken"] is False
    for each in all_containers():
        security = each["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert each["resources"]["requests"] == each["resources"]["limits"]
    assert not any("hostPath" in volume for volume in pod()["volumes"])


def mounts() -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container()["volumeMounts"]}


def volume(name: str) -> dict[str, Any]:
    return next(v for v in pod()["volumes"] if v["name"] == name)


def test_the_writable_places_the_server_needs_are_volumes() -> None:
    tmp = mounts()["/tmp"]
    assert "emptyDir" in volume(tmp["name"]) and not tmp.get("readOnly")
    for cache_dir in (image_env()["TRANSFORMERS_CACHE"], image_env()["HF_HOME"]):
        assert cache_dir.startswith("/tmp/")


def test_the_model_directory_is_filled_by_the_init_container() -> None:
    model = settings().model.name
    mount = next(m for path, m in mounts().items() if model.startswith(path + "/"))
    assert mount.get("readOnly") is True
    (init,) = pod()["initContainers"]
    assert any(m["name"] == mount["name"] and not m.get("readOnly") for m in init["volumeMounts"])
    assert model in " ".join(init["command"])


def test_torch_uses_as_many_threads_as_the_cpu_limit() -> None:
    source = env_value("OMP_NUM_THREADS")["valueFrom"]["resourceFieldRef"]
    assert (source["containerName"], source["resource"]) == (container()["name"], "limits.cpu")


def test_the_secrets_placeholder_cannot_serve() -> None:
    ref = env_value("API_KEY")["valueFrom"]["secretKeyRef"]
    secret = manifests()["Secret"]
    assert ref["name"] == secret["metadata"]["name"]
    placeholder = secret["stringData"][ref["key"]]
    assert placeholder != DEMO_KEY
    with pytest.raises(SystemExit, match="API_KEY is not set"):  # the pod refuses to start until replaced
        server.Settings.from_env({**image_env(), "API_KEY": placeholder})


def test_service_budget_and_autoscaler_point_at_the_pods() -> None:
    labels = manifests()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service, pdb, hpa = (manifests()[k]["spec"] for k in ("Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"))
    assert service["selector"].items() <= labels.items()
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= {p["name"] for p in container()["ports"]}
    assert hpa["scaleTargetRef"]["name"] == manifests()["Deployment"]["metadata"]["name"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]  # a disruption never takes the last replica


# ---------------------------------------------------------------------------------------------
# haproxy and the compose variant


def haproxy_lines() -> list[str]:
    """haproxy.cfg's directives, without comments and indentation."""
    lines = (line.split("#")[0].strip() for line in (DEPLOY / "haproxy.cfg").read_text().splitlines())
    return [line for line in lines if line]


def haproxy(keyword: str) -> str:
    """The arguments of a directive ("" if absent)."""
    return next((line[len(keyword) :].strip() for line in haproxy_lines() if line.startswith(keyword + " ")), "")


def seconds(duration: str) -> float:
    """A haproxy or compose duration with its unit ("150s", "2m", "250ms") in seconds."""
    match = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert match is not None, f"{duration!r}: give durations a unit (haproxy reads a bare number as ms)"
    return int(match[1]) * {"ms": 0.001, "s": 1, "m": 60}[match[2]]


def test_haproxy_can_replay_any_request_the_server_accepts() -> None:
    # L7 retries replay from one buffer, of which haproxy keeps 1 KiB for rewrites; allow 8 KiB of headers
    assert int(haproxy("tune.bufsize")) - 1024 >= server.Limits().max_body_bytes + 8192
    assert "option http-buffer-request" in haproxy_lines()
    assert {"conn-failure", "empty-response", "503"} <= set(haproxy("retry-on").split())
    assert haproxy("option redispatch") == "1"  # each retry on another replica


def test_haproxy_waits_as_long_as_a_generation_may_take() -> None:
    request_timeout = server.Settings.from_env({"API_KEY": "x"}).request_timeout
    assert seconds(haproxy("timeout server")) > request_timeout
    assert seconds(haproxy("timeout client")) > request_timeout


def test_haproxy_checks_readiness_and_never_takes_out_a_busy_replica() -> None:
    assert haproxy("http-check send") == "meth GET uri /ready"
    assert "/ready" in server.openapi(settings())["paths"]
    # A full replica answers 503 by design, and requests on a replica marked down must finish.
    for never in ("observe layer7", "on-error mark-down", "on-marked-down shutdown-sessions"):
        assert not any(never in line for line in haproxy_lines())


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.replicas.yml").read_text())  # type: ignore[no-any-return]


def test_the_compose_variant_puts_every_replica_behind_the_tested_haproxy_config() -> None:
    services = compose()["services"]
    lb = services.pop("lb")
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    backends = {v for k, v in lb["environment"].items() if k.startswith("LLM_SERVER_")}
    env = services["llm-1"]["environment"]
    port = server.Settings.from_env({**image_env(), **env, "API_KEY": "x"}).port
    assert backends == {f"{name}:{port}" for name in services}


def test_the_compose_replicas_get_time_to_drain_and_load_at_start() -> None:
    for replica in (s for name, s in compose()["services"].items() if name != "lb"):
        settings = server.Settings.from_env({**image_env(), **replica["environment"], "API_KEY": "x"})
        assert settings.load_on_start  # haproxy checks /ready
        grace = seconds(replica["stop_grace_period"])
        assert grace >= settings.drain_timeout + server.DRAIN_BACKSTOP_SECONDS
