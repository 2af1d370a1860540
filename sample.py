"""`python sample.py` in a clone: the `ddpm-sample` command (ddpm/sample_cli.py); --help says the rest."""

from ddpm.sample_cli import main

if __name__ == "__main__":
    main()
