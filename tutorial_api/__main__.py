"""Run the command line: `python -m tutorial_api serve`, `chat`, `download` or `keys`."""

from tutorial_api.cli import main

main()
