#!/usr/bin/env python3
"""Lists the import edges between the source files of a Rust crate and fails on a cycle.

An edge `a.rs -> b.rs` is any path in `a.rs` (a `use` item, or a path in code such as
`super::merge::merge_row::<I, E>(..)`) that starts with `crate::`, `super::`, `self::` or a
child module's name and resolves to the module defined in `b.rs` (the deepest module named
by the path's leading segments). `mod x;` declarations are containment, not imports.
Comments (including doc comments and their intra-doc links) are ignored.

Usage: scripts/import_cycles.py [--edges] [--under PREFIX] [CRATE_SRC_DIR ...]
(default: crates/flashpage/src). With --under, only cycles with a file under PREFIX fail.
Exit status 1 when a cycle is found, 0 otherwise.
"""

import os
import re
import sys


def module_files(src):
    """Maps module paths (tuples of names, () for the crate root) to their files."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, src)[:-3].split(os.sep)
            if rel in (["lib"], ["main"]):
                path = ()
            elif rel[-1] == "mod":
                path = tuple(rel[:-1])
            else:
                path = tuple(rel)
            # Only files reachable as modules (a `mod` declaration in their parent).
            mods[path] = full
    return mods


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    # String literals may hold `::` text; drop them.
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


def use_paths(body):
    """Expands a use tree (`a::{b, c::{d, e}}`) into its leaf paths."""
    body = body.strip()
    m = re.match(r"^(.*?)::\s*\{(.*)\}\s*$", body, flags=re.S)
    if m is None:
        if body.startswith("{") and body.endswith("}"):
            m = re.match(r"^()\{(.*)\}$", body, flags=re.S)
        else:
            body = re.sub(r"\s+as\s+\w+$", "", body)
            return [body]
    prefix, inner = m.group(1).strip(), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        p = p.strip()
        if not p:
            continue
        for leaf in use_paths(p):
            out.append(prefix + "::" + leaf if prefix else leaf)
    return out


def resolve(segs, here, mods):
    """The module a path starting with `segs` names, from module `here`; None if external."""
    if not segs:
        return None
    first = segs[0]
    if first == "crate":
        base, rest = (), segs[1:]
    elif first == "super" or first == "self":
        base = here
        rest = segs
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    elif here + (first,) in mods:
        base, rest = here, segs
    else:
        return None
    cur = base
    for s in rest:
        if cur + (s,) in mods:
            cur = cur + (s,)
        else:
            break
    return cur


def inline_mods(text):
    """(start, end, name) of every inline `mod name { ... }` block."""
    out = []
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        out.append((m.end(), i, m.group(1)))
    return out


def edges_of(path, file, mods):
    text = strip_comments(open(file, encoding="utf-8").read())
    blocks = inline_mods(text)

    def here_at(pos):
        # Inside inline modules the path is the file's module plus their names (these are
        # not files, so a path naming them resolves to the file itself).
        inner = tuple(n for (a, b, n) in blocks if a <= pos <= b)
        return path + inner

    def add(segs, pos):
        here = here_at(pos)
        local = dict(mods)
        for k in range(len(path) + 1, len(here) + 1):
            local[here[:k]] = file
        t = resolve(segs, here, local)
        if t is not None:
            found.add(local[t])

    found = set()
    for m in re.finditer(r"\buse\s+([^;]*);", text, flags=re.S):
        for p in use_paths(m.group(1)):
            segs = [s.strip() for s in p.split("::") if s.strip()]
            add(segs, m.start())
    for m in re.finditer(r"\b(?:crate|super|self)(?:\s*::\s*\w+)+", text):
        segs = [s.strip() for s in m.group(0).split("::")]
        add(segs, m.start())
    found.discard(file)
    return found


def sccs(graph):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv):
    show = "--edges" in argv
    argv = [a for a in argv if a != "--edges"]
    under = None
    if "--under" in argv:
        i = argv.index("--under")
        under = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    roots = argv or ["crates/flashpage/src"]
    failed = False
    for src in roots:
        mods = module_files(src)
        graph = {f: edges_of(p, f, mods) for p, f in mods.items()}
        if show:
            for a in sorted(graph):
                for b in sorted(graph[a]):
                    print(f"{a} -> {b}")
        cycles = [c for c in sccs(graph) if len(c) > 1]
        n_edges = sum(len(e) for e in graph.values())
        print(f"{src}: {len(graph)} files, {n_edges} import edges, {len(cycles)} cycles")
        for c in cycles:
            bad = under is None or any(f.startswith(under) for f in c)
            failed |= bad
            tag = "CYCLE" if bad else "cycle (outside --under)"
            print(f"  {tag}: " + ", ".join(c))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
