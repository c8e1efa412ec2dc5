"""`streamd check` refuses what `streamd run` refuses before it opens a camera: both are run
as real processes on the same config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_daemon import REPO, free_tcp_port


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "streamd.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "[::]", "eth0", "127.0.0.1.example.com"])
def test_check_refuses_a_network_endpoint_that_run_refuses(tmp_path: Path, host: str) -> None:
    (tmp_path / "m.onnx").write_bytes(b"")
    endpoint = f"tcp://{host}:{free_tcp_port()}"
    text = f"model:\n  path: m.onnx\npublisher:\n  endpoint: '{endpoint}'\ncameras: []\n"
    (tmp_path / "c.yaml").write_text(text)
    check = _cli("check", "-c", "c.yaml", cwd=tmp_path)
    assert check.returncode != 0, check.stdout
    assert f"c.yaml:4: publisher.endpoint: {endpoint} is not a loopback address" in check.stderr
    run = _cli("run", "-c", "c.yaml", cwd=tmp_path)
    assert run.returncode != 0 and "publisher.endpoint" in run.stderr
    # Said in so many words, it is accepted.
    (tmp_path / "c.yaml").write_text(text.replace("cameras: []", "  allow_non_loopback: true\ncameras: []"))
    ok = _cli("check", "-c", "c.yaml", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_check_refuses_a_pytorch_model_that_run_refuses(tmp_path: Path) -> None:
    (tmp_path / "best.pt").write_bytes(b"")
    (tmp_path / "c.yaml").write_text("cameras: []\nmodel:\n  path: best.pt\n")
    check = _cli("check", "-c", "c.yaml", cwd=tmp_path)
    assert check.returncode != 0, check.stdout
    assert "c.yaml: model.path:" in check.stderr and "no backend opens '.pt' files" in check.stderr
    run = _cli("run", "-c", "c.yaml", cwd=tmp_path)
    assert run.returncode != 0 and "'.pt'" in run.stderr
