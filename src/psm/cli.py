"""The `psm` command line."""

def main(argv=None) -> int:
    return 0
