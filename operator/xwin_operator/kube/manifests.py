"""Child manifests: the planner's planned children rendered as Kubernetes objects, as pure
functions of (run, stage, step, attempt, owner uid, config); `render` is the entry point.

* `train` steps -> a `kubeflow.org/v1` PyTorchJob: a Master plus `nodes-1` Workers, each pod
  asking `nvidia.com/gpu: gpusPerNode`; the container (named `pytorch`, as the Training
  Operator requires) runs `python -m xwin_jobs.launch -m xwin_jobs <job> --task $(XWIN_TASK)`
  (`TRAIN_LAUNCHER`: torchrun, exiting 128 + signal when stopped by one), torchrun reading
  the PET_* variables the Training Operator injects (PET_NNODES, PET_NODE_RANK,
  PET_MASTER_ADDR, PET_MASTER_PORT, PET_NPROC_PER_NODE from `nprocPerNode`).
  `restartPolicy: ExitCode`: a pod killed by a signal (exit >= 128, e.g. preemption) is
  restarted, a bug (1-127) is not; `runPolicy.backoffLimit` bounds the restarts. The pods get
  `terminationGracePeriodSeconds` (spec.scheduling): on SIGTERM the trainer finishes its
  optimizer step, uploads a checkpoint and exits 143; torchrun waits for it that long less
  `SHUTDOWN_MARGIN_S` (TORCH_ELASTIC_SHUTDOWN_TIMEOUT). The restart resumes from it.
  With `scheduling.launcher: TrainJob`, a `trainer.kubeflow.org/v1alpha1` TrainJob instead
  (`trainjob`): the same command, env, resources, node count and labels, on the
  ClusterTrainingRuntime `scheduling.trainingRuntime`.
* `serve` steps -> a vLLM Deployment (server arguments from `vllm_server_args`, the pure
  function the local executor uses too; readiness on `/health`) and a ClusterIP Service.
* `job` steps (sampler, judge) -> a batch/v1 Job; exit codes 1 and 2 (the stage failed / bad
  usage) fail it at once, a disrupted pod does not count, other exits retry `backoffLimit`.

Every pod: the task as env `XWIN_TASK` (JSON; the StageTask of `tasks.stage_task`), S3
credentials through `secretKeyRef` on `storage.secretRef`, `AWS_ENDPOINT_URL` from
`storage.endpoint`, the judge key through `secretKeyRef` on `judge.apiKeySecret` (judge steps
only), scheduling (Kueue queue label, priority class, node selector, tolerations), the
operator's `image_pull_secrets` as imagePullSecrets, non-root,
no privilege escalation, an emptyDir scratch at /scratch and /dev/shm. Every child carries
the labels of `child_labels` and a controller owner reference to the AlignmentRun.

Pure: no kubernetes client imports.
"""

from __future__ import annotations

import copy
from typing import Any

from xwin_jobs.gpu_check import GPU_ENV
from xwin_jobs.task import StageTask
from xwin_jobs.vllm_server import SERVED_MODEL_NAME as SERVED_MODEL

from ..api.spec import API_GROUP, API_VERSION, KIND, AlignmentRun, resolved_resources, resolved_serving
from ..core.children import ANNOTATION_SUSPENDED, MANAGED_BY, TRAIN_LAUNCHER, PlannedChild, child_labels, child_name
from ..core.config import OperatorConfig
from ..core.steps import Step, step_env

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SCRATCH = "/scratch"
SHUTDOWN_MARGIN_S = 15  # of the grace period, left for torchrun itself to exit after its workers


def owner_reference(run: AlignmentRun, uid: str) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": run.metadata.name,
            "uid": uid, "controller": True, "blockOwnerDeletion": True}


def server_url(run: AlignmentRun, stage: str, serve_step: str, attempt: int, config: OperatorConfig) -> str:
    return f"http://{child_name(run.metadata.name, stage, serve_step, attempt)}:{config.server_port}/v1"


# --- pod pieces -------------------------------------------------------------------------


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def container_env(run: AlignmentRun, task: StageTask, step: Step, extra: dict[str, str]) -> list[dict]:
    spec = run.spec
    env = [{"name": "XWIN_TASK", "value": task.to_json()},
           {"name": "PYTHONUNBUFFERED", "value": "1"},
           {"name": "HOME", "value": SCRATCH},
           {"name": "XWIN_WORKDIR", "value": f"{SCRATCH}/work"},
           {"name": "HF_HOME", "value": f"{SCRATCH}/hf"}]
    env += [{"name": k, "value": v} for k, v in extra.items()]
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint})
    if spec.storage.secretRef:
        env += [_secret_env(k, spec.storage.secretRef, k)
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    if step.needs_judge and spec.judge and spec.judge.apiKeySecret:
        env.append(_secret_env("OPENAI_API_KEY", spec.judge.apiKeySecret, "OPENAI_API_KEY"))
    return env


def _resources(gpus: int, cpu: str | None, memory: str | None) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = limits["memory"] = memory
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = gpus
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def scratch_volume(size: str | None, storage_class: str | None) -> dict[str, Any]:
    """The pod's /scratch volume: an emptyDir (of at most `size`), or with `storage_class` a
    generic ephemeral volume (a PVC created and deleted with the pod) of `size`."""
    if size and storage_class:
        return {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {
            "accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
            "resources": {"requests": {"storage": size}}}}}}
    return {"name": "scratch", "emptyDir": {"sizeLimit": size} if size else {}}


