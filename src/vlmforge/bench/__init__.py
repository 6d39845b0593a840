"""Benchmarks: each prints a table and writes its figures as JSON."""


def publish(result: dict, table: str, out: str | None) -> dict:
    """Print a bench's table and, with `out`, write its figures there as JSON (atomically)."""
    from vlmforge.config import save_json

    print(table)
    if out:
        save_json(result, out)
        print(f"figures saved to {out}")
    return result
