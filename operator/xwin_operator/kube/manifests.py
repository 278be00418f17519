"""Child manifests: the planner's planned children rendered as Kubernetes objects, as pure
functions of (run, planned child, owner uid, config); `render` is the entry point. A manifest
carries the child's own name, labels and task (the planner set them; nothing here recomputes
them), and its pods are sized by the settings the task carries (xwin_jobs.cost.SIZING).

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
  function the local executor uses too; readiness on `/health`) and a ClusterIP Service, two
  planned children of one name.
* `job` steps (sampler, judge) -> a batch/v1 Job; exit codes 1 and 2 (the stage failed / bad
  usage) fail it at once, a disrupted pod does not count, other exits retry `backoffLimit`.

Every pod: the task as env `XWIN_TASK` (JSON; the StageTask of `tasks.stage_task`), S3
credentials through `secretKeyRef` on `storage.secretRef`, `AWS_ENDPOINT_URL` from
`storage.endpoint`, the judge key through `secretKeyRef` on `judge.apiKeySecret` (judge steps
only), scheduling (Kueue queue label, priority class, node selector, tolerations), the
operator's `image_pull_secrets` as imagePullSecrets, non-root,
no privilege escalation, an emptyDir scratch at /scratch and /dev/shm. Every child carries
its planned child's labels and a controller owner reference to the AlignmentRun.

Pure: no kubernetes client imports.
"""

from __future__ import annotations

import copy
from typing import Any

from xwin_jobs.cost import SIZING
from xwin_jobs.gpu_check import GPU_ENV
from xwin_jobs.task import StageTask
from xwin_jobs.vllm_server import SERVED_MODEL_NAME as SERVED_MODEL

from ..api.spec import API_GROUP, API_VERSION, KIND, AlignmentRun
from ..core.children import ANNOTATION_SUSPENDED, MANAGED_BY, TRAIN_LAUNCHER, PlannedChild
from ..core.config import OperatorConfig
from ..core.steps import Step, step_env

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SCRATCH = "/scratch"
SHUTDOWN_MARGIN_S = 15  # of the grace period, left for torchrun itself to exit after its workers


def owner_reference(run: AlignmentRun, uid: str) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": run.metadata.name,
            "uid": uid, "controller": True, "blockOwnerDeletion": True}


def server_url(service: str, config: OperatorConfig) -> str:
    """The OpenAI base URL of a vLLM server's Service."""
    return f"http://{service}:{config.server_port}/v1"


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


def sizing(child: PlannedChild) -> dict[str, Any]:
    """The settings that size the child's pods, as the planner resolved them into its task:
    `resources`, `scoringResources` or `serving` (xwin_jobs.cost.SIZING, by the step's kind)."""
    key = SIZING[child.step.resources][0]
    if key not in child.task.params:
        raise KeyError(f"the task of stage {child.stage} has no {key!r} for step {child.step.name}")
    return child.task.params[key]


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


def pytorchjob(run: AlignmentRun, child: PlannedChild, uid: str, config: OperatorConfig) -> dict[str, Any]:
    step, res, labels = child.step, sizing(child), dict(child.labels)
    grace, env = _train_env(run, child.task, step, res["gpusPerNode"])
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
            "metadata": _metadata(run, child.name, labels, uid),
            "spec": {"nprocPerNode": str(max(1, res["gpusPerNode"])),
                     "runPolicy": {"backoffLimit": config.pod_backoff_limit,
                                   "suspend": bool(run.spec.suspend),
                                   # a finished job's running pods are deleted: a failed
                                   # attempt frees its GPUs before the next one is created
                                   "cleanPodPolicy": "Running"},
                     "pytorchReplicaSpecs": replicas}}


