"""The faces: the ``tvlang`` command line, its subcommands, the REPL and highlighting."""
