"""cluster/: autoscaler YAMLs, KubeRay manifests, runtime_env and the cluster run config, for real.

Every check uses what the installed packages ship rather than our reading of the docs: Ray's
cluster-config JSON schema and its `prepare_config` / `validate_config`, Ray's own translation of
a RayCluster CR into the autoscaler config the KubeRay autoscaler runs, Ray's node-label syntax
rules and accelerator names, Ray's runtime_env parser and package walk, the dsv3ray CLI parser
and the run-config resolver. The security checker is itself tested against broken copies.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
VM_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayjob_prepare.yaml"]
PROTECTED_PORTS = {8265: "dashboard", 10001: "Ray client"}
PUBLIC_CIDRS = {"0.0.0.0/0", "::/0"}
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
SHARED_MOUNT = "/mnt/cluster_storage"
NODE_TYPE_LABEL = "dsv3ray/node-type"
# node types each VM autoscaler YAML must offer (AWS and GCP have no AMD Instinct machine type;
# the AMD type is a KubeRay worker group)
VM_NODE_TYPES = {"head", "a100", "h100", "cpu"}
KUBERAY_GROUPS = {"a100", "h100", "mi250", "cpu"}
# worker type -> Ray accelerator type (the name the raylet detects and advertises)
ACCELERATOR = {"a100": "A100", "h100": "H100", "mi250": "AMD-Instinct-MI250X-MI250"}


def check_node_labels(node_type: str, labels: dict) -> None:
    """Labels `ray start` accepts (Kubernetes syntax); our own keys under `dsv3ray/`; Ray's
    reserved `ray.io/` namespace only for Ray's default accelerator label, with the value the
    raylet itself sets on that hardware (so the autoscaler's view and the node agree)."""
    import ray._raylet
    from ray._private.label_utils import validate_node_label_syntax

    validate_node_label_syntax(labels)
    assert labels[NODE_TYPE_LABEL] == node_type
    ray_keys = {k for k in labels if k.startswith("ray.io/")}
    acc_key = ray._raylet.RAY_NODE_ACCELERATOR_TYPE_KEY
    if node_type in ACCELERATOR:
        assert ray_keys == {acc_key} and labels[acc_key] == ACCELERATOR[node_type], (node_type, labels)
    else:
        assert not ray_keys, (node_type, labels)
    assert all(k.startswith("dsv3ray/") for k in set(labels) - ray_keys), labels


def load(rel: str):
    docs = list(yaml.safe_load_all((CLUSTER / rel).read_text()))
    return docs[0] if len(docs) == 1 else docs


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.fullmatch(r"torch\s*==.*", d)]
    return pin.replace(" ", "")


# --- Ray VM autoscaler YAMLs -------------------------------------------------------------------


@pytest.mark.parametrize("name", VM_YAMLS)
def test_vm_yaml_passes_ray_schema_and_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(name)
    jsonschema.validate(cfg, ray_schema())
    # what `ray up` does before touching the cloud: merge the provider defaults, then validate
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


@pytest.mark.parametrize("name", VM_YAMLS)
def test_vm_node_types_carry_resources_and_labels(name):
    from ray.util import accelerators

    cfg = load(name)
    types = cfg["available_node_types"]
    assert set(types) == VM_NODE_TYPES
    assert cfg["idle_timeout_minutes"] > 0
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    known_accelerators = {v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)}
    for key, t in types.items():
        check_node_labels(key, t["labels"])
        if key != "head":
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], key
        acc = [r for r in t["resources"] if r.startswith("accelerator_type:")]
        if key in ACCELERATOR:
            assert t["resources"]["GPU"] == 8, key
            assert acc == [f"accelerator_type:{ACCELERATOR[key]}"], key
            assert ACCELERATOR[key] in known_accelerators
            # the raylet advertises exactly 1 of it on such a node; any other value would make
            # the autoscaler plan with capacity that never appears
            assert t["resources"][acc[0]] == 1, key
        else:
            assert "GPU" not in t["resources"] and not acc, key
    assert types["head"]["resources"] == {"CPU": 0}  # the head coordinates; no work lands on it


