"""Schemathesis hooks for test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

The Tinker routes /api/v1/forward and /api/v1/forward_backward read a protobuf body (application/x-protobuf,
documented as binary): send the bytes schemathesis generates for it as they are.
"""

import schemathesis

schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")
