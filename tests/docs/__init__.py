"""The documentation is kept true by these tests: the CLI reference, the README size, the performance page."""
