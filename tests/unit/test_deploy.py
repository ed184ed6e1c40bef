"""The Kubernetes manifests: parsed and cross-checked against the image and the settings, no cluster needed.

What is checked is what breaks a deployment silently: probes on the wrong paths, a
container that may run as root, a Service or PDB or HPA that selects nothing, a
kustomization that forgets a file, and environment variables that are not settings.
With `kubernetes-validate` installed, every manifest is also checked against the
Kubernetes API schemas (bundled with that package, so offline).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.settings import Settings
from tests.dockerfile import DOCKERFILE, IMAGE_UID, ROOT, dockerfile_env, final_stage

DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes"
OVERLAY = DEPLOY / "model-volume"
TENSOR_PARALLEL = DEPLOY / "tensor-parallel"
MULTI_NODE = DEPLOY / "multi-node"
SESSION_AFFINITY = DEPLOY / "session-affinity"
REMOTE_SCORER = DEPLOY / "remote-scorer"
OVERLAYS = (OVERLAY, TENSOR_PARALLEL, MULTI_NODE, SESSION_AFFINITY, REMOTE_SCORER)
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

SERVER = "alignserve"  # Deployment, Service, PDB, HPA, container name
ENV_NAME = re.compile(r"\bALIGNSERVE_[A-Z0-9_]+\b")
# A setting DESIGN.md announces: manifests may name it in comments even before the server has it.
ANNOUNCED = {"ALIGNSERVE_REDIS_URL"}
SETTING_ENV = {f"ALIGNSERVE_{name.upper()}" for name in Settings.model_fields}


@functools.cache
def load(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file (cached: tests only read them)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def base_objects() -> list[dict[str, Any]]:
    return [doc for name in kustomization(BASE)["resources"] for doc in load(BASE / name)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in base_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def deployments() -> list[dict[str, Any]]:
    return [o for o in base_objects() if o["kind"] == "Deployment"]


def server_container() -> dict[str, Any]:
    (container,) = [c for c in find("Deployment", SERVER)["spec"]["template"]["spec"]["containers"]
                    if c["name"] == SERVER]
    return container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: dict[str, Any], port: int | str) -> int:
    """The container port a probe or Service targetPort names (by name or number)."""
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    raise AssertionError(f"{container['name']} has no port {port!r}")


# ---------------------------------------------------------------- kustomize


def test_kustomization_lists_every_manifest():
    listed = kustomization(BASE)["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert not [p for p in BASE.iterdir() if p.is_dir()], "kustomize refuses a base that contains an overlay"


@pytest.mark.parametrize("directory", OVERLAYS, ids=lambda d: d.name)
def test_overlay_lists_every_file_and_builds_on_the_base(directory):
    overlay = kustomization(directory)
    local = [r for r in overlay["resources"] if not r.startswith("..")]
    patches = [p["path"] for p in overlay.get("patches", [])]
    assert "../kubernetes" in overlay["resources"]
    assert set(local + patches) == {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    # Strategic-merge patches must name objects the base defines.
    names = {(o["kind"], o["metadata"]["name"]) for o in base_objects()}
    for patch in patches:
        for doc in load(directory / patch):
            assert (doc["kind"], doc["metadata"]["name"]) in names


def test_manifests_are_namespace_agnostic():
    for path in [*BASE.glob("*.yaml"), *(p for d in OVERLAYS for p in d.glob("*.yaml"))]:
        for doc in load(path):
            where = doc if doc.get("kind") == "Kustomization" else doc.get("metadata", {})
            assert "namespace" not in where, f"{path.name} pins a namespace"


def test_kustomize_image_name_matches_the_deployment():
    (image,) = kustomization(BASE)["images"]
    assert server_container()["image"].split(":")[0] == image["name"]


# ---------------------------------------------------------------- server Deployment


def test_server_probes_use_health_and_ready():
    container = server_container()
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == 8000


def test_startup_probe_allows_minutes_for_the_engine():
    startup = server_container()["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600


def test_server_listens_where_the_probes_look():
    env = {e["name"]: e.get("value") for e in server_container()["env"]}
    assert env["ALIGNSERVE_HOST"] == "0.0.0.0"
    assert int(env["ALIGNSERVE_PORT"]) == container_port(server_container(), "http") == 8000


def test_termination_grace_exceeds_drain_timeout():
    grace = find("Deployment", SERVER)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in server_container()["env"]}
    drain = float(env.get("ALIGNSERVE_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default))
    # The engine needs seconds to stop after the drain (about 9 s measured for the demo).
    assert grace >= drain + 20


def test_server_uses_the_redis_service():
    env = {e["name"]: e.get("value") for e in server_container()["env"]}
    service = find("Service", "alignserve-redis")
    assert env["ALIGNSERVE_REDIS_URL"].startswith(
        f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/")


def test_service_links_are_off():
    # A Service named `alignserve` injects ALIGNSERVE_PORT=tcp://...: an invalid port setting.
    for deployment in deployments():
        assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_replica_count_is_left_to_the_hpa():
    assert "replicas" not in find("Deployment", SERVER)["spec"]


@pytest.mark.parametrize("name", [SERVER, "alignserve-redis"])
def test_every_container_is_non_root_and_bounded(name):
    deployment = find("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert selects(deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{container['name']} {bound}"
        assert "readinessProbe" in container and "livenessProbe" in container


def test_server_runs_as_the_image_user_with_writable_scratch():
    pod = find("Deployment", SERVER)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    mounts = {m["mountPath"] for m in server_container()["volumeMounts"]}
    # Read-only root: vLLM, Triton and Python write under /tmp and HOME; vLLM needs /dev/shm.
    assert {"/tmp", dockerfile_env()["HOME"], "/dev/shm"} <= mounts


def test_gpu_variant_is_documented_in_the_deployment():
    assert "nvidia.com/gpu: 1" in (BASE / "deployment.yaml").read_text()


# ---------------------------------------------------------------- Service, PDB, HPA, monitoring


def test_services_target_container_ports():
    for service_name, deployment_name, port in ((SERVER, SERVER, 8000), ("alignserve-redis", "alignserve-redis", 6379)):
        service = find("Service", service_name)
        template = find("Deployment", deployment_name)["spec"]["template"]
        assert selects(service["spec"]["selector"], template["metadata"]["labels"])
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port
        (container,) = template["spec"]["containers"]
        assert container_port(container, service_port["targetPort"]) == port
    assert find("Service", SERVER)["spec"]["ports"][0]["name"] == "http"


def test_service_selects_only_the_server():
    selector = find("Service", SERVER)["spec"]["selector"]
    assert not selects(selector, find("Deployment", "alignserve-redis")["spec"]["template"]["metadata"]["labels"])


def test_pdb_selects_the_server_pods():
    pdb = find("PodDisruptionBudget", SERVER)
    assert pdb["spec"]["minAvailable"] == 1
    labels = find("Deployment", SERVER)["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)


def test_hpa_scales_the_server_on_queue_depth():
    hpa = find("HorizontalPodAutoscaler", SERVER)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SERVER}
    # With one replica, the PDB's minAvailable 1 would block every node drain.
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"


def test_prometheus_adapter_rule_yields_the_hpa_metric():
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert "vllm:num_requests_waiting" in rule["seriesQuery"]
    renamed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), "vllm:num_requests_waiting")
    hpa = find("HorizontalPodAutoscaler", SERVER)
    assert renamed == hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]


def test_service_monitor_scrapes_metrics_of_the_server_service():
    monitor = find("ServiceMonitor", SERVER)
    service = find("Service", SERVER)
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_redis_is_reachable_from_the_server_only():
    policy = find("NetworkPolicy", "alignserve-redis")
    redis_labels = find("Deployment", "alignserve-redis")["spec"]["template"]["metadata"]["labels"]
    server_labels = find("Deployment", SERVER)["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], redis_labels)
    (rule,) = policy["spec"]["ingress"]
    assert selects(rule["from"][0]["podSelector"]["matchLabels"], server_labels)


# ---------------------------------------------------------------- guide-model table


def test_guide_table_configmap_is_what_the_server_reads():
    env = {e["name"]: e.get("value") for e in server_container()["env"]}
    table_path = Path(env["ALIGNSERVE_GUIDE_MODELS"])
    pod = find("Deployment", SERVER)["spec"]["template"]["spec"]
    (mount,) = [m for m in server_container()["volumeMounts"] if m["mountPath"] == str(table_path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = find("ConfigMap", volume["configMap"]["name"])
    for data in (configmap["data"], load(OVERLAY / "guides-configmap-patch.yaml")[0]["data"]):
        table = json.loads(data[table_path.name])
        assert isinstance(table, dict) and all(isinstance(v, str) and v.startswith("/") for v in table.values())


def demo_table_in_configmap() -> dict[str, str]:
    return json.loads(find("ConfigMap", "alignserve-guides")["data"]["guides.json"])


def test_demo_guide_table_points_into_the_image():
    workdir = [args for keyword, args in final_stage() if keyword == "WORKDIR"][-1]
    checkpoints = Path(workdir) / "models" / "demo" / "checkpoints"
    assert all(Path(path).parent == checkpoints for path in demo_table_in_configmap().values())


def test_demo_guide_table_matches_the_committed_demo():
    committed = ROOT / "models" / "demo" / "checkpoints" / "guides.json"
    demo = json.loads(committed.read_text())
    assert {name: Path(path).name for name, path in demo_table_in_configmap().items()} == demo
    for directory in demo.values():
        assert (committed.parent / directory).is_dir()


# ---------------------------------------------------------------- settings named in env


def deploy_texts() -> dict[str, str]:
    paths = [DOCKERFILE, *BASE.glob("*.yaml"), *(p for d in OVERLAYS for p in d.glob("*.yaml")), DEPLOY_DOC]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths if p.is_file()}


def active_env_names() -> set[str]:
    names = set(dockerfile_env())
    docs = base_objects() + [doc for d in OVERLAYS for p in d.glob("*.yaml") for doc in load(p)]
    for doc in docs:
        for container in pod_containers(doc):
            names |= {e["name"] for e in container.get("env", [])}
    return {n for n in names if n.startswith("ALIGNSERVE_")}


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a Deployment (or patch of one) or of a LeaderWorkerSet's pod templates."""
    spec = doc.get("spec", {})
    templates = [spec.get("template", {})] + [spec.get("leaderWorkerTemplate", {}).get(t, {})
                                              for t in ("leaderTemplate", "workerTemplate")]
    return [c for t in templates for c in t.get("spec", {}).get("containers", [])]


