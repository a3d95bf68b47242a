"""``python -m bridge.bench``: the same as ``epsignal-bridge bench``."""

import argparse
import sys

from bridge.bench import add_arguments, main

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bridge.bench", description=__doc__)
    add_arguments(p)
    sys.exit(main(p.parse_args()))
