"""`python -m ddpm`: the `ddpm` command (ddpm/cli.py); `python -m ddpm --help` lists its commands."""

from ddpm.cli import main

if __name__ == "__main__":
    main()
