"""The `raytrain-ssl` subcommands that live outside `cli.py`: one module each, with `register(subparsers)`.

`register` adds the subcommand's parser and sets `handler` to a `run(args) -> int` that returns the exit
code (0 done, 2 bad input: a one-line message on stderr, no traceback).
"""


def add_recipe_parser(subparsers, name: str, summary: str, description: str, config_cls, config_help: str, handler):
    """The parser shared by `pipeline` and `sweep`: a recipe file, key=value overrides, --print-config and
    --address, with every key of `config_cls` listed in --help."""
    import argparse

    from raytrain_ssl.config import describe_options

    parser = subparsers.add_parser(
        name, help=summary, description=description + "\nKeys:\n" + "\n".join(describe_options(config_cls)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.set_defaults(handler=handler)
    return parser
