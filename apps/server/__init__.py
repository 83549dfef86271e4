"""`moshi-mlx serve`: the aiohttp app (routes, Origin checks, health), the websocket handlers,
and the model worker that runs every session's frames on the thread that loaded the model."""
