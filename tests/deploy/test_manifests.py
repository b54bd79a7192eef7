"""deploy/: the manifests parse, and every `moelink serve` in them is a command the real parser accepts.

Where serve commands are looked for: the YAML manifests (their parsed string
values, i.e. what Kubernetes or the Ray launcher really runs, and their comment
lines), the Slurm script, deploy/ray/serve.sh (whose usage lines stand for
`moelink serve ...`) and the shell blocks of deploy/README.md. `moelink.sbatch
ARGS` counts too: the script passes ARGS on to `moelink serve`.

Shell variables become values before parsing: `${VAR:-default}` its default, a
variable set in the Kubernetes container's env its value, anything else a
dummy of the type the flag wants (`$PORT` after `--port` becomes an int), so a
literal value is always checked as written. Usage placeholders (MODEL,
HEAD_IP:PORT, N), `[optional --flags]` and `...` are read the same way.
The parser is `moelink.engine.api.cli.build_parser()`, so the test follows the code.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from tests.helpers.deploy_commands import (  # noqa: E402
    CLUSTER_YAML, DEPLOY, K8S, Placeholder, README,
    SBATCH, SCRIPTS, SERVE_SH, YAML_FILES, _container_env,
    commands_in, commands_in_text, concrete_args, parse_serve,
)


# --------------------------------------------------------------------------- the parser
@pytest.fixture(scope="module")
def serve_parser() -> argparse.ArgumentParser:
    from moelink.engine.api.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["serve"]
    raise AssertionError("build_parser() has no `serve` subcommand")


# Each file, and how many serve commands it must at least hold.
EXPECTED = {K8S: 1, CLUSTER_YAML: 1, SBATCH: 3, SERVE_SH: 2, README: 2}


# --------------------------------------------------------------------------- the tests
def test_every_yaml_under_deploy_parses():
    assert K8S in YAML_FILES and CLUSTER_YAML in YAML_FILES, YAML_FILES
    for path in YAML_FILES:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path}: no YAML documents"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document should be a mapping"


def test_extraction_reads_shell_like_a_shell(serve_parser):
    """The extractor itself, on the forms the manifests use."""
    text = ('x=1\n"$MOELINK" serve "$MODEL" \\\n  --port "${SERVE_PORT:-50051}" --expert-parallel-size "$EP" \\\n'
            '  "$@" &\n#   deploy/ray/serve.sh MODEL --ray-address HEAD_IP:PORT [--host 0.0.0.0 ...]\n'
            "ray exec c.yaml 'moelink serve /m --all-to-all nccl' --tmux\n"
            'echo "usage: serve.sh MODEL -ep N [moelink serve flags]" >&2\nexec "$MOELINK" serve "$@"\n'
            "python -m moelink.engine.server.client --target x\n")
    cmds = commands_in_text(text, "t")
    args = [concrete_args(serve_parser, c.tokens) for c in cmds]
    assert args == [
        ["/placeholder/model", "--port", "50051", "--expert-parallel-size", "1"],
        ["/placeholder/model", "--ray-address", "placeholder", "--host", "0.0.0.0"],
        ["/m", "--all-to-all", "nccl"],
        ["/placeholder/model", "-ep", "1"],
    ], args
    bad = commands_in_text("moelink serve m --all-to-all nvl", "t")[0]
    with pytest.raises(AssertionError, match="--all-to-all"):
        parse_serve(serve_parser, concrete_args(serve_parser, bad.tokens))


@pytest.mark.parametrize("path", list(EXPECTED), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_serve_commands_are_accepted_by_the_parser(path, serve_parser):
    cmds = commands_in(path)
    assert len(cmds) >= EXPECTED[path], f"{path}: expected at least {EXPECTED[path]} `moelink serve` commands, " \
                                        f"found {[c.source for c in cmds]}"
    for cmd in cmds:
        args = concrete_args(serve_parser, cmd.tokens)
        try:
            parse_serve(serve_parser, args)
        except AssertionError as exc:
            raise AssertionError(f"{cmd.source}\n{exc}") from None


@pytest.mark.parametrize("path", [K8S, CLUSTER_YAML, SBATCH], ids=lambda p: p.name)
def test_cluster_serve_commands_join_the_cluster_and_listen_beyond_loopback(path, serve_parser):
    cmds = [c for c in commands_in(path) if c.launcher == "moelink"]
    assert cmds, f"{path}: no `moelink serve` invocation"
    for cmd in cmds:
        ns = parse_serve(serve_parser, concrete_args(serve_parser, cmd.tokens))
        text = " ".join(t.text if isinstance(t, Placeholder) else t for t in cmd.tokens)
        assert "--ray-address" in text, f"{cmd.source}: should join the running cluster (--ray-address)"
        assert "--expert-parallel-size" in text, f"{cmd.source}: should set --expert-parallel-size"
        assert ns.host == "0.0.0.0", f"{cmd.source}: clients come from other machines (--host 0.0.0.0)"
        assert ns.metrics_port is not None and ns.metrics_host == "0.0.0.0", \
            f"{cmd.source}: Prometheus scrapes from elsewhere (--metrics-port ... --metrics-host 0.0.0.0)"


# --------------------------------------------------------------------------- Kubernetes
def _k8s_docs():
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    raycluster = next(d for d in docs if d["kind"] == "RayCluster")
    services = [d for d in docs if d["kind"] == "Service"]
    return raycluster, services


def _ray_containers(raycluster):
    spec = raycluster["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    groups = [("head", head, 1)]
    for g in spec.get("workerGroupSpecs") or []:
        groups.append((g["groupName"], g["template"]["spec"], g.get("replicas", 0)))
    # KubeRay's Ray container is the first one (unless marked otherwise).
    return [(name, pod, pod["containers"][0], replicas) for name, pod, replicas in groups]


def _head_serve(serve_parser, raycluster) -> tuple[dict, argparse.Namespace]:
    """The head's Ray container and its `moelink serve` arguments (its env filled in)."""
    _, _, head, _ = _ray_containers(raycluster)[0]
    script = "\n".join(head.get("command", []) + head.get("args", []))
    cmds = commands_in_text(script, "head", _container_env(head))
    assert len(cmds) == 1, f"the head container should run exactly one `moelink serve`, found {len(cmds)}"
    return head, parse_serve(serve_parser, concrete_args(serve_parser, cmds[0].tokens))


