"""The managed OpenAI HTTP gateway: smg (PyPI `smg`, the Shepherd Model Gateway) run, watched and fronted.

The one place in moelink that knows smg: `supervisor.py` starts, restarts and stops it, `managed.py` wires it
for a bound `moelink serve --http-port` (the worker address, the front and the routes answered beside the engine), `health.py` mirrors its state into gRPC health and metrics, `admin.py` guards its control plane,
`output.py` reads its last words, `http_front.py` (with `openai_fields.py`, `tool_calls.py`, `hangups.py`,
`vllm_routes.py`, `http_metrics.py`) is the HTTP front before it, `front_cli.py` is `moelink http-front` and the
commands for an smg started by hand, `options.py` holds what the rest of the server asks of it (`GatewayOptions`,
the vLLM flags it reads) and writes smg's command line from it, `parsers.py` and `chat_template.py` check its flags before
the weights load.
`quirks.py` names each behaviour of a given smg release that moelink works around, with the versions it was
seen in; tests/server/test_gateway_quirks.py fails when the installed smg leaves a quirk's range.
"""
