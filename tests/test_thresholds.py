"""Detection thresholds: one set of defaults for config, postprocess and export, and a model
with NMS in its graph whose baked-in confidence threshold is above ``model.conf``."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamd import thresholds
from streamd.backends import open_backend
from streamd.config import ModelConfig
from streamd.pipeline.postprocess import PostprocessParams, conf_below_graph
from tests.fixtures_daemon import free_tcp_port, wait_until

GRAPH_CONF = 0.4        # baked into the NMS model below; well above the usual 0.25
WARNING = "is below the confidence threshold"


def test_config_postprocess_and_export_share_the_default_thresholds(yolov8n_pt: Path) -> None:
    from streamd_export import ExportRequest
    from streamd_export.cli import build_parser

    want = (thresholds.DEFAULT_CONF, thresholds.DEFAULT_IOU, thresholds.DEFAULT_MAX_DET)
    cfg = ModelConfig(path=Path("m.onnx"))
    params = PostprocessParams()
    req = ExportRequest(weights=yolov8n_pt)
    assert (cfg.conf, cfg.iou, cfg.max_det) == want
    assert (params.conf, params.iou, params.max_det) == want
    assert (req.conf, req.iou, req.max_det) == want
    # The export's --help states the same numbers.
    text = " ".join(build_parser().format_help().split()).split(" options: ", 1)[1]
    for flag, value in zip(("--conf CONF", "--iou IOU", "--max-det MAX_DET"), want):
        after = text.split(flag, 1)[1]
        assert after.split("(default ", 1)[1].startswith(f"{value})"), (flag, after[:120])


@pytest.fixture(scope="module")
def nms_model(fall_pt: Path, exported_model: Any) -> Path:
    return exported_model(fall_pt, 320, (1, 4), True, conf=GRAPH_CONF)


@pytest.mark.slow
def test_a_graph_threshold_above_the_config_is_named(nms_model: Path, fall_onnx_320: Path) -> None:
    with open_backend(nms_model, device="cpu", warmup=False) as b:
        info = b.info
    assert info.nms_conf == GRAPH_CONF
    message = conf_below_graph(info, 0.1)
    assert message is not None
    assert "model.conf 0.1 " in message and f"threshold {GRAPH_CONF:g} " in message and str(nms_model) in message
    assert conf_below_graph(info, GRAPH_CONF) is None and conf_below_graph(info, 0.5) is None
    with open_backend(fall_onnx_320, device="cpu", warmup=False) as raw:
        assert raw.info.nms_conf is None and conf_below_graph(raw.info, 0.01) is None


def _config(model: Path, conf: float, cameras: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": {"path": str(model), "conf": conf},
            "scheduler": {"max_batch": 4, "autotune_s": 0, "workers": 1},
            "publisher": {"endpoint": f"tcp://127.0.0.1:{free_tcp_port()}", "heartbeat_s": 0.5},
            "metrics": {"port": 0},
            "cameras": cameras}


@pytest.mark.slow
def test_check_warns_about_an_unreachable_conf(nms_model: Path, tmp_path: Path) -> None:
    cams = [{"id": "door", "url": "rtsp://192.0.2.10/stream1"}]
    for conf, warned in ((0.1, True), (GRAPH_CONF, False)):
        config = tmp_path / f"streamd-{conf}.yaml"
        config.write_text(yaml.safe_dump(_config(nms_model, conf, cams)))
        out = subprocess.run([sys.executable, "-m", "streamd.cli", "check", "-c", str(config), "--load-model"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert (WARNING in out.stdout) == warned, out.stdout


@pytest.mark.slow
def test_daemon_warns_once_at_load_and_publishes_nothing_below_the_graph(
        nms_model: Path, test_media: Any, daemon_factory: Any, collector_factory: Any) -> None:
    cams = [{"id": "bus", "url": str(test_media["bus"].mp4), "loop": True, "fps": 4},
            {"id": "pitch", "url": str(test_media["zidane"].mp4), "loop": True, "fps": 4}]
    cfg = _config(nms_model, 0.1, cams)
    d = daemon_factory(cfg)
    c = collector_factory(cfg["publisher"]["endpoint"])
    for cam in ("bus", "pitch"):
        c.wait_for(lambda m, cam=cam: m["type"] == "detections" and m["camera"] == cam and m["detections"],
                   60, f"detections with boxes from camera {cam}\n{d.log()[-2000:]}")
    confidences = [det["confidence"] for m in c.of("detections") for det in m["detections"]]
    # model.conf 0.1 asks for boxes the graph never outputs: everything is above its 0.4.
    assert confidences and min(confidences) > GRAPH_CONF
    lines = wait_until(lambda: [ln for ln in d.log().splitlines() if WARNING in ln], 10, what="the warning")
    assert len(lines) == 1, lines
    assert "model.conf 0.1 " in lines[0] and f"{GRAPH_CONF:g}" in lines[0] and str(nms_model) in lines[0]
    # A reload that keeps the model does not load it again, nor warn again.
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reload applied" in d.log(), 20, what=f"the reload\n{d.log()[-2000:]}")
    assert d.stop() == 0
    assert [ln for ln in d.log().splitlines() if WARNING in ln] == lines
