"""Frontend processes beside one engine process (`--frontends N`, N >= 1).

    clients ──gRPC/HTTP──▶ frontend 0..N-1 ──Unix socket + shared-memory slots──▶ engine ──▶ batcher ─▶ backend
                           (share the ports: SO_REUSEPORT)                          (one per machine's GPU)

The GIL of one process serializes gRPC, protobuf, validation, decoding and the batcher, which capped one process near
1,000-1,500 requests/s whatever the GPU. So the per-request work runs in N frontend processes, each a full server
(service/server.py) whose models are a mirror of the engine's (remote_models.py), and one engine process
(engine.py) owns the models' batchers, backends, CUDA graphs and staging buffers, and batches across all frontends.
A supervisor (supervisor.py) starts them, restarts any that dies, and drains them in order at SIGTERM: frontends
first (their in-flight requests still reach the engine), then the engine.

Tensors cross in shared memory (slots.py): each frontend owns a file of fixed-size slots; a request's tensor is
written into a free slot, the engine computes on a view of it (no copy, no pickling) and writes the logits back into
the same slot. Only headers cross the socket (messages.py). A tensor larger than a slot travels inline on the socket.
"""
