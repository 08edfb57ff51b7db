"""A custom import-linter contract: no module imports a private name (`_x`) across a folder line.

import-linter's own contracts see modules, not names: `from zhllama.vocab.resize import _helper` in
`export/` is an allowed arrow (export sits above vocab) and would pass. A name starting with an
underscore is the owner's to change, so importing it from another folder (stage or core) is a wrong
arrow too. Registered in pyproject.toml under [tool.importlinter] contract_types; run through
scripts/lint_imports.py.
"""

import re

from importlinter.application import contract_utils, output
from importlinter.application.contract_utils import AlertLevel
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck

_FROM_IMPORT = re.compile(r"^\s*from\s+(\S+)\s+import\s+\(?(.*?)\)?\s*$")


def _folder(module: str, folders) -> str:
    """The folder a module belongs to: the longest listed package it is in, else the root."""
    best = module.split(".")[0]
    for f in folders:
        if (module == f or module.startswith(f + ".")) and len(f) > len(best):
            best = f
    return best


def _private_names(line: str):
    m = _FROM_IMPORT.match(line.split("#")[0])
    if not m:
        return []
    names = [n.strip().split(" as ")[0].strip() for n in m.group(2).split(",")]
    return [n for n in names if n.startswith("_") and not n.startswith("__")]


class PrivateNamesContract(Contract):
    """Options: `folders`, the packages that own their private names (everything else in the root
    package is one more folder, the core); `ignore_imports`, known exceptions. Only the first line of a
    `from ... import (...)` spanning several lines is read (grimp keeps that line)."""

    type_name = "private_names"
    folders = fields.ListField(subfield=fields.StringField())
    ignore_imports = fields.SetField(subfield=fields.ImportExpressionField(), required=False)

    def check(self, graph, verbose: bool) -> ContractCheck:
        removal = contract_utils.remove_ignored_imports_and_report(
            graph=graph, ignore_imports=self.ignore_imports, unmatched_alerting=AlertLevel.ERROR)
        bad = []
        for importer in sorted(graph.modules):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                if _folder(importer, self.folders) == _folder(imported, self.folders):
                    continue
                for d in graph.get_import_details(importer=importer, imported=imported):
                    names = _private_names(d["line_contents"])
                    if names:
                        bad.append({"importer": importer, "imported": imported, "line": d["line_number"],
                                    "names": names})
        return ContractCheck(kept=not bad, metadata={"bad": bad}, warnings=list(removal.warnings),
                             ignored_import_count=removal.ignored_import_count)

    def render_broken_contract(self, check: ContractCheck) -> None:
        for b in check.metadata["bad"]:
            output.print_error(f"{b['importer']}:{b['line']} imports private {', '.join(b['names'])} "
                               f"from {b['imported']}")
            output.new_line()
