"""A real English corpus that needs no download: the installed Python standard library's docs.

Documents = module, class and function docstrings (via `ast`, no import of the modules) and the
`pydoc` help topics. Files are walked in sorted order, so the corpus is deterministic for a given
Python installation; `max_bytes` sizes it (a few MB for the demo).
"""

from __future__ import annotations

import ast
import json
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_documents(min_chars: int = 60) -> Iterator[dict]:
    """Yield {"id", "text"} documents: pydoc topics first, then docstrings of the stdlib sources."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= min_chars:
            yield {"id": f"pydoc:{name}", "text": text}
    yield from python_docstrings(Path(sysconfig.get_paths()["stdlib"]), min_chars, _SKIP_DIRS)


def python_docstrings(root: Path, min_chars: int = 60, skip_dirs: set[str] | None = None) -> Iterator[dict]:
    """Module, class and function docstrings of the .py files under `root` (sorted; parsed with
    `ast`, nothing imported), skipping directories named in `skip_dirs`."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip_dirs and any(part in skip_dirs for part in rel.parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old sources
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError, RecursionError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                name = getattr(node, "name", "")
                yield {
                    "id": f"{rel.as_posix()}:{name or '<module>'}:{getattr(node, 'lineno', 0)}",
                    "text": doc,
                }


def write_demo_corpus(path: str | Path, max_bytes: int = 4_000_000, min_chars: int = 60) -> dict:
    """Write stdlib documents as jsonl until about `max_bytes`; returns {"documents", "bytes"}."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = size = 0
    with out.open("w", encoding="utf-8") as f:
        for doc in stdlib_documents(min_chars):
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            f.write(line)
            n += 1
            size += len(line.encode())
            if size >= max_bytes:
                break
    return {"documents": n, "bytes": size}
