"""``python -m polystream``: same as the ``polystream`` command."""

from polystream.cli import main

main()
