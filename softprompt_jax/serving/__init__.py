"""The HTTP server (`softprompt-jax serve`): a prompt bank, a cross-task dynamic batcher, the
model runner with its compiled shapes, request checking, metrics, and the aiohttp routes."""