def with_scratch_request(resources: dict[str, Any], size: str | None,
                         storage_class: str | None) -> dict[str, Any]:
    """`resources` plus an ephemeral-storage request of `size` when the scratch volume is an
    emptyDir on the node's disk (the scheduler then places the pod where it fits, and the
    kubelet does not evict it for using what it asked for)."""
    if not size or storage_class:
        return resources
    out = copy.deepcopy(resources)
    out.setdefault("requests", {})["ephemeral-storage"] = size
    return out


def pod_spec(run: AlignmentRun, container: dict[str, Any], config: OperatorConfig,
             restart_policy: str | None = None, scratch: str | None = None,
             scratch_class: str | None = None) -> dict[str, Any]:
    sched = run.spec.scheduling
    container = {**container, "imagePullPolicy": config.image_pull_policy,
                 "securityContext": {"allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]}},
                 "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH},
                                  {"name": "dshm", "mountPath": "/dev/shm"}]}
    spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                            "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [scratch_volume(scratch, scratch_class),
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    secrets = [name.strip() for name in config.image_pull_secrets.split(",") if name.strip()]
    if secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in secrets]
    if sched.priorityClassName:
        spec["priorityClassName"] = sched.priorityClassName
    if sched.nodeSelector:
        spec["nodeSelector"] = dict(sched.nodeSelector)
    if sched.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in sched.tolerations]
    return spec


def _metadata(run: AlignmentRun, name: str, labels: dict[str, str], uid: str) -> dict[str, Any]:
    labels = dict(labels)
    if run.spec.scheduling.queueName:
        labels[QUEUE_LABEL] = run.spec.scheduling.queueName
    meta = {"name": name, "namespace": run.metadata.namespace, "labels": labels,
            "ownerReferences": [owner_reference(run, uid)]}
    if run.spec.suspend:  # created suspended by the operator: resumed by it when the run is
        meta["annotations"] = {ANNOTATION_SUSPENDED: MANAGED_BY}
    return meta


# --- the children -----------------------------------------------------------------------


def _step_resources(run: AlignmentRun, stage: str, step: Step, task: StageTask) -> dict[str, Any]:
    if step.resources == "scoring":
        return task.params.get("scoringResources") or resolved_resources(
            run.spec, getattr(run.spec.stages, stage).scoringResources)
    return task.params.get("resources") or resolved_resources(
        run.spec, getattr(run.spec.stages, stage).resources)


def _train_env(run: AlignmentRun, task: StageTask, step: Step, gpus: int) -> tuple[int, list[dict[str, Any]]]:
    """The grace period of a training pod and its container env (torchrun's shutdown timeout
    leaves `SHUTDOWN_MARGIN_S` of it for torchrun itself): the same for either launcher. A pod
    that requests GPUs is told how many (`GPU_ENV`): each rank stops at once, exit 1 (not
    restarted under `restartPolicy: ExitCode`), when torch cannot see them."""
    grace = run.spec.scheduling.terminationGracePeriodSeconds
    extra = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(max(1, grace - SHUTDOWN_MARGIN_S))}
    if gpus:
        extra[GPU_ENV] = str(int(gpus))
    return grace, container_env(run, task, step, {**step_env(step), **extra})


