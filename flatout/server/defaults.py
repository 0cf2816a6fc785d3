"""Defaults of `flatout serve`'s own limits that the command line shows in its help: plain
constants, so that building the parser imports none of the server's libraries."""

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # `--max-request-body-bytes`
FD_RESERVE = 128  # `--limit-concurrency`: file descriptors kept for pipes, checkpoints, logs
DEFAULT_MAX_STREAM_BACKLOG = 8 * 1024 * 1024  # `--max-stream-backlog-bytes`
DEFAULT_MEDIA_FETCH_TIMEOUT = 10.0  # `--media-fetch-timeout`: seconds for a whole image fetch
DEFAULT_MAX_MEDIA_FETCH_BYTES = 20 * 1024 * 1024  # `--max-media-fetch-bytes`