def test_raylet_advertises_one_accelerator_type_unit_whatever_is_configured():
    """Why the node types declare `accelerator_type:<T>: 1` and not one per GPU: on a node where
    Ray detects the GPU it overwrites the configured amount with 1. Only GPU detection (the
    hardware) is stood in for; the resolution is Ray's own."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager
    from ray._private.resource_and_label_spec import ResourceAndLabelSpec

    class DetectedA100(NvidiaGPUAcceleratorManager):
        @staticmethod
        def get_current_node_accelerator_type():
            return "A100"

        @staticmethod
        def get_current_process_visible_accelerator_ids():
            return None

    spec = ResourceAndLabelSpec(num_cpus=96, num_gpus=8, resources={"accelerator_type:A100": 8})
    spec._resolve_accelerator_resources(DetectedA100, 8)
    assert spec.num_gpus == 8 and spec.resources["accelerator_type:A100"] == 1


@pytest.mark.parametrize("name", [*VM_YAMLS, "kuberay/raycluster.yaml"])
def test_train_workers_pinned_to_a_gpu_type_fill_its_nodes(name):
    """Ray Train's own per-worker request for `accelerator_type=<T>` (1 GPU + 0.001 of the
    accelerator resource) packs 8 workers onto one node of that type and none onto the others."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.train import ScalingConfig

    doc = load(name)
    types = (
        _derive_autoscaling_config_from_ray_cr(_ray_cr(doc)) if doc.get("kind") == "RayCluster" else doc
    )["available_node_types"]
    for key, acc in ACCELERATOR.items():
        if key not in types:
            continue
        per_worker = ScalingConfig(
            num_workers=8, use_gpu=True, accelerator_type=acc
        )._resources_per_worker_not_none
        for other, t in types.items():
            # how many workers one node of this type holds (Ray schedules by these numbers)
            fits = min(int(t["resources"].get(r, 0) / need + 1e-9) for r, need in per_worker.items())
            assert fits == (8 if other == key else 0), (key, other, per_worker, t["resources"])


def _commands_for(prepared: dict, node_type: str) -> list[str]:
    """The setup commands Ray runs on a node of this type: `prepare_config` merges
    setup_commands into head/worker_setup_commands; a node type's own worker_setup_commands
    replace the merged list (StandardAutoscaler._get_node_type_specific_fields)."""
    if node_type == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    t = prepared["available_node_types"][node_type]
    return t.get("worker_setup_commands", prepared["worker_setup_commands"])


@pytest.mark.parametrize("name", VM_YAMLS)
def test_vm_setup_installs_pinned_torch_then_the_repo(name):
    from ray.autoscaler._private.util import prepare_config

    cfg = load(name)
    pin = torch_pin()
    assert cfg["file_mounts"] == {"~/dsv3ray": "."}
    assert {".venv", "runs", ".git"} <= set(cfg["rsync_exclude"])
    prepared = prepare_config(copy.deepcopy(cfg))
    for node_type in cfg["available_node_types"]:
        cmds = _commands_for(prepared, node_type)
        torch_at = [i for i, c in enumerate(cmds) if pin in c.split()]
        repo_at = [i for i, c in enumerate(cmds) if "pip install" in c and "-e ~/dsv3ray" in c]
        assert torch_at and repo_at and torch_at[0] < repo_at[0], (node_type, cmds)
        cpu_index = "--index-url https://download.pytorch.org/whl/cpu" in cmds[torch_at[0]]
        # GPU types get PyPI's torch (the CUDA build on Linux); the others the small CPU build
        assert cpu_index == (node_type not in ACCELERATOR), (node_type, cmds[torch_at[0]])
    sdk = {"aws": "boto3", "gcp": "google-api-python-client"}[cfg["provider"]["type"]]
    assert any(sdk in c for c in cfg["head_setup_commands"]), "the autoscaler on the head needs " + sdk
    # docker images: Ray's own, at the installed version; GPU types on the GPU image
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"
    for key, t in cfg["available_node_types"].items():
        image = t.get("docker", {}).get("worker_image", cfg["docker"]["image"])
        flavor = "gpu" if key in ACCELERATOR else "cpu"
        assert image == f"rayproject/ray:{ray.__version__}-py311-{flavor}", (key, image)
    # the shared directory the run config writes to is mounted into every container
    assert f"-v {SHARED_MOUNT}:{SHARED_MOUNT}" in cfg["docker"]["run_options"]


@pytest.fixture(scope="module")
def aws_bootstrap():
    """Ray's AWS config steps on aws.yaml against moto's EC2 (the cloud is the boundary; the
    instance-type data moto serves is EC2's own DescribeInstanceTypes). IAM and key pairs are
    skipped: they need nothing from our YAML beyond defaults."""
    pytest.importorskip("moto", reason="moto[ec2] (dev dependency) emulates EC2")
    from moto import mock_aws

    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            mp.setenv(k, "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-west-2")
        mp.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")  # halves moto's start-up; we use no AMI id
        with mock_aws():
            import boto3
            from ray.autoscaler._private.aws import config as aws_config
            from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
            from ray.autoscaler._private.util import prepare_config

            cfg = prepare_config(load("aws.yaml"))
            region = cfg["provider"]["region"]
            ec2 = boto3.client("ec2", region_name=region)
            ours = sorted({t["node_config"]["InstanceType"] for t in cfg["available_node_types"].values()})

            def our_instance_types(region_, credentials=None):
                # Ray lists every instance type of the region (seconds under moto); ask for ours
                # only. An unknown type name raises InvalidInstanceType here.
                return ec2.describe_instance_types(InstanceTypes=ours)["InstanceTypes"]

            mp.setattr("ray.autoscaler._private.aws.node_provider.list_ec2_instances", our_instance_types)
            bare = copy.deepcopy(cfg)
            for t in bare["available_node_types"].values():
                t["resources"] = {}
            # what Ray would advertise from EC2's instance data if we declared nothing
            detected = AWSNodeProvider.fillout_available_node_types_resources(bare)
            booted = aws_config._configure_security_group(aws_config._configure_subnet(copy.deepcopy(cfg)))
            sg_ids = {
                i
                for t in booted["available_node_types"].values()
                for i in t["node_config"]["SecurityGroupIds"]
            }
            groups = ec2.describe_security_groups(GroupIds=sorted(sg_ids))["SecurityGroups"]
            yield cfg, detected, booted, groups