def test_k8s_probes_point_at_the_served_port_and_health_services(serve_parser):
    from moelink.engine.server.native import SERVICE_NAME

    raycluster, _ = _k8s_docs()
    head, ns = _head_serve(serve_parser, raycluster)

    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert kind in head, f"head container has no {kind}"
        grpc_probe = head[kind].get("grpc")
        assert grpc_probe, f"{kind} should be a native gRPC probe"
        assert grpc_probe["port"] == ns.port, f"{kind} probes port {grpc_probe['port']}, the server binds {ns.port}"
    assert head["startupProbe"]["grpc"].get("service", "") == ""
    assert head["livenessProbe"]["grpc"].get("service", "") == "", "liveness is the server-wide health ('')"
    assert head["readinessProbe"]["grpc"]["service"] == SERVICE_NAME, "readiness is the native service's health"
    # The startup probe must outlast Ray start, the workers joining and weight loading.
    startup = head["startupProbe"]
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 600

    ports = {p["containerPort"]: p.get("name") for p in head["ports"]}
    assert ns.port in ports and ns.metrics_port in ports, ports
    assert 6379 in ports, "listing head ports replaces KubeRay's defaults: keep the GCS port for the workers"
    names = [p.get("name") for p in head["ports"]]
    assert len(names) == len(set(names)) and all(n and len(n) <= 15 for n in names), names
    assert ports[ns.metrics_port] != "metrics", "KubeRay uses the port name 'metrics' for Ray's own exporter"


