"""infra/: the deployments of prefect.yaml and the work-pool templates, against a real Prefect API.

The pools are created from infra/work-pools/*.json and the deployments deployed with the real
`prefect deploy` CLI, with the commands infra/README.md gives (first the process pool's alone, as a user
with only that pool does); every check then reads back what the server stored, and renders each
deployment's job configuration the way a worker does (no GPU, Docker engine or cluster needed). One test
runs a real process worker to see how a wrong `repo_dir` fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound, ParameterTypeError, PrefectHTTPStatusError
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate
from prefect.workers.base import BaseJobConfiguration
from prefect.workers.process import ProcessJobConfiguration
from pydantic import ConfigDict

from evop.config import EvoPConfig, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "infra" / "prefect.yaml"
GUIDE = " ".join((ROOT / "infra" / "README.md").read_text().split())  # whitespace-normalised
POOL_FILES = sorted((ROOT / "infra" / "work-pools").glob("*.json"))
SPEC = yaml.safe_load(PREFECT_FILE.read_text())
DEPLOYMENTS = {d["name"]: d for d in SPEC["deployments"]}
FLOW_NAME = "evop-pipeline"

# infra/README.md, section 5: the deployments of one pool each (the pools you did not create are not
# needed), and all of them once every pool exists.
_DEPLOY = "prefect --no-prompt deploy --prefect-file infra/prefect.yaml"
DEPLOY_POOL = {
    "gpu-process": f"{_DEPLOY} -n evop-nightly -n evop-on-demand",
    "gpu-docker": f"{_DEPLOY} -n evop-docker",
    "gpu-kubernetes": f"{_DEPLOY} -n evop-k8s",
}
DEPLOY_ALL = "prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml"


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


def _config_differences(a: EvoPConfig, b: EvoPConfig) -> dict[str, tuple[Any, Any]]:
    def flat(data, prefix=""):
        out = {}
        for key, value in data.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return {k: (fa.get(k), fb.get(k)) for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


@pytest.mark.parametrize(
    ("deployment", "config_file", "may_differ"),
    [
        ("evop-on-demand", "configs/demo.yaml", {"model.device", "output_dir"}),
        ("evop-nightly", "configs/llama-3.1-8b-gpu.yaml", {"output_dir", "checkpoints"}),
        ("evop-docker", "configs/llama-3.1-8b-gpu.yaml", {"output_dir", "checkpoints"}),
        ("evop-k8s", "configs/llama-3.1-8b-gpu.yaml", {"output_dir", "checkpoints"}),
    ],
)
def test_deployment_config_is_its_config_file(deployment, config_file, may_differ):
    deployed = build_config(DEPLOYMENTS[deployment]["parameters"]["config"])
    differences = _config_differences(load_config(ROOT / config_file), deployed)
    assert set(differences) <= may_differ, differences
    # The comment above the config in prefect.yaml names the file and what differs.
    anchor = "demo" if config_file.endswith("demo.yaml") else "llama"
    lines = PREFECT_FILE.read_text().splitlines()
    end = lines.index(f"    {anchor}: &{anchor}_config")
    start = end
    while lines[start - 1].lstrip().startswith("#"):
        start -= 1
    comment = " ".join(line.strip().lstrip("# ") for line in lines[start:end])
    for word in (config_file, *may_differ):
        assert word in comment, (word, comment)


def _cli(command: str, api_url: str, home: Path, cwd: Path = ROOT, timeout: float = 120):
    """Run a `prefect ...` (or `python ...`) command line of the guide; stdout and stderr joined and
    whitespace-normalised in ``.output``."""
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),  # no developer profile leaks in
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "250",  # rich wraps its panels at the terminal width
    }
    argv = shlex.split(command)
    argv = [sys.executable, *(["-m", "prefect"] if argv[0] == "prefect" else []), *argv[1:]]
    # Entrypoints are resolved against the working directory: deploy from the repository root.
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    result.output = " ".join((result.stdout + result.stderr).split())
    return result


def _created(output: str) -> set[str]:
    # The CLI skips an invalid prefect.yaml with a warning only: count what it created.
    return set(re.findall(rf"Deployment '{FLOW_NAME}/([\w-]+)' successfully created", output))


def _create_pools(paths, name=None):
    async def create():
        async with get_client() as client:
            for path in paths:
                template = json.loads(path.read_text())
                kind = _pool_type(path)
                pool = WorkPoolCreate(name=name or path.stem, type=kind, base_job_template=template)
                await client.create_work_pool(pool, overwrite=True)

    asyncio.run(create())


@pytest.fixture(scope="module")
def process_pool_alone(prefect_api, tmp_path_factory):
    """Only the gpu-process pool exists: the guide's command for its deployments, then `--all`."""
    _create_pools([ROOT / "infra" / "work-pools" / "gpu-process.json"])
    for other in set(DEPLOY_POOL) - {"gpu-process"}:
        with pytest.raises(ObjectNotFound):
            _read(lambda c, other=other: c.read_work_pool(other))
    home = tmp_path_factory.mktemp("prefect-home")
    return _cli(DEPLOY_POOL["gpu-process"], prefect_api, home), _cli(DEPLOY_ALL, prefect_api, home)