def pytorchjob(run: AlignmentRun, stage: str, step: Step, attempt: int, uid: str,
               task: StageTask, config: OperatorConfig) -> dict[str, Any]:
    res = _step_resources(run, stage, step, task)
    name = child_name(run.metadata.name, stage, step.name, attempt)
    labels = child_labels(run, stage, step.name, attempt)
    grace, env = _train_env(run, task, step, res["gpusPerNode"])
    scratch = res.get("scratch"), res.get("scratchStorageClass")
    container = {"name": "pytorch", "image": config.image(run, step.image),
                 "command": [*TRAIN_LAUNCHER, step.job, "--task", "$(XWIN_TASK)"],
                 "env": env,
                 "resources": with_scratch_request(
                     _resources(res["gpusPerNode"], res.get("cpu"), res.get("memory")), *scratch)}
    template = {"metadata": {"labels": labels},
                "spec": {**pod_spec(run, container, config, None, *scratch),
                         "terminationGracePeriodSeconds": grace}}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": template}}
    if res["nodes"] > 1:
        replicas["Worker"] = {"replicas": res["nodes"] - 1, "restartPolicy": "ExitCode",
                              "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": _metadata(run, name, labels, uid),
            "spec": {"nprocPerNode": str(max(1, res["gpusPerNode"])),
                     "runPolicy": {"backoffLimit": config.pod_backoff_limit,
                                   "suspend": bool(run.spec.suspend),
                                   # a finished job's running pods are deleted: a failed
                                   # attempt frees its GPUs before the next one is created
                                   "cleanPodPolicy": "Running"},
                     "pytorchReplicaSpecs": replicas}}


def trainjob(run: AlignmentRun, stage: str, step: Step, attempt: int, uid: str,
             task: StageTask, config: OperatorConfig) -> dict[str, Any]:
    """The `train` step as a Kubeflow Trainer v2 TrainJob on `scheduling.trainingRuntime`: the
    same command, environment (Secrets by reference), resources per node, node count and Kueue
    label as the PyTorchJob; the pod settings (security context, scratch volumes, scheduling)
    as a runtime patch of the runtime's `node` job."""
    res = _step_resources(run, stage, step, task)
    name = child_name(run.metadata.name, stage, step.name, attempt)
    labels = child_labels(run, stage, step.name, attempt)
    scratch = res.get("scratch"), res.get("scratchStorageClass")
    pod = pod_spec(run, {"name": "node", "image": config.image(run, step.image)}, config, None, *scratch)
    mounts = pod["containers"][0]["volumeMounts"]
    security = pod["containers"][0]["securityContext"]
    pod["containers"] = [{"name": "node", "volumeMounts": mounts, "securityContext": security}]
    grace, env = _train_env(run, task, step, res["gpusPerNode"])
    pod = {k: v for k, v in pod.items() if k in TRAINJOB_POD_FIELDS}  # no priorityClassName: Kueue's
    pod["terminationGracePeriodSeconds"] = grace
    trainer = {"image": config.image(run, step.image),
               "command": [*TRAIN_LAUNCHER, step.job, "--task", "$(XWIN_TASK)"],
               "env": env,
               "numNodes": res["nodes"], "numProcPerNode": max(1, res["gpusPerNode"]),
               "resourcesPerNode": with_scratch_request(
                   _resources(res["gpusPerNode"], res.get("cpu"), res.get("memory")), *scratch)}
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": _metadata(run, name, labels, uid),
            "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                    "name": run.spec.scheduling.trainingRuntime},
                     "suspend": bool(run.spec.suspend), "trainer": trainer,
                     "runtimePatches": [{"manager": f"{API_GROUP}/operator", "trainingRuntimeSpec": {"template": {
                         "spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": {
                             "metadata": {"labels": labels}, "spec": pod}}}}]}}}}]}}


# what a TrainJob's runtime patch may set of a pod (trainer.kubeflow.org/v1alpha1)
TRAINJOB_POD_FIELDS = ("affinity", "containers", "imagePullSecrets", "initContainers", "nodeSelector",
                       "schedulingGates", "securityContext", "serviceAccountName",
                       "terminationGracePeriodSeconds", "tolerations", "volumes")


