"""docs/EDGE.md's streamd and streamd-export command lines parse with the real command-line
parsers (a renamed or removed flag fails here), and its YAML snippets are valid configs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from streamd.cli import build_parser as streamd_parser
from streamd.config import parse_config
from streamd_export.cli import build_parser as export_parser

EDGE = Path(__file__).resolve().parents[1] / "docs" / "EDGE.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(EDGE.read_text()) if lang == kind]


def commands() -> list[list[str]]:
    """Every streamd / streamd-export invocation in the bash blocks, continuation lines joined
    and comments dropped."""
    out = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word.endswith(("/streamd", "/streamd-export")):
                    out.append(words[i:])
                    break
    return out


def test_the_page_has_commands_to_check() -> None:
    names = {Path(c[0]).name for c in commands()}
    assert names == {"streamd", "streamd-export"}


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join([Path(argv[0]).name, *argv[1:3]]))
def test_each_command_parses(argv: list[str]) -> None:
    parser = export_parser() if argv[0].endswith("streamd-export") else streamd_parser()
    try:
        parser.parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{' '.join(argv)}: rejected by the parser (exit {exc.code})")


def test_yaml_snippets_are_valid_configs() -> None:
    """Each snippet, completed with a model and an empty camera list where it has none, passes
    the daemon's own config validation (keys, values, and the checks across them)."""
    snippets = blocks("yaml")
    assert snippets
    for text in snippets:
        data = yaml.safe_load(text)
        data.setdefault("model", {"path": "model.onnx"})
        data.setdefault("cameras", [])
        parse_config(yaml.safe_dump(data), source=f"docs/EDGE.md snippet {text.splitlines()[0]!r}",
                     check_files=False)
