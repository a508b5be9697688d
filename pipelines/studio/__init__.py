"""``python -m pipelines.studio ROOT``: a local web page over runs and candidate sets.

files.py (the one path gate, the walk, thumbnails), journal.py (marks as events),
pairs.py (export), runs.py and labels.py (routers), app.py (the application),
cli.py (server and ``export`` command); static/ holds the pages.
"""
__all__ = ["create_app", "main"]


def __getattr__(name):  # fastapi is an extra: import it only when the studio is used
    if name == "create_app":
        from pipelines.studio.app import create_app

        return create_app
    if name == "main":
        from pipelines.studio.cli import main

        return main
    raise AttributeError(name)