def trainjob(run: AlignmentRun, child: PlannedChild, uid: str, config: OperatorConfig) -> dict[str, Any]:
    """The `train` step as a Kubeflow Trainer v2 TrainJob on `scheduling.trainingRuntime`: the
    same command, environment (Secrets by reference), resources per node, node count and Kueue
    label as the PyTorchJob; the pod settings (security context, scratch volumes, scheduling)
    as a runtime patch of the runtime's `node` job."""
    step, res, labels = child.step, sizing(child), dict(child.labels)
    scratch = res.get("scratch"), res.get("scratchStorageClass")
    pod = pod_spec(run, {"name": "node", "image": config.image(run, step.image)}, config, None, *scratch)
    mounts = pod["containers"][0]["volumeMounts"]
    security = pod["containers"][0]["securityContext"]
    pod["containers"] = [{"name": "node", "volumeMounts": mounts, "securityContext": security}]
    grace, env = _train_env(run, child.task, step, res["gpusPerNode"])
    pod = {k: v for k, v in pod.items() if k in TRAINJOB_POD_FIELDS}  # no priorityClassName: Kueue's
    pod["terminationGracePeriodSeconds"] = grace
    trainer = {"image": config.image(run, step.image),
               "command": [*TRAIN_LAUNCHER, step.job, "--task", "$(XWIN_TASK)"],
               "env": env,
               "numNodes": res["nodes"], "numProcPerNode": max(1, res["gpusPerNode"]),
               "resourcesPerNode": with_scratch_request(
                   _resources(res["gpusPerNode"], res.get("cpu"), res.get("memory")), *scratch)}
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": _metadata(run, child.name, labels, uid),
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


def batch_job(run: AlignmentRun, child: PlannedChild, uid: str, config: OperatorConfig) -> dict[str, Any]:
    """A sampler or judge Job; a sampler reads the Service of its serve step (`child.server`)."""
    step, labels = child.step, dict(child.labels)
    extra = step_env(step, server_url(child.server, config), SERVED_MODEL) if child.server else step_env(step)
    container = {"name": "main", "image": config.image(run, step.image),
                 "command": ["python", "-m", "xwin_jobs", step.job, "--task", "$(XWIN_TASK)"],
                 "env": container_env(run, child.task, step, extra),
                 "resources": _resources(0, config.job_cpu, config.job_memory)}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": _metadata(run, child.name, labels, uid),
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


def deployment(run: AlignmentRun, child: PlannedChild, uid: str, config: OperatorConfig) -> dict[str, Any]:
    """The vLLM Deployment of a serve step."""
    step, task, serving, labels = child.step, child.task, sizing(child), dict(child.labels)
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
    manifest = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(run, child.name, labels, uid),
        "spec": {"replicas": serving["replicas"], "selector": {"matchLabels": labels},
                 "progressDeadlineSeconds": 3600,
                 "template": {"metadata": {"labels": labels},
                              "spec": pod_spec(run, container, config,
                                               scratch=serving.get("scratch"))}}}
    if fetched_from:
        manifest["spec"]["template"]["spec"]["initContainers"] = [fetch_model_container(run, fetched_from, env, config)]
    return manifest


def service(run: AlignmentRun, child: PlannedChild, uid: str, config: OperatorConfig) -> dict[str, Any]:
    """The ClusterIP Service of a serve step's Deployment (same name and labels)."""
    labels = dict(child.labels)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(run, child.name, labels, uid),
            "spec": {"type": "ClusterIP", "selector": labels,
                     "ports": [{"name": "http", "port": config.server_port, "targetPort": "http"}]}}


_BUILDERS = {"PyTorchJob": pytorchjob, "TrainJob": trainjob, "Job": batch_job,
             "Deployment": deployment, "Service": service}


def render(run: AlignmentRun, child: PlannedChild, uid: str, config: OperatorConfig) -> dict[str, Any]:
    """The manifest of one planned child: an object of its kind, under its name and labels,
    doing its task, owned by the run (`uid`)."""
    return _BUILDERS[child.kind](run, child, uid, config)
