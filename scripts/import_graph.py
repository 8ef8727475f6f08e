#!/usr/bin/env python3
"""The library's file-level import graph, and a check that it has no cycle.

Every `use crate::…`, `use super::…`, `use self::…` and inline `crate::…`/`super::…` path in
a file of `crates/flashpage/src` (test-only modules excluded) is resolved to the file that
defines the item: the longest module prefix that is a file, then through that module's
`pub use` re-exports (so `use super::RunArgs` from `backend/cpu/mod.rs` is an edge to
`backend/args.rs`, where `RunArgs` lives, not to `backend/mod.rs`, which only re-exports it).
A `mod child;` declaration is structure, not an import. Exit status 1 and the cycles printed
when the graph has one; `--edges` prints every edge.

Usage: python3 scripts/import_graph.py [--edges] [SRC_DIR]
"""
import os
import re
import sys

USE_RE = re.compile(r'\b(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]+);', re.S)
PATH_RE = re.compile(r'\b((?:crate|super|self)(?:::\w+)+)')


def module_of(rel):
    parts = rel[:-3].split('/')
    if parts[-1] in ('lib', 'mod'):
        parts = parts[:-1]
    return tuple(parts)


def strip_tests(text):
    """Drops `#[cfg(test)] mod …` items (inline blocks), comments and string literals."""
    text = re.sub(r'//[^\n]*', '', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    out, i = [], 0
    for m in re.finditer(r'#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{', text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {'{': 1, '}': -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return ''.join(out)


def expand(tree):
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e'] (aliases and globs dropped)."""
    tree = re.sub(r'\s+', '', tree)
    i = tree.find('{')
    if i < 0:
        return [re.sub(r'as\w+$', '', tree).rstrip(':')]
    prefix, body = tree[:i], tree[i + 1:tree.rfind('}')]
    items, depth, cur = [], 0, ''
    for ch in body:
        if ch == ',' and depth == 0:
            items.append(cur)
            cur = ''
            continue
        depth += {'{': 1, '}': -1}.get(ch, 0)
        cur += ch
    items.append(cur)
    res = []
    for it in items:
        if not it:
            continue
        for e in expand(it):
            res.append(prefix + e if e != 'self' else prefix.rstrip(':'))
    return res


def main():
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    src = args[0] if args else os.path.join(os.path.dirname(__file__), '..', 'crates', 'flashpage', 'src')
    src = os.path.normpath(src)
    files = {}
    for root, _, names in os.walk(src):
        for n in names:
            if n.endswith('.rs'):
                rel = os.path.relpath(os.path.join(root, n), src)
                files[module_of(rel)] = rel
    text = {m: open(os.path.join(src, f)).read() for m, f in files.items()}
    # Test-only modules (`#[cfg(test)] mod x;`) are not part of the library.
    test_only = set()
    for m, t in text.items():
        for d in re.finditer(r'#\[cfg\(test\)\]\s*mod\s+(\w+)\s*;', t):
            test_only.add(m + (d.group(1),))
    code = {m: strip_tests(t) for m, t in text.items() if m not in test_only}
    # Re-exports: module -> {name: absolute path it re-exports}.
    reexports = {}
    for m, t in code.items():
        for u in USE_RE.finditer(t):
            if not u.group(0).lstrip().startswith('pub'):
                continue
            for p in expand(u.group(1)):
                segs = p.split('::')
                absolute = absolutize(m, segs, files)
                if absolute is not None:
                    reexports.setdefault(m, {})[segs[-1]] = absolute
    edges = {}
    for m, t in code.items():
        paths = []
        for u in USE_RE.finditer(t):
            paths += expand(u.group(1))
        paths += PATH_RE.findall(t)
        for p in paths:
            absolute = absolutize(m, p.split('::'), files)
            if absolute is None:
                continue
            target = resolve(absolute, files, reexports, set())
            if target is not None and target != m and target in code:
                edges.setdefault(m, set()).add(target)
    if '--edges' in sys.argv:
        for m in sorted(edges):
            for t in sorted(edges[m]):
                print(f'{files[m]} -> {files[t]}')
    cycles = find_cycles(edges)
    if cycles:
        for c in cycles:
            print('cycle: ' + ' -> '.join(files[m] for m in c + [c[0]]))
        sys.exit(1)
    n = sum(len(v) for v in edges.values())
    print(f'{len(code)} files, {n} import edges, no cycle')


def absolutize(m, segs, files=None):
    if not segs:
        return None
    if segs[0] == 'crate':
        return tuple(segs[1:])
    if segs[0] not in ('super', 'self'):
        # A path relative to the module: a child module (`use args::X` in `backend/mod.rs`).
        if files is not None and tuple(m) + (segs[0],) in files:
            return tuple(m) + tuple(segs)
        return None
    base = list(m)
    i = 0
    while i < len(segs) and segs[i] in ('super', 'self'):
        if segs[i] == 'super':
            if not base:
                return None
            base.pop()
        i += 1
    if i == 0:
        return None
    return tuple(base) + tuple(segs[i:])


def resolve(path, files, reexports, seen):
    """The file defining the item at `path`: longest module prefix, then its re-exports."""
    for k in range(len(path), -1, -1):
        mod = path[:k]
        if mod in files:
            rest = path[k:]
            if rest and mod in reexports and rest[0] in reexports[mod] and (mod, rest[0]) not in seen:
                seen.add((mod, rest[0]))
                return resolve(reexports[mod][rest[0]] + rest[1:], files, reexports, seen)
            return mod
    return None


def find_cycles(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


if __name__ == '__main__':
    main()
