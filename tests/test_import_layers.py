"""Imports run one way (STYLE.md, "Import direction"), checked on the source with `ast`, nothing imported.

Every module of contrastive/ belongs to a component (its first name under `contrastive.`), and every component to
a layer. A module imports its own component and the layers below it; never a layer above, and never another
component of its own layer (data -> models is as wrong as models -> train). Every import counts: at module level,
inside a function, under `if TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "contrastive"

LAYERS = (
    # The user-facing error family, which every layer raises.
    ("errors",),
    # Leaves. checkpoint_io is the checkpoint files' layout and reading, which models/ (pretrained weights, locked
    # towers) needs as much as train/, eval/ and export/.
    ("config", "types", "registry", "checkpoint_io"),
    # Building blocks. Losses get their collectives as a value (the `Collectives` protocol is in types).
    # connectors holds nn.Modules that sit between an exported encoder and an LLM; it needs only the registry.
    ("dist", "data", "models", "losses", "connectors"),
    # A model joined with its preprocessing (data) and tokenizer, read from any format: what evaluation, export,
    # the trainer's evaluators and other consumers of a trained encoder take.
    ("encoders",),
    # What is done with the blocks. export reads checkpoints and models, and needs neither training nor evaluation.
    # curation scores, filters, deduplicates and balances shards with an encoder; it needs none of the other three.
    ("train", "eval", "export", "curation"),
    ("cli",),
)
LAYER_OF = {component: index for index, layer in enumerate(LAYERS) for component in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module of ours, line) for every import in the file; `from pkg import mod` names the submodule."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in contrastive.data.loader means contrastive.data.x
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) + 1 - node.level])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule if is_module(submodule) else base, node.lineno))
    return sorted({(module, line) for module, line in found if module.split(".")[0] == "contrastive"})


def component(module: str) -> str | None:
    """`contrastive.data.loader` -> "data"; the package itself has none (it imports nothing and nothing of it)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        own = component(importer)
        for imported, line in imported_modules(path):
            other = component(imported)
            if other == own:
                continue
            if own is None or other is None or LAYER_OF[other] >= LAYER_OF[own]:
                found.append(f"{importer} -> {imported}  ({path.relative_to(PACKAGE.parent)}:{line})")
    return found


def test_every_component_has_a_layer():
    components = {component(module_name(path)) for path in PACKAGE.rglob("*.py")} - {None}
    assert components <= set(LAYER_OF), f"assign to a layer in LAYERS: {sorted(components - set(LAYER_OF))}"


def test_imports_run_one_way():
    found = violations()
    if found:
        pytest.fail("imports against the layer order (module -> imported module):\n" + "\n".join(found), pytrace=False)
