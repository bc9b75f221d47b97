"""Fine-tuning and supervised baselines; saves classifier artifacts (same as ``ecgfm-finetune``)."""

from ecgfm.cli.finetune import main

if __name__ == "__main__":
    main()