def batch_job(run: AlignmentRun, stage: str, step: Step, attempt: int, uid: str,
              task: StageTask, config: OperatorConfig, extra_env: dict[str, str]) -> dict[str, Any]:
    name = child_name(run.metadata.name, stage, step.name, attempt)
    labels = child_labels(run, stage, step.name, attempt)
    container = {"name": "main", "image": config.image(run, step.image),
                 "command": ["python", "-m", "xwin_jobs", step.job, "--task", "$(XWIN_TASK)"],
                 "env": container_env(run, task, step, extra_env),
                 "resources": _resources(0, config.job_cpu, config.job_memory)}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": _metadata(run, name, labels, uid),
            "spec": {"backoffLimit": config.pod_backoff_limit, "suspend": bool(run.spec.suspend),
                     "podFailurePolicy": {"rules": [
                         {"action": "FailJob",
                          "onExitCodes": {"containerName": "main", "operator": "In", "values": [1, 2]}},
                         {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
                     "template": {"metadata": {"labels": labels},
                                  "spec": pod_spec(run, container, config, restart_policy="Never")}}}


def model_location(uri: str) -> str:
    """Where vLLM loads a model from: a local path, an HF repo id or an s3:// URI."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith("hf://"):
        return uri[len("hf://"):]
    return uri


MODEL_DIR = f"{SCRATCH}/model"
_FETCH_MODEL = ("import sys; from xwin_jobs.store import Store; "
                "Store().download_dir(sys.argv[1], sys.argv[2])")


def fetch_model_container(run: AlignmentRun, uri: str, env: list[dict], config: OperatorConfig) -> dict[str, Any]:
    """The init container that copies a model from the store (s3://) into the pod's scratch
    volume, where vLLM serves it from (the trainer image has the store's S3 client)."""
    return {"name": "fetch-model", "image": config.image(run, "trainer"),
            "imagePullPolicy": config.image_pull_policy,
            "command": ["python", "-c", _FETCH_MODEL, uri, MODEL_DIR],
            "env": copy.deepcopy([e for e in env if e["name"].startswith("AWS_") or e["name"] == "HOME"]),
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH}]}


def server_command(model: str, serving: dict[str, Any], port: int) -> tuple[list[str], dict[str, str]]:
    """The vLLM server's command and extra env, from `xwin_jobs.vllm_server` (the functions
    the local executor uses too). No GPU asked for -> vLLM's CPU settings. vLLM runs under
    `xwin_jobs.serve`, which writes why it ended to the pod's termination log."""
    from xwin_jobs.vllm_server import SERVE_MODULE, vllm_server_args, vllm_server_env

    device = "gpu" if serving.get("gpusPerReplica") else "cpu"
    args = vllm_server_args(model, serving, port, host="0.0.0.0", served_model_name=SERVED_MODEL,
                            device=device)
    return ["python", "-m", SERVE_MODULE, *args], vllm_server_env(device)


def vllm_server(run: AlignmentRun, stage: str, step: Step, attempt: int, uid: str,
                task: StageTask, config: OperatorConfig) -> list[dict[str, Any]]:
    """The Deployment and Service of a serve step."""
    serving = task.params.get("serving") or resolved_serving(run.spec, getattr(run.spec.stages, stage))
    name = child_name(run.metadata.name, stage, step.name, attempt)
    labels = child_labels(run, stage, step.name, attempt)
    model = model_location(task.inputs[step.model_input])
    fetched_from = model if model.startswith("s3://") else None
    port = config.server_port
    command, server_env = server_command(MODEL_DIR if fetched_from else model, serving, port)
    env = [e for e in container_env(run, task, step, {**step_env(step), **server_env}) if e["name"] != "XWIN_TASK"]
    container = {
        "name": "vllm", "image": config.image(run, step.image),
        "command": command,
        "env": env,
        "ports": [{"name": "http", "containerPort": port}],
        # why the server ended (xwin_jobs.serve writes it; its last log lines otherwise): the
        # operator reads it from the pod's status into the stage's message
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                           "periodSeconds": 5, "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"},
                         "periodSeconds": 10, "failureThreshold": 180},
        "resources": with_scratch_request(_resources(serving.get("gpusPerReplica") or 0, None, None),
                                          serving.get("scratch"), None),
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(run, name, labels, uid),
        "spec": {"replicas": serving["replicas"], "selector": {"matchLabels": labels},
                 "progressDeadlineSeconds": 3600,
                 "template": {"metadata": {"labels": labels},
                              "spec": pod_spec(run, container, config,
                                               scratch=serving.get("scratch"))}}}
    if fetched_from:
        deployment["spec"]["template"]["spec"]["initContainers"] = [fetch_model_container(run, fetched_from, env, config)]
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(run, name, labels, uid),
        "spec": {"type": "ClusterIP", "selector": labels,
                 "ports": [{"name": "http", "port": port, "targetPort": "http"}]}}
    return [deployment, service]


def build_step(run: AlignmentRun, stage: str, step: Step, attempt: int, uid: str,
               task: StageTask, config: OperatorConfig) -> list[dict[str, Any]]:
    """Every manifest of one step's attempt (a sample step points at the Service of its serve
    step's same attempt)."""
    if step.kind == "train":
        launcher = trainjob if run.spec.scheduling.launcher == "TrainJob" else pytorchjob
        return [launcher(run, stage, step, attempt, uid, task, config)]
    if step.kind == "serve":
        return vllm_server(run, stage, step, attempt, uid, task, config)
    extra = step_env(step)
    if step.served_by:
        url = server_url(run, stage, step.served_by, attempt, config)
        extra = step_env(step, url, SERVED_MODEL)
    return [batch_job(run, stage, step, attempt, uid, task, config, extra)]


def render(run: AlignmentRun, child: PlannedChild, uid: str, config: OperatorConfig) -> dict[str, Any]:
    """The manifest of one planned child (a serve step's Deployment or its Service)."""
    made = build_step(run, child.stage, child.step, child.attempt, uid, child.task, config)
    return next(m for m in made if m["kind"] == child.kind)
