"""Every flag of `vllm serve --help` (vLLM 0.33.0), and the flags of earlier releases that scripts still carry: what
each one does on `moelink serve`. The one place this is written down: engine/api/vllm_flags.py registers the
accepted and mapped flags with these help texts and refuses the others with these reasons, docs/vllm-compat.md's
tables are rendered from here (`markdown_table`), and tests/engine/test_vllm_flag_table.py walks every row and
checks that the docs print them.

Each row is keyed by the flag's spellings as vLLM's parser spells them (a long flag, its negation, its short
alias), and is one of

* accepted: moelink takes the flag with vLLM's meaning (`values`: only those values; any other is refused);
  `http_gateway`: the managed OpenAI HTTP gateway reads it, and the gateway package registers it on `moelink serve`
  and translates it for the gateway (engine/server/gateway/options.py, GATEWAY_FLAGS: a floor above this one, so
  this table only marks the rows; tests/server/test_gateway_options.py keeps the two equal);
* mapped: the flag is vLLM's spelling of a moelink flag: `example` parses as `same_as` does;
* refused: the parse stops with one line naming the flag and saying what to use instead.
"""
from __future__ import annotations

from dataclasses import dataclass

VLLM_RELEASE = "0.33.0"  # the `vllm serve --help` VLLM_SERVE_FLAGS covers, flag for flag


@dataclass(frozen=True)
class VllmFlag:
    kind: str  # "accepted", "mapped" or "refused"
    says: str  # accepted / mapped: what it does in moelink (its help text); refused: what to use instead
    example: str = ""  # how a script writes it (default: the first spelling alone)
    same_as: str = ""  # mapped: moelink's own spelling, which parses the same
    values: tuple[str, ...] = ()  # accepted with these values only
    http_gateway: bool = False  # accepted: the OpenAI HTTP gateway reads it (engine/server/gateway/options.py)


def accepted(says: str, example: str = "", values: tuple[str, ...] = ()) -> VllmFlag:
    return VllmFlag("accepted", says, example, "", values)


def to_gateway(says: str, example: str = "") -> VllmFlag:
    """Accepted, and read by the OpenAI HTTP gateway (which registers it: engine/server/gateway/options.py)."""
    return VllmFlag("accepted", says, example, http_gateway=True)


def mapped(same_as: str, says: str, example: str = "") -> VllmFlag:
    return VllmFlag("mapped", says, example, same_as)


def refused(says: str) -> VllmFlag:
    return VllmFlag("refused", says)


# Reasons shared by several flags.
RAY = "moelink places its ranks with Ray (in-process at one rank): --ray-address joins a cluster"
LORA = "not built for LoRA yet (docs/lora.md#limits): leave it out"
TEXT = "moelink serves text-only models: leave it out"
KERNELS = "moelink runs its own kernels (Triton, picked per device; docs/kernels.md): leave it out"
SLEEP = "sleep mode is not supported: stop the server to free the device"
STATE = "moelink sizes and runs the linear-attention state itself (docs/models.md): leave it out"
NO_CP = ("moelink runs no context parallelism: split a model with --tensor-parallel-size and "
         "--data-parallel-size N --enable-expert-parallel")
WEIGHTS_ON_DEVICE = ("moelink keeps every weight on the device: add ranks with --data-parallel-size N "
                     "--enable-expert-parallel")
GATEWAY = "the OpenAI API is served by the managed HTTP gateway, which has no such setting: leave it out"
ROUTER = ("one server balances over its own ranks: put a router in front of several servers (the OpenAI HTTP "
          "gateway started by hand routes over several: docs/serving.md)")
NO_TLS = "TLS is on the gRPC port (--tls-cert, --tls-key): put a TLS proxy in front of --http-port"
NO_CORS = "no CORS: put a proxy in front of --http-port"
METRICS = "not supported: moelink's metrics are on /metrics (docs/metrics.md)"
LOGGING = "moelink logs at INFO to stderr: --log-format text|json; leave it out"
SCHEDULER = "moelink's scheduler has no such setting (chunks are bounded by --max-num-batched-tokens): leave it out"
CONFIG_JSON = "moelink reads the model's config.json as published: edit it in a copy of the checkpoint"
LOADER = "moelink reads each rank's weights from the checkpoint's safetensors itself: leave it out"
NOT_SUPPORTED = "not supported: leave it out"

