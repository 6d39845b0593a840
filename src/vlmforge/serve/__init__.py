"""`vlmforge serve`: an OpenAI-compatible chat-completions server on the engine.

`protocol` (limits, errors, request parsing), `images` (data URLs and the remote-image guard),
`app` (the routes), `launch` (socket, uvicorn, graceful shutdown).

`POST /v1/chat/completions` takes OpenAI's request (messages whose content is a string or a list
of `text` / `image_url` parts, images as `data:image/...;base64,` URLs), answers in OpenAI's
response shape, or with `stream: true` as server-sent `chat.completion.chunk` events ending in
`data: [DONE]` (with `stream_options.include_usage`, a last chunk carries the usage).
`GET /v1/models` and `GET /health` complete what clients (the `openai` package, lmms-eval,
LangChain) ask of a server.

Safe by default: it binds 127.0.0.1; `--api-key` requires `Authorization: Bearer KEY`;
`http(s)://` image URLs are refused unless `--allow-remote-images`, and then fetched only from
public addresses (the address checked is the one connected to; redirects are not followed);
`file://` is always refused. Every refusal is an OpenAI error object with its HTTP status:
400 (malformed JSON, missing or wrong fields, bad base64, not an image, too many pixels, too many
images, prompt too long), 401 (key), 404 (unknown model or path), 413 (body or image bytes too
large), 503 (queue full or shutting down). On shutdown the server stops taking requests, lets
the running ones finish for `--drain-seconds`, then ends the rest (finish_reason "abort").
"""
