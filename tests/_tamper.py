"""Tampered copies of an ONNX export, for parity tests that must see a broken graph fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from worldflux_onnx._manifest import sha256_file


def halve_largest_weight(export_dir: Path, dest: Path, graph: str) -> Path:
    """A copy of the export with the largest weight of ``graph`` halved, hashes kept valid.

    The largest float weight that is not all zeros: a zero-initialised head would not change.
    The manifest's digest is updated, so only parity (not the integrity check) can catch it.
    """
    shutil.copytree(export_dir, dest)
    path = dest / f"{graph}.onnx"
    proto = onnx.load(str(path))
    weights = [
        i
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and np.any(numpy_helper.to_array(i))
    ]
    init = max(weights, key=lambda i: int(np.prod(i.dims)))
    array = numpy_helper.to_array(init) * np.float32(0.5)
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(proto, str(path))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["graphs"][graph]["sha256"] = sha256_file(path)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest
