"""DESIGN.md section 8, "Which part may use which", checked on the source: every module of attnzoo is
parsed with `ast` (imports inside functions count too) and each rule prints every violation.

    cli -> bench -> api/registry -> methods -> ops -> kernels | torch_impl | fla
    methods -> masks, block_mask, geometry, validation;  reference/ stands alone
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "attnzoo"
MODULES = {}  # dotted name -> path
for _path in sorted(ROOT.rglob("*.py")):
    _parts = _path.relative_to(ROOT.parent).with_suffix("").parts
    MODULES[".".join(_parts[:-1] if _parts[-1] == "__init__" else _parts)] = _path


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str):
    """(line, imported module, imported names) of every import in `module`, relative ones resolved.
    `from pkg import name` counts as importing pkg.name when that is a module of attnzoo."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module).split(".")
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{base}.{name}" for name in names if f"{base}.{name}" in MODULES]
            if submodules:
                for sub in submodules:
                    yield node.lineno, sub, ()
                rest = tuple(name for name in names if f"{base}.{name}" not in MODULES)
                if rest:
                    yield node.lineno, base, rest
            else:
                yield node.lineno, base, names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _modules_under(prefix: str):
    return [m for m in MODULES if _within(m, prefix)]


def _attnzoo_imports(module: str):
    for line, target, names in _imports(module):
        if _within(target, "attnzoo"):
            yield line, target, names


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT.parent)}:{line}"


def _report(violations: list[str], rule: str) -> None:
    for violation in violations:
        print(f"[{rule}] {violation}")
    assert not violations, f"{rule}: {len(violations)} violation(s):\n" + "\n".join(violations)


def _allowed_only(prefix: str, allowed: tuple[str, ...], rule: str) -> None:
    violations = []
    for module in _modules_under(prefix):
        for line, target, _ in _attnzoo_imports(module):
            if not any(_within(target, ok) for ok in allowed):
                violations.append(f"{_where(module, line)} imports {target}")
    _report(violations, rule)


def test_the_source_tree_is_found():
    for part in ("attnzoo.reference", "attnzoo.methods", "attnzoo.ops", "attnzoo.kernels", "attnzoo.torch_impl"):
        assert _modules_under(part), part


def test_reference_imports_nothing_of_attnzoo_outside_itself():
    _allowed_only("attnzoo.reference", ("attnzoo.reference",), "reference stands alone")


def test_kernels_import_only_kernels_and_env():
    _allowed_only("attnzoo.kernels", ("attnzoo.kernels", "attnzoo._env"), "kernels know no method")


def test_torch_impl_imports_only_itself_geometry_and_env():
    _allowed_only("attnzoo.torch_impl", ("attnzoo.torch_impl", "attnzoo.geometry", "attnzoo._env"),
                  "torch twins know only geometry")


def test_ops_know_no_registry_api_methods_hf_or_bench():
    forbidden = ("attnzoo.registry", "attnzoo.api", "attnzoo.methods", "attnzoo.hf", "attnzoo.bench")
    violations = []
    for module in _modules_under("attnzoo.ops"):
        for line, target, _ in _attnzoo_imports(module):
            if any(_within(target, bad) for bad in forbidden):
                violations.append(f"{_where(module, line)} imports {target}")
    _report(violations, "ops are below methods")


def test_methods_import_only_ops_and_the_shared_helpers():
    allowed = ("attnzoo.ops", "attnzoo.masks", "attnzoo.block_mask", "attnzoo.geometry", "attnzoo.validation",
               "attnzoo._env")
    violations = []
    for module in _modules_under("attnzoo.methods"):
        for line, target, _ in _attnzoo_imports(module):
            if target == "attnzoo.methods" or any(_within(target, ok) for ok in allowed):
                continue
            other_method = _within(target, "attnzoo.methods")
            note = " (another method)" if other_method else ""
            violations.append(f"{_where(module, line)} imports {target}{note}")
    _report(violations, "methods import only ops, masks, block_mask, geometry, validation")


def test_kernel_files_share_private_names_only_through_the_common_module():
    shared = ("attnzoo.kernels._common", "attnzoo.kernels._config")
    violations = []
    for module in _modules_under("attnzoo.kernels"):
        for line, target, names in _imports(module):
            if not _within(target, "attnzoo.kernels") or target in shared:
                continue
            private = [name for name in names if name.startswith("_")]
            if private:
                violations.append(f"{_where(module, line)} imports private {', '.join(private)} from {target}")
    _report(violations, "kernels share private names only via _common/_config")


def _is_backend(node) -> bool:
    return (isinstance(node, ast.Name) and node.id == "backend") or \
        (isinstance(node, ast.Attribute) and node.attr == "backend")


def _is_str_literal(node) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
    return False


def test_only_ops_compare_the_backend_to_a_string():
    violations = []
    for module, path in MODULES.items():
        if _within(module, "attnzoo.ops"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            if any(_is_backend(x) for x in operands) and any(_is_str_literal(x) for x in operands):
                violations.append(f"{_where(module, node.lineno)}: {ast.unparse(node)}")
    _report(violations, "nothing outside ops branches on the backend")


@pytest.mark.parametrize("library", ["transformers", "matplotlib"])
def test_optional_libraries_are_imported_lazily_and_only_by_hf_and_bench(library):
    violations = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            if not any(_within(t, library) for t in targets):
                continue
            if not (module == "attnzoo.hf" or _within(module, "attnzoo.bench")):
                violations.append(f"{_where(module, node.lineno)} imports {library}")
            elif id(node) in top_level:
                violations.append(f"{_where(module, node.lineno)} imports {library} at module level")
    _report(violations, f"{library} is optional")
