"""HTTP routes for the pack's web extension: GET /opensora/size_rules (also under /api/...).

The answer is keyed by Empty Latent Video's version choices: "1.2", "1.3", "2.0" and "2.0 DC-AE".

The page evaluates these rules instead of copying any constant, so Python's `sizes` stays the one
source of truth. Importing this module is harmless without a running ComfyUI server (tests, scripts):
nothing registers until `PromptServer.instance` exists.
"""

from __future__ import annotations

import functools

from ..opensora_lib import sizes
from ..opensora_lib.size_rules import size_rules

SIZE_RULES_PATH = "/opensora/size_rules"


@functools.lru_cache(maxsize=1)
def all_size_rules() -> dict:
    """{choice: rules} for every version choice of Empty Latent Video ("1.3", ..., "2.0 DC-AE"); static data,
    computed once. The page looks the node's version widget up here, so each choice has its own rule set."""
    return {choice: size_rules(version, autoencoder) for choice, (version, autoencoder) in sizes.LATENT_CHOICES.items()}


async def size_rules_handler(request):
    from aiohttp import web

    try:
        rules = all_size_rules()
    except ValueError as error:  # a broken rule table must say so, not serve half an answer
        return web.json_response({"error": f"Open-Sora size rules are unavailable: {error}"}, status=500)
    return web.json_response(rules, headers={"Cache-Control": "no-cache"})


def register(routes=None) -> bool:
    """Add the routes to `routes` (default: the running PromptServer's table). False when there is no server."""
    if routes is None:
        try:
            from server import PromptServer
        except ImportError:
            return False
        instance = getattr(PromptServer, "instance", None)
        if instance is None:
            return False
        routes = instance.routes
    # Registering twice would make aiohttp refuse the duplicate GET when the app starts.
    if any(getattr(route, "path", None) == SIZE_RULES_PATH for route in routes):
        return True
    routes.get(SIZE_RULES_PATH)(size_rules_handler)
    return True


REGISTERED = register()