VLLM_SERVE_FLAGS: dict[tuple[str, ...], VllmFlag] = {
    # -- the server (vLLM's FrontendArgs and serve's own) ----------------------------------------------------
    ("--headless",): refused("moelink places its ranks with Ray: start the other nodes with `ray start --address ...`"),
    ("--api-server-count", "-asc"): refused("one front per server: start more servers (or more ranks)"),
    ("--config",): refused("write the flags on the command line (moelink reads no YAML config)"),
    ("--grpc",): mapped("--no-http", "serve gRPC only (moelink.v1 and vllm.grpc.engine.VllmEngine on --port), no "
                                     "HTTP gateway"),
    ("--lora-modules",): accepted("LoRA adapters served by name from the start (needs --enable-lora): name=path or "
                                  "vLLM's JSON {\"name\", \"path\", \"base_model_name\"}; a request's model names "
                                  "one (docs/lora.md)", "--enable-lora --lora-modules sql=/adapters/sql"),
    ("--chat-template",): to_gateway("a Jinja chat template file the managed gateway renders chats with",
                                     "--chat-template t.jinja"),
    ("--chat-template-content-format",): refused(GATEWAY),
    ("--trust-request-chat-template", "--no-trust-request-chat-template"): refused(
        "the chat template is --chat-template or the checkpoint's: leave it out"),
    ("--trust-request-mm-kwargs", "--no-trust-request-mm-kwargs"): refused(TEXT),
    ("--default-chat-template-kwargs",): refused(GATEWAY),
    ("--reasoning-effort-map",): refused(GATEWAY),
    ("--response-role",): refused("the assistant role is the chat template's: leave it out"),
    ("--return-tokens-as-token-ids", "--no-return-tokens-as-token-ids"): accepted(
        "with logprobs: each token of /v1/completions' and chat's logprobs named `token_id:N` (a request's "
        "return_tokens_as_token_ids wins), the text unchanged, as vLLM", "--return-tokens-as-token-ids"),
    ("--enable-auto-tool-choice",): to_gateway("with --tool-call-parser: the gateway parses tool calls whenever a "
                                               "parser is set", "--enable-auto-tool-choice --tool-call-parser qwen"),
    ("--disable-auto-tool-choice",): to_gateway("accepted (vLLM's default): no tool-call parsing unless "
                                                "--enable-auto-tool-choice"),
    ("--exclude-tools-when-tool-choice-none", "--no-exclude-tools-when-tool-choice-none"): refused(GATEWAY),
    ("--tool-call-parser",): to_gateway("the managed gateway's tool-call parser (vLLM's names translated to the "
                                        "gateway's)", "--tool-call-parser hermes"),
    ("--tool-parser-plugin",): refused("the gateway's built-in parsers only: --tool-call-parser NAME"),
    ("--tool-strict-level",): refused(GATEWAY),
    ("--tool-server",): refused("no built-in tools: leave it out"),
    ("--max-log-len",): accepted("with --enable-log-outputs: the most characters of an output logged (moelink's "
                                 "request lines carry no prompt text)", "--max-log-len 100"),
    ("--enable-prompt-tokens-details",): accepted("accepted: usage.prompt_tokens_details.cached_tokens is always "
                                                  "reported"),
    ("--disable-prompt-tokens-details",): refused("usage.prompt_tokens_details.cached_tokens is always reported"),
    ("--enable-per-request-metrics", "--disable-per-request-metrics"): refused(METRICS),
    ("--enable-server-load-tracking", "--disable-server-load-tracking"): refused(METRICS),
    ("--enable-force-include-usage", "--disable-force-include-usage"): refused(
        "a response carries usage, and a stream does when it asks with stream_options.include_usage: set it per "
        "request"),
    ("--sse-keep-alive-interval",): refused(GATEWAY),
    ("--enable-tokenizer-info-endpoint", "--disable-tokenizer-info-endpoint"): refused(NOT_SUPPORTED),
    ("--enable-log-outputs", "--disable-log-outputs"): accepted(
        "each 'request finished' line carries the output text (`output`, at most --max-log-len characters), as "
        "vLLM logs it with --enable-log-requests (moelink's default; refused with --disable-log-requests)",
        "--enable-log-outputs"),
    ("--enable-log-deltas", "--disable-log-deltas"): refused(
        "moelink logs an output once, when its request finishes (--enable-log-outputs), never per streamed delta: "
        "leave it out"),
    ("--cohere-is-reasoning-model", "--no-cohere-is-reasoning-model"): refused("the OpenAI API only: leave it out"),
    ("--cohere-format",): refused("the OpenAI API only: leave it out"),
    ("--anthropic-disabled-thinking-effort",): refused("the OpenAI API only: leave it out"),
    ("--log-error-stack", "--no-log-error-stack"): refused(
        "a failure's traceback is logged already (bounded, with the request id)"),
    ("--tokens-only", "--no-tokens-only"): refused("serve token ids over gRPC: --no-http"),
    ("--enable-scale-out", "--disable-scale-out"): refused(NOT_SUPPORTED),
    ("--fingerprint-mode",): refused(GATEWAY),
    ("--fingerprint-value",): refused(GATEWAY),
    ("--host",): accepted("the gRPC port's address (--http-host is the OpenAI API's)", "--host 0.0.0.0"),
    ("--port",): accepted("moelink's gRPC port; vLLM's HTTP port is --http-port (default 8000)", "--port 9000"),
    ("--grpc-port",): refused("moelink's gRPC is on --port (the OpenAI API on --http-port)"),
    ("--data-parallel-supervisor-port",): refused(RAY),
    ("--dp-supervisor-probe-interval-s",): refused(RAY),
    ("--dp-supervisor-probe-timeout-s",): refused(RAY),
    ("--dp-supervisor-probe-failure-threshold",): refused(RAY),
    ("--uds",): refused("moelink listens on TCP: --host / --http-host"),
    ("--uvicorn-log-level",): accepted("the level of the OpenAI HTTP front's log lines (moelink serves HTTP without "
                                       "uvicorn; its front logs what uvicorn would: failures, the gateway's restarts)",
                                       "--uvicorn-log-level warning",
                                       ("critical", "error", "warning", "info", "debug", "trace")),
    ("--disable-uvicorn-access-log",): accepted("accepted, nothing to do: moelink's HTTP front writes no access lines"),
    ("--enable-uvicorn-access-log",): refused("moelink's HTTP front writes no access lines: leave it out"),
    ("--disable-access-log-for-endpoints",): refused(
        "no uvicorn: the managed HTTP gateway serves HTTP and logs no access lines; leave it out"),
    ("--allow-credentials", "--no-allow-credentials"): refused(NO_CORS),
    ("--allowed-origins",): refused(NO_CORS),
    ("--allowed-methods",): refused(NO_CORS),
    ("--allowed-headers",): refused(NO_CORS),
    ("--api-key",): accepted("one key, the same on gRPC and the OpenAI API", "--api-key k"),
    ("--ssl-keyfile",): refused(NO_TLS),
    ("--ssl-certfile",): refused(NO_TLS),
    ("--ssl-ca-certs",): refused(NO_TLS),
    ("--enable-ssl-refresh", "--disable-ssl-refresh"): refused(NO_TLS),
    ("--ssl-cert-reqs",): refused(NO_TLS),
    ("--ssl-ciphers",): refused(NO_TLS),
    ("--root-path",): refused("not supported: put a proxy in front of --http-port"),
    ("--middleware",): refused("not supported: put a proxy in front of --http-port"),
    ("--enable-request-id-headers", "--disable-request-id-headers"): refused(GATEWAY),
    ("--disable-fastapi-docs", "--enable-fastapi-docs"): refused("no FastAPI: " + GATEWAY),
    ("--h11-max-incomplete-event-size",): refused(
        "no h11: the gateway and moelink's HTTP front bound requests themselves; leave it out"),
    ("--h11-max-header-count",): refused(
        "no h11: the gateway and moelink's HTTP front bound requests themselves; leave it out"),
    ("--enable-offline-docs", "--disable-offline-docs"): refused("no FastAPI: " + GATEWAY),
    ("--enable-flash-late-interaction", "--disable-flash-late-interaction"): refused(
        "moelink serves generative models only: leave it out"),
    # -- the model -----------------------------------------------------------------------------------------
    ("--model",): refused("give the model as the first argument: moelink serve MODEL"),
    ("--runner",): accepted("moelink runs generative models", "--runner generate", values=("auto", "generate")),
    ("--convert",): accepted("moelink runs the model as published", "--convert none", values=("auto", "none")),
    ("--tokenizer",): accepted("accepted when it names the model itself (the tokenizer is read from the "
                               "checkpoint)", "--tokenizer MODEL"),
    ("--tokenizer-mode",): accepted("moelink reads tokenizer.json (or a tiktoken file) with `tokenizers`",
                                    "--tokenizer-mode hf", values=("auto", "hf")),
    ("--trust-remote-code", "--no-trust-remote-code"): accepted(
        "accepted: moelink never runs code from a checkpoint (configs and tokenizers are read as data)"),
    ("--dtype",): accepted("the model's dtype (auto, bfloat16, float16 / half, float32 / float)", "--dtype half"),
    ("--seed",): accepted("reproducible sampling: a request without a seed samples with one from this seed and its "
                          "arrival number", "--seed 7"),
    ("--hf-config-path",): refused(CONFIG_JSON),
    ("--allowed-local-media-path",): refused(TEXT),
    ("--allowed-media-domains",): refused(TEXT),
    ("--revision",): accepted("for a repo id: the revision", "--revision main"),
    ("--code-revision",): refused("moelink runs no code from a checkpoint: leave it out"),
    ("--tokenizer-revision",): refused("the tokenizer is read from the checkpoint at --revision"),
    ("--max-model-len",): accepted("longest sequence (prompt + output), k/m/g/K/M/G as vLLM reads them; auto / -1 "
                                   "refused (moelink's default is the model's max_position_embeddings)",
                                   "--max-model-len 32K"),
    ("--quantization", "-q"): accepted("fp8: block-quantize a float checkpoint at load (a quantized checkpoint's "
                                       "method is read from its config.json)", "--quantization fp8"),
    ("--quantization-config",): refused("moelink reads a checkpoint's quantization_config from its config.json "
                                        "(or --quantization fp8 at load)"),
    ("--allow-deprecated-quantization", "--no-allow-deprecated-quantization"): refused(
        "moelink runs the quantization methods docs/quantization.md lists: leave it out"),
    ("--enforce-eager", "--no-enforce-eager"): accepted("no CUDA graphs (--no-enforce-eager: the default, decode "
                                                        "steps replay captured graphs)"),
    ("--enable-return-routed-experts", "--disable-return-routed-experts"): accepted(
        "record each token's routed experts, returned to a request that asks return_routed_experts (the Python API, "
        "and the native gRPC moelink.v1 GenerateResponse.routed_experts; docs/rl.md)"),
    ("--return-sampling-mask", "--no-return-sampling-mask"): refused(NOT_SUPPORTED),
    ("--max-logprobs",): accepted("at most N top logprobs per token (at most 20)", "--max-logprobs 5"),
    ("--logprobs-mode",): accepted("moelink's logprobs are the model's, before temperature, top-k and top-p "
                                   "(vLLM's raw_logprobs)", "--logprobs-mode raw_logprobs",
                                   values=("raw_logprobs",)),
    ("--use-fp64-gumbel", "--no-use-fp64-gumbel"): refused(NOT_SUPPORTED),
    ("--enable-trace-replay", "--disable-trace-replay"): refused(NOT_SUPPORTED),
    ("--disable-sliding-window", "--enable-sliding-window"): refused(
        "moelink runs a model's sliding window as its config.json says: leave it out"),
    ("--disable-cascade-attn", "--enable-cascade-attn"): accepted(
        "accepted: it does nothing in vLLM 0.33 either (deprecated; cascade attention was removed)"),
    ("--skip-tokenizer-init", "--no-skip-tokenizer-init"): refused(
        "not supported: the gRPC services take token-id prompts; leave it out"),
    ("--enable-prompt-embeds", "--disable-prompt-embeds"): refused(NOT_SUPPORTED),
    ("--served-model-name",): accepted("the names clients may send, the first reported (default: the model argument "
                                       "as given)", "--served-model-name tiny moe"),
    ("--config-format",): accepted("moelink reads config.json (Hugging Face's format)", "--config-format hf",
                                   values=("auto", "hf")),
    ("--hf-token",): refused("set HF_TOKEN in the environment or log in with `hf auth login` (huggingface_hub "
                             "reads either)"),
    ("--hf-overrides",): refused(CONFIG_JSON),
    ("--model-class-overrides",): refused("moelink builds its own model for each architecture it runs"),
    ("--pooler-config",): refused("moelink serves generative models only: leave it out"),
    ("--generation-config",): accepted("auto (the checkpoint's generation_config.json: its EOS ids and the sampling "
                                       "defaults of the fields a request leaves out) or vllm; not a folder",
                                       "--generation-config auto"),
    ("--override-generation-config",): refused(
        "moelink's sampling defaults are the checkpoint's generation_config.json (--generation-config auto) or "
        "SamplingParams' own (vllm): pass other values per request"),
    ("--enable-sleep-mode", "--disable-sleep-mode"): refused(SLEEP),
    ("--sleep-mode-backend",): refused(SLEEP),
    ("--sleep-mode-offload-cudagraph", "--no-sleep-mode-offload-cudagraph"): refused(SLEEP),
    ("--sleep-preserve-parameter-names",): refused(SLEEP),
    ("--enable-cumem-allocator", "--disable-cumem-allocator"): refused(NOT_SUPPORTED),
    ("--enable-nccl-comm-suspend", "--disable-nccl-comm-suspend"): refused(SLEEP),
    ("--model-impl",): accepted("moelink runs its own implementation of each architecture it supports",
                                "--model-impl vllm", values=("auto", "vllm")),
    ("--logits-processors",): refused("no logits processor plug-ins: sampling parameters and structured outputs "
                                      "per request"),
    ("--io-processor-plugin",): refused(NOT_SUPPORTED),
    ("--renderer-num-workers",): refused("the managed gateway renders and tokenizes: leave it out"),
    ("--load-format",): accepted("auto / safetensors: the checkpoint's weights; dummy: random weights from "
                                 "config.json", "--load-format dummy"),
    ("--download-dir",): accepted("for a repo id: the Hugging Face cache", "--download-dir /tmp/hf"),
    ("--safetensors-load-strategy",): refused(LOADER),
    ("--safetensors-prefetch-num-threads",): refused(LOADER),
    ("--safetensors-prefetch-block-size",): refused(LOADER),
    ("--model-loader-extra-config",): refused(LOADER),
    ("--ignore-patterns",): refused("moelink reads the safetensors files the checkpoint's index names"),
    ("--use-tqdm-on-load", "--no-use-tqdm-on-load"): accepted("print the weights' load progress (the default) or "
                                                              "not"),
    ("--pt-load-map-location",): refused("moelink reads safetensors only: leave it out"),
    ("--attention-backend",): refused(KERNELS),
    ("--mamba-backend",): refused(STATE),
    ("--mamba-ssu-algorithm",): refused(STATE),
    ("--enable-mamba-cache-stochastic-rounding", "--disable-mamba-cache-stochastic-rounding"): refused(STATE),
    ("--mamba-cache-philox-rounds",): refused(STATE),
    ("--reasoning-parser",): to_gateway("the managed gateway's reasoning parser (vLLM's names translated to the "
                                        "gateway's)", "--reasoning-parser deepseek_r1"),
    ("--reasoning-parser-plugin",): refused("the gateway's built-in parsers only: --reasoning-parser NAME"),
    # -- parallelism -----------------------------------------------------------------------------------------
    ("--distributed-executor-backend",): accepted("where the ranks run: mp (= --executor mp, one rank in a process "
                                                  "of its own; beyond one rank, Ray's ranks), uni (= --executor "
                                                  "inprocess), ray (= --executor ray)",
                                                  "--distributed-executor-backend mp", values=("mp", "uni", "ray")),
    ("--pipeline-parallel-size", "-pp"): refused("moelink runs no pipeline parallelism: add ranks with "
                                                 "--data-parallel-size N --enable-expert-parallel (Ray beyond one "
                                                 "rank)"),
    ("--master-addr",): refused(RAY),
    ("--master-port",): refused(RAY),
    ("--nnodes", "-n"): refused(RAY),
    ("--node-rank", "-r"): refused(RAY),
    ("--distributed-timeout-seconds",): refused("moelink bounds a hung rank with --heartbeat-timeout and "
                                                "--step-timeout"),
    ("--cpu-distributed-timeout-seconds",): refused("moelink bounds a hung rank with --heartbeat-timeout and "
                                                    "--step-timeout"),
    ("--numa-bind", "--no-numa-bind"): refused("bind the process yourself (numactl): moelink sets no affinity"),
    ("--numa-bind-nodes",): refused("bind the process yourself (numactl): moelink sets no affinity"),
    ("--numa-bind-cpus",): refused("bind the process yourself (numactl): moelink sets no affinity"),
    ("--device-ids",): refused("set CUDA_VISIBLE_DEVICES (Ray places the ranks on the devices it sees)"),
    ("--tensor-parallel-size", "-tp"): accepted("ranks per tensor-parallel group (docs/tensor-parallelism.md)",
                                                "--tensor-parallel-size 2"),
    ("--decode-context-parallel-size", "-dcp"): refused(NO_CP),
    ("--dcp-comm-backend",): refused(NO_CP),
    ("--dcp-q-replicate", "--no-dcp-q-replicate"): refused(NO_CP),
    ("--dcp-kv-cache-interleave-size",): refused(NO_CP),
    ("--cp-kv-cache-interleave-size",): refused(NO_CP),
    ("--prefill-context-parallel-size", "-pcp"): refused(NO_CP),
    ("--data-parallel-size", "-dp"): mapped(
        "--expert-parallel-size 2", "with --enable-expert-parallel: N ranks, attention data-parallel and the "
                                    "experts sharded over them (alone, N > 1 is refused: moelink's ranks always "
                                    "shard the experts)", "--data-parallel-size 2 --enable-expert-parallel"),
    ("--data-parallel-rank", "-dpn"): refused(RAY),
    ("--data-parallel-start-rank", "-dpr"): refused(RAY),
    ("--data-parallel-size-local", "-dpl"): refused(RAY),
    ("--data-parallel-address", "-dpa"): refused(RAY),
    ("--data-parallel-rpc-port", "-dpp"): refused(RAY),
    ("--data-parallel-backend", "-dpb"): refused(RAY),
    ("--data-parallel-hybrid-lb", "--no-data-parallel-hybrid-lb", "-dph"): refused(ROUTER),
    ("--data-parallel-external-lb", "--no-data-parallel-external-lb", "-dpe"): refused(ROUTER),
    ("--data-parallel-multi-port-external-lb", "-dpm"): refused(ROUTER),
    ("--enable-hc-sp", "--disable-hc-sp"): refused(NOT_SUPPORTED),
    ("--enable-expert-parallel",): accepted("shard the experts over the --data-parallel-size ranks (always so in "
                                            "moelink; at one rank nothing changes)"),
    ("-ep",): mapped("--expert-parallel-size 2", "bare, vLLM's --enable-expert-parallel; with a number, moelink's "
                                                 "--expert-parallel-size N", "-dp 2 -ep"),
    ("--disable-expert-parallel",): accepted("accepted (vLLM's default) where it changes nothing: one rank, or "
                                             "tensor parallelism alone; -dp N > 1 without expert parallelism is "
                                             "refused"),
    ("--enable-batch-sharded-sampling", "--disable-batch-sharded-sampling"): refused(NOT_SUPPORTED),
    ("--enable-ep-weight-filter",): accepted("accepted: each rank reads only its own experts from the checkpoint "
                                             "(always so)"),
    ("--disable-ep-weight-filter",): refused("each moelink rank reads only its own experts: leave it out"),
    ("--all2all-backend",): refused("moelink's all-to-all backends are --all-to-all auto|none|torch|torch_padded|"
                                    "nccl|two_level (auto picks by world size; docs/expert-parallelism.md)"),
    ("--enable-dbo",): mapped("--enable-two-batch-overlap", "moelink's --enable-two-batch-overlap: two micro-batches "
                                                            "per step, each one's attention and experts overlapping "
                                                            "the other's all-to-all"),
    ("--disable-dbo",): accepted("accepted (the default): one batch per step"),
    ("--enable-shm-tensor-arena", "--disable-shm-tensor-arena"): refused(TEXT),
    ("--ubatch-size",): refused("--enable-dbo (= --enable-two-batch-overlap) runs two micro-batches: leave it out"),
    ("--enable-elastic-ep", "--disable-elastic-ep"): refused(
        "vLLM's elastic EP scales on request; moelink's --elastic-ep (default on) survives a lost rank and "
        "--ep-rejoin replaces it"),
    ("--elastic-ep-max-dp-size",): refused("moelink's --elastic-ep survives a lost rank; it does not scale up"),
    ("--dbo-decode-token-threshold",): refused("moelink splits every step in two under --enable-dbo: leave it out"),
    ("--dp-sync-interval",): refused("moelink's ranks step together every step: leave it out"),
    ("--dbo-prefill-token-threshold",): refused("moelink splits every step in two under --enable-dbo: leave it out"),
    ("--disable-nccl-for-dp-synchronization", "--enable-nccl-for-dp-synchronization"): refused(
        "moelink's ranks step together every step: leave it out"),
    ("--enable-eplb",): mapped("--eplb-interval 3000", "online expert load balancing every 3000 steps, vLLM's "
                                                       "step_interval (moelink's --eplb-interval; --eplb-config sets "
                                                       "it), on the whole interval's load"),
    ("--disable-eplb",): accepted("accepted (the default): no online expert load balancing"),
    ("--eplb-config",): mapped(
        "--eplb-interval 500 --num-redundant-experts 2", "with --enable-eplb: step_interval is --eplb-interval, "
                                                         "num_redundant_experts --num-redundant-experts; "
                                                         "window_size must equal step_interval (moelink balances "
                                                         "on the whole interval's load), policy default; other "
                                                         "keys refused",
        "--enable-eplb --eplb-config '{\"step_interval\": 500, \"num_redundant_experts\": 2}'"),
    ("--expert-placement-strategy",): accepted("moelink places the experts contiguously (linear), then "
                                               "--eplb-interval re-places them", "--expert-placement-strategy linear",
                                               values=("linear",)),
    ("--max-parallel-loading-workers",): refused(LOADER),
    ("--ray-workers-use-nsight", "--no-ray-workers-use-nsight"): refused(
        "profile with benchmarks/ (docs/benchmarks.md): leave it out"),
    ("--disable-custom-all-reduce", "--enable-custom-all-reduce"): refused(KERNELS),
    ("--worker-cls",): refused(NOT_SUPPORTED),
    ("--worker-extension-cls",): refused(NOT_SUPPORTED),
    ("--enable-fault-tolerance", "--disable-fault-tolerance"): refused(
        "moelink survives a lost rank with --elastic-ep (default on) and replaces it with --ep-rejoin"),
    ("--fault-tolerance-config",): refused(
        "moelink survives a lost rank with --elastic-ep (default on) and replaces it with --ep-rejoin"),
    # -- the KV cache ----------------------------------------------------------------------------------------
    ("--block-size",): accepted("KV block size in tokens", "--block-size 32"),
    ("--gpu-memory-utilization", "--device-memory-utilization"): accepted(
        "fraction of each GPU the engine may fill; the KV cache takes what is left", "--gpu-memory-utilization 0.8"),
    ("--kv-cache-memory-bytes",): accepted("the KV cache's bytes per rank (k/m/g/K/M/G as vLLM reads them)",
                                           "--kv-cache-memory-bytes 4G"),
    ("--kv-cache-dtype",): accepted("fp8 (= fp8_e4m3): e4m3 with a per-layer scale; fp8_e5m2 refused",
                                    "--kv-cache-dtype fp8"),
    ("--num-gpu-blocks-override",): mapped("--num-kv-blocks 512", "the KV cache's blocks per rank",
                                           "--num-gpu-blocks-override 512"),
    ("--enable-prefix-caching",): accepted("on by default"),
    ("--disable-prefix-caching",): mapped("--no-enable-prefix-caching", "prefix caching off"),
    ("--prefix-caching-hash-algo",): accepted("moelink chains sha256 over each block's token ids",
                                              "--prefix-caching-hash-algo sha256", values=("sha256", "sha256_cbor")),
    ("--prefix-cache-retention-interval",): refused(STATE),
    ("--kv-cache-dtype-skip-layers",): refused("--kv-cache-dtype fp8 quantizes every layer's KV: leave it out"),
    ("--kv-sharing-fast-prefill", "--no-kv-sharing-fast-prefill"): refused(NOT_SUPPORTED),
    ("--swa-bounded-replay", "--no-swa-bounded-replay"): refused(
        "moelink keeps a sliding window's KV as its prefix cache needs: leave it out"),
    ("--mamba-cache-dtype",): refused(STATE),
    ("--mamba-ssm-cache-dtype",): refused(STATE),
    ("--mamba-block-size",): refused(STATE),
    ("--prefix-match-unit",): refused("prefix-cache hits land on --block-size boundaries"),
    ("--mamba-cache-mode",): accepted("accepted: it does nothing in vLLM 0.33 either (deprecated)",
                                      "--mamba-cache-mode align"),
    ("--enable-mamba-shared-prefix-checkpoint", "--disable-mamba-shared-prefix-checkpoint"): refused(STATE),
    ("--replayssm-buffer-len",): refused(STATE),
    ("--use-replayssm", "--no-use-replayssm"): refused(STATE),
    ("--kv-offloading-size",): mapped("--kv-offload-host-bytes 2147483648",
                                      "GiB of host memory for KV the prefix cache evicts, over the tensor-parallel "
                                      "group (moelink's --kv-offload-host-bytes is per rank: divided by -tp)",
                                      "--kv-offloading-size 2"),
    ("--kv-offloading-backend",): accepted("with --kv-offloading-size: moelink's own host tier (docs/kv-offload.md)",
                                           "--kv-offloading-backend native", values=("native",)),
    ("--offload-backend",): refused(WEIGHTS_ON_DEVICE),
    ("--cpu-offload-gb",): refused(WEIGHTS_ON_DEVICE),
    ("--cpu-offload-params",): refused(WEIGHTS_ON_DEVICE),
    ("--offload-group-size",): refused(WEIGHTS_ON_DEVICE),
    ("--offload-num-in-group",): refused(WEIGHTS_ON_DEVICE),
    ("--offload-prefetch-step",): refused(WEIGHTS_ON_DEVICE),
    ("--offload-params",): refused(WEIGHTS_ON_DEVICE),
    # -- multimodal and LoRA ---------------------------------------------------------------------------------
    ("--language-model-only",): mapped("--limit-mm-per-prompt image=0,video=0", "a multimodal checkpoint served "
                                       "as its text model: its vision tower not loaded"),
    ("--no-language-model-only",): accepted("the default: a multimodal checkpoint takes images where moelink runs "
                                            "them (docs/multimodal.md)"),
    ("--limit-mm-per-prompt",): accepted("items per prompt, per modality: image (16 by default), video (0 by "
                                         "default; Qwen3.5, the processor's outputs; docs/multimodal.md)",
                                         "--limit-mm-per-prompt image=4"),
    ("--enable-mm-embeds", "--disable-mm-embeds"): refused(TEXT),
    ("--media-io-kwargs",): refused(TEXT),
    ("--mm-processor-kwargs",): refused(TEXT),
    ("--mm-processor-cache-gb",): refused(TEXT),
    ("--mm-processor-cache-type",): refused(TEXT),
    ("--mm-hasher-algorithm",): refused(TEXT),
    ("--mm-shm-cache-max-object-size-mb",): refused(TEXT),
    ("--mm-encoder-only", "--no-mm-encoder-only"): refused(TEXT),
    ("--mm-encoder-tp-mode",): refused(TEXT),
    ("--mm-encoder-attn-backend",): refused(TEXT),
    ("--mm-encoder-attn-dtype",): refused(TEXT),
    ("--mm-encoder-fp8-scale-path",): refused(TEXT),
    ("--mm-encoder-fp8-scale-save-path",): refused(TEXT),
    ("--mm-encoder-fp8-scale-save-margin",): refused(TEXT),
    ("--interleave-mm-strings", "--no-interleave-mm-strings"): refused(TEXT),
    ("--skip-mm-profiling", "--no-skip-mm-profiling"): refused(TEXT),
    ("--video-pruning-rate",): refused(TEXT),
    ("--video-pruning-method",): refused(TEXT),
    ("--mm-tensor-ipc",): refused(TEXT),
    ("--mm-processor-device",): refused(TEXT),
    ("--mm-ipc-gpu-memory-gb",): refused(TEXT),
    ("--mm-device-do-normalize", "--no-mm-device-do-normalize"): refused(TEXT),
    ("--enable-lora", "--disable-lora"): accepted("serve LoRA adapters (--lora-modules, POST /v1/load_lora_adapter "
                                                  "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1; docs/lora.md)"),
    ("--max-loras",): accepted("with --enable-lora: adapters one step may mix, the device slots of every rank "
                               "(default 1)", "--enable-lora --max-loras 4"),
    ("--max-lora-rank",): accepted("with --enable-lora: the largest adapter rank served (default 16)",
                                   "--enable-lora --max-lora-rank 64"),
    ("--lora-dtype",): accepted("auto (vLLM's default), or the model's own --dtype: adapters run in the model's "
                                "dtype; another dtype is refused", "--enable-lora --lora-dtype auto"),
    ("--enable-tower-connector-lora", "--disable-tower-connector-lora"): refused(LORA),
    ("--max-cpu-loras",): accepted("with --enable-lora: adapters each rank keeps read in host memory, least "
                                   "recently used evicted (default --max-loras)", "--enable-lora --max-cpu-loras 8"),
    ("--fully-sharded-loras", "--no-fully-sharded-loras"): refused(LORA),
    ("--lora-target-modules",): accepted("with --enable-lora: the modules LoRA runs on, by name or suffix (vLLM's "
                                         "packed qkv_proj / gate_up_proj, experts for the routed experts); an "
                                         "adapter's other targets are skipped, as vLLM's",
                                         "--enable-lora --lora-target-modules o_proj qkv_proj"),
    ("--default-mm-loras",): refused(LORA),
    ("--specialize-active-lora", "--no-specialize-active-lora"): refused(LORA),
    ("--enable-mixed-moe-lora-format", "--disable-mixed-moe-lora-format"): refused(LORA),
    ("--enable-moe-shared-loras", "--disable-moe-shared-loras"): refused(LORA),
    ("--max-lora-cls-labels",): refused(LORA),
    # -- logging, metrics, tracing ---------------------------------------------------------------------------
    ("--logging-config",): refused(LOGGING),
    ("--log-level",): refused(LOGGING),
    ("--log-config-file",): refused(LOGGING),
    ("--show-hidden-metrics-for-version",): refused(METRICS),
    ("--otlp-traces-endpoint",): refused("not supported: use --log-format json (request ids on every line) and "
                                         "/metrics"),
    ("--collect-detailed-traces",): refused("not supported: use --log-format json (request ids on every line) and "
                                            "/metrics"),
    ("--per-request-spec-decode-metrics",): refused(METRICS),
    ("--kv-cache-metrics", "--no-kv-cache-metrics"): refused(METRICS),
    ("--kv-cache-metrics-sample",): refused(METRICS),
    ("--custom-histogram-buckets",): refused(METRICS),
    ("--cudagraph-metrics", "--no-cudagraph-metrics"): refused(METRICS),
    ("--enable-layerwise-nvtx-tracing", "--disable-layerwise-nvtx-tracing"): refused(
        "profile with benchmarks/ (docs/benchmarks.md): leave it out"),
    ("--enable-mfu-metrics", "--disable-mfu-metrics"): refused(METRICS),
    ("--enable-logging-iteration-details", "--disable-logging-iteration-details"): refused(METRICS),
    ("--jit-monitor-mode",): refused("moelink compiles its kernels at warm-up (--skip-warmup: at first use)"),
    ("--jit-monitor-verbose", "--no-jit-monitor-verbose"): refused(
        "moelink compiles its kernels at warm-up (--skip-warmup: at first use)"),
    # -- the scheduler ---------------------------------------------------------------------------------------
    ("--max-num-batched-tokens",): accepted("token budget of a step (prefill chunk size; k/m/g/K/M/G as vLLM "
                                            "reads them)", "--max-num-batched-tokens 4096"),
    ("--max-num-scheduled-tokens",): refused("a step schedules at most --max-num-batched-tokens"),
    ("--max-num-seqs",): accepted("most sequences running at once per rank", "--max-num-seqs 64"),
    ("--max-num-active-seqs",): refused("--max-num-seqs bounds the running sequences"),
    ("--max-num-queued-reqs",): refused("moelink bounds what waits, not what runs: --max-queued-requests (sequences "
                                        "waiting for their first token) and --max-num-seqs (running)"),
    ("--max-num-queued-tokens",): mapped("--max-queued-tokens 8192", "refuse a request beyond this many prompt "
                                                                     "tokens waiting for their first token",
                                         "--max-num-queued-tokens 8192"),
    ("--long-prefill-token-threshold",): refused(SCHEDULER),
    ("--long-prefill-token-threshold-adaptive", "--no-long-prefill-token-threshold-adaptive"): refused(SCHEDULER),
    ("--scheduling-policy",): refused("moelink serves first come, first served, shared fairly among clients: "
                                      "--client-fairness / --no-client-fairness"),
    ("--enable-chunked-prefill",): accepted("accepted: prompts longer than --max-num-batched-tokens are always "
                                            "chunked"),
    ("--disable-chunked-prefill",): refused("moelink always chunks prompts longer than --max-num-batched-tokens; set "
                                            "--max-num-batched-tokens to --max-model-len to prefill prompts whole"),
    ("--disable-chunked-mm-input", "--enable-chunked-mm-input"): refused(TEXT),
    ("--scheduler-cls",): refused(SCHEDULER),
    ("--scheduler-reserve-full-isl", "--no-scheduler-reserve-full-isl"): refused(SCHEDULER),
    ("--watermark",): refused(SCHEDULER),
    ("--prefill-schedule-interval",): refused(SCHEDULER),
    ("--disable-hybrid-kv-cache-manager", "--enable-hybrid-kv-cache-manager"): refused(
        "moelink sizes a hybrid model's caches itself: leave it out"),
    ("--async-scheduling", "--no-async-scheduling"): accepted("overlap the host's work for the next step with the "
                                                              "device's step (default on)"),
    ("--stream-interval",): accepted("moelink streams each step's tokens as they are made", "--stream-interval 1",
                                     values=("1",)),
    # -- compilation, kernels, speculative decoding, other configs -------------------------------------------
    ("--cudagraph-capture-sizes",): mapped("--cuda-graph-sizes 1 2 4", "decode batch sizes captured in CUDA graphs",
                                           "--cudagraph-capture-sizes 1 2 4"),
    ("--max-cudagraph-capture-size",): refused("list the sizes: --cuda-graph-sizes N ..."),
    ("--ir-op-priority",): refused(KERNELS),
    ("--enable-flashinfer-autotune", "--disable-flashinfer-autotune"): refused(KERNELS),
    ("--monokernel", "--no-monokernel"): refused(KERNELS),
    ("--moe-backend",): refused(KERNELS),
    ("--linear-backend",): refused(KERNELS),
    ("--sparse-indexer-topk-backend",): refused(KERNELS),
    ("--speculative-config", "-sc"): accepted("speculative decoding, vLLM's JSON (ngram, mtp, eagle3, dspark; "
                                              "docs/speculative-decoding.md)",
                                              "--speculative-config '{\"method\": \"ngram\", "
                                              "\"num_speculative_tokens\": 3}'"),
    ("--spec-method",): mapped("--speculative-config '{\"method\": \"ngram\", \"num_speculative_tokens\": 3}'",
                               "speculative_config.method", "--spec-method ngram --spec-tokens 3"),
    ("--spec-model",): mapped("--speculative-config '{\"method\": \"eagle3\", \"model\": \"/heads/e3\", "
                              "\"num_speculative_tokens\": 3}'", "speculative_config.model (an EAGLE-3 head, a DSpark draft)",
                              "--spec-method eagle3 --spec-model /heads/e3 --spec-tokens 3"),
    ("--spec-tokens",): mapped("--speculative-config '{\"method\": \"mtp\", \"num_speculative_tokens\": 2}'",
                               "speculative_config.num_speculative_tokens", "--spec-method mtp --spec-tokens 2"),
    ("--watermark-config",): refused(NOT_SUPPORTED),
    ("--diffusion-config", "-dc"): refused("moelink runs autoregressive models only: leave it out"),
    ("--kv-transfer-config",): accepted("prefill/decode disaggregation or the KV offload tier as vLLM spells them "
                                        "(connectors below)", "--kv-transfer-config '{\"kv_connector\": "
                                        "\"NixlConnector\", \"kv_role\": \"kv_both\"}'"),
    ("--kv-events-config",): refused("moelink publishes no KV cache events: the OpenAI HTTP gateway's "
                                     "cache-aware routing routes by prefix without them (docs/serving.md)"),
    ("--ec-transfer-config",): refused(TEXT),
    ("--ec-manager-config",): refused(TEXT),
    ("--compilation-config", "-cc"): refused("moelink runs its own Triton kernels: --enforce-eager / "
                                             "--cuda-graph-sizes"),
    ("--attention-config", "-ac"): refused(KERNELS),
    ("--engram-config",): refused(NOT_SUPPORTED),
    ("--reasoning-config",): refused("the managed gateway splits reasoning out: --reasoning-parser NAME"),
    ("--kernel-config",): refused(KERNELS),
    ("--additional-config",): refused(NOT_SUPPORTED),
    ("--structured-outputs-config",): refused("moelink compiles grammars with xgrammar: bound it with "
                                              "--grammar-compile-timeout / --grammar-compile-workers"),
    ("--aux-output-config",): refused(NOT_SUPPORTED),
    ("--profiler-config",): refused("profile with benchmarks/ (docs/benchmarks.md): leave it out"),
    ("--watchdog-config",): refused("moelink bounds a hung step with --step-timeout and a silent rank with "
                                    "--heartbeat-timeout"),
    ("--optimization-level",): refused("moelink runs its own Triton kernels: --enforce-eager / --cuda-graph-sizes "
                                       "/ --skip-warmup"),
    ("--performance-mode",): refused("moelink has one mode: tune --max-num-seqs / --max-num-batched-tokens"),
    ("--weight-transfer-config",): refused(NOT_SUPPORTED),
    ("--disable-log-stats",): accepted("accepted: moelink logs no periodic statistics (they are on /metrics)"),
    ("--aggregate-engine-logging",): refused("moelink logs no periodic statistics: /metrics holds them"),
    ("--fail-on-environ-validation", "--no-fail-on-environ-validation"): refused(NOT_SUPPORTED),
    ("--shutdown-timeout",): mapped("--shutdown-grace 10", "seconds in-flight requests get to finish after SIGTERM "
                                                           "(0: abort them at once)", "--shutdown-timeout 10"),
    ("--gdn-prefill-backend",): refused(KERNELS),
    ("--kda-prefill-backend",): refused(KERNELS),
    ("--kda-decode-backend",): refused(KERNELS),
    ("--enable-log-requests",): accepted("accepted (moelink's default): a 'request admitted' and a 'request "
                                         "finished' line per request"),
    ("--disable-log-requests",): accepted("no 'request admitted' / 'request finished' log lines"),
}

