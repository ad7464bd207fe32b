"""The `raytrain-ssl` subcommands that live outside `cli.py`: one module each, with `register(subparsers)`.

`register` adds the subcommand's parser and sets `handler` to a `run(args) -> int` that returns the exit
code (0 done, 2 bad input: a one-line message on stderr, no traceback).
"""
