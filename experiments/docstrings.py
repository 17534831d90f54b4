"""A paired retrieval corpus from the standard library's own source: a function's name ↔ its docstring.

Each pair is (the qualified name and signature of a public function or method,
the first sentence of its docstring), e.g.::

    json.dumps(obj, *, skipkeys=False, ...)  ↔  Serialize ``obj`` to a JSON formatted ``str``.

Why this corpus: nothing may be downloaded at run time and no installed package
ships a standard paired text set (STS-B, AllNLI, MS MARCO). The standard
library ships with every Python, its docstrings are written by people for
people, and a name → description match is a real retrieval task (code search,
"which function does X"): the name alone does not give the sentence away, the
signature and the module narrow it down.

How: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` are *parsed*
(``ast``), never imported — no side effects, the same corpus on every machine
with the same Python version. Tests, IDLE, the 2to3 fixers, the turtle demos
and ensurepip are left out; private names (a leading underscore, dunders
included) too. A sentence shorter than four words or longer than 48 is dropped.
Split by top-level module (a stable hash of its name), so that no module has
pairs on both sides: held-out names come from modules the model never saw.

Duplicates: one sentence can describe several functions (``"Return the
number of elements."`` of many containers). ``Pair.doc_group`` numbers the
distinct sentences; retrieval counts a sentence equal to the right one as
right, and the false-negative masking arm removes pairs of one group from
each other's denominators.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

#: folders of the standard library that are not its API
SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "__pycache__"}
)
MIN_WORDS, MAX_WORDS = 4, 48
#: one top-level module in this many goes to the held-out side
HELD_OUT_ONE_IN = 5


@dataclass(frozen=True)
class Pair:
    name: str  # "module.Class.method(signature)"
    doc: str  # the docstring's first sentence
    module: str  # the top-level module, the unit of the split
    doc_group: int  # the same number for the same sentence, across the whole corpus


@dataclass(frozen=True)
class Corpus:
    train: list[Pair]
    held_out: list[Pair]

    @property
    def duplicate_docs(self) -> int:
        """Pairs whose sentence another pair of the corpus also has (the false negatives)."""
        pairs = self.train + self.held_out
        counts: dict[int, int] = {}
        for pair in pairs:
            counts[pair.doc_group] = counts.get(pair.doc_group, 0) + 1
        return sum(1 for pair in pairs if counts[pair.doc_group] > 1)


def first_sentence(docstring: str) -> Optional[str]:
    """The first sentence of the docstring's first paragraph, or None if too short or too long."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    # a sentence ends at ". " before a capital (or at the end): "e.g. foo" does not end one
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.\s+(?=[A-Z(`])", text)
    sentence = text[: match.start() + 1] if match else text
    words = len(sentence.split())
    return sentence if MIN_WORDS <= words <= MAX_WORDS else None


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def _functions(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualified name with signature, docstring) of the public functions and methods."""

    def public(name: str) -> bool:
        return not name.startswith("_")

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and public(node.name):
            yield _signature(node), ast.get_docstring(node) or ""
        elif isinstance(node, ast.ClassDef) and public(node.name):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and public(item.name):
                    yield f"{node.name}.{_signature(item)}", ast.get_docstring(item) or ""


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def held_out(module: str) -> bool:
    """The split: a stable hash of the top-level module (not Python's salted ``hash``)."""
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


def build_corpus(root: Optional[Path] = None) -> Corpus:
    """Every (name, sentence) pair of the standard library at ``root``, split by top-level module."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    seen: set[str] = set()
    rows: list[tuple[str, str, str]] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.startswith(("_", ".")) for part in relative.parts[:-1]):
            continue
        if relative.name.startswith("_") and relative.name != "__init__.py":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = _module_name(path, root)
        for qualified, docstring in _functions(tree):
            sentence = first_sentence(docstring)
            name = f"{module}.{qualified}"
            if sentence is None or name in seen:  # platform variants of one function: the first
                continue
            seen.add(name)
            rows.append((name, sentence, module.split(".", 1)[0]))
    groups: dict[str, int] = {}
    pairs = [Pair(name, doc, top, groups.setdefault(doc, len(groups))) for name, doc, top in rows]
    return Corpus(
        train=[pair for pair in pairs if not held_out(pair.module)],
        held_out=[pair for pair in pairs if held_out(pair.module)],
    )
