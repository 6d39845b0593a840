"""`python -m vlmforge` runs the command line."""

from vlmforge.cli import main

if __name__ == "__main__":
    main()
