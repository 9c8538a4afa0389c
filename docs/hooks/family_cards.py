"""mkdocs hook: replace ``<!-- family-card: NAME -->`` with tables generated from the family spec.

The tables come from the installed `FamilySpec` (presets, parameter counts, fingerprints,
capabilities, contract), so family pages cannot drift from the code. Torch is never imported.
"""

from __future__ import annotations

import re
from typing import Any

_MARKER = re.compile(r"<!--\s*family-card:\s*([a-z0-9_.-]+)\s*-->")


def _shape(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def family_card(name: str) -> str:
    """Markdown tables describing the family ``name`` as the registry sees it."""
    from worldflux_registry import registry

    spec = registry.get(name)
    lines = [
        f"Family `{spec.name}` from `{spec.distribution}`"
        + (f", aliases {', '.join(f'`{a}`' for a in spec.aliases)}" if spec.aliases else "")
        + f"; maturity {spec.maturity}; default preset `{spec.default_preset}`.",
        "",
        "Capabilities: " + ", ".join(f"`{c.value}`" for c in sorted(spec.capabilities)) + ".",
        "",
        "| preset | parameters | contract fingerprint |",
        "|---|---:|---|",
    ]
    for preset in spec.presets:
        config = spec.config(preset)
        count = f"{spec.param_count(config):,}" if spec.param_count else "-"
        fingerprint = spec.contract_for(config).fingerprint()[: len("sha256:") + 16]
        lines.append(f"| `{preset}` | {count} | `{fingerprint}` |")
    contract = spec.contract_for(spec.config())
    lines += [
        "",
        f"Contract of the default preset `{spec.default_preset}`:",
        "",
        "| group | name | dtype | shape | kind |",
        "|---|---|---|---|---|",
    ]
    groups: list[tuple[str, Any]] = [
        ("observation", contract.observations),
        ("action", (contract.action,) if contract.action else ()),
        ("state", contract.state),
        ("prediction", contract.predictions),
        ("target", contract.targets),
    ]
    for group, specs in groups:
        for t in specs:
            lines.append(f"| {group} | `{t.name}` | {t.dtype} | {_shape(t.shape)} | {t.kind} |")
    for noise in contract.noise:
        graphs = ", ".join(noise.graphs)
        lines.append(
            f"| noise ({graphs}) | `{noise.name}` | {noise.dtype} | {_shape(noise.shape)} "
            f"| {noise.distribution} |"
        )
    return "\n".join(lines)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return _MARKER.sub(lambda m: family_card(m.group(1)), markdown)
