"""Reading an export's manifest.json: every broken envelope is a typed error naming the file."""

from __future__ import annotations

import json

import pytest

from worldflux_registry import ExportError, ResolutionError, registry
from worldflux_registry.registry._artifact import read_artifact_manifest


def test_a_manifest_with_a_format_is_returned_whole(tmp_path):
    manifest = {"format": "x.y", "family": "toy", "graphs": {"encode": {"file": "e.onnx"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert read_artifact_manifest(tmp_path) == manifest
    assert read_artifact_manifest(str(tmp_path)) == manifest


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"is not an export directory \(no manifest\.json\)"),
        ("{not json", r"manifest\.json is not readable JSON"),
        (b"\xff\xfe\x00", r"manifest\.json is not readable JSON"),
        ("[1, 2]", r"manifest\.json holds list, not a JSON object"),
        ('{"family": "toy"}', r"manifest\.json names no artifact format"),
        ('{"format": 3}', r"manifest\.json names no artifact format"),
    ],
    ids=["missing", "not-json", "not-utf8", "not-object", "no-format", "format-not-string"],
)
def test_a_broken_manifest_raises_the_callers_error_with_a_next_step(tmp_path, content, match):
    path = tmp_path / "manifest.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ResolutionError, match=match) as info:
        read_artifact_manifest(tmp_path)
    assert info.value.hint
    with pytest.raises(ExportError, match=match):
        read_artifact_manifest(tmp_path, ExportError)


def test_resolving_a_directory_with_a_formatless_manifest_says_so(tmp_path):
    (tmp_path / "manifest.json").write_text('{"family": "toy"}')
    with pytest.raises(ResolutionError, match="names no artifact format"):
        registry.resolve(str(tmp_path))
