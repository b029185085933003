"""The project's import rules, checked on the source (ast), as the next engineer would check them:

1. no module uses another project module's private names (`from x import _y`, `x._y`, or a
   private module such as `x._y` from outside its package);
2. the import graph of the project's modules (function-local imports included) has no cycle;
3. a function-local import of a project module is a deliberate lazy import: a comment saying why
   is on its line or just above its block of imports;
4. the layers: nas_agent, train.py and model.py never import nas_agent_graph, and the LLM
   package (nas_agent_graph.llm) never imports the LoRA package (the graph hands it its adapter).

Tests are exempt from rule 1: they may reach into the module they test.
"""
from __future__ import annotations

import ast
from pathlib import Path

from nas_agent_graph.paths import ROOT

PACKAGES = ("nas_agent", "nas_agent_graph")
TOP_MODULES = ("train", "model")


def project_files() -> dict[str, Path]:
    files = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    for path in sorted((ROOT / "bench").glob("*.py")):
        files[f"bench.{path.stem}"] = path
    return files


FILES = project_files()


def is_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES + TOP_MODULES


def resolve(module: str | None, level: int, importer: str) -> str:
    if not level:
        return module or ""
    base = importer.split(".")
    if not FILES[importer].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def owner(module: str) -> str:
    """The project module a dotted name belongs to (the longest prefix that is a file)."""
    parts = module.split(".")
    while parts and ".".join(parts) not in FILES:
        parts.pop()
    return ".".join(parts)


def imports(name: str) -> list[tuple[ast.AST, str, list[str], bool]]:
    """(node, imported module, names, inside a function) for each import of a project module."""
    tree = ast.parse(FILES[name].read_text(encoding="utf-8"))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if is_project(alias.name):
                        found.append((child, alias.name, [], in_function))
            elif isinstance(child, ast.ImportFrom):
                module = resolve(child.module, child.level, name)
                if is_project(module):
                    found.append((child, module, [a.name for a in child.names], in_function))
            visit(child, local)

    visit(tree, False)
    return found


def private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def test_no_module_uses_another_modules_private_names():
    problems = []
    for name, path in FILES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}  # local name -> project module, for attribute access like `launcher._x`
        for node, module, names, _ in imports(name):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    aliases[(alias.asname or alias.name).split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
            outside = not name.startswith(module.rsplit(".", 1)[0] + ".") if "." in module else True
            if any(private(p) for p in module.split(".")) and outside:
                problems.append(f"{path.name}:{node.lineno}: imports private module {module}")
            for n in names:
                if private(n):
                    problems.append(f"{path.name}:{node.lineno}: imports {n} from {module}")
                elif f"{module}.{n}" in FILES:
                    aliases[n] = f"{module}.{n}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name):
                module = aliases.get(node.value.id)
                if module and owner(module) != name:
                    problems.append(f"{path.name}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not problems, "private names used across modules:\n" + "\n".join(problems)


def test_the_import_graph_has_no_cycle():
    graph = {name: sorted({owner(m) for _, m, names, _ in imports(name)} - {name, ""}) for name in FILES}
    for name in FILES:  # `from package import module` imports the module
        for _, m, names, _ in imports(name):
            graph[name] = sorted(set(graph[name]) | {f"{m}.{n}" for n in names if f"{m}.{n}" in FILES} - {name})
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            walk(node)
    # A package importing its own submodules (its __init__ re-exporting them) is not a cycle.
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") or c[0].startswith(m + ".")
                                           for m in c)]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_function_local_imports_of_project_modules_say_why():
    problems = []
    for name, path in FILES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node, module, _, in_function in imports(name):
            if not in_function:
                continue
            here, above = lines[node.lineno - 1], node.lineno - 2
            while above >= 0 and lines[above].strip().startswith(("from ", "import ")):  # one comment per block
                above -= 1
            if "#" not in here and not (above >= 0 and lines[above].strip().startswith("#")):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not problems, ("function-local imports of project modules without a comment saying why "
                          "(import at the top, or say why it must be lazy):\n" + "\n".join(problems))


LAYERS = {  # importer prefix -> module prefixes it must not import
    "nas_agent": ("nas_agent_graph",),
    "train": ("nas_agent_graph",),
    "model": ("nas_agent_graph",),
    "nas_agent_graph.llm": ("nas_agent_graph.lora",),
}


def test_layers_are_kept():
    problems = []
    for name in FILES:
        for prefix, banned in LAYERS.items():
            if name == prefix or name.startswith(prefix + "."):
                problems += [f"{name} imports {m}" for _, m, _, _ in imports(name)
                             if any(m == b or m.startswith(b + ".") for b in banned)]
    assert not problems, "\n".join(problems)
