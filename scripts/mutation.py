"""Mutation testing of attnzoo's selection and feature code: do the tests notice a wrong rule?

    python scripts/mutation.py                        # every target, 2 workers -> scripts/mutation_report.json
    python scripts/mutation.py --files attnzoo/methods/xattention.py --jobs 1
    python scripts/mutation.py --sample 120 --seed 0   # a seeded random sample (what docs/testing.md reports)
    python scripts/mutation.py --list                  # the mutants, without running them

A small AST mutator (no third-party tool: mutmut and cosmic-ray rewrite the tree in place and do
not run this project's hypothesis suite in parallel copies). For every target module it makes one
mutant per site, one change at a time:
- a comparison swapped for its neighbour (< <=, > >=, == !=, is / is not);
- an arithmetic operator swapped (+ -, * //, // *, % //);
- a small integer constant moved by one (0 1 2 -> 1 2 3, -1 -> 0);
- True <-> False, `and` <-> `or`, `not x` -> `x`, `x[..., ::-1]`-style index flips are not made.
Validation code is not mutated (functions named check_*/_check_*, `if ...: raise` guards, error
messages): its tests are the error tests, and this run asks about the rules that choose blocks and
build features. Each mutant is written into a private copy of the repository and the target's
tests run there with the torch backend (`-k "not triton"`; the rules are backend independent),
stopping at the first failure. A mutant is *killed* when a test fails or errors, *survives* when
all pass. Survivors that are equivalent (the change cannot alter any result) are listed, with why,
in scripts/mutation_equivalent.json; the kill rate counts the others.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.json"

TARGETS = {  # module -> the tests that own its behaviour
    "attnzoo/geometry.py": ["tests/test_block_mask.py", "tests/test_masks.py", "tests/test_dense.py"],
    "attnzoo/block_mask.py": ["tests/test_block_mask.py", "tests/test_block_sparse.py"],
    "attnzoo/masks.py": ["tests/test_masks.py", "tests/test_s2.py"],
    "attnzoo/methods/block_sparse.py": ["tests/test_block_sparse.py"],
    "attnzoo/methods/xattention.py": ["tests/test_xattention.py", "tests/test_official_xattention.py"],
    "attnzoo/methods/seerattention.py": ["tests/test_seerattention.py", "tests/test_official_seerattention.py"],
    "attnzoo/methods/s2.py": ["tests/test_s2.py", "tests/test_official_s2.py"],
    "attnzoo/methods/sparsed.py": ["tests/test_sparsed.py"],
    "attnzoo/methods/flashbias.py": ["tests/test_flashbias.py"],
    "attnzoo/methods/dense.py": ["tests/test_dense.py", "tests/test_dense_bias_sinks.py"],
    "attnzoo/methods/gla.py": ["tests/test_linear_gla.py"],
    "attnzoo/methods/based.py": ["tests/test_linear_based.py"],
    "attnzoo/methods/lawcat.py": ["tests/test_linear_lawcat.py", "tests/test_lawcat.py"],
    "attnzoo/methods/wersa.py": ["tests/test_linear_wersa.py", "tests/test_wersa.py"],
}

_COMPARE_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
               ast.Mod: ast.FloorDiv}


@dataclass
class Mutant:
    file: str
    line: int
    site: int  # index among the module's mutation sites (stable for one source)
    change: str
    status: str = "not run"
    detail: str = ""

    @property
    def key(self) -> str:
        return f"{self.file}:{self.line}:{self.change}"


def _skipped_function(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.lstrip("_").startswith("check")


def _is_raise_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and all(isinstance(s, ast.Raise) for s in node.body) and not node.orelse


class _Sites(ast.NodeVisitor):
    """Collect mutation sites in source order: (node, field, describe, apply)."""

    def __init__(self):
        self.sites: list[tuple[ast.AST, str, callable]] = []

    def generic_visit(self, node):
        if _skipped_function(node) or _is_raise_guard(node) or isinstance(node, (ast.Raise, ast.JoinedStr)):
            return
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # docstrings
        self._collect(node)
        super().generic_visit(node)

    def _collect(self, node):
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _COMPARE_SWAP:
                    self.sites.append((node, f"{type(op).__name__} -> {_COMPARE_SWAP[type(op)].__name__}",
                                       lambda n, i=i, op=op: n.ops.__setitem__(i, _COMPARE_SWAP[type(op)]())))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
            new = _BINOP_SWAP[type(node.op)]
            self.sites.append((node, f"{type(node.op).__name__} -> {new.__name__}",
                               lambda n, new=new: setattr(n, "op", new())))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or if isinstance(node.op, ast.And) else ast.And
            self.sites.append((node, f"{type(node.op).__name__} -> {new.__name__}",
                               lambda n, new=new: setattr(n, "op", new())))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self.sites.append((node, "not x -> x", lambda n: setattr(n, "op", ast.UAdd())))
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            self.sites.append((node, f"{node.value} -> {not node.value}",
                               lambda n: setattr(n, "value", not n.value)))
        elif isinstance(node, ast.Constant) and type(node.value) is int and -1 <= node.value <= 2:
            self.sites.append((node, f"{node.value} -> {node.value + 1}",
                               lambda n: setattr(n, "value", n.value + 1)))


def _sites(source: str):
    tree = ast.parse(source)
    visitor = _Sites()
    visitor.visit(tree)
    return tree, visitor.sites


def mutants_of(file: str) -> list[Mutant]:
    _, sites = _sites((ROOT / file).read_text())
    return [Mutant(file, node.lineno, i, change) for i, (node, change, _) in enumerate(sites)]


def mutated_source(file: str, site: int) -> str:
    tree, sites = _sites((ROOT / file).read_text())
    node, _, apply = sites[site]
    apply(node)
    return ast.unparse(tree)


def _workspace() -> Path:
    """A private copy of the package and tests (a mutant never touches the real tree)."""
    work = Path(tempfile.mkdtemp(prefix="attnzoo-mutant-"))
    for part in ("attnzoo", "tests", "registry.yaml", "pyproject.toml"):
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, work / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, work / part)
    return work


def run_mutant(mutant: Mutant, timeout: int) -> Mutant:
    work = _workspace()
    try:
        (work / mutant.file).write_text(mutated_source(mutant.file, mutant.site))
        env = dict(os.environ, PYTHONPATH=str(work), HYPOTHESIS_PROFILE="ci")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k", "not triton",
               *TARGETS[mutant.file]]
        try:
            done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            mutant.status, mutant.detail = "killed", f"timeout after {timeout} s"
            return mutant
        last = (done.stdout.strip().splitlines() or [""])[-1]
        mutant.status = "survived" if done.returncode == 0 else "killed"
        mutant.detail = last
        return mutant
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _equivalent() -> dict[str, str]:
    return json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}


def summarise(mutants: list[Mutant]) -> dict:
    equivalent = _equivalent()
    killed = sum(m.status == "killed" for m in mutants)
    survivors = [m for m in mutants if m.status == "survived"]
    explained = [m for m in survivors if m.key in equivalent]
    non_equivalent = len(mutants) - len(explained)
    rate = killed / non_equivalent if non_equivalent else 1.0
    return dict(total=len(mutants), killed=killed, survived=len(survivors), equivalent=len(explained),
                kill_rate=f"Kill rate: {rate:.0%} ({killed}/{non_equivalent})",
                unexplained_survivors=[m.key for m in survivors if m.key not in equivalent])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="mutation testing of attnzoo's selection and feature code")
    parser.add_argument("--files", nargs="*", default=list(TARGETS), help="target modules (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant before it counts as killed")
    parser.add_argument("--sample", type=int, default=0,
                        help="run a seeded random sample of this many mutants (0: all of them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "mutation_report.json")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.files) - set(TARGETS))
    if unknown:
        parser.error(f"--files: no tests are mapped for {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    mutants = [m for f in args.files for m in mutants_of(f)]
    if args.sample and args.sample < len(mutants):
        mutants = sorted(random.Random(args.seed).sample(mutants, args.sample), key=lambda m: (m.file, m.site))
    if args.list:
        for m in mutants:
            print(m.key)
        print(f"{len(mutants)} mutants")
        return 0
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(tqdm(pool.map(lambda m: run_mutant(m, args.timeout), mutants), total=len(mutants),
                         desc="mutants", unit="mutant"))
    summary = summarise(done)
    run = dict(files=args.files, sample=args.sample or len(done), seed=args.seed)
    args.out.write_text(json.dumps(dict(run=run, summary=summary, mutants=[asdict(m) for m in done]), indent=2))
    print(summary["kill_rate"])
    for key in summary["unexplained_survivors"]:
        print("survived:", key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
