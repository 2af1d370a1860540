"""`python train.py` in a clone: the `ddpm-train` command (ddpm/train.py); --help says the rest."""

from ddpm.train import main

if __name__ == "__main__":
    main()