def test_aws_resources_match_ec2_instance_data(aws_bootstrap):
    cfg, detected, _, _ = aws_bootstrap
    for key, t in cfg["available_node_types"].items():
        auto = detected["available_node_types"][key]["resources"]
        # the head declares CPU 0 on purpose (no work on it); everything else must agree with EC2
        ours = {k: v for k, v in t["resources"].items() if not (key == "head" and k == "CPU")}
        assert ours == {k: auto[k] for k in ours}, (key, ours, auto)
        assert {k for k in auto if k in ("GPU",) or k.startswith("accelerator_type:")} <= set(ours), key


def test_aws_security_group_opens_only_ssh_to_the_internet(aws_bootstrap):
    _, _, booted, groups = aws_bootstrap
    assert {g["GroupName"] for g in groups} == {f"ray-autoscaler-{booted['cluster_name']}"}
    subnets = booted["available_node_types"]["a100"]["node_config"]["SubnetIds"]
    assert len(subnets) == len(booted["provider"]["availability_zone"].split(","))  # every zone exists
    for g in groups:
        for rule in g["IpPermissions"]:
            public = {r["CidrIp"] for r in rule["IpRanges"]} | {r["CidrIpv6"] for r in rule["Ipv6Ranges"]}
            if public & PUBLIC_CIDRS:
                assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
            else:  # the only other rule: everything, but only from the cluster's own group
                assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [g["GroupId"]], rule


# Google Cloud machine types used in gcp.yaml: (vCPUs, GPUs, Ray accelerator type), from the
# Compute Engine machine-type documentation (no offline API to ask, unlike EC2 under moto).
GCE_MACHINES = {
    "n2-standard-8": (8, 0, None),
    "n2-standard-32": (32, 0, None),
    "a2-highgpu-8g": (96, 8, "A100"),
    "a3-highgpu-8g": (208, 8, "H100"),
}


def test_gcp_node_configs_match_their_machine_types():
    cfg = load("gcp.yaml")
    for key, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        cpus, gpus, acc = GCE_MACHINES[nc["machineType"]]
        if key != "head":
            assert t["resources"]["CPU"] == cpus, key
        assert t["resources"].get("GPU", 0) == gpus, key
        if acc:
            assert t["resources"][f"accelerator_type:{acc}"] == 1, key
            assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE", key  # GPU VMs cannot migrate
            assert {"key": "install-nvidia-driver", "value": "True"} in nc["metadata"]["items"], key


# --- public exposure of the dashboard / Ray client ----------------------------------------------


def _ports_of(rule: dict) -> set[int]:
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if rule.get("IpProtocol") == "-1" or lo == -1:
        return set(PROTECTED_PORTS)
    return {p for p in PROTECTED_PORTS if lo <= p <= hi}


def _gcp_rule_ports(rule: dict) -> set[int]:
    out = set()
    for allowed in rule.get("allowed", []):
        ports = allowed.get("ports")
        if ports is None:
            return set(PROTECTED_PORTS)
        for spec in ports:
            lo, _, hi = str(spec).partition("-")
            out |= {p for p in PROTECTED_PORTS if int(lo) <= p <= int(hi or lo)}
    return out


def vm_exposures(cfg: dict) -> list[str]:
    """Ways an autoscaler YAML exposes 8265/10001 beyond the cluster; empty = none."""
    problems = []
    for cmd in cfg.get("head_start_ray_commands", []):
        if "ray start" not in cmd or "--head" not in cmd:
            continue
        hosts = re.findall(r"--dashboard-host[= ](\S+)", cmd)
        if not hosts:
            problems.append("head start command leaves --dashboard-host implicit")
        problems += [f"dashboard host {h}" for h in hosts if h.strip("'\"") not in LOCAL_HOSTS]
    # AWS: extra inbound rules Ray adds to its security group
    for rule in cfg.get("provider", {}).get("security_group", {}).get("IpPermissions", []):
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        if cidrs & PUBLIC_CIDRS:
            problems += [f"security group opens {p} to the internet" for p in _ports_of(rule)]
    # GCP: firewall rules, wherever they appear
    for rule in _find_dicts(cfg, lambda d: "sourceRanges" in d):
        if set(rule["sourceRanges"]) & PUBLIC_CIDRS:
            problems += [f"firewall opens {p} to the internet" for p in _gcp_rule_ports(rule)]
    return problems


def _find_dicts(node, pred):
    if isinstance(node, dict):
        if pred(node):
            yield node
        for v in node.values():
            yield from _find_dicts(v, pred)
    elif isinstance(node, list):
        for v in node:
            yield from _find_dicts(v, pred)


