"""deploy/k8s: every manifest passes `kubernetes-validate --strict`, and the manifests agree with the code:
environment names the services read, their default ports, probes on /healthz, Secrets for credentials,
the tiers file where METERING_TIERS_FILE says, selectors that select, and drain times that fit."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metering.config import DEFAULT_LISTEN as METERING_DEFAULT_LISTEN
from metering.config import Config as MeteringConfig
from metering.tiers import TierTable
from renderer.config import RendererConfig

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
# Oldest Kubernetes the manifests target (preStop `sleep` on by default in 1.30) and
# the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# The public contract's Environment table (CONTRACT.md lives outside the repo): variable -> who reads it.
CONTRACT_ENV = {
    "DATABASE_URL": {"metering"},
    "METERING_LISTEN": {"metering"},
    "METERING_LEASE_SECONDS": {"metering"},
    "RENDERER_LISTEN": {"renderer"},
    "METERING_TARGET": {"renderer"},
    "RENDER_MODE": {"renderer"},
    "RENDER_OUTPUT_DIR": {"renderer"},
    "LAMBDA_FUNCTION_NAME": {"renderer"},
    "RENDER_BUCKET": {"renderer"},
    "AWS_ENDPOINT_URL_LAMBDA": {"renderer"},
    "AWS_ENDPOINT_URL_S3": {"renderer"},
    "METERING_METRICS_LISTEN": {"metering"},
    "RENDERER_METRICS_LISTEN": {"renderer"},
    "METERING_AUTH_TOKENS": {"metering"},
    "METERING_TOKEN": {"renderer"},
    "RENDERER_AUTH_TOKENS": {"renderer"},
}
CREDENTIALS = {"DATABASE_URL", "METERING_AUTH_TOKENS", "METERING_TOKEN", "RENDERER_AUTH_TOKENS"}
# Which variable switches on authentication, without which a server refuses a non-loopback address.
AUTH_FOR_LISTEN = {"METERING_LISTEN": "METERING_AUTH_TOKENS", "RENDERER_LISTEN": "RENDERER_AUTH_TOKENS"}
_ENV_READ = re.compile(r'env(?:\.get\(\s*|\[\s*|,\s*)"([A-Z][A-Z0-9_]*)"')


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def documents() -> list[dict]:
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    matches = [doc for doc in documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container(workload: dict, name: str) -> dict:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env_of(c: dict) -> dict[str, dict]:
    return {item["name"]: item for item in c.get("env", [])}


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def names_read_by(service: str) -> set[str]:
    source = (REPO / service / "config.py").read_text()
    return set(_ENV_READ.findall(source)) | {name for name, readers in CONTRACT_ENV.items() if service in readers}


WORKLOADS = [
    # (kind, name, container, service package, listen variable, metrics variable)
    ("Deployment", "metering", "metering", "metering", "METERING_LISTEN", "METERING_METRICS_LISTEN"),
    ("DaemonSet", "renderer", "renderer", "renderer", "RENDERER_LISTEN", "RENDERER_METRICS_LISTEN"),
]


def default_listen(service: str) -> str:
    if service == "metering":
        return METERING_DEFAULT_LISTEN
    return RendererConfig.from_env({}).listen


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_strict(version: str) -> None:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    files = [str(path) for path in manifest_files()]
    result = subprocess.run(
        [str(tool), "--strict", "--kubernetes-version", version, *files], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(documents())


def test_kustomization_lists_every_manifest_and_builds() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(path.name for path in manifest_files())
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return  # the file list above is the part that can drift; kustomize itself is optional here
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(built) == len(documents())
    namespaced = [doc for doc in built if doc["kind"] != "Namespace"]
    assert {doc["metadata"]["namespace"] for doc in namespaced} == {kustomization["namespace"]}


@pytest.mark.parametrize(("kind", "name", "container_name", "service", "listen_var", "metrics_var"), WORKLOADS)
def test_env_names_are_ones_the_code_reads(kind, name, container_name, service, listen_var, metrics_var) -> None:
    env = env_of(container(find(kind, name), container_name))
    unknown = set(env) - names_read_by(service)
    assert not unknown, f"{name} sets variables {service} never reads: {sorted(unknown)}"


@pytest.mark.parametrize(("kind", "name", "container_name", "service", "listen_var", "metrics_var"), WORKLOADS)
def test_ports_and_probes_agree_with_the_code(kind, name, container_name, service, listen_var, metrics_var) -> None:
    workload = find(kind, name)
    c = container(workload, container_name)
    env = env_of(c)
    ports = {port["name"]: port["containerPort"] for port in c["ports"]}
    grpc_port = port_of(default_listen(service))
    assert ports["grpc"] == grpc_port == port_of(env[listen_var]["value"])
    assert ports["metrics"] == port_of(env[metrics_var]["value"])
    # The servers refuse a non-loopback address without auth, so the variable that enables it must be set.
    assert not env[listen_var]["value"].startswith("127."), "a pod must listen beyond loopback"
    assert AUTH_FOR_LISTEN[listen_var] in env
    # Readiness reads the health status over HTTP beside the metrics (Kubernetes' grpc probes cannot speak TLS).
    for probe in ("readinessProbe", "startupProbe"):
        if probe in c or probe == "readinessProbe":
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    assert c["livenessProbe"]["tcpSocket"]["port"] in ("grpc", grpc_port)
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    service_doc = find("Service", name)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service_doc["spec"]["selector"].items() <= labels.items()
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for port in service_doc["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]


@pytest.mark.parametrize(("kind", "name", "container_name", "service", "listen_var", "metrics_var"), WORKLOADS)
def test_credentials_come_from_secrets(kind, name, container_name, service, listen_var, metrics_var) -> None:
    env = env_of(container(find(kind, name), container_name))
    for variable in CREDENTIALS & set(env):
        assert "value" not in env[variable], f"{variable} must not be written into the manifest"
        reference = env[variable]["valueFrom"]["secretKeyRef"]
        assert reference["name"] and reference["key"]
    for doc in documents():
        assert doc["kind"] != "Secret", "Secrets are created by operators, never committed"


def test_metering_deployment_is_highly_available() -> None:
    deployment = find("Deployment", "metering")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = find("PodDisruptionBudget", "metering")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] >= 1


def test_tiers_file_is_mounted_where_metering_looks_and_parses(tmp_path: Path) -> None:
    deployment = find("Deployment", "metering")
    c = container(deployment, "metering")
    tiers_path = Path(env_of(c)["METERING_TIERS_FILE"]["value"])
    (mount,) = [m for m in c["volumeMounts"] if tiers_path.parent == Path(m["mountPath"])]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["configMap"]["items"] if i["path"] == tiers_path.name]
    config_map = find("ConfigMap", volume["configMap"]["name"])
    copy = tmp_path / "tiers.toml"
    copy.write_text(config_map["data"][item["key"]])
    tiers = TierTable.load(copy)
    # The contract's defaults, and the same as the built-in table.
    assert (tiers["free"].daily_limit, tiers["free"].max_duration_seconds) == (3, 30)
    assert (tiers["pro"].daily_limit, tiers["pro"].max_duration_seconds) == (50, 120)
    assert tiers["unlimited"].daily_limit is None
    assert dict(tiers) == dict(TierTable.built_in())


def test_renderer_reaches_metering_through_its_service_with_a_token() -> None:
    env = env_of(container(find("DaemonSet", "renderer"), "renderer"))
    host, _, port = env["METERING_TARGET"]["value"].rpartition(":")
    metering_service = find("Service", "metering")
    assert host == metering_service["metadata"]["name"]
    assert int(port) in {p["port"] for p in metering_service["spec"]["ports"] if p["name"] == "grpc"}
    assert "secretKeyRef" in env["METERING_TOKEN"]["valueFrom"]


def test_renderer_writes_only_to_volumes() -> None:
    daemonset = find("DaemonSet", "renderer")
    c = container(daemonset, "renderer")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = [Path(m["mountPath"]) for m in c["volumeMounts"]]
    for variable in ("RENDER_OUTPUT_DIR", "RENDER_STATE_DIR"):
        path = Path(env_of(c)[variable]["value"])
        assert any(path == mount or mount in path.parents for mount in mounts), f"{variable} is not on a volume"
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    state = Path(env_of(c)["RENDER_STATE_DIR"]["value"])
    (state_mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) in state.parents]
    assert "hostPath" in volumes[state_mount["name"]], "the outbox must survive the pod (hostPath)"


def test_drain_fits_in_the_termination_grace_period() -> None:
    metering_grace = MeteringConfig.from_env({}).shutdown_grace_seconds
    deployment = find("Deployment", "metering")
    env = env_of(container(deployment, "metering"))
    if "METERING_SHUTDOWN_GRACE_SECONDS" in env:
        metering_grace = float(env["METERING_SHUTDOWN_GRACE_SECONDS"]["value"])
    pre_stop = container(deployment, "metering")["lifecycle"]["preStop"]["sleep"]["seconds"]
    pool_close = 5  # metering.server closes its pool within 5 s
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= (
        pre_stop + metering_grace + pool_close
    )
    daemonset = find("DaemonSet", "renderer")
    renderer_env = {name: item["value"] for name, item in env_of(container(daemonset, "renderer")).items()
                    if "value" in item and name.startswith(("RENDER_SHUTDOWN", "METERING_TIMEOUT"))}
    pre_stop = container(daemonset, "renderer")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= (
        pre_stop + RendererConfig.from_env(renderer_env).drain_seconds
    )


# --- resources sized from the measurements -----------------------------------------------------------------

BENCH_RESULTS = REPO / "bench" / "results" / "latest.json"
_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def mebibytes(quantity: str) -> float:
    for suffix, factor in _MEMORY_UNITS.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor / 2**20
    return float(quantity) / 2**20


def measured() -> dict:
    results = json.loads(BENCH_RESULTS.read_text())
    assert "resources" in results["render"] and "server_peak_rss_mib" in results["metering"]["spread"], (
        "bench/results/latest.json predates the resource figures: run `make bench`"
    )
    return results


def test_metering_resources_cover_what_the_benchmark_measured() -> None:
    """Requests: the CPU at half the measured maximum and 1.5x the peak resident set; limits: at least the CPU
    flat out and 3x the peak. A slower release fails here until the manifests are sized again."""
    results = measured()["metering"]
    shapes = [results[shape] for shape in ("spread", "hot") if shape in results]
    half_load_cpu = max(shape["open_loop"]["server_cpu_cores"] for shape in shapes)
    full_load_cpu = max(shape["service"]["server_cpu_cores"] for shape in shapes)
    peak = max(shape["server_peak_rss_mib"] for shape in shapes)
    resources = container(find("Deployment", "metering"), "metering")["resources"]
    assert cores(resources["requests"]["cpu"]) >= half_load_cpu
    assert cores(resources["limits"]["cpu"]) >= full_load_cpu
    assert mebibytes(resources["requests"]["memory"]) >= 1.5 * peak
    assert mebibytes(resources["limits"]["memory"]) >= 3 * peak


def test_renderer_resources_cover_its_concurrent_renders_at_the_largest_frame() -> None:
    """Requests: one render at its measured speed and the largest render's memory plus the process; limits:
    RENDER_CONCURRENCY of them."""
    render = measured()["render"]["resources"]
    largest = max(figures["peak_rss_mib"] for figures in render["largest_frame"].values())
    busiest = max([render["ffmpeg_cpu_cores"], *(f["cpu_cores"] for f in render["largest_frame"].values())])
    process = render["job_runner_process_peak_rss_mib"]
    renderer = container(find("DaemonSet", "renderer"), "renderer")
    concurrency = int(env_of(renderer)["RENDER_CONCURRENCY"]["value"])
    resources = renderer["resources"]
    assert cores(resources["requests"]["cpu"]) >= busiest
    assert cores(resources["limits"]["cpu"]) >= concurrency * busiest
    assert mebibytes(resources["requests"]["memory"]) >= largest + process
    assert mebibytes(resources["limits"]["memory"]) >= concurrency * largest + process
