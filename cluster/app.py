"""The Serve import path of releases before `cluster/` had layers, `cluster.app:build`: Serve configs and
RayServices that still name it deploy the same application, with a warning naming the new path."""

from __future__ import annotations

import logging
from typing import Any

from cluster.deploy import app
from cluster.deploy.names import IMPORT_PATH


def build(args: dict[str, Any]):
    logging.getLogger(__name__).warning("import_path cluster.app:build is deprecated; use %s", IMPORT_PATH)
    return app.build(args)