def k8s_exposures(doc: dict) -> list[str]:
    """Ways a RayCluster / RayJob / Service exposes 8265/10001 outside the cluster network."""
    problems = []
    kind = doc.get("kind")
    if kind == "Service":
        specs = [doc.get("spec", {})]
    else:
        spec = doc.get("spec", {})
        cluster = spec.get("rayClusterSpec", spec) if kind == "RayJob" else spec
        head = cluster.get("headGroupSpec", {})
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            problems.append(f"head service type {head['serviceType']}")
        if head.get("enableIngress"):
            problems.append("head Ingress enabled")
        specs = [head.get("headService", {}).get("spec", {})]
        for c in _find_dicts(cluster, lambda d: "containerPort" in d):
            if c["containerPort"] in PROTECTED_PORTS and "hostPort" in c:
                problems.append(f"hostPort for {c['containerPort']}")
    for s in specs:
        if s.get("type", "ClusterIP") in ("LoadBalancer", "NodePort"):
            ports = {p.get("port") for p in s.get("ports", [])} | {
                p.get("targetPort") for p in s.get("ports", [])
            }
            if not s.get("ports") or ports & set(PROTECTED_PORTS):
                problems.append(f"{s['type']} Service exposes the dashboard/client")
    return problems


def test_no_dashboard_or_client_port_is_public():
    for name in VM_YAMLS:
        assert vm_exposures(load(name)) == [], name
    for name in [*KUBERAY, "kuberay/storage.yaml"]:
        assert k8s_exposures(load(name)) == [], name


