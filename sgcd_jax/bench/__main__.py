"""Dispatch `python -m sgcd_jax.bench <name> [args]` to sgcd_jax.bench.<name>.main(args)."""

import importlib
import sys

from sgcd_jax.bench import available


def main(argv: list[str]) -> int:
    names = available()
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m sgcd_jax.bench <name> [args]  (python -m sgcd_jax.bench <name> --help for its args)\n"
              f"benchmarks: {', '.join(names)}")
        return 0
    if not argv or argv[0] not in names:
        print(f"usage: python -m sgcd_jax.bench <name> [args]; available: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"sgcd_jax.bench.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
