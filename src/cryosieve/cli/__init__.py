"""Command-line entry points: each parses arguments and calls the library."""