def test_exposure_checker_catches_each_kind_of_leak():
    aws = load("aws.yaml")
    leak = copy.deepcopy(aws)
    leak["head_start_ray_commands"][-1] = leak["head_start_ray_commands"][-1].replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"
    )
    assert vm_exposures(leak) == ["dashboard host 0.0.0.0"]
    leak = copy.deepcopy(aws)
    leak["head_start_ray_commands"][-1] = leak["head_start_ray_commands"][-1].replace(
        "--dashboard-host=127.0.0.1", ""
    )
    assert vm_exposures(leak)  # Ray's own default YAMLs pass 0.0.0.0: being implicit is a leak
    leak = copy.deepcopy(aws)
    leak["provider"]["security_group"] = {
        "IpPermissions": [
            {"FromPort": 8000, "ToPort": 9000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        ]
    }
    assert vm_exposures(leak) == ["security group opens 8265 to the internet"]
    gcp = copy.deepcopy(load("gcp.yaml"))
    gcp["provider"]["firewall"] = {
        "sourceRanges": ["0.0.0.0/0"],
        "allowed": [{"IPProtocol": "tcp", "ports": ["10001"]}],
    }
    assert vm_exposures(gcp) == ["firewall opens 10001 to the internet"]

    rc = load("kuberay/raycluster.yaml")
    for mutate, expected in [
        (lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"), "head service type"),
        (lambda d: d["spec"]["headGroupSpec"].update(enableIngress=True), "Ingress"),
        (
            lambda d: d["spec"]["headGroupSpec"].update(headService={"spec": {"type": "NodePort"}}),
            "NodePort Service",
        ),
        (
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][1].update(
                hostPort=8265
            ),
            "hostPort for 8265",
        ),
    ]:
        leak = copy.deepcopy(rc)
        mutate(leak)
        assert any(expected in p for p in k8s_exposures(leak)), expected
    svc = {"kind": "Service", "spec": {"type": "LoadBalancer", "ports": [{"port": 10001}]}}
    assert k8s_exposures(svc) == ["LoadBalancer Service exposes the dashboard/client"]


# --- KubeRay manifests ---------------------------------------------------------------------------

# Paths KubeRay requires (or that we rely on), checked data-driven; `[*]` = every list element.
RAYCLUSTER_SPEC_PATHS = [
    "rayVersion",
    "enableInTreeAutoscaling",
    "headGroupSpec.rayStartParams",
    "headGroupSpec.template.spec.containers[*].name",
    "headGroupSpec.template.spec.containers[*].image",
    "workerGroupSpecs[*].groupName",
    "workerGroupSpecs[*].replicas",
    "workerGroupSpecs[*].minReplicas",
    "workerGroupSpecs[*].maxReplicas",
    "workerGroupSpecs[*].rayStartParams",
    "workerGroupSpecs[*].template.spec.containers[*].name",
    "workerGroupSpecs[*].template.spec.containers[*].image",
]
COMMON_PATHS = ["apiVersion", "kind", "metadata.name", "spec"]
RAYJOB_PATHS = ["spec.entrypoint", "spec.submissionMode"]
RAYJOB_OWN_CLUSTER_PATHS = ["spec.shutdownAfterJobFinishes", "spec.ttlSecondsAfterFinished"]


def values_at(doc, path: str) -> list:
    """Values at a dotted path (`[*]` fans out over a list); KeyError names what is missing."""
    nodes = [doc]
    for part in path.split("."):
        fan = part.endswith("[*]")
        key = part[:-3] if fan else part
        nxt = []
        for n in nodes:
            if not isinstance(n, dict) or key not in n:
                raise KeyError(f"{path}: missing {key!r}")
            v = n[key]
            if fan:
                if not isinstance(v, list) or not v:
                    raise KeyError(f"{path}: {key!r} must be a non-empty list")
                nxt.extend(v)
            else:
                nxt.append(v)
        nodes = nxt
    return nodes


def check_paths(doc, paths: list[str], prefix: str = "") -> list[str]:
    missing = []
    for p in paths:
        try:
            values_at(doc, prefix + p)
        except KeyError as e:
            missing.append(e.args[0])
    return missing


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def test_path_checker_reports_missing_fields():
    rc = copy.deepcopy(load("kuberay/raycluster.yaml"))
    del rc["spec"]["workerGroupSpecs"][1]["maxReplicas"]
    del rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert check_paths(rc, RAYCLUSTER_SPEC_PATHS, "spec.") == [
        "spec.headGroupSpec.template.spec.containers[*].image: missing 'image'",
        "spec.workerGroupSpecs[*].maxReplicas: missing 'maxReplicas'",
    ]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_has_required_fields(name):
    doc = load(name)
    assert check_paths(doc, COMMON_PATHS) == []
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == ("RayCluster" if "raycluster" in name else "RayJob")
    if doc["kind"] == "RayJob":
        assert check_paths(doc, RAYJOB_PATHS) == []
        own, selector = "rayClusterSpec" in doc["spec"], "clusterSelector" in doc["spec"]
        assert own != selector, "a RayJob needs exactly one of rayClusterSpec / clusterSelector"
        if selector:
            # runs on the long-lived RayCluster of raycluster.yaml (KubeRay labels it ray.io/cluster)
            assert doc["spec"]["clusterSelector"] == {
                "ray.io/cluster": load("kuberay/raycluster.yaml")["metadata"]["name"]
            }
            assert "shutdownAfterJobFinishes" not in doc["spec"]  # it would tear that cluster down
            return
        assert check_paths(doc, RAYJOB_OWN_CLUSTER_PATHS) == []
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"]["backoffLimit"] == 0  # retries belong to Ray Train, not to KubeRay
    spec = cluster_spec(doc)
    prefix = "spec.rayClusterSpec." if doc["kind"] == "RayJob" else "spec."
    assert check_paths(doc, RAYCLUSTER_SPEC_PATHS, prefix) == []
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"  # v2 scales groups for label selectors
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


def _ray_cr(doc: dict) -> dict:
    """A RayCluster CR as the API server would hold it (namespace filled in)."""
    return {"metadata": {"name": doc["metadata"]["name"], "namespace": "dsv3ray"}, "spec": cluster_spec(doc)}


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_cluster_translates_to_a_valid_autoscaler_config(name):
    """Ray's KubeRay autoscaler derives node types from the CR and validates them: run that."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    doc = load(name)
    derived = _derive_autoscaling_config_from_ray_cr(_ray_cr(doc))  # calls validate_config
    types = derived["available_node_types"]
    groups = {g["groupName"] for g in cluster_spec(doc)["workerGroupSpecs"]}
    if name.endswith("raycluster.yaml"):
        assert groups == KUBERAY_GROUPS
    assert types["headgroup"]["resources"]["CPU"] == 0
    for group in groups:
        t = types[group]
        check_node_labels(group, t["labels"])
        if group in ACCELERATOR:
            assert t["resources"]["GPU"] == 8, group
            assert t["resources"][f"accelerator_type:{ACCELERATOR[group]}"] == 1, group
        else:
            assert "GPU" not in t["resources"] and not any(
                r.startswith("accelerator_type:") for r in t["resources"]
            )
    # GPU pods tolerate their vendor's taint and ask for that vendor's device
    for g in cluster_spec(doc)["workerGroupSpecs"]:
        if g["groupName"] not in ACCELERATOR:
            continue
        vendor = "amd.com/gpu" if g["groupName"].startswith("mi") else "nvidia.com/gpu"
        pod = g["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"][vendor] == "8"
        assert any(t["key"] == vendor for t in pod["tolerations"])
        assert pod["nodeSelector"] == {"dsv3ray/node-pool": g["groupName"]}


def k8s_unknown_fields(type_name: str, data, path: str = "") -> list[str]:
    """Fields of `data` that the Kubernetes API model `type_name` (e.g. "V1PodTemplateSpec")
    does not have, recursively, using the official client's generated models; empty = none.
    The API server would drop or reject such fields; a typo would silently lose a setting."""
    import kubernetes.client as k8s

    # the generated models spell containers both ways: List[X] / list[X], Dict[str, X] / dict(str, X)
    if m := re.fullmatch(r"[Ll]ist\[(.+)\]", type_name):
        if not isinstance(data, list):
            return [f"{path}: expected a list"]
        return [e for i, x in enumerate(data) for e in k8s_unknown_fields(m.group(1), x, f"{path}[{i}]")]
    if m := re.fullmatch(r"[Dd]ict[\[(]str, (.+)[\])]", type_name):
        if not isinstance(data, dict):
            return [f"{path}: expected a mapping"]
        return [e for key, x in data.items() for e in k8s_unknown_fields(m.group(1), x, f"{path}.{key}")]
    cls = getattr(k8s, type_name, None)
    if cls is None:  # a scalar; quantities are str in the models but ints are accepted too
        ok = {"int": (int,), "bool": (bool,), "str": (str, int, float)}.get(type_name, (object,))
        return [] if isinstance(data, ok) else [f"{path}: {data!r} is not {type_name}"]
    if not isinstance(data, dict):
        return [f"{path}: expected an object ({type_name})"]
    attrs = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    out = []
    for key, x in data.items():
        if key not in attrs:
            out.append(f"{path}.{key}: not a field of {type_name}")
        else:
            out += k8s_unknown_fields(cls.openapi_types[attrs[key]], x, f"{path}.{key}")
    return out


def _k8s_objects() -> list[tuple[str, str, object]]:
    """(where, Kubernetes model, data) for every plain Kubernetes object inside our manifests."""
    out = [("kuberay/storage.yaml", "V1PersistentVolumeClaim", load("kuberay/storage.yaml"))]
    for name in ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]:
        spec = cluster_spec(load(name))
        out.append(
            (f"{name} autoscalerOptions", "V1ResourceRequirements", spec["autoscalerOptions"]["resources"])
        )
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            out.append((f"{name} {g.get('groupName', 'head')}", "V1PodTemplateSpec", g["template"]))
    return out


def test_pod_templates_use_only_kubernetes_api_fields():
    pytest.importorskip("kubernetes", reason="the kubernetes client (dev dependency) has the API models")
    for where, model, data in _k8s_objects():
        assert k8s_unknown_fields(model, data) == [], where
    # the checker catches a typo and a wrong type
    tpl = copy.deepcopy(cluster_spec(load("kuberay/raycluster.yaml"))["workerGroupSpecs"][0]["template"])
    tpl["spec"]["toleration"] = tpl["spec"].pop("tolerations")
    tpl["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = "yes"
    assert k8s_unknown_fields("V1PodTemplateSpec", tpl) == [
        ".spec.containers[0].volumeMounts[0].readOnly: 'yes' is not bool",
        ".spec.toleration: not a field of V1PodSpec",
    ]


def test_rayjob_cluster_is_a_cut_of_the_raycluster():
    """The RayJob's own cluster must not drift from raycluster.yaml: same head, same groups."""
    rc, job = cluster_spec(load("kuberay/raycluster.yaml")), cluster_spec(load("kuberay/rayjob.yaml"))
    sizes = ("replicas", "minReplicas", "maxReplicas")
    assert {k: v for k, v in job.items() if k != "workerGroupSpecs"} == {
        k: v for k, v in rc.items() if k != "workerGroupSpecs"
    }
    by_name = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    for g in job["workerGroupSpecs"]:
        ref = by_name[g["groupName"]]
        assert {k: v for k, v in g.items() if k not in sizes} == {
            k: v for k, v in ref.items() if k not in sizes
        }


def test_every_pod_mounts_the_shared_volume():
    storage = load("kuberay/storage.yaml")
    assert storage["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in storage["spec"]["accessModes"]
    for name in ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]:
        spec = cluster_spec(load(name))
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = g["template"]["spec"]
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod["volumes"]
                if "persistentVolumeClaim" in v
            }
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert claims[mounts[SHARED_MOUNT]] == storage["metadata"]["name"], (name, g.get("groupName"))


