"""Convert ECG record sources into a corpus cache: kept for old commands; same as ``python prepare.py`` and
``ecgfm-prepare`` (see ecgfm/conf/prepare.yaml and ecgfm.data.cache).

    python scripts/prepare.py sources=[ptbxl,cinc2017] out=cache/pretrain spec.fs=100 workers=2
"""

from ecgfm.cli.prepare import main

if __name__ == "__main__":
    main()
