"""``python -m openmythos.demo``: the same as ``mythos demo``."""

from . import main

if __name__ == "__main__":  # a spawned training process (--jobs 2) imports this module too
    raise SystemExit(main())
