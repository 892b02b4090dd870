"""``python -m diffloss_fast``: the same command line as ``diffloss-fast``."""
from .cli import main

if __name__ == "__main__":
    main()