def test_settings_in_the_manifests_are_valid_values():
    for doc in base_objects() + [doc for d in OVERLAYS for p in d.glob("*.yaml") for doc in load(p)]:
        for container in pod_containers(doc):
            # The model directories are on the cluster's volumes, not here.
            values = {e["name"].removeprefix("ALIGNSERVE_").lower(): e["value"] for e in container.get("env", [])
                      if e["name"].startswith("ALIGNSERVE_") and "value" in e and e["name"] != "ALIGNSERVE_MODEL"}
            Settings(**values)  # raises naming the field whose value the server would refuse


def test_env_variables_set_are_settings():
    assert active_env_names() - SETTING_ENV == set()


def test_env_variables_mentioned_are_settings_or_announced():
    for name, text in deploy_texts().items():
        unknown = set(ENV_NAME.findall(text)) - SETTING_ENV - ANNOUNCED
        assert not unknown, f"{name} names {sorted(unknown)}, which are not settings"


# ---------------------------------------------------------------- scale-out overlays


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def leader_worker_set() -> dict[str, Any]:
    (lws,) = load(MULTI_NODE / "leaderworkerset.yaml")
    return lws


def test_tensor_parallel_overlay_asks_for_one_gpu_per_rank():
    (patch,) = load(TENSOR_PARALLEL / "deployment-patch.yaml")
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(env_of(container)["ALIGNSERVE_TENSOR_PARALLEL_SIZE"]) == gpus
    assert kustomization(TENSOR_PARALLEL)["images"][0]["newTag"].endswith("-cuda")


