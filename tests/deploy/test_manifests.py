"""deploy/: every manifest parses and uses its tool's field names (KubeRay's RayService, Ray's
cluster launcher, Ray Serve's config, Prometheus), the Grafana dashboard queries only metrics
that a real ``caldera serve`` exports, and the Dockerfile installs as the README does."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from server_support import ServerProcess, read_metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "caldera-dashboard.json"
IMPORT_PATH = "caldera.deploy.serve:app_builder"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_every_manifest_parses():
    manifests = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {p.relative_to(DEPLOY).as_posix() for p in manifests} >= {
        "kuberay/rayservice.yaml", "ray-cluster.yaml", "serve-config.yaml",
        "prometheus/prometheus.yml"}
    for path in manifests:
        assert isinstance(load_yaml(path), dict), path
    assert isinstance(json.loads(DASHBOARD.read_text()), dict)


# ---- KubeRay ----------------------------------------------------------------------------------

# Field names of KubeRay's RayService CRD (ray.io/v1, config/crd/bases/ray.io_rayservices.yaml)
# and of the Kubernetes objects it embeds, as far as the manifest goes.
RAYSERVICE_KEYS = {"apiVersion", "kind", "metadata", "spec"}
SPEC_KEYS = {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
             "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds", "suspend",
             "managedBy", "serviceUnhealthySecondThreshold",
             "deploymentUnhealthySecondThreshold"}
CLUSTER_KEYS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                "autoscalerOptions", "headServiceAnnotations", "gcsFaultToleranceOptions",
                "authOptions", "networkPolicy", "tlsOptions", "upgradeStrategy", "suspend",
                "managedBy", "historyServerOptions"}
AUTOSCALER_KEYS = {"idleTimeoutSeconds", "upscalingMode", "version", "image",
                   "imagePullPolicy", "resources", "securityContext", "env", "envFrom",
                   "volumeMounts", "command", "args"}
HEAD_KEYS = {"template", "rayStartParams", "headService", "enableIngress", "ingressOptions",
             "resources", "labels", "serviceType"}
WORKER_KEYS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
               "template", "idleTimeoutSeconds", "numOfHosts", "scaleStrategy", "suspend",
               "resources", "labels", "priority"}
WORKER_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "template"}
TEMPLATE_KEYS = {"metadata", "spec"}
POD_KEYS = {"containers", "initContainers", "volumes", "nodeSelector", "tolerations",
            "affinity", "securityContext", "serviceAccountName", "imagePullSecrets",
            "priorityClassName", "runtimeClassName", "terminationGracePeriodSeconds",
            "topologySpreadConstraints", "hostNetwork", "dnsPolicy", "schedulerName"}
CONTAINER_KEYS = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom",
                  "ports", "resources", "volumeMounts", "securityContext", "lifecycle",
                  "livenessProbe", "readinessProbe", "startupProbe", "workingDir"}
RESOURCES_KEYS = {"requests", "limits", "claims"}
PORT_KEYS = {"containerPort", "name", "protocol", "hostPort", "hostIP"}
ENV_KEYS = {"name", "value", "valueFrom"}
VOLUME_MOUNT_KEYS = {"name", "mountPath", "readOnly", "subPath", "mountPropagation"}
TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _keys(obj: dict, allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    assert not unknown, f"{where}: fields KubeRay does not know: {sorted(unknown)}"


def _check_pod_template(template: dict, where: str) -> list[dict]:
    _keys(template, TEMPLATE_KEYS, where)
    pod = template["spec"]
    _keys(pod, POD_KEYS, f"{where}.spec")
    for toleration in pod.get("tolerations", []):
        _keys(toleration, TOLERATION_KEYS, f"{where}.spec.tolerations")
    for container in pod["containers"]:
        name = f"{where}.spec.containers[{container['name']}]"
        _keys(container, CONTAINER_KEYS, name)
        _keys(container["resources"], RESOURCES_KEYS, f"{name}.resources")
        for port in container.get("ports", []):
            _keys(port, PORT_KEYS, f"{name}.ports")
        for env in container.get("env", []):
            _keys(env, ENV_KEYS, f"{name}.env")
        for mount in container.get("volumeMounts", []):
            _keys(mount, VOLUME_MOUNT_KEYS, f"{name}.volumeMounts")
    return pod["containers"]


def _check_ray_start_params(params: dict, where: str) -> None:
    # map[string]string in the CRD: a number must be quoted.
    bad = {k: v for k, v in params.items() if not isinstance(v, str)}
    assert not bad, f"{where}.rayStartParams values must be strings: {bad}"


def test_rayservice_uses_kuberay_field_names():
    service = load_yaml(DEPLOY / "kuberay" / "rayservice.yaml")
    _keys(service, RAYSERVICE_KEYS, "RayService")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    spec = service["spec"]
    _keys(spec, SPEC_KEYS, "spec")
    cluster = spec["rayClusterConfig"]
    _keys(cluster, CLUSTER_KEYS, "spec.rayClusterConfig")
    _keys(cluster.get("autoscalerOptions", {}), AUTOSCALER_KEYS, "autoscalerOptions")
    assert cluster["enableInTreeAutoscaling"] is True

    head = cluster["headGroupSpec"]
    _keys(head, HEAD_KEYS, "headGroupSpec")
    _check_ray_start_params(head["rayStartParams"], "headGroupSpec")
    _check_pod_template(head["template"], "headGroupSpec.template")

    gpus_per_pod = []
    for group in cluster["workerGroupSpecs"]:
        where = f"workerGroupSpecs[{group['groupName']}]"
        _keys(group, WORKER_KEYS, where)
        assert set(group) >= WORKER_REQUIRED, f"{where} misses {WORKER_REQUIRED - set(group)}"
        assert group["minReplicas"] < group["maxReplicas"]
        _check_ray_start_params(group["rayStartParams"], where)
        for container in _check_pod_template(group["template"], f"{where}.template"):
            resources = container["resources"]
            gpus = resources["limits"].get("nvidia.com/gpu")
            assert gpus == resources["requests"].get("nvidia.com/gpu")
            gpus_per_pod.append(int(gpus))

    # The Serve application: Caldera's, tensor parallel over 2 GPUs, autoscaled replicas that
    # fit a worker pod, with arguments Caldera accepts.
    assert isinstance(spec["serveConfigV2"], str)
    app = _serve_application(yaml.safe_load(spec["serveConfigV2"]))
    args = app["args"]
    assert args["model"] == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert args["tensor_parallel_size"] == 2 and args["device"] == "cuda"
    assert args["min_replicas"] < args["max_replicas"]
    assert gpus_per_pod and all(g >= args["tensor_parallel_size"] for g in gpus_per_pod)


def _serve_application(config: dict) -> dict:
    """The one application of a Serve config, validated by Ray Serve's schema and Caldera's
    argument readers."""
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from caldera.deploy.serve import ReplicaOptions, read_caldera_args, read_replica_options

    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == IMPORT_PATH
    args = app["args"]
    read_replica_options(args)
    server, engine = read_caldera_args(
        {k: v for k, v in args.items() if k not in ReplicaOptions.names()})
    assert engine.model == args["model"]
    return app


def test_serve_config_for_a_cluster_of_your_own():
    app = _serve_application(load_yaml(DEPLOY / "serve-config.yaml"))
    assert app["args"]["tensor_parallel_size"] == 2


def test_ray_cluster_config_matches_the_cluster_launchers_schema():
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray_autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = load_yaml(DEPLOY / "ray-cluster.yaml")
    jsonschema.validate(config, schema)  # the schema refuses unknown fields
    assert config["docker"]["image"]
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("--metrics-export-port=8080") == 2


# ---- Prometheus -------------------------------------------------------------------------------

PROMETHEUS_KEYS = {"global", "scrape_configs", "rule_files", "alerting"}
SCRAPE_KEYS = {"job_name", "metrics_path", "scheme", "scrape_interval", "scrape_timeout",
               "authorization", "basic_auth", "tls_config", "static_configs",
               "file_sd_configs", "kubernetes_sd_configs", "relabel_configs",
               "metric_relabel_configs", "honor_labels"}
RELABEL_KEYS = {"source_labels", "separator", "regex", "target_label", "replacement",
                "action", "modulus"}


def test_prometheus_scrapes_caldera_with_the_api_key_and_ray_without_the_prefix():
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    _keys(config, PROMETHEUS_KEYS, "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name, job in jobs.items():
        _keys(job, SCRAPE_KEYS, f"job {name}")
        for relabel in job.get("metric_relabel_configs", []):
            _keys(relabel, RELABEL_KEYS, f"job {name} relabelling")
    auth = jobs["caldera"]["authorization"]
    assert auth["type"] == "Bearer" and ("credentials" in auth or "credentials_file" in auth)

    # Prometheus anchors the regex and substitutes $1: ray_caldera_x -> caldera_x, other Ray
    # metrics untouched.
    [relabel] = jobs["ray"]["metric_relabel_configs"]
    assert relabel["source_labels"] == ["__name__"] and relabel["target_label"] == "__name__"

    def rename(name: str) -> str:
        match = re.fullmatch(relabel["regex"], name)
        if match is None:
            return name
        return re.sub(r"\$(\d+)", lambda m: match.group(int(m.group(1))),
                      relabel["replacement"])

    assert rename("ray_caldera_generation_tokens_total") == "caldera_generation_tokens_total"
    assert rename("ray_serve_num_http_requests_total") == "ray_serve_num_http_requests_total"


# ---- Grafana ----------------------------------------------------------------------------------


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"]
               for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        for target in panel["targets"]:
            # A histogram is read through its buckets.
            for name in re.findall(r"histogram_quantile\([^,]+,\s*sum by \(le[^)]*\) \(rate\("
                                   r"(\w+)", target["expr"]):
                assert name.endswith("_bucket"), target["expr"]


@pytest.fixture(scope="module")
def served_metrics(llava15_dir) -> set[str]:
    """Sample names of a real ``caldera serve``'s /metrics after one chat request."""
    server = ServerProcess(["--model", str(llava15_dir), "--kv-cache-memory", "16MiB",
                            "--max-model-len", "1024", "--no-ui"], api_key="sk-dashboard")
    try:
        with server.client() as client:
            response = client.post("/v1/chat/completions", json={
                "model": "default", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello"}]})
            assert response.status_code == 200, response.text
            names = {key.split("{")[0] for key in read_metrics(client)}
        assert httpx.get(server.base_url + "/metrics").status_code == 401  # the key is needed
    finally:
        server.stop()
    return names


def test_every_metric_the_dashboard_queries_is_exported(served_metrics):
    queried = {name for query in dashboard_queries()
               for name in re.findall(r"\bcaldera_[a-z0-9_]+", query)}
    assert len(queried) >= 20
    missing = queried - served_metrics
    assert not missing, f"the dashboard queries metrics /metrics does not have: {missing}"


# ---- Dockerfile -------------------------------------------------------------------------------


def readme_install_commands() -> list[list[str]]:
    """The README's first command line, without the commands that run caldera."""
    block = re.search(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    line = block.group(1).strip().splitlines()[0]
    commands = [shlex.split(part) for part in line.split("&&")]
    return [c for c in commands if Path(c[0]).name != "caldera"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # continuation lines
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_installs_as_the_readme_on_cuda_as_a_non_root_user():
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("nvidia/cuda:")
    runs = [[shlex.split(part) for part in rest.split("&&")]
            for keyword, rest in instructions if keyword == "RUN"]
    readme = readme_install_commands()
    assert any(run == readme for run in runs), (
        f"no RUN line of the Dockerfile is the README's install: {readme}")
    # Any other pip install adds extras of this project only.
    for run in runs:
        if run == readme:
            continue
        for command in run:
            if "install" in command and Path(command[0]).name == "pip":
                assert command[-2:-1] == ["-e"] and command[-1].startswith(".["), command
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert instructions[-1][0] == "CMD"
