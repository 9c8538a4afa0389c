"""``export(model, format, out)``: dispatch to an exporter plugin, then check parity.

Layer 7 (imports parity, registry, protocol and below). The exporters themselves are plugins
(``worldflux-onnx``); this layer only finds them by format name and records the parity verdict
in the artifact's manifest.
"""

from __future__ import annotations

from ._export import check_export, export

__all__ = ["check_export", "export"]
