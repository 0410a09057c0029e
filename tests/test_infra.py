"""infra/: the deployments of prefect.yaml and the work-pool templates, against a real Prefect API.

The pools are created from infra/work-pools/*.json and the deployments deployed with the real
`prefect deploy` CLI; every check then reads back what the server stored, and renders each
deployment's job configuration the way a worker does (no GPU, Docker engine or cluster needed).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ParameterTypeError, PrefectHTTPStatusError
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate
from prefect.workers.base import BaseJobConfiguration
from prefect.workers.process import ProcessJobConfiguration
from pydantic import ConfigDict

from evop.config import EvoPConfig

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "infra" / "prefect.yaml"
POOL_FILES = sorted((ROOT / "infra" / "work-pools").glob("*.json"))
SPEC = yaml.safe_load(PREFECT_FILE.read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}
FLOW_NAME = "evop-pipeline"


class _AnyWorkerJobConfiguration(BaseJobConfiguration):
    """Keeps every templated field (job_manifest, container_create_kwargs, ...): prefect-docker and
    prefect-kubernetes are not installed here, but the merge and templating logic is the base class's."""

    model_config = ConfigDict(extra="allow")


def _pool_type(path: Path) -> str:
    # gpu-process.json -> process, gpu-docker.json -> docker, gpu-kubernetes.json -> kubernetes
    return path.stem.split("-", 1)[1]


def _flow():
    return load_flow_from_entrypoint(str(ROOT / "flows" / "evop_pipeline.py") + ":evop_pipeline")


def test_prefect_yaml_declares_the_deployments():
    assert SPEC["name"] == "evop"
    assert str(SPEC["prefect-version"]).split(".")[0] == "3"
    assert SPEC["build"] is None and SPEC["push"] is None
    (step,) = SPEC["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $EVOP_REPO_DIR }}"}}
    assert {"evop-nightly", "evop-on-demand", "evop-docker", "evop-k8s"} <= set(DEPLOYMENTS)
    for spec in DEPLOYMENTS.values():
        assert spec["entrypoint"] == "flows/evop_pipeline.py:evop_pipeline"
        assert set(spec["parameters"]) == {"config"}
    pools = {name: spec["work_pool"]["name"] for name, spec in DEPLOYMENTS.items()}
    assert pools["evop-nightly"] == "gpu-process"
    assert pools["evop-docker"] == "gpu-docker"
    assert pools["evop-k8s"] == "gpu-kubernetes"
    assert {p.stem for p in POOL_FILES} >= set(pools.values())


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_parameters_validate_against_the_flow(name):
    params = DEPLOYMENTS[name]["parameters"]
    flow = _flow()
    config = flow.validate_parameters(params)["config"]
    assert isinstance(config, EvoPConfig)
    assert config == EvoPConfig.model_validate(params["config"])
    # The server checks a run's parameters against this JSON schema (enforce_parameter_schema).
    validate(params, parameter_schema(flow).model_dump(), raise_on_error=True)


def test_unknown_config_keys_are_rejected_by_flow_and_schema():
    flow = _flow()
    bad = {"config": {"search": {"sparsity": 0.3, "sparsty": 0.3}}}
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters(bad)
    with pytest.raises(ValidationError):
        validate(bad, parameter_schema(flow).model_dump(), raise_on_error=True)