def test_multi_node_group_is_one_engine_over_its_nodes():
    lws = leader_worker_set()
    group = lws["spec"]["leaderWorkerTemplate"]
    (leader,) = group["leaderTemplate"]["spec"]["containers"]
    (worker,) = group["workerTemplate"]["spec"]["containers"]
    env = env_of(leader)
    assert env["ALIGNSERVE_DISTRIBUTED_EXECUTOR_BACKEND"] == "ray"
    # vLLM's Ray executor: a pipeline stage per node, tensor parallelism over each node's GPUs.
    assert int(env["ALIGNSERVE_PIPELINE_PARALLEL_SIZE"]) == group["size"]
    for container in (leader, worker):
        assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["ALIGNSERVE_TENSOR_PARALLEL_SIZE"])
    assert "ray start --head --port=6379" in leader["args"][0] and "$LWS_GROUP_SIZE" in leader["args"][0]
    assert leader["args"][0].rstrip().endswith("exec alignserve serve")
    assert "--address=$LWS_LEADER_ADDRESS:6379" in worker["args"][0]
    assert container_port(leader, "http") == 8000


def test_multi_node_leader_pods_take_the_deployments_place():
    lws = leader_worker_set()
    group = lws["spec"]["leaderWorkerTemplate"]
    leader_labels = group["leaderTemplate"]["metadata"]["labels"]
    worker_labels = group["workerTemplate"]["metadata"]["labels"]
    for selector in (find("Service", SERVER)["spec"]["selector"],
                     find("PodDisruptionBudget", SERVER)["spec"]["selector"]["matchLabels"]):
        assert selects(selector, leader_labels) and not selects(selector, worker_labels)
    (deleted,) = load(MULTI_NODE / "delete-deployment-patch.yaml")
    assert deleted["$patch"] == "delete" and (deleted["kind"], deleted["metadata"]["name"]) == ("Deployment", SERVER)
    (hpa,) = load(MULTI_NODE / "hpa-patch.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": lws["apiVersion"], "kind": "LeaderWorkerSet",
                                             "name": lws["metadata"]["name"]}
    assert "replicas" not in lws["spec"]  # the HPA owns the count of groups
    (leader,) = group["leaderTemplate"]["spec"]["containers"]
    assert env_of(leader)["ALIGNSERVE_REDIS_URL"] == env_of(server_container())["ALIGNSERVE_REDIS_URL"]


