"""The `disback` command line: thin commands over the library modules."""
