"""`python -m workbench`: the same front door as the `workbench` command."""

from workbench.cli import main

if __name__ == "__main__":
    main()