def _deploy(api_url: str, home: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),  # no developer profile leaks in
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "250",  # rich wraps its panels at the terminal width
    }
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    cmd += ["--prefect-file", "infra/prefect.yaml"]
    # Entrypoints are resolved against the working directory: deploy from the repository root.
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def deployed(prefect_api, tmp_path_factory):
    """The pools of infra/work-pools created and infra/prefect.yaml deployed on the test server."""

    async def create_pools():
        async with get_client() as client:
            for path in POOL_FILES:
                pool = WorkPoolCreate(
                    name=path.stem, type=_pool_type(path), base_job_template=json.loads(path.read_text())
                )
                await client.create_work_pool(pool, overwrite=True)

    asyncio.run(create_pools())
    result = _deploy(prefect_api, tmp_path_factory.mktemp("prefect-home"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # The CLI skips an invalid prefect.yaml with a warning only: count what it created.
    for name in DEPLOYMENTS:
        assert f"Deployment '{FLOW_NAME}/{name}' successfully created" in " ".join(output.split()), output
    return prefect_api


def _read(coro_fn):
    async def run():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(run())


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_reads_back(deployed, name):
    spec = DEPLOYMENTS[name]
    dep = _read(lambda c: c.read_deployment_by_name(f"{FLOW_NAME}/{name}"))
    assert dep.entrypoint == spec["entrypoint"]
    assert dep.work_pool_name == spec["work_pool"]["name"]
    assert dep.job_variables == spec["work_pool"]["job_variables"]
    assert dep.parameters == spec["parameters"]
    assert dep.pull_steps == SPEC["pull"]
    assert dep.enforce_parameter_schema
    schema = dep.parameter_openapi_schema
    assert schema["definitions"]["EvoPConfig"]["additionalProperties"] is False
    crons = [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules]
    assert crons == [(s["cron"], s["timezone"], s.get("active", True)) for s in spec.get("schedules", [])]
    limit = spec.get("concurrency_limit")
    # Prefect 3 keeps a deployment's concurrency limit as a global concurrency limit of its own.
    assert (dep.global_concurrency_limit.limit if dep.global_concurrency_limit else None) == limit


def test_nightly_is_the_cron_scheduled_serialised_gpu_run(deployed):
    dep = _read(lambda c: c.read_deployment_by_name(f"{FLOW_NAME}/evop-nightly"))
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    assert dep.global_concurrency_limit.limit == 1
    config = EvoPConfig.model_validate(dep.parameters["config"])
    assert config.model.device == "cuda"
    assert config.checkpoints == "s3://evop-checkpoints/nightly"
    assert dep.job_variables["env"] == {"CUDA_VISIBLE_DEVICES": "0", "PREFECT_LOGGING_EXTRA_LOGGERS": "evop"}


def _render(name: str, run_job_variables: dict[str, Any] | None = None, parameters=None):
    """Create a flow run of deployment ``name`` and build its job configuration as a worker would."""

    async def run(client):
        dep = await client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
        flow_run = await client.create_flow_run_from_deployment(
            dep.id, parameters=parameters, job_variables=run_job_variables
        )
        pool = await client.read_work_pool(dep.work_pool_name)
        cls = ProcessJobConfiguration if pool.type == "process" else _AnyWorkerJobConfiguration
        return await cls.resolve_for_flow_run(flow_run, client=client, work_pool=pool, worker_name="test")

    return _read(run)


def test_process_pool_gives_the_run_its_gpu_and_repo_dir(deployed):
    job = _render("evop-nightly")
    assert job.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert job.env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "evop"
    assert job.env["EVOP_REPO_DIR"] == "/opt/evop"  # read by the pull step at run time
    assert job.working_dir == Path("/opt/evop")
    # A run's own job variables win, key by key inside env.
    job = _render("evop-nightly", {"env": {"CUDA_VISIBLE_DEVICES": "1"}})
    assert job.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert job.env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "evop"
    # Without a CUDA_VISIBLE_DEVICES in env the pool variable decides.
    job = _render("evop-on-demand", {"cuda_visible_devices": "2,3"})
    assert job.env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_docker_pool_requests_an_nvidia_gpu(deployed):
    job = _render("evop-docker")
    assert job.image == "evop:latest"
    assert job.image_pull_policy == "IfNotPresent"
    assert job.container_create_kwargs == {
        "device_requests": [{"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}]
    }
    assert job.env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "evop"


def test_kubernetes_pool_sets_the_gpu_limit_from_gpu_count(deployed):
    def limits(job):
        (container,) = job.job_manifest["spec"]["template"]["spec"]["containers"]
        return container["resources"]["limits"]

    job = _render("evop-k8s")
    assert limits(job) == {"nvidia.com/gpu": 1}  # unset cpu/memory limits are dropped, not empty
    assert job.job_manifest["spec"]["template"]["spec"]["containers"][0]["image"] == "evop:latest"
    assert limits(_render("evop-k8s", {"gpu_count": 2})) == {"nvidia.com/gpu": 2}


def test_custom_run_parameters_are_checked_by_the_server(deployed):
    good = {"config": {**DEPLOYMENTS["evop-on-demand"]["parameters"]["config"], "output_dir": "runs/x"}}
    _render("evop-on-demand", parameters=good)
    bad = {"config": {"search": {"sparsty": 0.3}}}
    with pytest.raises(PrefectHTTPStatusError) as err:
        _render("evop-on-demand", parameters=bad)
    assert "sparsty" in str(err.value)
