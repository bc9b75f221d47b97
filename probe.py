"""Linear / MLP probes on frozen encoder features (same as ``ecgfm-probe``; see docs/BENCHMARK.md)."""

from ecgfm.cli.probe import main

if __name__ == "__main__":
    main()
