"""Built-in configs; each file defines get_config(). Pass a path or a bare name (`--config=tiny`)."""
