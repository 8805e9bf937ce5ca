"""``python -m openmythos.demo``: the same as ``mythos demo``."""

from . import main

raise SystemExit(main())