def test_k8s_service_exposes_grpc_and_metrics_of_the_head(serve_parser):
    raycluster, services = _k8s_docs()
    head, ns = _head_serve(serve_parser, raycluster)
    by_name = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert services, "no Service in front of the server"
    svc = services[0]
    assert svc["spec"]["selector"] == {"ray.io/cluster": raycluster["metadata"]["name"], "ray.io/node-type": "head"}
    targets = {}
    for p in svc["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        targets[p["port"]] = by_name.get(target, target)
    assert targets.get(ns.port) == ns.port, f"Service ports {targets}: none reaches gRPC {ns.port}"
    assert targets.get(ns.metrics_port) == ns.metrics_port, f"Service ports {targets}: none reaches metrics"


def test_k8s_groups_have_gpus_token_auth_shm_and_the_model(serve_parser):
    raycluster, _ = _k8s_docs()
    assert raycluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    containers = _ray_containers(raycluster)
    secrets = set()
    total_gpus = 0
    for name, pod, c, replicas in containers:
        script = " ".join(c.get("command", []) + c.get("args", []))
        assert "$KUBERAY_GEN_RAY_START_CMD" in script, f"{name}: should run the ray start KubeRay generated"
        env = {e["name"]: e for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}: RAY_AUTH_MODE=token missing"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref, f"{name}: RAY_AUTH_TOKEN should come from a Secret"
        secrets.add((ref["name"], ref["key"]))
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert gpus > 0, f"{name}: no GPUs"
        total_gpus += gpus * replicas
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert "/dev/shm" in mounts and volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
        assert "/models" in mounts and "persistentVolumeClaim" in volumes[mounts["/models"]], name
    assert len(secrets) == 1, f"every pod must use the same Ray token, got {secrets}"

    _, ns = _head_serve(serve_parser, raycluster)
    assert ns.model.startswith("/models/"), "the model should live on the mounted volume"
    assert ns.expert_parallel_size == total_gpus, \
        f"--expert-parallel-size {ns.expert_parallel_size} but the pods hold {total_gpus} GPUs"
    assert ns.device == "cuda" and ns.ray_address == "auto"


def test_k8s_head_script_is_valid_bash():
    raycluster, _ = _k8s_docs()
    for name, _, c, _ in _ray_containers(raycluster):
        for script in c.get("args", []):
            proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=10)
            assert proc.returncode == 0, f"{name}: bash -n: {proc.stderr}"


# --------------------------------------------------------------------------- Ray cluster launcher
def test_ray_cluster_yaml_matches_the_launcher_schema():
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        jsonschema.validate(cfg, json.load(f))
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for node_type in cfg["available_node_types"].values():
        assert node_type["resources"].get("GPU", 0) > 0, "every node type should be a GPU node"
    setup = "\n".join(cfg["setup_commands"])
    assert "RAY_AUTH_MODE=token" in setup and "RAY_AUTH_TOKEN" in setup
    assert any("auth_token" in local for local in cfg["file_mounts"].values()), "the token must reach every node"
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for c in cfg.get(key) or []:
            proc = subprocess.run(["bash", "-n"], input=c, capture_output=True, text=True, timeout=10)
            assert proc.returncode == 0, f"{key}: {c!r}: {proc.stderr}"


# --------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_scripts_are_strict_valid_bash(path):
    text = path.read_text()
    assert text.startswith(("#!/usr/bin/env bash\n", "#!/bin/bash\n")), f"{path}: bash shebang"
    assert re.search(r"^set -euo pipefail$", text, flags=re.M), f"{path}: no `set -euo pipefail`"
    assert os.access(path, os.X_OK), f"{path}: not executable"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, f"{path}: bash -n: {proc.stderr}"


def test_sbatch_directives_come_before_the_first_command():
    """sbatch stops reading #SBATCH lines at the first line that is not a comment."""
    lines = SBATCH.read_text().splitlines()
    first_code = next(i for i, l in enumerate(lines) if l.strip() and not l.lstrip().startswith("#"))
    directives = [i for i, l in enumerate(lines) if l.startswith("#SBATCH")]
    assert directives and max(directives) < first_code, "an #SBATCH line after the first command is ignored"
    for key in ("--nodes", "--gpus-per-node", "--ntasks-per-node"):
        assert any(lines[i].split()[1].startswith(key) for i in directives), f"no #SBATCH {key}"
    text = SBATCH.read_text()
    assert re.search(r"^trap cleanup EXIT$", text, flags=re.M), "the script must clean up on exit"
    assert "JOIN_TIMEOUT_S" in text, "waiting for the nodes to join must be bounded"


def test_sbatch_refuses_to_run_without_model_or_slurm(tmp_path):
    """Outside Slurm the script stops before it starts anything, saying what is missing."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=10, cwd=tmp_path)
    assert proc.returncode != 0 and "MODEL" in proc.stderr, proc.stderr
    proc = subprocess.run(["bash", str(SBATCH)], env={**env, "MODEL": "/m"}, capture_output=True, text=True,
                          timeout=10, cwd=tmp_path)
    assert proc.returncode != 0 and "sbatch" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir()), "nothing should be created before the checks pass"
