"""The Kubernetes manifests in deploy/k8s: valid against the Kubernetes schemas, and every container runs
a dosebench command line that dosebench's own CLI parser accepts, with settings dosebench reads."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import typer
import yaml

from dosebench.cli import app
from dosebench.core.settings import QUEUES, Settings
from dosebench.segmenter.nnunet import MODELS_ROOT_ENV
from dosebench.segmenter.weights import WEIGHTS_ENV

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"


def manifests() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return pod.get("containers", [])


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize(("name", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_is_valid_kubernetes(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_can_fail():
    doc = next(d for _, d in manifests() if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    containers(broken)[0]["argz"] = ["beat"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def parse_dosebench_args(args: list[str]):
    """Parse ``dosebench ARGS`` with the real CLI, without running the command."""
    group = typer.main.get_command(app)
    context = group.make_context("dosebench", list(args), resilient_parsing=False)
    name, command, rest = group.resolve_command(context, list(args))
    if hasattr(command, "resolve_command"):  # a sub-app (e.g. `db upgrade`)
        sub_context = command.make_context(name, rest, parent=context)
        _, command, rest = command.resolve_command(sub_context, rest)
        return command.make_context(name, rest, parent=sub_context)
    return command.make_context(name, rest, parent=context)


def test_every_container_runs_a_valid_dosebench_command():
    seen = set()
    for _, doc in manifests():
        for container in containers(doc):
            args = container["args"]
            context = parse_dosebench_args(args)  # raises on an unknown command or option
            seen.add(args[0])
            if args[0] == "worker":
                assert set(context.params["queues"].split(",")) <= set(QUEUES)
    assert {"serve", "worker", "beat", "db"} <= seen


def test_the_command_check_can_fail():
    with pytest.raises(Exception, match="No such option: --queue"):  # typer's vendored click
        parse_dosebench_args(["worker", "--queue", "simulate"])


def test_every_queue_has_a_worker_and_gpu_workers_ask_for_a_gpu():
    served: set[str] = set()
    for _, doc in manifests():
        for container in containers(doc):
            args = container["args"]
            if args[0] != "worker":
                continue
            queues = set(args[args.index("--queues") + 1].split(","))
            served |= queues
            wants_gpu = "nvidia.com/gpu" in container["resources"]["limits"]
            assert wants_gpu == bool(queues & {"reconstruct", "segment"}), doc["metadata"]["name"]
    assert served == set(QUEUES)


def test_configuration_names_settings_dosebench_reads():
    config = next(d for _, d in manifests() if d["kind"] == "ConfigMap")
    known = {f"DOSEBENCH_{name.upper()}" for name in Settings.model_fields} | {WEIGHTS_ENV, MODELS_ROOT_ENV}
    for key in config["data"]:
        if key.startswith("DOSEBENCH_"):
            assert key in known, key


def test_images_are_the_compose_images():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    compose_images = {service["image"] for service in compose.values() if "image" in service}
    for _, doc in manifests():
        for container in containers(doc):
            assert container["image"] in compose_images, container["image"]
