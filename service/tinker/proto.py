"""Tinker wire codecs the SDK leaves to the server: its forward_backward request and protobuf results.

It decodes the protobuf forward_backward request and encodes the ForwardBackwardOutput and SampleResponse
protobufs the SDK asks for (`Accept: application/x-protobuf`).

The message classes are the `tinker` package's own (`tinker.proto.tinker_public_pb2`).
"""

from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb
from tinker.types.topk_logprobs import MASK_LOGPROB

from util.errors import InvalidInputError

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


def _tensor(msg: Any, name: str) -> list[float]:
    """A proto Tensor as a flat list (dense or sparse CSR, densified with zeros)."""
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None:
        raise InvalidInputError(f"loss_fn_inputs['{name}'] has an unsupported dtype ({msg.dtype}).")
    shape = list(msg.shape)
    if msg.HasField("sparse_csr"):
        if len(shape) != 2:
            raise InvalidInputError(f"loss_fn_inputs['{name}'] is sparse but not 2-D.")
        values = np.frombuffer(msg.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        dense = np.zeros(shape, dtype=dtype)
        for r in range(shape[0]):
            dense[r, col[crow[r] : crow[r + 1]]] = values[crow[r] : crow[r + 1]]
        array = dense
    else:
        array = np.frombuffer(msg.dense, dtype=dtype)
        if shape and int(np.prod(shape)) != array.size:
            raise InvalidInputError(f"loss_fn_inputs['{name}'] has {array.size} values but shape {shape}.")
        if len(shape) > 1:
            raise InvalidInputError(f"loss_fn_inputs['{name}'] must be 1-D (one value per token), got shape {shape}.")
    return array.reshape(-1).tolist()


def decode_forward_backward(body: bytes) -> dict[str, Any]:
    """The SDK's protobuf ForwardBackwardRequest as plain data: model_id, loss_fn, config, forward_only, data."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidInputError(f"The forward_backward body is not a valid protobuf message: {exc}") from exc
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        config[key] = value.text if value.WhichOneof("value") == "text" else float(value.number)
    data = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise InvalidInputError(f"data[{i}]: only token (encoded_text) chunks are supported, not images.")
            tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
        inputs = {name: _tensor(t, name) for name, t in datum.loss_fn_inputs.items()}
        data.append({"tokens": tokens, "inputs": inputs})
    return {
        "model_id": msg.model_id,
        "seq_id": msg.seq_id,
        "loss_fn": msg.loss_fn,
        "config": config,
        "forward_only": msg.forward_only,
        "data": data,
    }


def _batched(values: list[list[float]], dtype: Any, proto_dtype: int) -> Any:
    """Per-datum 1-D arrays as one BatchedTensor (concatenated bytes plus byte offsets)."""
    arrays = [np.asarray(v, dtype=dtype) for v in values]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    for i, a in enumerate(arrays):
        offsets[i + 1] = offsets[i] + a.nbytes
    data = b"".join(a.tobytes() for a in arrays)
    return pb.BatchedTensor(data=data, offsets=offsets.tobytes(), dtype=proto_dtype)


def encode_forward_backward_output(result: dict[str, Any]) -> bytes:
    """A worker's loss_step result as the ForwardBackwardOutput protobuf (one ArrayRecord of every datum)."""
    outputs = result["outputs"]
    fields = {}
    if outputs:
        for name in outputs[0]:
            fields[name] = _batched([o[name] for o in outputs], np.float32, pb.DTYPE_FLOAT32)
    record = pb.ArrayRecord(type_tag="ArrayRecord", fields=fields, num_datums=len(outputs))
    msg = pb.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[record] if outputs else [],
        metrics={k: float(v) for k, v in result.get("metrics", {}).items()},
    )
    return msg.SerializeToString()


def _topk(rows: list[list[list[float]] | None], k: int) -> Any:
    """Top-k rows (None rows masked with the SDK's sentinel) as a TopkLogprobs message."""
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), MASK_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (tok, lp) in enumerate(row or []):
            ids[i, j], lps[i, j] = int(tok), float(lp)
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=len(rows))


def encode_sample_response(result: dict[str, Any], topk: int) -> bytes:
    """A worker's sample_tokens result as the SampleResponse protobuf."""
    sequences = [
        pb.SampledSequence(
            stop_reason=pb.STOP_REASON_STOP if s["stop_reason"] == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(s["tokens"], dtype=np.int32).tobytes(),
            logprobs=np.asarray(s["logprobs"], dtype=np.float32).tobytes(),
        )
        for s in result["sequences"]
    ]
    msg = pb.SampleResponse(sequences=sequences)
    if result.get("prompt_logprobs") is not None:
        values = [np.nan if v is None else v for v in result["prompt_logprobs"]]
        msg.prompt_logprobs = np.asarray(values, dtype=np.float32).tobytes()
    if topk and result.get("topk_prompt_logprobs") is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk(result["topk_prompt_logprobs"], topk))
    return msg.SerializeToString()
