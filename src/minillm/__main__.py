"""``python -m minillm``: the same command as ``minillm``."""

from minillm.cli import main

main()
