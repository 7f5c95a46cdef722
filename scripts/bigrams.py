#!/usr/bin/env python3
"""Build the character-bigram table the injection screen's
adversarial-suffix signal scores text against.

Two tables say how surprising each pair of adjacent characters is, one
in English prose and one in source code: cost = -log2 P(next | previous),
in eighths of a bit, one byte per pair, for 96 classes (white space, the
94 printable ASCII characters, anything else). Text that is costly under
both is neither prose nor code. They are written, prose first, to
filters/src/injection/bigrams.bin and compiled into the gateway.

Corpus: prose is this project's Markdown files and the docstrings of the
Python standard library; code is this project's Rust and Python files and
the Python standard library's sources. The injection screen's own files
are left out. Run it again after changing the corpus; the tables are
small and checked in so that builds do not depend on a corpus.

    python3 scripts/bigrams.py
"""
import ast
import os
import sysconfig
from math import log2

CLASSES = 96


def cls(ch):
    if ch in " \t\r\n\f\v":
        return 0
    o = ord(ch)
    if 0x21 <= o <= 0x7E:
        return o - 0x20
    return 95


def corpus():
    """(prose, code): lists of texts."""
    prose, code = [], []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d, _, files in os.walk(root):
        if any(p in d for p in ("/target", "/.git", "/.venv", "/var", "/node_modules", "/injection")):
            continue
        for f in files:
            path = os.path.join(d, f)
            if f.endswith(".md"):
                prose.append(read(path))
            elif f.endswith((".rs", ".py")):
                code.append(read(path))
    stdlib = sysconfig.get_paths()["stdlib"]
    for d, _, files in os.walk(stdlib):
        if "site-packages" in d or "/test" in d:
            continue
        for f in files:
            if not f.endswith(".py"):
                continue
            src = read(os.path.join(d, f))
            code.append(src)
            try:
                tree = ast.parse(src)
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        prose.append(doc)
    return prose, code


def read(path):
    try:
        return open(path, encoding="utf-8").read()
    except (UnicodeDecodeError, OSError):
        return ""


def table(texts):
    counts = [[1] * CLASSES for _ in range(CLASSES)]  # add-one smoothing
    for text in texts:
        prev = 0
        for ch in text:
            c = cls(ch)
            counts[prev][c] += 1
            prev = c
    out = bytearray()
    for row in counts:
        total = sum(row)
        for n in row:
            out.append(min(255, round(-log2(n / total) * 8)))
    return out


def main():
    prose, code = corpus()
    out = table(prose) + table(code)
    here = os.path.dirname(os.path.abspath(__file__))
    dest = os.path.join(here, "..", "filters", "src", "injection", "bigrams.bin")
    with open(dest, "wb") as fh:
        fh.write(out)
    size = lambda texts: sum(map(len, texts))
    print(f"prose {size(prose)} characters, code {size(code)} -> {os.path.normpath(dest)}")


if __name__ == "__main__":
    main()
