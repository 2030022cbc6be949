"""``python -m midway`` and the ``midway`` command: the command line
(:func:`midway.cli.main`).  Ctrl-C while it is still importing exits 130, as
Ctrl-C before serving does, without a traceback."""

import sys


def main() -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        return 130  # cli.EXIT_INTERRUPTED, not imported yet
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
