"""What every part of the AlignmentRun spec shares (its base model class, the URI and quantity
patterns, the upper bound of every string, list and map) and the run-level settings blocks:
storage, judge, images, scheduling, retries. spec.py assembles them with the stages. Pure:
pydantic only.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

_URI_PATTERN = r"^(s3://[^/]+.*|file://.+|hf://.+|/.+)$"
_QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?|k)?$"

# Upper bounds of every string, list and map of the spec. The API server sizes a CEL rule's
# worst-case cost by them (an unbounded string counts as 3 MiB, an unbounded list as about a
# million items: the CRD would be refused), and `xwin validate` refuses the same values.
URI_MAX = 2048          # a URI, or a stage key where a URI may stand
NAME_MAX = 253          # an object name (DNS subdomain): Secret, StorageClass, PriorityClass, ...
LABEL_VALUE_MAX = 63    # a label value (the Kueue queue-name label, nodeSelector values)
LABEL_KEY_MAX = 317     # a label or taint key: prefix (253) '/' name (63)
QUANTITY_MAX = 64       # a Kubernetes quantity ('200Gi')
IMAGE_MAX = 1024        # an image reference (registry/path:tag@sha256:...)
MODELS_MAX = 16         # evaluate.models
TOLERATIONS_MAX = 64
NODE_SELECTOR_MAX = 64


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class Storage(_Model):
    uri: str = Field(..., max_length=URI_MAX, pattern=r"^(s3://[^/]+.*|file://.+|/.+)$", description="Artifacts land under <uri>/<namespace>/<name>/<stage>/.")
    endpoint: Optional[str] = Field(None, max_length=URI_MAX, pattern=r"^https?://.+", description="S3-compatible endpoint (MinIO, Ceph...).")
    secretRef: Optional[str] = Field(None, min_length=1, max_length=NAME_MAX, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")


class Judge(_Model):
    model: str = Field("gpt-4-0613", min_length=1, max_length=NAME_MAX, description="Judge model name.")
    baseURL: Optional[str] = Field(None, max_length=URI_MAX, pattern=r"^https?://.+", description="OpenAI-compatible endpoint (default: OpenAI).")
    apiKeySecret: Optional[str] = Field(None, min_length=1, max_length=NAME_MAX, description="Secret holding OPENAI_API_KEY; never copied into spec, status or logs.")
    mode: Literal["online", "batch"] = Field("online", description="online | batch (OpenAI Batch API, half the price).")
    maxConcurrency: int = Field(32, ge=1, le=4096, description="Judge requests in flight at most.")
    requestsPerMinute: Optional[int] = Field(None, ge=1, description="Client-side request rate limit.")
    tokensPerMinute: Optional[int] = Field(None, ge=1, description="Client-side token rate limit.")
    budgetUSD: Optional[float] = Field(None, gt=0, description="Stop before the run's estimated judge spend (all judge stages, attempts and retries together) passes this; `xwin plan` estimates it.")
    stageBudgetUSD: Optional[float] = Field(None, gt=0, description="Optional cap of each judge stage's own estimated spend (all its attempts), within budgetUSD.")


class Images(_Model):
    trainer: Optional[str] = Field(None, max_length=IMAGE_MAX, description="Image of training and scoring pods.")
    sampler: Optional[str] = Field(None, max_length=IMAGE_MAX, description="Image of vLLM servers and sampler jobs.")
    annotator: Optional[str] = Field(None, max_length=IMAGE_MAX, description="Image of judge jobs.")


class Toleration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: Optional[str] = Field(None, max_length=LABEL_KEY_MAX)
    operator: Optional[Literal["Exists", "Equal"]] = None
    value: Optional[str] = Field(None, max_length=LABEL_VALUE_MAX)
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    tolerationSeconds: Optional[int] = None


class Scheduling(_Model):
    queueName: Optional[str] = Field(None, max_length=LABEL_VALUE_MAX, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
    priorityClassName: Optional[str] = Field(None, max_length=NAME_MAX, description="PriorityClass of every child pod.")
    nodeSelector: dict[str, Annotated[str, StringConstraints(max_length=LABEL_VALUE_MAX)]] = Field(
        default_factory=dict, max_length=NODE_SELECTOR_MAX, description="Node labels every child pod requires.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=TOLERATIONS_MAX, description="Tolerations of every child pod.")
    launcher: Literal["PyTorchJob", "TrainJob"] = Field("PyTorchJob", description="What runs training and scoring steps: PyTorchJob (kubeflow.org/v1, Kubeflow Training Operator) or TrainJob (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2).")
    trainingRuntime: str = Field("torch-distributed", min_length=1, max_length=NAME_MAX, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", description="The ClusterTrainingRuntime every TrainJob refers to (launcher: TrainJob).")
    pendingTimeoutSeconds: Optional[int] = Field(None, ge=0, le=604800, description="Seconds a step's pods may stay unstarted (unschedulable, image not pulled, a missing Secret key, ...) before its attempt fails and `retries` applies. Default: 3600 for a step asking for GPUs, 900 otherwise; 0 = wait forever. Time a child is held by Kueue for quota does not count.")
    terminationGracePeriodSeconds: int = Field(600, ge=30, le=86400, description="Seconds a training pod has between SIGTERM (preemption, eviction) and SIGKILL: it finishes the optimizer step, uploads a checkpoint and exits 143, and its restart resumes from that checkpoint.")


class Retries(_Model):
    maxAttempts: int = Field(3, ge=1, le=100, description="Attempts per stage before the run fails.")
