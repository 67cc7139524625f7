"""The Textual workbench (`workbench` or `workbench tui`).

`app.py` opens the catalog and routes between screens (F2–F7, F1 help); each screen lives in its own
module with its .tcss. Blocking work runs in thread workers that use their own DuckDB cursor and post
messages (`messages.py`); widgets are only touched on the UI thread. Catalog reads and edits the screens
need live in plain modules (`queries.py`, `steps.py`; caption edits in `pipelines/caption_edits.py`, which the CLI shares) that do not import Textual.
"""
