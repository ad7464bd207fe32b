"""The `raytrain-ssl` subcommands: one module each, with `register(subparsers)`.

`register` adds the subcommand's parser and sets `func` to a `run(args) -> int` that returns the exit
code (0 done, 2 bad input: a one-line message on stderr, no traceback).
"""
