"""Generated protobuf/gRPC stubs of engine/server/protos (python -m moelink.engine.server.protogen). Do not edit."""