def test_versions_match_the_installed_ray():
    v = ray.__version__
    for name in ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]:
        spec = cluster_spec(load(name))
        assert spec["rayVersion"] == v
        for image in values_at(spec, "headGroupSpec.template.spec.containers[*].image") + values_at(
            spec, "workerGroupSpecs[*].template.spec.containers[*].image"
        ):
            assert f"-ray{v}-" in image, image
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    bases = re.findall(r"rayproject/ray:(\S+?)-py", dockerfile)
    assert bases and set(bases) == {v}
    assert torch_pin() in dockerfile.split()


# --- runtime_env ----------------------------------------------------------------------------------


def _runtime_envs() -> dict[str, dict]:
    envs = {"runtime_env.yaml": load("runtime_env.yaml")}
    for name in KUBERAY[1:]:
        envs[name] = yaml.safe_load(load(name)["spec"]["runtimeEnvYAML"])
    return envs


def test_runtime_envs_parse_as_ray_runtime_envs(tmp_path):
    from ray.runtime_env import RuntimeEnv

    workdir = re.search(r"^WORKDIR (\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M).group(1)
    for name, env in _runtime_envs().items():
        if name.startswith("kuberay/"):
            # the RayJob submitter pod runs the image: working_dir is the repo copy inside it
            assert env["working_dir"] == workdir, name
            env = {**env, "working_dir": str(tmp_path)}  # Ray checks that a local dir exists
        else:
            env = {**env, "working_dir": str(ROOT / env["working_dir"])}
        parsed = RuntimeEnv(**env)  # Ray's own validation of every field
        assert parsed.working_dir() == env["working_dir"], name
        assert all(isinstance(v, str) for v in env["env_vars"].values()), name


def test_runtime_env_upload_stays_small_and_leaves_local_state_out():
    """Walk the repo the way Ray packs working_dir, with only our excludes (no .gitignore)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, _dir_travel, _get_excludes

    env = load("runtime_env.yaml")
    assert env["working_dir"] == "."  # relative to where `ray job submit` runs: the repo root
    forbidden = {".venv", "runs", ".git", "__pycache__"}
    files, total = [], 0

    def handler(p: Path):
        nonlocal total
        rel = p.relative_to(ROOT)
        assert not (set(rel.parts) & forbidden), f"{rel} would be uploaded"
        if p.is_file():
            files.append(rel)
            total += p.stat().st_size

    _dir_travel(ROOT, [_get_excludes(ROOT, env["excludes"])], handler, include_gitignore=False)
    assert Path("cluster/train_cluster.toml") in files and Path("dsv3ray/cli.py") in files
    assert total < GCS_STORAGE_MAX_SIZE // 4, f"{total / 2**20:.1f} MiB to upload"


@pytest.mark.slow
def test_runtime_env_ships_the_checkout_to_a_ray_worker(ray_local, tmp_path):
    """What `ray job submit --runtime-env cluster/runtime_env.yaml` does, on the local Ray: Ray
    packs the working_dir with our excludes, uploads it to the GCS, a worker unpacks it and runs
    with it as cwd, where the relative config path resolves (`dsv3ray config`)."""
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    env = load("runtime_env.yaml")
    # the zip goes to tmp_path: never into the directory being packed
    env = upload_working_dir_if_needed(
        {**env, "working_dir": str(ROOT)}, include_gitignore=True, scratch_dir=str(tmp_path)
    )
    assert env["working_dir"].startswith("gcs://")

    # defined here so Ray pickles it by value (the tests are not importable on a worker)
    def _config_on_a_worker(argv: list[str]) -> dict:
        """Runs `dsv3ray <argv>` inside a Ray worker; returns what the worker saw."""
        import contextlib
        import io
        import os

        from dsv3ray.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(argv)
        text = out.getvalue()
        return {
            "rc": rc,
            # DeepSpeed's import may print a warning line to stdout before the JSON
            "config": json.loads(text[text.index("{\n") :]),
            "cwd": os.getcwd(),
            "listing": sorted(os.listdir(".")),
            "env": {
                k: os.environ.get(k) for k in ("RAY_TRAIN_V2_ENABLED", "TOKENIZERS_PARALLELISM", "NCCL_DEBUG")
            },
        }

    task = ray_local.remote(runtime_env=env, num_cpus=0)(_config_on_a_worker)
    seen = ray_local.get(
        task.remote(["config", "--config", "cluster/train_cluster.toml", "--json"]), timeout=120
    )
    assert seen["rc"] == 0 and seen["config"]["train"]["num_workers"] == 16
    assert Path(seen["cwd"]) != ROOT and "cluster" in seen["listing"]
    assert not {".venv", "runs", ".git"} & set(seen["listing"])
    assert seen["env"] == {k: str(v) for k, v in env["env_vars"].items()}


# --- dsv3ray command lines and the cluster run config ----------------------------------------------

SHELL_OPS = {"&&", "||", ";", "|"}


def shell_snippets(path: Path) -> str:
    """The shell examples of a file: fenced code blocks of a .md, else indented comment lines
    (`#   ray job submit ...`); prose such as `# dsv3ray on AWS` is neither."""
    text = path.read_text()
    if path.suffix == ".md":
        return "\n".join(re.findall(r"^```(?:bash|sh)?\n(.*?)^```", text, re.M | re.S))
    return "\n".join(m for m in re.findall(r"^\s*#(?: {2,}|\t)(.*)$", text, re.M))


def shell_tokens(line: str) -> list[str]:
    """Split like a shell: quotes, `# comments`, and `;` `&&` `|` as tokens of their own."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def program_commands(text: str, program: str) -> list[list[str]]:
    """Every `<program> ...` command line in a shell snippet (continuations joined), as argv: the
    program is the first word, or follows `--` (ray job submit), a shell operator or `VAR=value`."""
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if program not in line:
            continue
        try:
            tokens = shell_tokens(line.strip())
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            prev = tokens[i - 1] if i else ""
            at_start = i == 0 or prev == "--" or prev in SHELL_OPS or re.fullmatch(r"[A-Z_]+=\S*", prev)
            if Path(tok).name == program and at_start:
                argv = []
                for t in tokens[i:]:
                    if t in SHELL_OPS:
                        break
                    argv.append(t)
                out.append(argv)
    return out


def dsv3ray_commands(text: str) -> list[list[str]]:
    return program_commands(text, "dsv3ray")


def _all_command_lines(program: str = "dsv3ray") -> dict[str, list[list[str]]]:
    found: dict[str, list[list[str]]] = {}
    for name in VM_YAMLS:
        cfg = load(name)
        cmds = [c for k, v in cfg.items() if k.endswith("_commands") for c in v]
        cmds += [c for t in cfg["available_node_types"].values() for c in t.get("worker_setup_commands", [])]
        found[name] = [a for c in cmds for a in program_commands(c, program)]
    for name in KUBERAY[1:]:
        found[name] = program_commands(load(name)["spec"]["entrypoint"], program)
    for name in ["README.md", "train_cluster.toml", "runtime_env.yaml", "aws.yaml", "gcp.yaml", *KUBERAY]:
        found[f"{name} (examples)"] = program_commands(shell_snippets(CLUSTER / name), program)
    return found


def test_command_extraction():
    assert dsv3ray_commands("ray job submit --runtime-env x.yaml -- \\\n  dsv3ray train --config a.toml") == [
        ["dsv3ray", "train", "--config", "a.toml"]
    ]
    assert dsv3ray_commands("cd /x && dsv3ray config --config 'a b.toml' | head") == [
        ["dsv3ray", "config", "--config", "a b.toml"]
    ]
    assert dsv3ray_commands("pip install -e ~/dsv3ray") == []
    assert dsv3ray_commands(".venv/bin/dsv3ray demo   # local") == [[".venv/bin/dsv3ray", "demo"]]
    assert program_commands("ulimit -n 65536; ray start --head", "ray") == [["ray", "start", "--head"]]
    assert program_commands("RAY_ADDRESS=http://h:8265 ray job list", "ray") == [["ray", "job", "list"]]
    snippets = shell_snippets(CLUSTER / "aws.yaml")
    assert "ray dashboard cluster/aws.yaml" in snippets and "dsv3ray on AWS" not in snippets
    readme = shell_snippets(CLUSTER / "README.md")
    assert "ray up cluster/aws.yaml" in readme and "| file |" not in readme


def test_every_dsv3ray_command_line_parses_with_the_cli():
    from dsv3ray.cli import build_parser
    from dsv3ray.runconfig import resolve_run_config

    found = _all_command_lines()
    subcommands = {argv[1] for cmds in found.values() for argv in cmds if len(argv) > 1}
    assert {"train", "prepare", "config"} <= subcommands, subcommands
    assert found["kuberay/rayjob.yaml"] and found["kuberay/rayjob_prepare.yaml"]
    for where, cmds in found.items():
        for argv in cmds:
            try:
                args = build_parser().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with dsv3ray's CLI")
            if getattr(args, "config", None):
                assert (ROOT / args.config).is_file(), f"{where}: {args.config} does not exist"
                # the config with the line's own --preset / --set resolves (what the command does first)
                resolve_run_config(args.preset, str(ROOT / args.config), args.overrides)


def parse_ray_cli(argv: list[str]):
    """Parse a `ray ...` command line with Ray's own click CLI, down to the leaf command,
    without running it; click.UsageError for an unknown command or option."""
    import warnings

    import click
    from ray.scripts.scripts import cli

    cmd, name, args, ctx = cli, "ray", argv[1:], None
    while True:
        ctx = cmd.make_context(name, list(args), parent=ctx)
        if not isinstance(cmd, click.Group):
            return ctx
        with warnings.catch_warnings():  # click 8.2 deprecates protected_args (merged into args in 9)
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*getattr(ctx, "protected_args", []), *ctx.args]
        name, cmd, args = cmd.resolve_command(ctx, rest)


