"""Console scripts: one command per job, found after ``pip install`` from any directory.

========================  ==========================  =====================================
command                   root-script equivalent      config (inside the package)
========================  ==========================  =====================================
``ecgfm-train``           ``python train.py``         ``ecgfm/conf/train.yaml``
``ecgfm-prepare``         ``python prepare.py``       ``ecgfm/conf/prepare.yaml``
``ecgfm-probe``           ``python probe.py``         ``ecgfm/conf/probe.yaml``
``ecgfm-finetune``        ``python finetune.py``      ``ecgfm/conf/finetune.yaml``
``ecgfm-explain``         ``python explain.py``       ``ecgfm/conf/explain.yaml``
========================  ==========================  =====================================

Each takes Hydra overrides (``ecgfm-train +experiment=mae trainer.max_steps=5``). The configs are found through
Hydra's package search path (``pkg://ecgfm.conf``), so a wheel install needs no checkout. Relative paths in the
configs are relative to the directory the command runs from.
"""
