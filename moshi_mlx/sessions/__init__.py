"""Sessions: streaming generation on shared, loaded models. Each session owns its state
(token rings, KV caches, codec state); the models hold only weights."""
