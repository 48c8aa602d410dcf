"""`python -m rg_lightning fit --config ...` is the same as `lightning fit --config ...`."""

from rg_lightning.cli import main

if __name__ == "__main__":
    main()
