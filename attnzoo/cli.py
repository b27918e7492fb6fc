"""The `attnzoo` command: `attnzoo list`, `attnzoo check`, `attnzoo bench`, `attnzoo --version`."""

from __future__ import annotations

import argparse
import sys


def _supports_summary(info) -> str:
    sup = info.supports
    flags = [name for name, on in (("causal", sup.causal), ("non-causal", sup.non_causal), ("gqa", sup.gqa),
                                   ("backward", sup.backward)) if on]
    return ", ".join(flags)


def list_table(markdown: bool = False) -> str:
    """The registry as a table: method, family, paper, what it supports, backends."""
    from .registry import info, list_methods

    header = ("method", "family", "paper", "supports", "backends")
    rows = []
    for name in list_methods():
        entry = info(name)
        rows.append((name, entry.family, entry.paper, _supports_summary(entry), ", ".join(entry.supports.backends)))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _version() -> str:
    from . import __version__

    return __version__


def _cmd_list(args) -> int:
    print(list_table(markdown=args.markdown))
    return 0


def _cmd_check(args) -> int:
    from . import check

    rows = []
    for row in check.iter_rows(args.methods, args.device, args.seed):
        rows.append(row)
        print(check.progress_line(row), file=sys.stderr, flush=True)
    print(check.format_table(rows))
    failed = [r.method for r in rows if r.status.startswith("FAIL")]
    if failed:
        print(f"\n{len(failed)} method(s) failed: {', '.join(failed)}")
        return 1
    print(f"\nall {len(rows)} methods ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # the sweep has its own flags
        from .bench import main as bench_main

        return bench_main(argv[1:])

    parser = argparse.ArgumentParser(prog="attnzoo", description="Sparse, linear and exact attention behind one API.")
    parser.add_argument("--version", action="version", version=f"attnzoo {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the registered methods")
    listing.add_argument("--markdown", action="store_true", help="print a Markdown table")
    listing.set_defaults(run=_cmd_list)
    checking = commands.add_parser("check", help="run every method on small inputs against its float64 reference")
    checking.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (default: all)")
    checking.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    checking.add_argument("--seed", type=int, default=0)
    checking.set_defaults(run=_cmd_check)
    commands.add_parser("bench", help="benchmark sweep (see `attnzoo bench --help`)")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