def test_leader_worker_set_fields_are_those_of_its_crd():
    """Structural check of the LeaderWorkerSet object itself, against the fields and enums of the
    published CRD (leaderworkerset.x-k8s.io/v1); no schema of it is vendored here. Its pod templates
    are validated against the Kubernetes Pod schema below."""
    lws = leader_worker_set()
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and lws["kind"] == "LeaderWorkerSet"
    assert set(lws["spec"]) <= {"replicas", "leaderWorkerTemplate", "rolloutStrategy", "startupPolicy",
                                "networkConfig"}
    assert lws["spec"]["startupPolicy"] in {"LeaderCreated", "LeaderReady"}
    group = lws["spec"]["leaderWorkerTemplate"]
    assert set(group) <= {"leaderTemplate", "workerTemplate", "size", "restartPolicy", "subGroupPolicy"}
    assert isinstance(group["size"], int) and group["size"] >= 1
    assert group["restartPolicy"] in {"RecreateGroupOnPodRestart", "None"}
    for template in ("leaderTemplate", "workerTemplate"):
        assert set(group[template]) == {"metadata", "spec"}


def test_session_affinity_hashes_the_api_key_onto_the_service():
    (ingress,) = load(SESSION_AFFINITY / "ingress.yaml")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_authorization"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = find("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


