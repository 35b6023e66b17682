"""KServe v2 / Open Inference Protocol over HTTP/REST, with Triton's binary tensor extension (aiohttp, on the event
loop grpc.aio runs on): a thin translation from HTTP and JSON to the gRPC servicer's messages, and back."""
