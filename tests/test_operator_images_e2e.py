"""The whole tiny demo through the operator with every child in its real image: the operator
(`python -m xwin_operator`) against the fake API server, the test kubelet running each pod as
podman containers of the images `make images` builds (trainers, vLLM Deployments with their
fetch-model init containers, sampler and judge Jobs), as the manifests' users, with their
volumes and security settings; artifacts on moto S3, the loopback judge.

Marker `containers` (`make test-containers`, after `make images`; CI runs it).
"""

from __future__ import annotations

import json

import pytest

from container_children import IMAGES
from judge_fixtures import judge_server  # noqa: F401
from kube.fixtures import NS, cluster, create_run, kubelet_factory, operator_factory  # noqa: F401
from kube.harness import wait_phase
from test_containers import need_images
from test_operator_e2e import tiny_task  # noqa: F401
from test_operator_full_e2e import full_run_on_s3, small_task  # noqa: F401

pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]


def test_full_tiny_demo_succeeds_with_every_child_in_its_image(cluster, kubelet_factory, operator_factory,
                                                               s3_server, s3_bucket, small_task, judge_server):
    from xwin_jobs.store import read_marker

    need_images("trainer", "sampler", "annotator")
    name = "tiny-xwin"
    run, store = full_run_on_s3(cluster, name, s3_server, s3_bucket, small_task, judge_server.base_url)
    kubelet = kubelet_factory(runtime="podman", extra_env={"OMP_NUM_THREADS": "1"})  # as demo.py sets it
    images = {f"XWIN_{which.upper()}_IMAGE": IMAGES[which] for which in ("trainer", "sampler", "annotator")}
    op = operator_factory(env={**s3_server.env, **images, "XWIN_IMAGE_PULL_POLICY": "Never"})
    create_run(cluster, run)

    status = wait_phase(cluster, NS, name, phases=("Succeeded", "Failed"), timeout=1740, operator=op)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((kubelet.work / "logs").glob("*.log")))
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{logs}"
    stages = {s["name"]: s for s in status["stages"]}
    assert {n: (s["phase"], s["attempts"]) for n, s in stages.items()} == {n: ("Succeeded", 1) for n in stages}
    assert len(stages) == 7
    for stage in stages:
        assert read_marker(store, f"{s3_bucket}/runs/{NS}/{name}/{stage}/")["stage"] == stage
    assert store.exists(f"{s3_bucket}/runs/{NS}/{name}/evaluate/data/report.json")
    # every pod ran in an image: its log starts with the podman command that ran it
    started = [p.read_text().splitlines()[0] for p in (kubelet.work / "logs").glob("*.log")]
    assert started and all(line.startswith("$ podman run ") for line in started), started
    # the run succeeds on the evaluate marker, which its judge Job writes just before it exits:
    # the last containers (that Job's, a sampler scaled down) go within seconds, never stay
    try:
        cluster.wait_for(lambda: not kubelet.containers, timeout=120, what="every container to exit")
    except TimeoutError:
        raise AssertionError(f"containers left running: {sorted(kubelet.containers)}") from None
