"""A custom import-linter contract: no module imports another module's private names.

`from services.serving.classifier import _predict` reaches past a module's public
surface; import-linter's own `private_modules` contract covers private *modules*
only, so this contract reads each module's `from ... import ...` statements and
refuses any name that starts with one underscore (dunders such as `__version__`
are public) taken from another module of the checked packages.
"""

from __future__ import annotations

import ast
import importlib.util
from typing import Iterator, NamedTuple

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class PrivateName(NamedTuple):
    importer: str
    line: int
    module: str
    name: str


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute_module(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module a `from X import ...` statement names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def private_names(importer: str, source: str, is_package: bool,
                  packages: set[str]) -> Iterator[PrivateName]:
    """The private names `importer` takes from other modules under `packages`."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = absolute_module(importer, is_package, node)
        if module == importer or module.split(".")[0] not in packages:
            continue
        for alias in node.names:
            if is_private(alias.name):
                yield PrivateName(importer, node.lineno, module, alias.name)


class PrivateNamesContract(Contract):
    """Configuration: `packages`, the root packages whose modules are checked (both as
    importers and as the modules imported from); `ignore_names`, entries
    `importer:module:name` that are allowed."""

    type_name = "private_names"

    packages = fields.SetField(subfield=fields.StringField())
    ignore_names = fields.SetField(subfield=fields.StringField(), required=False)

    def check(self, graph, verbose: bool) -> ContractCheck:
        roots = {p.split(".")[0] for p in self.packages}
        allowed = set(self.ignore_names or ())
        found: list[PrivateName] = []
        for module in sorted(graph.modules):
            if module.split(".")[0] not in roots:
                continue
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            with open(spec.origin, encoding="utf-8") as f:
                source = f.read()
            is_package = spec.origin.endswith("__init__.py")
            found += [p for p in private_names(module, source, is_package, roots)
                      if f"{p.importer}:{p.module}:{p.name}" not in allowed]
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for p in check.metadata["found"]:
            output.print_error(f"{p.importer}:{p.line} imports the private name {p.name!r} "
                               f"from {p.module}", bold=False)
        output.new_line()
