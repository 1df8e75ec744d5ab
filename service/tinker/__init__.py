"""The Tinker wire protocol over the run service: request handling (api) and its protobuf codecs (proto)."""
