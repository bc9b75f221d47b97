"""Convert ECG record sources into a corpus cache: kept for older commands; the same as ``python prepare.py`` and
``ecgfm-prepare`` (see :mod:`ecgfm.cli.prepare` and ecgfm/conf/prepare.yaml).

    python scripts/prepare.py sources=[ptbxl,cinc2017] out=cache/pretrain spec.fs=100 workers=2
"""

from ecgfm.cli.prepare import main

if __name__ == "__main__":
    main()
