"""Convert record sources into a corpus cache (same as ``ecgfm-prepare``; see ecgfm/conf/prepare.yaml)."""

from ecgfm.cli.prepare import main

if __name__ == "__main__":
    main()