@pytest.fixture(scope="module")
def deployed(process_pool_alone, prefect_api, tmp_path_factory):
    """The pools of infra/work-pools created and infra/prefect.yaml deployed on the test server."""
    _create_pools(POOL_FILES)
    result = _cli(DEPLOY_ALL, prefect_api, tmp_path_factory.mktemp("prefect-home"))
    assert result.returncode == 0, result.output
    assert _created(result.output) == set(DEPLOYMENTS), result.output
    return prefect_api


def test_guide_deploys_each_pools_deployments():
    for pool, command in DEPLOY_POOL.items():
        assert command in GUIDE, command
        names = set(re.findall(r"-n (\S+)", command))
        assert names == {n for n, spec in DEPLOYMENTS.items() if spec["work_pool"]["name"] == pool}, pool
    assert DEPLOY_ALL in GUIDE


def test_process_pool_deployments_deploy_without_the_other_pools(process_pool_alone):
    alone, everything = process_pool_alone
    assert DEPLOY_POOL["gpu-process"] in GUIDE
    assert alone.returncode == 0, alone.output
    assert _created(alone.output) == {"evop-nightly", "evop-on-demand"}, alone.output
    # Why the guide deploys per pool: `--all` stops at the first deployment whose pool is missing.
    assert everything.returncode != 0
    assert "references work pool 'gpu-docker' which does not exist" in everything.output


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


# infra/README.md, section 2: the process pool's variables set from the command line (here under another
# pool name, so the deployments' pool keeps the defaults the other tests read).
POOL_TEMPLATE = "python infra/pool_template.py infra/work-pools/gpu-process.json"
POOL_CREATE = "prefect work-pool create gpu-process --type process --base-job-template /tmp/gpu-process.json"


def test_process_pool_variables_from_the_command_line(deployed, tmp_path):
    assert f"{POOL_TEMPLATE} repo_dir=" in GUIDE and f"{POOL_CREATE} --overwrite" in GUIDE
    home = tmp_path / "home"
    made = _cli(f"{POOL_TEMPLATE} repo_dir=/srv/evop cuda_visible_devices=1", deployed, home)
    assert made.returncode == 0, made.stderr
    (tmp_path / "gpu-process.json").write_text(made.stdout)
    command = POOL_CREATE.replace("gpu-process ", "evop-test-pool-variables ", 1)
    command = command.replace("/tmp/gpu-process.json", str(tmp_path / "gpu-process.json"))
    created = _cli(f"{command} --overwrite", deployed, home)
    assert created.returncode == 0, created.output
    pool = _read(lambda c: c.read_work_pool("evop-test-pool-variables"))
    # What a worker of this pool gives a run that sets neither variable.
    job = asyncio.run(ProcessJobConfiguration.from_template_and_values(pool.base_job_template, {}))
    assert job.working_dir == Path("/srv/evop")
    assert job.env["EVOP_REPO_DIR"] == "/srv/evop"
    assert job.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert job.env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "evop"
    # A misspelled variable is refused, not added.
    wrong = _cli(f"{POOL_TEMPLATE} repo_dirr=/srv/evop", deployed, home)
    assert wrong.returncode == 2 and "'repo_dirr' is not a variable" in wrong.stderr


