"""What the serve tests share besides the server: the API key it requires, its context, a request
helper and a tokenizer stand-in that records what it is asked to encode. (The server itself is in the
`serve_fixtures` plugin; plain helpers live here so test modules can import them.)"""

import json
import urllib.error
import urllib.request

KEY = "test-key-0123"
CONTEXT = 4096          # the tiny model's max_position_embeddings


def call(server, path, body=None, raw=None, timeout=60, key=KEY):
    """(status, text, headers) of a request to `server.url + path`: `body` as JSON, or `raw` bytes;
    a GET when neither. `timeout` bounds each socket operation: a server that never answers fails the
    test instead of hanging it."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8"), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8"), e.headers


class CountingTokenizer:
    """Stands in for the served tokenizer and records the length of every text it is asked to encode:
    how a test sees that a refused prompt cost no tokenizing (and a bounded one, bounded work)."""

    def __init__(self, tokenizer, calls: list):
        self._tokenizer, self._calls = tokenizer, calls

    def __call__(self, text, *args, **kwargs):
        self._calls.append(len(text))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