# Flags of earlier vLLM releases that 0.33.0 no longer lists, which launch scripts still carry.
EARLIER_VLLM_FLAGS: dict[tuple[str, ...], VllmFlag] = {
    ("--swap-space",): refused("moelink preempts by recompute and never swaps a running request's KV to the CPU; a "
                               "host tier for the prefix cache is --kv-offload-host-bytes"),
    ("--no-enable-prefix-caching",): accepted("prefix caching off (moelink's own flag too)"),
    ("--no-enable-chunked-prefill",): refused("moelink always chunks prompts longer than --max-num-batched-tokens; "
                                              "set --max-num-batched-tokens to --max-model-len to prefill prompts "
                                              "whole"),
    ("--cuda-graph-sizes",): accepted("decode batch sizes captured (moelink's own flag too)",
                                      "--cuda-graph-sizes 1 2 4"),
    ("--max-seq-len-to-capture",): refused("use --cuda-graph-sizes (decode batch sizes captured)"),
    ("-O",): refused("moelink runs its own Triton kernels: --enforce-eager / --cuda-graph-sizes"),
    ("--guided-decoding-backend",): refused("moelink compiles grammars with xgrammar: bound it with "
                                            "--grammar-compile-timeout / --grammar-compile-workers"),
    ("--speculative-model", "--num-speculative-tokens"): refused("use --speculative-config JSON, as vLLM now "
                                                                 "spells it"),
    ("--preemption-mode",): refused("moelink preempts by recompute only: leave it out"),
    ("--rope-scaling", "--rope-theta"): refused(CONFIG_JSON),
    ("--max-num-partial-prefills",): refused("prefill chunks are bounded by --max-num-batched-tokens"),
    ("--pt-load-timeout",): refused("moelink reads safetensors only: leave it out"),
    ("--load-format-options",): refused("moelink reads config.json: leave it out"),
}

ALL_FLAGS: dict[tuple[str, ...], VllmFlag] = {**VLLM_SERVE_FLAGS, **EARLIER_VLLM_FLAGS}
# spelling -> its row's key
SPELLINGS: dict[str, tuple[str, ...]] = {s: key for key in ALL_FLAGS for s in key}


def row(spelling: str) -> VllmFlag:
    """The row of a flag as vLLM spells it (KeyError: not in the table)."""
    return ALL_FLAGS[SPELLINGS[spelling]]


def markdown_table(flags: dict[tuple[str, ...], VllmFlag]) -> str:
    """The docs' table of `flags`: the flag's spellings, how moelink takes it, what it does or what to use."""
    lines = ["| vLLM flag | moelink | what it does here, or what to use |", "|---|---|---|"]
    for key, f in flags.items():
        if f.kind == "mapped":
            how = f"mapped: `{f.example or key[0]}` = `{f.same_as}`"
        elif f.values:
            how = "accepted: " + ", ".join(f"`{v}`" for v in f.values)
        else:
            how = f.kind
        lines.append(f"| {' '.join(f'`{s}`' for s in key)} | {how.replace('|', '&#124;')} | "
                     f"{f.says.replace('|', '&#124;')} |")
    return "\n".join(lines)
