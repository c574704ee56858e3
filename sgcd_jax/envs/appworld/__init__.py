"""AppWorld adapter: a pool of `appworld serve environment` subprocesses in their own venv."""

from sgcd_jax.envs.appworld.env import AppWorldEnv, AppWorldFactory, data_root
from sgcd_jax.envs.appworld.server import AppWorldServer, AppWorldServerError, ServerPool

__all__ = ["AppWorldEnv", "AppWorldFactory", "AppWorldServer", "AppWorldServerError", "ServerPool",
           "data_root"]
