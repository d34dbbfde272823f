"""The package's imports run one way (bottom to top): no cycle among clusterstm_jax modules, with
module-level and function-level imports both counted; nothing imports an entry point; and an
import of our own modules inside a function says why it is lazy (`# lazy: reason`, on its line
or the line above)."""
from __future__ import annotations

import ast
import os

import pytest

pytestmark = pytest.mark.unit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY_POINTS = ('clusterstm_jax.train', 'clusterstm_jax.evaluate', 'clusterstm_jax.export')


def modules(root: str) -> dict[str, str]:
  """{dotted module name: file} of the package at `root`."""
  base, out = os.path.dirname(root), {}
  for d, _, files in os.walk(root):
    for f in files:
      if f.endswith('.py'):
        name = os.path.relpath(os.path.join(d, f), base)[:-3].replace(os.sep, '.')
        out[name[:-len('.__init__')] if name.endswith('.__init__') else name] = os.path.join(d, f)
  return out


def imports(root: str):
  """-> (edges {module: {imported modules}}, [(module, line, is_lazy, has_reason)])."""
  mods = modules(root)
  pkg = os.path.basename(root)
  edges, found = {m: set() for m in mods}, []
  for mod, path in mods.items():
    source = open(path).read()
    lines = source.splitlines()
    tree = ast.parse(source)
    in_function = set()
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
          here = mod if path.endswith('__init__.py') else mod.rpartition('.')[0]
          for _ in range(node.level - 1):
            here = here.rpartition('.')[0]
          stem = here + ('.' + node.module if node.module else '')
        else:
          stem = node.module or ''
        # `from pkg import sub` imports the submodule when there is one.
        targets = [f'{stem}.{a.name}' if f'{stem}.{a.name}' in mods else stem for a in node.names]
      else:
        continue
      ours = [t for t in targets if t == pkg or t.startswith(pkg + '.')]
      for t in ours:
        while t not in mods:
          t = t.rpartition('.')[0]
        edges[mod].add(t)
      if ours:
        lazy = id(node) in in_function
        text = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else '')
        found.append((mod, node.lineno, lazy, '# lazy:' in text))
  return edges, found


def cycles(edges) -> list[list[str]]:
  """Strongly connected components with more than one module (or a module importing itself)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
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
      if len(comp) > 1 or v in edges.get(v, ()):
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycle():
  edges, _ = imports(os.path.join(REPO, 'clusterstm_jax'))
  assert len(edges) > 50 and 'clusterstm_jax.trainer' in edges  # the real package was read
  assert cycles(edges) == []


def test_nothing_imports_an_entry_point():
  edges, _ = imports(os.path.join(REPO, 'clusterstm_jax'))
  bad = sorted((m, t) for m, ts in edges.items() for t in ts if t in ENTRY_POINTS)
  assert bad == []


def test_lazy_imports_of_our_modules_say_why():
  _, found = imports(os.path.join(REPO, 'clusterstm_jax'))
  unexplained = [f'{m}:{line}' for m, line, lazy, reason in found if lazy and not reason]
  assert unexplained == []


def test_the_checker_sees_cycles_and_unexplained_lazy_imports(tmp_path):
  pkg = tmp_path / 'clusterstm_jax'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'sub' / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from clusterstm_jax.sub import b\n')
  (pkg / 'sub' / 'b.py').write_text('def f():\n  from clusterstm_jax import c\n')
  (pkg / 'c.py').write_text('from clusterstm_jax import a\n'
                            'def g():\n  # lazy: keeps a heavy dependency off the import path\n'
                            '  from clusterstm_jax.sub import b\n')
  edges, found = imports(str(pkg))
  assert cycles(edges) == [['clusterstm_jax.a', 'clusterstm_jax.c', 'clusterstm_jax.sub.b']]
  assert [(m, lazy, reason) for m, _, lazy, reason in sorted(found)] == [
      ('clusterstm_jax.a', False, False), ('clusterstm_jax.c', False, False),
      ('clusterstm_jax.c', True, True), ('clusterstm_jax.sub.b', True, False)]