def test_every_ray_command_line_parses_with_rays_cli():
    import click

    found = _all_command_lines("ray")
    leaves = set()
    for where, cmds in found.items():
        for argv in cmds:
            try:
                ctx = parse_ray_cli(argv)
            except click.ClickException as e:
                pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with Ray's CLI: {e}")
            leaves.add(ctx.command_path)
            for key in ("cluster_config_file", "runtime_env"):
                if ctx.params.get(key):
                    assert (ROOT / ctx.params[key]).is_file(), f"{where}: {ctx.params[key]} does not exist"
    assert {"ray start", "ray up", "ray dashboard", "ray job submit"} <= leaves, leaves
    with pytest.raises(click.UsageError):  # the parser does reject what Ray does not know
        parse_ray_cli(["ray", "job", "submit", "--runtime-env-yaml", "x", "--", "true"])


def test_cluster_run_config_resolves_and_fits_the_cluster():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from dsv3ray.runconfig import resolve_run_config

    run = resolve_run_config(config=str(CLUSTER / "train_cluster.toml"))
    assert run.train.use_gpu and run.train.num_workers % run.train.ep_size == 0
    for path in (run.train.run_dir, run.data.prepared):
        assert path.startswith(SHARED_MOUNT + "/"), f"{path}: multi-node runs need the shared volume"
    # the RayJob's own cluster brings up enough GPUs for every Train worker (1 GPU each)
    job = load("kuberay/rayjob.yaml")
    types = _derive_autoscaling_config_from_ray_cr(_ray_cr(job))["available_node_types"]
    gpus = sum(t["resources"].get("GPU", 0) * t["min_workers"] for t in types.values())
    assert gpus >= run.train.num_workers, (gpus, run.train.num_workers)
    # the cost model is told the device the RayJob's GPU group actually has
    assert ACCELERATOR["a100"] in run.cost.device
