"""WSGI entry point for gunicorn: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app`` (config from $EST_CONFIG)."""

from est_app import create_app

app = create_app()
