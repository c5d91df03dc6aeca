import sys

from .cli import main

# spawned tensor-parallel ranks import the parent's main module again (as __mp_main__): only the
# process started as `python -m flashdecode` runs the command
if __name__ == "__main__":
    sys.exit(main())