# ---------------------------------------------------------------- remote scorer overlay


def reward_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in load(REMOTE_SCORER / "reward-model.yaml") if doc["kind"] == kind]


def test_remote_scorer_runs_vllms_pooling_runner_non_root_and_bounded():
    (deployment,) = reward_objects("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["vllm", "serve"]
    args = container["args"]
    assert args[args.index("--runner") + 1] == "pooling"
    assert container["image"] in {i["name"] for i in kustomization(REMOTE_SCORER)["images"]}
    assert selects(deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound])
    port = int(args[args.index("--port") + 1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container_port(container, container[probe]["httpGet"]["port"]) == port


def test_remote_scorer_table_entry_reaches_the_reward_service():
    from guidance.search.remote import read_remote_entry

    (deployment,) = reward_objects("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    (service,) = reward_objects("Service")
    assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    (service_port,) = service["spec"]["ports"]
    assert container_port(container, service_port["targetPort"]) == int(args[args.index("--port") + 1])
    table = json.loads(load(REMOTE_SCORER / "guides-configmap-patch.yaml")[0]["data"]["guides.json"])
    remote = {name: entry for name, entry in table.items() if isinstance(entry, dict)}
    assert list(remote) == ["reward"]
    config, api_key = read_remote_entry("reward", remote["reward"], {})
    assert config.host == f"{service['metadata']['name']}:{service_port['port']}" and api_key is None
    assert config.model == args[args.index("--served-model-name") + 1]
    # The demo guide models stay as the base serves them.
    assert {name: path for name, path in table.items() if isinstance(path, str)} == demo_table_in_configmap()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_remote_scorer_overlay_builds_with_the_table_and_image_it_patches():
    built = subprocess.run(["kubectl", "kustomize", str(REMOTE_SCORER)], capture_output=True, text=True, timeout=60,
                           check=True)
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(built.stdout) if doc}
    table = json.loads(objects[("ConfigMap", "alignserve-guides")]["data"]["guides.json"])
    assert table["reward"]["url"] == "http://alignserve-reward:8000"
    (container,) = objects[("Deployment", "alignserve-reward")]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "vllm/vllm-openai:v0.32.0"
    assert ("Deployment", SERVER) in objects and ("Service", "alignserve-reward") in objects
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import latest_version

    for obj in objects.values():
        if obj["apiVersion"] != "monitoring.coreos.com/v1":  # a CRD
            kubernetes_validate.validate(obj, latest_version(), strict=True)


def test_remote_scorer_is_reachable_from_the_server_only():
    (policy,) = reward_objects("NetworkPolicy")
    (deployment,) = reward_objects("Deployment")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    server_labels = find("Deployment", SERVER)["spec"]["template"]["metadata"]["labels"]
    assert selects(rule["from"][0]["podSelector"]["matchLabels"], server_labels)


# ---------------------------------------------------------------- API schemas (optional tool)


def test_manifests_match_the_kubernetes_api_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import all_versions, latest_version

    versions = [latest_version()] + [v for v in all_versions() if v.startswith("1.27.")][:1]
    # The LeaderWorkerSet's pod templates, as the Pods its controller creates from them.
    group = leader_worker_set()["spec"]["leaderWorkerTemplate"]
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"alignserve-{t}", **group[t]["metadata"]},
             "spec": group[t]["spec"]} for t in ("leaderTemplate", "workerTemplate")]
    objects = base_objects() + load(OVERLAY / "models-pvc.yaml") + load(SESSION_AFFINITY / "ingress.yaml") + pods \
        + load(REMOTE_SCORER / "reward-model.yaml") + load(REMOTE_SCORER / "guides-configmap-patch.yaml")
    validated = set()
    for obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert obj["apiVersion"] == "monitoring.coreos.com/v1"  # a CRD: checked above
            else:
                validated.add(obj["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap", "Ingress",
            "Pod", "NetworkPolicy", "PersistentVolumeClaim"} <= validated
