"""gunicorn configuration read from the est_app YAML named by $EST_CONFIG.

    EST_CONFIG=/etc/est/config.yaml gunicorn -c deploy/gunicorn.conf.py wsgi:app
"""

import os

from est_app.config import load_config
from est_app.server import gunicorn_options

globals().update(gunicorn_options(load_config(os.environ["EST_CONFIG"])))