# infra/README.md, section 7: one run's job variables. A --job-variable value is read as JSON: a bare
# `cuda_visible_devices=1` is the integer 1, which the server refuses for the pool's string variable.
RUN_WITH_JOB_VARIABLES = (
    "prefect deployment run 'evop-pipeline/evop-on-demand' --job-variable repo_dir=/srv/evop"
    " --job-variable 'cuda_visible_devices=\"1\"'"
)


def test_run_job_variables_from_the_command_line(deployed, tmp_path):
    assert RUN_WITH_JOB_VARIABLES in GUIDE
    started = _cli(RUN_WITH_JOB_VARIABLES, deployed, tmp_path)
    assert started.returncode == 0, started.output
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.output).group(1)

    async def job(client):
        flow_run = await client.read_flow_run(run_id)
        pool = await client.read_work_pool("gpu-process")
        return await ProcessJobConfiguration.resolve_for_flow_run(
            flow_run, client=client, work_pool=pool, worker_name="test"
        )

    config = _read(job)
    assert config.working_dir == Path("/srv/evop")
    assert config.env["EVOP_REPO_DIR"] == "/srv/evop"
    assert config.env["CUDA_VISIBLE_DEVICES"] == "1"
    bare = RUN_WITH_JOB_VARIABLES.replace("'cuda_visible_devices=\"1\"'", "cuda_visible_devices=1")
    bare = _cli(bare, deployed, tmp_path)
    assert bare.returncode != 0
    assert "Validation failed for field 'cuda_visible_devices'" in bare.output


def test_a_wrong_repo_dir_crashes_the_run_as_the_guide_says(deployed, tmp_path):
    """A real process worker and a `repo_dir` that does not exist on its host (infra/README.md, section 6)."""
    pool = "evop-test-wrong-repo-dir"  # its own pool: the worker runs nothing else
    missing = str(tmp_path / "no-evop-checkout")
    _create_pools([ROOT / "infra" / "work-pools" / "gpu-process.json"], name=pool)

    async def schedule(client):
        flow_id = await client.create_flow_from_name(FLOW_NAME)
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=pool,
            work_pool_name=pool,
            entrypoint=DEPLOYMENTS["evop-on-demand"]["entrypoint"],
            pull_steps=SPEC["pull"],
        )
        run = await client.create_flow_run_from_deployment(deployment_id, job_variables={"repo_dir": missing})
        return run.id

    run_id = _read(schedule)
    (tmp_path / "home").mkdir()
    worker = _cli(f"prefect worker start --pool {pool} --run-once", deployed, tmp_path / "home", cwd=tmp_path)
    flow_run = _read(lambda c: c.read_flow_run(run_id))
    assert flow_run.state.type == StateType.CRASHED, (flow_run.state, worker.output)
    assert flow_run.state.message.startswith("Flow run could not start"), flow_run.state.message
    # The cause is in the worker's output ...
    assert f"FileNotFoundError: [Errno 2] No such file or directory: PosixPath('{missing}')" in worker.output
    # ... the flow run's logs only say that the submission failed.
    logs = _read(lambda c: c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))
    failed = f"Failed to submit flow run '{flow_run.name}' to infrastructure"
    assert any(log.message.startswith(failed) for log in logs), [log.message for log in logs]
    for quoted in (
        "Flow run could not start",
        "Failed to submit flow run",
        "FileNotFoundError: [Errno 2] No such file or directory: PosixPath('/opt/evop')",
    ):
        assert quoted in GUIDE, quoted


def test_the_ray_cluster_manifest_matches_the_image_ray():
    """KubeRay's rayVersion is the Ray the image installs (driver and cluster must match), and the
    workers ask for a GPU each."""
    manifest = yaml.safe_load((ROOT / "infra" / "ray" / "raycluster.yaml").read_text())
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert manifest["kind"] == "RayCluster" and manifest["spec"]["rayVersion"] == pins["ray"]
    worker = manifest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert '".[pipeline,ray]"' in (ROOT / "infra" / "Dockerfile").read_text()
