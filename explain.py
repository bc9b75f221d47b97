"""Explain a classifier artifact's predictions (same as ``ecgfm-explain``; see docs/EXPLAIN.md)."""

from ecgfm.cli.explain import main

if __name__ == "__main__":
    main()
