"""``python -m h5dask``: the ``h5dask`` command line."""

from h5dask.cli import main

raise SystemExit(main())
