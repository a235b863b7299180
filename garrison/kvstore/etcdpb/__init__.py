"""etcd's v3 API messages (the KV, Watch, Lease, Maintenance.Status and Auth.Authenticate
parts), generated.

`rpc.proto` and `kv.proto` are etcd 3.4's definitions without their gogoproto and gateway
options; `*_pb2.py` and `*_pb2.pyi` are what grpcio-tools' protoc makes of them. Regenerate
after editing a `.proto` (a unit test fails when the committed files differ):

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \\
        garrison/kvstore/etcdpb/kv.proto garrison/kvstore/etcdpb/rpc.proto
"""
