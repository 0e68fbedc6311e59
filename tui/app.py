"""ftui placeholder (replaced by the TUI work)."""


def main() -> int:
    return 0
