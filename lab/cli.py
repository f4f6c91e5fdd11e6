"""The `sdlab` command.

sdlab lab                  open JupyterLab on the curated notebooks (embedded TinyWorld model)
sdlab demo                 run the tour notebook headless and write an executed HTML copy
sdlab tinyworld train      train the embedded model from scratch (resumable)
sdlab tinyworld eval       measure the judge and the model on TinyWorld's fixed splits
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if command == "tinyworld":
        sub = rest[0] if rest else ""
        if sub == "train":
            from lab.tinyworld.train import main as run
        elif sub == "eval":
            from lab.tinyworld.evaluate import main as run
        else:
            sys.exit("usage: sdlab tinyworld {train,eval} [options]  (add --help to either for its options)")
        return run(rest[1:])
    if command in ("lab", "demo"):
        from lab import launcher

        return getattr(launcher, command)(rest)
    sys.exit(f"sdlab: unknown command {command!r}\n{__doc__}")


if __name__ == "__main__":
    main()
